//! Atoll's trainer: Gemma 3 / Gemma 4 text models in tch, Hugging Face checkpoints, data
//! (corpus, tokenizer, packing), recipes and the single-learner training loop.

pub mod checkpoint;
pub mod config;
pub mod models;
pub mod presets;

pub use config::{Architecture, GemmaConfig};
pub use models::GemmaModel;
