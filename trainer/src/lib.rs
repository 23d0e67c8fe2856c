//! Atoll's trainer: Gemma 3 / Gemma 4 text models in tch, Hugging Face checkpoints, data
//! (corpus, tokenizer, packing), recipes and the single-learner training loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod drafter;
pub mod finetune;
pub mod logging;
pub mod models;
pub mod optim;
pub mod presets;
/// The recipe schema lives in its own crate (atoll-recipe) so the node, link and store sides can
/// read it without the trainer; `atoll_trainer::recipe` and `crate::recipe` name it here.
pub use atoll_recipe as recipe;
pub mod sharded;
pub mod simulate;
pub mod train;
pub mod worker;

pub use config::{Architecture, GemmaConfig};
pub use models::GemmaModel;
