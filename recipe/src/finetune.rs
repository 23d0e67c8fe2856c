//! The fine-tuning sections of a recipe: `lora:` (the adapters) and `finetune:` (instruction data
//! and the memory switches). `atoll finetune` requires `model.init_from` and `finetune.data`.

use crate::{OpenFraction, PositiveF64, PositiveInt};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// PEFT's default `target_modules` for Gemma-style decoders: every attention and MLP projection.
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Adapter rank.
    #[serde(default = "defaults::r")]
    pub r: PositiveInt,
    /// The update is scaled by alpha / r (alpha / sqrt(r) with `rslora`).
    #[serde(default = "defaults::alpha")]
    pub alpha: PositiveF64,
    /// Dropout on the adapter input while training, in [0, 1).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub rslora: bool,
    /// Linear layers to adapt, as PEFT's `target_modules`: `q_proj` selects every layer's q_proj.
    #[serde(default = "defaults::targets")]
    pub targets: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        serde_yaml::from_value(serde_yaml::Value::Mapping(Default::default()))
            .expect("every field has a default")
    }
}

impl LoraSection {
    /// Checks what serde cannot: the dropout range and a non-empty target list.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..1.0).contains(&self.dropout) {
            anyhow::bail!(
                "lora.dropout: expected a number in [0, 1), got {}",
                self.dropout
            );
        }
        if self.targets.is_empty() {
            anyhow::bail!("lora.targets: name at least one module, e.g. [q_proj, v_proj]");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    /// A JSONL file: one `{"messages": [{"role", "content"}, ...]}` (chat; loss on assistant
    /// turns only) or `{"text": ...}` (loss on every token) per line.
    pub data: PathBuf,
    /// Share of the examples held out for evaluation.
    #[serde(default = "defaults::eval_fraction")]
    pub eval_fraction: OpenFraction,
    /// Per-layer activation checkpointing: keep one hidden state per layer and recompute each
    /// layer in the backward pass (about a third more compute, activations of one layer).
    #[serde(default)]
    pub checkpointing: bool,
    /// Start from this PEFT adapter directory instead of fresh adapters (its rank, alpha and
    /// targets replace the `lora:` section).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

mod defaults {
    use super::*;
    pub fn r() -> PositiveInt {
        PositiveInt(16)
    }
    pub fn alpha() -> PositiveF64 {
        PositiveF64(32.0)
    }
    pub fn targets() -> Vec<String> {
        DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()
    }
    pub fn eval_fraction() -> OpenFraction {
        OpenFraction(0.1)
    }
}
