//! `model`: which model a run trains.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    #[default]
    F32,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A built-in configuration (`atoll model presets`); its vocab_size follows the tokenizer.
    #[serde(default)]
    pub preset: Option<String>,
    /// A Hugging Face checkpoint directory to start from (fine-tuning / continued pretraining).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    #[serde(default)]
    pub dtype: ParamDtype,
    /// Train a Gemma 4 MTP drafter against the frozen `init_from` model instead of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drafter: Option<crate::drafter::DrafterSection>,
}

/// The built-in model configurations (`atoll model presets`), listed here so that a recipe naming
/// another fails when it is read; their shapes live in the trainer's `presets` module.
pub const PRESET_NAMES: &[&str] = &[
    "gemma3-12b",
    "gemma4-12b",
    "gemma3-27b",
    "gemma3-tiny",
    "gemma4-tiny",
    "gemma3-bench",
];

/// The error for a preset name that is not built in.
pub fn unknown_preset(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "unknown model preset `{name}` (available: {})",
        PRESET_NAMES.join(", ")
    )
}
