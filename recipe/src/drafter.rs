//! The `model.drafter` recipe section: train a Gemma 4 MTP drafter against the frozen base model
//! of `model.init_from` (see docs/drafter.md).

use crate::PositiveInt;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrafterSection {
    /// A drafter checkpoint (the Hugging Face assistant layout) to continue from; absent: a fresh
    /// drafter of the shape below, seeded by the recipe seed.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: PositiveInt,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: PositiveInt,
    /// Decoder layers: all sliding but the last, which is full (the 12B drafter: 3 + 1).
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: PositiveInt,
    /// Query heads; absent: the base model's.
    #[serde(default)]
    pub num_attention_heads: Option<PositiveInt>,
    /// Tokens drafted per round: the horizon of the training loss (the next k tokens) and what
    /// `atoll eval drafter` and transformers' assisted generation draft.
    #[serde(default = "defaults::num_assistant_tokens")]
    pub num_assistant_tokens: PositiveInt,
}

mod defaults {
    use super::PositiveInt;
    pub fn hidden_size() -> PositiveInt {
        PositiveInt(64)
    }
    pub fn intermediate_size() -> PositiveInt {
        PositiveInt(256)
    }
    pub fn num_hidden_layers() -> PositiveInt {
        PositiveInt(2)
    }
    pub fn num_assistant_tokens() -> PositiveInt {
        PositiveInt(4)
    }
}
