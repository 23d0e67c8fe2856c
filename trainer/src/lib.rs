//! Atoll's trainer: Gemma 3 / Gemma 4 text models in tch, Hugging Face checkpoints, data
//! (corpus, tokenizer, packing), recipes and the single-learner training loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod drafter;
pub mod logging;
pub mod models;
pub mod optim;
pub mod presets;
pub mod recipe;
pub mod recipe_drafter;
pub mod simulate;
pub mod train;
pub mod worker;

pub use config::{Architecture, GemmaConfig};
pub use models::GemmaModel;
