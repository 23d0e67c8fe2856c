//! `checkpoint`: where and how often checkpoints are written (read by atoll-store's writer).

use crate::field_defaults;
use crate::value::{PositiveF64, PositiveInt};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where and how often checkpoints are written (see docs/checkpoint.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// A directory, `file://`, `s3://bucket/prefix`, `gs://…` or `az://…`; default
    /// `<run dir>/checkpoints`.
    #[serde(default)]
    pub url: Option<String>,
    /// Write a checkpoint every this many steps (0: only `--resume`-able at the end, never
    /// during the run).
    #[serde(default)]
    pub every: usize,
    /// Keep the newest this many checkpoints...
    #[serde(default = "defaults::keep_last")]
    pub keep_last: PositiveInt,
    /// ...and every checkpoint whose step is a multiple of this.
    #[serde(default)]
    pub keep_every: Option<PositiveInt>,
    /// Files above this go up as multipart uploads in parts of this size (S3 minimum: 5).
    #[serde(default = "defaults::part_size_mib")]
    pub part_size_mib: PositiveInt,
    /// Files and parts uploaded at once.
    #[serde(default = "defaults::upload_concurrency")]
    pub upload_concurrency: PositiveInt,
    /// A failing request is retried with backoff for this long before the checkpoint is given
    /// up (the previous ones stay intact).
    #[serde(default = "defaults::retry_timeout_s")]
    pub retry_timeout_s: PositiveF64,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        field_defaults()
    }
}

impl CheckpointSection {
    pub fn store_options(&self) -> atoll_store::StoreOptions {
        atoll_store::StoreOptions {
            part_size: self.part_size_mib.0 << 20,
            concurrency: self.upload_concurrency.0,
            retry_timeout: std::time::Duration::from_secs_f64(self.retry_timeout_s.0),
            ..atoll_store::StoreOptions::default()
        }
    }

    /// The checkpoint location of a run in `run_dir`.
    pub fn location(&self, run_dir: &Path) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| run_dir.join("checkpoints").display().to_string())
    }
}

mod defaults {
    use super::*;
    pub fn keep_last() -> PositiveInt {
        PositiveInt(3)
    }
    pub fn part_size_mib() -> PositiveInt {
        PositiveInt(16)
    }
    pub fn upload_concurrency() -> PositiveInt {
        PositiveInt(8)
    }
    pub fn retry_timeout_s() -> PositiveF64 {
        PositiveF64(180.0)
    }
}
