//! `sync`: how the learners of a job synchronise (the mode, M/P/H/τ/K, the outer step, codecs,
//! how merges are applied), the failures the simulator injects, regions and emulated WAN links.

use crate::field_defaults;
use crate::link::LinkSection;
use crate::value::{Count, Fraction, NonNegativeF64, PositiveF64, PositiveInt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Gradients averaged every step (data parallel).
    Ddp,
    /// Classic DiLoCo: every H steps all learners stop and sync the whole model.
    Diloco,
    /// Streaming DiLoCo: fragments with overlap, all learners per round, α-mixing.
    Streaming,
    /// Decoupled DiLoCo: quorum, grace window, never-blocking learners.
    #[default]
    Decoupled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CodecChoice {
    F32,
    Bf16,
    Int8,
    #[default]
    E3m0,
    Int2,
}

impl CodecChoice {
    pub fn codec(self) -> atoll_wire::Codec {
        match self {
            CodecChoice::F32 => atoll_wire::Codec::F32,
            CodecChoice::Bf16 => atoll_wire::Codec::Bf16,
            CodecChoice::Int8 => atoll_wire::Codec::Int8,
            CodecChoice::E3m0 => atoll_wire::Codec::E3M0,
            CodecChoice::Int2 => atoll_wire::Codec::Int2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApplyChoice {
    #[default]
    Overwrite,
    Rebase,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureSection {
    /// Mean time between failures of one learner, in simulated seconds; absent: no failures.
    #[serde(default)]
    pub mtbf_s: Option<PositiveF64>,
    #[serde(default = "defaults::recovery_s")]
    pub recovery_s: NonNegativeF64,
}

impl Default for FailureSection {
    fn default() -> Self {
        field_defaults()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    #[serde(default)]
    pub mode: SyncMode,
    /// M: learners (regions).
    #[serde(default = "defaults::learners")]
    pub learners: PositiveInt,
    /// P: fragments (the embedding gets one of its own when P ≥ 2).
    #[serde(default = "defaults::fragments")]
    pub fragments: PositiveInt,
    /// H: inner steps between two syncs of the same fragment.
    #[serde(default = "defaults::h")]
    pub h: PositiveInt,
    /// τ: steps a learner keeps training while a fragment is in flight.
    #[serde(default = "defaults::tau")]
    pub tau: Count,
    /// K: learners needed before a fragment round may close.
    #[serde(default = "defaults::quorum")]
    pub quorum: PositiveInt,
    #[serde(default = "defaults::grace_gamma")]
    pub grace_gamma: NonNegativeF64,
    /// A learner left out of this many rounds of a fragment in a row is waited for in the next
    /// one (up to two of its steps beyond the grace window); 0: never.
    #[serde(default = "defaults::max_skipped_rounds")]
    pub max_skipped_rounds: Count,
    #[serde(default = "defaults::outer_lr")]
    pub outer_lr: PositiveF64,
    #[serde(default = "defaults::outer_momentum")]
    pub outer_momentum: Fraction,
    #[serde(default)]
    pub merge: atoll_coordinator::MergeRule,
    /// The job's last round, once every learner has stopped: `average` (Θ becomes the learners'
    /// plain average, every learner once) or `outer` (the usual merge and Nesterov step).
    #[serde(default)]
    pub final_step: atoll_coordinator::FinalStep,
    /// Codec of the outer gradients sent up.
    #[serde(default)]
    pub codec: CodecChoice,
    /// Codec of the outer updates broadcast down; absent: the same as `codec`.
    #[serde(default)]
    pub down_codec: Option<CodecChoice>,
    /// zstd level on top of the codec (0: off).
    #[serde(default)]
    pub zstd_level: i32,
    /// Learners carry what the up-link codec rounded away into their next contribution.
    #[serde(default)]
    pub error_feedback: bool,
    /// The syncer carries what the down-link codec rounded away into the fragment's next
    /// broadcast (no effect with an f32 down-link).
    #[serde(default)]
    pub down_error_feedback: bool,
    /// Streaming DiLoCo's α (θ ← α·θ_local + (1 − α)·Θ); absent: `apply` decides.
    #[serde(default)]
    pub mix_alpha: Option<Fraction>,
    /// How a learner applies a merged fragment: `overwrite` (the paper) or `rebase` (keep the
    /// steps taken since the pull on top of the new Θ).
    #[serde(default)]
    pub apply: ApplyChoice,
    /// Simulated compute time of one inner step at speed 1.
    #[serde(default = "defaults::step_time_s")]
    pub step_time_s: PositiveF64,
    /// Per-learner speed factors (1.0 = nominal); missing entries are 1.0.
    #[serde(default)]
    pub speeds: Vec<PositiveF64>,
    #[serde(default)]
    pub link: LinkSection,
    /// Emulated WAN links between each learner and the coordinator for `atoll run`, keyed by
    /// region name or `all`: `{rate: 2gbps, rtt: 40ms, jitter: 2ms, loss: 0.1%, queue: 4MB,
    /// outages: [{at: 120s, for: 30s}], seed: 1}` (parsed by atoll-link's emulator; see
    /// docs/wan.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wan: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub failures: FailureSection,
    /// Region names, one per learner (`atoll run` starts one learner per region); default
    /// region-0 … region-(M−1).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Network runs: a learner silent this long is marked absent until it reports again.
    #[serde(default = "defaults::heartbeat_timeout_s")]
    pub heartbeat_timeout_s: PositiveF64,
    /// The job secret learners present. Prefer `ATOLL_SECRET` or `--secret-file`: a recipe is
    /// copied into run directories.
    #[serde(default)]
    pub secret: Option<String>,
}

impl SyncSection {
    /// How learners apply a merged fragment: `mix_alpha` when set, else α = 0.5 in Streaming
    /// DiLoCo, else `apply`.
    pub fn apply_rule(&self) -> atoll_coordinator::ApplyRule {
        use atoll_coordinator::ApplyRule;
        match (self.mix_alpha, self.mode, self.apply) {
            (Some(a), _, _) => ApplyRule::Mix { alpha: a.0 as f32 },
            (None, SyncMode::Streaming, _) => ApplyRule::Mix { alpha: 0.5 },
            (None, _, ApplyChoice::Overwrite) => ApplyRule::Overwrite,
            (None, _, ApplyChoice::Rebase) => ApplyRule::Rebase,
        }
    }

    /// The regions of the job, one per learner.
    pub fn region_names(&self) -> Vec<String> {
        if self.regions.is_empty() {
            (0..self.learners.0)
                .map(|m| format!("region-{m}"))
                .collect()
        } else {
            self.regions.clone()
        }
    }
}

impl Default for SyncSection {
    fn default() -> Self {
        field_defaults()
    }
}

mod defaults {
    use super::*;
    pub fn recovery_s() -> NonNegativeF64 {
        NonNegativeF64(60.0)
    }
    pub fn heartbeat_timeout_s() -> PositiveF64 {
        PositiveF64(10.0)
    }
    pub fn learners() -> PositiveInt {
        PositiveInt(4)
    }
    pub fn fragments() -> PositiveInt {
        PositiveInt(4)
    }
    pub fn h() -> PositiveInt {
        PositiveInt(24)
    }
    pub fn tau() -> Count {
        Count(2)
    }
    pub fn quorum() -> PositiveInt {
        PositiveInt(1)
    }
    pub fn grace_gamma() -> NonNegativeF64 {
        NonNegativeF64(0.5)
    }
    pub fn outer_lr() -> PositiveF64 {
        PositiveF64(0.7)
    }
    /// DiLoCo's 0.9 was tuned for H = 500; with fragments synced every few dozen steps its
    /// look-ahead (an effective step of lr/(1 − μ) = 7 outer gradients) overshoots, and every
    /// measured recipe settled on 0.5 (benchmarks/README.md, tuning log).
    pub fn outer_momentum() -> Fraction {
        Fraction(0.5)
    }
    pub fn max_skipped_rounds() -> Count {
        Count(2)
    }
    pub fn step_time_s() -> PositiveF64 {
        PositiveF64(1.0)
    }
}
