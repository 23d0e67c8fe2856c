//! `data`: the corpus, the tokenizer, sequence length and how windows are shared out.

use crate::value::{OpenFraction, PositiveInt};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// A `tokenizer.json` to load; when absent a byte-level BPE is trained on the training split.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: PositiveInt,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        TokenizerSection {
            path: None,
            vocab_size: defaults::vocab_size(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    #[serde(default = "defaults::corpus")]
    pub corpus: String,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    #[serde(default = "defaults::seq_len")]
    pub seq_len: PositiveInt,
    #[serde(default = "defaults::eval_fraction")]
    pub eval_fraction: OpenFraction,
    #[serde(default)]
    pub sharding: Sharding,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            corpus: defaults::corpus(),
            tokenizer: TokenizerSection::default(),
            seq_len: defaults::seq_len(),
            eval_fraction: defaults::eval_fraction(),
            sharding: Sharding::default(),
        }
    }
}

/// How the training windows are divided among a job's learners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Learner i of M trains on the windows w with w mod M = i, as regions with their own data do.
    #[default]
    Disjoint,
    /// Every learner draws from all windows, in its own shuffled order: on a small corpus that a
    /// job passes over many times, a faster learner then does not repeat its share more often
    /// than a slower one repeats its own.
    Shared,
}

mod defaults {
    use super::*;
    pub fn vocab_size() -> PositiveInt {
        PositiveInt(4096)
    }
    pub fn corpus() -> String {
        "builtin:tinyshakespeare".into()
    }
    pub fn seq_len() -> PositiveInt {
        PositiveInt(128)
    }
    pub fn eval_fraction() -> OpenFraction {
        OpenFraction(0.05)
    }
}
