//! Recipes: YAML files mapped to typed structs. Unknown fields are rejected, and every error names
//! the field path, the bad value and what is allowed, e.g.
//! `train.lr: expected a positive number, got "fast"`.
//! `--set path.to.field=value` overrides are applied to the YAML tree before it is typed, so they
//! are checked exactly like the file.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A YAML scalar of the wrong kind, rendered the way the user wrote it.
fn describe(unexp: de::Unexpected) -> String {
    match unexp {
        de::Unexpected::Str(s) => format!("{s:?}"),
        de::Unexpected::Float(f) => format!("{f}"),
        de::Unexpected::Signed(i) => format!("{i}"),
        de::Unexpected::Unsigned(u) => format!("{u}"),
        de::Unexpected::Bool(b) => format!("{b}"),
        de::Unexpected::Unit => "null".to_string(),
        other => other.to_string(),
    }
}

macro_rules! bounded_number {
    ($name:ident, $inner:ty, $expect:literal, |$v:ident| $ok:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_f64<E: de::Error>(self, x: f64) -> Result<$name, E> {
                        let as_inner = x as $inner;
                        if (as_inner as f64) != x {
                            return Err(E::custom(format!("expected {}, got {x}", $expect)));
                        }
                        let $v = as_inner;
                        if $ok {
                            Ok($name(as_inner))
                        } else {
                            Err(E::custom(format!("expected {}, got {x}", $expect)))
                        }
                    }
                    fn visit_i64<E: de::Error>(self, x: i64) -> Result<$name, E> {
                        self.visit_f64(x as f64)
                    }
                    fn visit_u64<E: de::Error>(self, x: u64) -> Result<$name, E> {
                        self.visit_f64(x as f64)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$name, E> {
                        Err(E::custom(format!(
                            "expected {}, got {}",
                            $expect,
                            describe(de::Unexpected::Str(s))
                        )))
                    }
                    fn visit_bool<E: de::Error>(self, b: bool) -> Result<$name, E> {
                        Err(E::custom(format!("expected {}, got {b}", $expect)))
                    }
                    fn visit_unit<E: de::Error>(self) -> Result<$name, E> {
                        Err(E::custom(format!("expected {}, got null", $expect)))
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

bounded_number!(PositiveF64, f64, "a positive number", |v| v > 0.0
    && v.is_finite());
bounded_number!(NonNegativeF64, f64, "a number >= 0", |v| v >= 0.0
    && v.is_finite());
bounded_number!(Fraction, f64, "a number in [0, 1)", |v| (0.0..1.0)
    .contains(&v));
bounded_number!(OpenFraction, f64, "a number in (0, 1)", |v| v > 0.0
    && v < 1.0);
bounded_number!(PositiveInt, usize, "a positive integer", |v| v > 0);
bounded_number!(Count, usize, "an integer >= 0", |v| v < usize::MAX);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    #[default]
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is visible, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda,
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
    pub drafter: Option<crate::recipe_drafter::DrafterSection>,
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "defaults::max_steps")]
    pub max_steps: PositiveInt,
    /// Sequences per micro-batch.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: PositiveInt,
    /// Micro-batches accumulated into one optimizer step.
    #[serde(default = "defaults::grad_accum")]
    pub grad_accum: PositiveInt,
    #[serde(default = "defaults::lr")]
    pub lr: PositiveF64,
    /// The cosine schedule decays to lr × min_lr_ratio at max_steps.
    #[serde(default = "defaults::min_lr_ratio")]
    pub min_lr_ratio: Fraction,
    #[serde(default = "defaults::warmup_steps")]
    pub warmup_steps: Count,
    #[serde(default = "defaults::betas")]
    pub betas: [Fraction; 2],
    #[serde(default = "defaults::eps")]
    pub eps: PositiveF64,
    /// Decoupled weight decay, applied to matrices only (not norms, scalars or biases).
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: NonNegativeF64,
    /// Max global gradient L2 norm; absent: no clipping.
    #[serde(default = "defaults::grad_clip")]
    pub grad_clip: Option<PositiveF64>,
    /// Evaluate every N steps (and after the last step); 0 disables periodic eval.
    #[serde(default = "defaults::eval_every")]
    pub eval_every: Count,
    #[serde(default = "defaults::eval_batches")]
    pub eval_batches: PositiveInt,
    #[serde(default)]
    pub device: DeviceChoice,
    /// CPU threads for libtorch; absent: all cores.
    #[serde(default)]
    pub threads: Option<PositiveInt>,
    /// Plain log line every N steps when stderr is not a terminal.
    #[serde(default = "defaults::log_every")]
    pub log_every: PositiveInt,
}

impl TrainSection {
    /// The learning rate at optimizer step `step` (from 0) of this section's schedule.
    pub fn lr_at(&self, step: usize) -> f64 {
        crate::optim::learning_rate(
            step,
            self.lr.0,
            self.warmup_steps.0,
            self.max_steps.0,
            self.min_lr_ratio.0,
        )
    }

    pub fn adamw(&self) -> crate::optim::AdamWConfig {
        crate::optim::AdamWConfig {
            beta1: self.betas[0].0,
            beta2: self.betas[1].0,
            eps: self.eps.0,
            weight_decay: self.weight_decay.0,
        }
    }

    pub fn clip(&self) -> Option<f64> {
        self.grad_clip.map(|c| c.0)
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        field_defaults()
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApplyChoice {
    #[default]
    Overwrite,
    Rebase,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSection {
    #[serde(default = "defaults::bandwidth_gbps")]
    pub bandwidth_gbps: PositiveF64,
    #[serde(default = "defaults::latency_ms")]
    pub latency_ms: NonNegativeF64,
    /// QUIC connections per learner, striped tensor by tensor, for links one connection (one
    /// core) cannot fill.
    #[serde(default = "defaults::connections")]
    pub connections: PositiveInt,
    #[serde(default)]
    pub congestion: CongestionChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CongestionChoice {
    #[default]
    Cubic,
    Bbr,
    /// Send at `bandwidth_gbps`, ignoring sparse loss: for dedicated inter-region links.
    Provisioned,
}

impl Default for LinkSection {
    fn default() -> Self {
        field_defaults()
    }
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
    #[serde(default)]
    pub error_feedback: bool,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub run: RunSection,
    /// Multi-learner synchronisation (`atoll simulate`, later `atoll run`).
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
}

/// A section with every field at its serde default: deserialising an empty mapping means the
/// `Default` impls and the `#[serde(default = ...)]` attributes cannot drift apart.
fn field_defaults<T: serde::de::DeserializeOwned>() -> T {
    serde_yaml::from_value(Value::Mapping(Mapping::new())).expect("every field has a default")
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
    pub fn max_steps() -> PositiveInt {
        PositiveInt(1000)
    }
    pub fn batch_size() -> PositiveInt {
        PositiveInt(8)
    }
    pub fn grad_accum() -> PositiveInt {
        PositiveInt(1)
    }
    pub fn lr() -> PositiveF64 {
        PositiveF64(3e-3)
    }
    pub fn min_lr_ratio() -> Fraction {
        Fraction(0.1)
    }
    pub fn warmup_steps() -> Count {
        Count(50)
    }
    pub fn betas() -> [Fraction; 2] {
        [Fraction(0.9), Fraction(0.95)]
    }
    pub fn eps() -> PositiveF64 {
        PositiveF64(1e-8)
    }
    pub fn weight_decay() -> NonNegativeF64 {
        NonNegativeF64(0.1)
    }
    pub fn grad_clip() -> Option<PositiveF64> {
        Some(PositiveF64(1.0))
    }
    pub fn eval_every() -> Count {
        Count(100)
    }
    pub fn eval_batches() -> PositiveInt {
        PositiveInt(8)
    }
    pub fn log_every() -> PositiveInt {
        PositiveInt(10)
    }
    pub fn seed() -> u64 {
        1234
    }
    pub fn yes() -> bool {
        true
    }
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
    pub fn bandwidth_gbps() -> PositiveF64 {
        PositiveF64(2.0)
    }
    pub fn latency_ms() -> NonNegativeF64 {
        NonNegativeF64(20.0)
    }
    pub fn connections() -> PositiveInt {
        PositiveInt(1)
    }
    pub fn heartbeat_timeout_s() -> PositiveF64 {
        PositiveF64(10.0)
    }
    pub fn recovery_s() -> NonNegativeF64 {
        NonNegativeF64(60.0)
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
    pub fn outer_momentum() -> Fraction {
        Fraction(0.9)
    }
    pub fn step_time_s() -> PositiveF64 {
        PositiveF64(1.0)
    }
}

/// Applies one `path.to.field=value` override; the value is parsed as YAML (`3e-4`, `true`,
/// `[0.9, 0.99]`, `gemma3-tiny`).
pub fn apply_override(tree: &mut Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {assignment}: expected path.to.field=value"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        bail!("--set {assignment}: `{path}` is not a field path like train.lr");
    }
    let value: Value = serde_yaml::from_str(raw)
        .with_context(|| format!("--set {assignment}: cannot parse value `{raw}`"))?;
    let mut node = tree;
    let mut walked = Vec::new();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        walked.push(*part);
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            bail!(
                "--set {assignment}: `{}` is a value, not a section",
                walked[..walked.len() - 1].join(".")
            );
        };
        let key = Value::String(part.to_string());
        if i == parts.len() - 1 {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Null);
    }
    unreachable!("the path has at least one part")
}

impl Recipe {
    /// Parses recipe YAML text, applies `--set` overrides, and types it.
    pub fn from_yaml(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let mut tree: Value =
            serde_yaml::from_str(text).map_err(|e| anyhow!("{origin}: invalid YAML: {e}"))?;
        if tree.is_null() {
            tree = Value::Mapping(Mapping::new());
        }
        if !tree.is_mapping() {
            bail!(
                "{origin}: a recipe must be a YAML mapping of sections (model, data, train, run)"
            );
        }
        for o in overrides {
            apply_override(&mut tree, o)?;
        }
        let recipe: Recipe = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                anyhow!("{origin}: {inner}")
            } else {
                anyhow!("{origin}: {path}: {inner}")
            }
        })?;
        recipe.validate().map_err(|e| anyhow!("{origin}: {e}"))?;
        Ok(recipe)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let mut recipe = Self::from_yaml(&text, &path.display().to_string(), overrides)?;
        if recipe.name.is_none() {
            recipe.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(recipe)
    }

    fn validate(&self) -> Result<()> {
        match (&self.model.preset, &self.model.init_from) {
            (None, None) => bail!("model: set either model.preset (e.g. gemma3-tiny) or model.init_from (a checkpoint directory)"),
            (Some(_), Some(_)) => bail!("model: model.preset and model.init_from are mutually exclusive"),
            _ => {}
        }
        if self.sync.quorum.0 > self.sync.learners.0 {
            bail!(
                "sync.quorum: expected at most sync.learners ({}), got {}",
                self.sync.learners.0,
                self.sync.quorum.0
            );
        }
        let regions = self.sync.region_names();
        for key in self.sync.wan.keys() {
            if key != "all" && !regions.contains(key) {
                bail!(
                    "sync.wan.{key}: not a region of this job (regions: {}; or `all`)",
                    regions.join(", ")
                );
            }
        }
        if !self.sync.regions.is_empty() {
            if self.sync.regions.len() != self.sync.learners.0 {
                bail!(
                    "sync.regions: {} regions named for sync.learners = {}; name one per learner",
                    self.sync.regions.len(),
                    self.sync.learners.0
                );
            }
            let mut seen = std::collections::BTreeSet::new();
            for r in &self.sync.regions {
                let valid = !r.is_empty()
                    && r.len() <= 64
                    && r.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !valid {
                    bail!("sync.regions: {r:?} is not a valid region name (letters, digits, '-', '_'; at most 64)");
                }
                if !seen.insert(r) {
                    bail!("sync.regions: region {r:?} is listed twice");
                }
            }
        }
        if self.sync.speeds.len() > self.sync.learners.0 {
            bail!(
                "sync.speeds: {} speeds given for {} learners",
                self.sync.speeds.len(),
                self.sync.learners.0
            );
        }
        if !(0..=22).contains(&self.sync.zstd_level) {
            bail!(
                "sync.zstd_level: expected 0 (off) to 22, got {}",
                self.sync.zstd_level
            );
        }
        if let Some(p) = &self.model.preset {
            crate::presets::preset(p).map_err(|e| anyhow!("model.preset: {e}"))?;
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("run")
    }

    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<Recipe> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::from_yaml(text, "r.yaml", &sets)
    }

    fn err(text: &str, sets: &[&str]) -> String {
        format!("{:#}", parse(text, sets).unwrap_err())
    }

    #[test]
    fn defaults_fill_everything_but_the_model() {
        let r = parse("model: {preset: gemma3-tiny}", &[]).unwrap();
        assert_eq!(r.train, TrainSection::default());
        assert!(
            r.run.save_final,
            "an absent run section keeps the field defaults"
        );
        assert_eq!(r.train.lr.0, 3e-3);
        assert_eq!(r.data.corpus, "builtin:tinyshakespeare");
    }

    #[test]
    fn errors_name_the_field_the_value_and_what_is_allowed() {
        let e = err("model: {preset: gemma3-tiny}\ntrain: {lr: fast}", &[]);
        assert!(
            e.contains("train.lr: expected a positive number, got \"fast\""),
            "{e}"
        );
        let e = err("model: {preset: gemma3-tiny}\ntrain: {batch_size: -2}", &[]);
        assert!(
            e.contains("train.batch_size: expected a positive integer, got -2"),
            "{e}"
        );
        let e = err(
            "model: {preset: gemma3-tiny}\ntrain: {betas: [0.9, 1.5]}",
            &[],
        );
        assert!(
            e.contains("train.betas[1]: expected a number in [0, 1), got 1.5"),
            "{e}"
        );
        let e = err("model: {preset: gemma3-tiny, dtype: f8}", &[]);
        assert!(
            e.contains("model.dtype: unknown variant `f8`, expected `f32` or `bf16`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let e = err("model: {preset: gemma3-tiny}\ntrain: {lrr: 0.1}", &[]);
        assert!(
            e.contains("train.lrr: unknown field `lrr`, expected one of"),
            "{e}"
        );
        let e = err("model: {preset: gemma3-tiny}\ntrian: {}", &[]);
        assert!(e.contains("unknown field `trian`"), "{e}");
    }

    #[test]
    fn set_overrides_are_typed_like_the_file() {
        let r = parse(
            "model: {preset: gemma3-tiny}",
            &[
                "train.lr=1e-4",
                "train.max_steps=30",
                "data.tokenizer.vocab_size=512",
            ],
        )
        .unwrap();
        assert_eq!(r.train.lr.0, 1e-4);
        assert_eq!(r.train.max_steps.0, 30);
        assert_eq!(r.data.tokenizer.vocab_size.0, 512);
        let e = err("model: {preset: gemma3-tiny}", &["train.lr=fast"]);
        assert!(
            e.contains("train.lr: expected a positive number, got \"fast\""),
            "{e}"
        );
        let e = err(
            "model: {preset: gemma3-tiny}\ntrain: {lr: 0.1}",
            &["train.lr.x=1"],
        );
        assert!(e.contains("`train.lr` is a value, not a section"), "{e}");
        let e = err("model: {preset: gemma3-tiny}", &["train.lr.x=1"]);
        assert!(
            e.contains("train.lr: invalid type: map, expected a positive number"),
            "{e}"
        );
        assert!(err("model: {preset: gemma3-tiny}", &["novalue"])
            .contains("expected path.to.field=value"));
    }

    #[test]
    fn sync_values_are_checked() {
        let base = "model: {preset: gemma3-tiny}";
        assert!(err(base, &["sync.quorum=5", "sync.learners=4"])
            .contains("sync.quorum: expected at most sync.learners (4), got 5"));
        assert!(err(base, &["sync.h=0"]).contains("sync.h: expected a positive integer, got 0"));
        assert!(err(base, &["sync.codec=int3"]).contains("sync.codec: unknown variant `int3`"));
        assert!(err(base, &["sync.outer_lr=-0.7"])
            .contains("sync.outer_lr: expected a positive number, got -0.7"));
        assert!(err(base, &["sync.mode=async"]).contains("sync.mode: unknown variant `async`"));
        let r = parse(base, &["sync.mode=ddp", "sync.speeds=[1.0, 0.5]"]).unwrap();
        assert_eq!(r.sync.mode, SyncMode::Ddp);
        assert_eq!(r.sync.speeds.len(), 2);
    }

    #[test]
    fn model_choice_is_checked() {
        assert!(err("seed: 1", &[]).contains("missing field `model`"));
        assert!(err("model: {}", &[]).contains("set either model.preset"));
        assert!(err("model: {preset: gemma9}", &[]).contains("unknown model preset `gemma9`"));
    }

    #[test]
    fn resolved_recipe_round_trips_through_yaml() {
        let r = parse("model: {preset: gemma3-tiny}\ntrain: {lr: 0.01}", &[]).unwrap();
        let again = parse(&r.to_yaml().unwrap(), &[]).unwrap();
        assert_eq!(r, again);
    }
}
