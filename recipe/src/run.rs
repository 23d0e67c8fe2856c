//! `run`: where a run writes and what it keeps at the end.

use crate::field_defaults;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Run directory; default `runs/<recipe name>`. An existing non-empty directory is never
    /// overwritten: a numeric suffix is added instead.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Write the final weights as a Hugging Face checkpoint under `<run dir>/final`.
    #[serde(default = "defaults::yes")]
    pub save_final: bool,
}

impl Default for RunSection {
    fn default() -> Self {
        field_defaults()
    }
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
}
