//! What the planner is asked: [`PlanInput`], its defaults and validation, wire codecs, model
//! presets, and parsers for the unit-suffixed values the CLI accepts (`2gbps`, `40ms`, `1y`).

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// Seconds in a (365-day) year: the unit of `mtbi_chip_years`.
pub const SECONDS_PER_YEAR: f64 = 365.0 * 86_400.0;

/// bf16 dense peak of one H100 SXM, FLOP/s: the default "chip" (TPU results are quoted in
/// H100-equivalents).
pub const H100_BF16_PEAK_FLOPS: f64 = 989e12;

/// A wire codec, with the names of `atoll-wire` and the recipes (`sync.codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    F32,
    Bf16,
    Int8,
    E3m0,
    Int2,
}

impl Codec {
    pub const ALL: [Codec; 5] = [
        Codec::F32,
        Codec::Bf16,
        Codec::Int8,
        Codec::E3m0,
        Codec::Int2,
    ];

    /// Bits on the wire per value. The blocked codecs carry one f32 scale per 256 values
    /// (+32/256 = 0.125 bit), as `atoll-wire` encodes them.
    pub fn bits_per_value(self) -> f64 {
        match self {
            Codec::F32 => 32.0,
            Codec::Bf16 => 16.0,
            Codec::Int8 => 8.125,
            Codec::E3m0 => 4.125,
            Codec::Int2 => 2.125,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::Bf16 => "bf16",
            Codec::Int8 => "int8",
            Codec::E3m0 => "e3m0",
            Codec::Int2 => "int2",
        }
    }

    /// Parses a codec name as the CLI receives it (case-insensitive; `int4`/`fp4` are E3M0,
    /// the 4-bit format Atoll ships).
    pub fn parse(s: &str) -> Result<Codec, PlanError> {
        let lower = s.trim().to_ascii_lowercase();
        let alias = match lower.as_str() {
            "int4" | "fp4" | "4bit" => "e3m0",
            "fp32" => "f32",
            other => other,
        };
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == alias)
            .ok_or_else(|| {
                PlanError::invalid(
                    "codec",
                    format!("unknown codec `{s}` (f32, bf16, int8, e3m0, int2)"),
                )
            })
    }
}

/// A model the planner knows by name: parameter count and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelPreset {
    pub name: &'static str,
    pub params: u64,
    /// `true`: the count `atoll model info` prints for the preset of the same name (every tensor
    /// of the released checkpoint). `false`: the rounded size of the model card; pass `params`
    /// for an exact figure.
    pub exact: bool,
}

/// The presets, named as in `atoll-trainer` (`gemma3-12b`, `gemma4-12b`) plus the other Gemma
/// sizes for planning. The planner does not link the trainer (so it builds in seconds): the two
/// exact counts are copied from `docs/models.md`, the figures `atoll model info` prints and the
/// workspace's CLI test checks.
pub const MODEL_PRESETS: &[ModelPreset] = &[
    ModelPreset {
        name: "gemma3-1b",
        params: 1_000_000_000,
        exact: false,
    },
    ModelPreset {
        name: "gemma3-4b",
        params: 4_300_000_000,
        exact: false,
    },
    ModelPreset {
        name: "gemma3-12b",
        params: 12_187_325_040,
        exact: true,
    },
    ModelPreset {
        name: "gemma4-12b",
        params: 11_959_730_224,
        exact: true,
    },
    ModelPreset {
        name: "gemma3-27b",
        params: 27_432_406_640,
        exact: true,
    },
];

/// Looks a preset up by name.
pub fn model_preset(name: &str) -> Option<&'static ModelPreset> {
    MODEL_PRESETS.iter().find(|p| p.name == name)
}

/// Everything the planner needs, with the names of the recipe fields and CLI flags
/// (`--gpus-per-learner` ↔ `gpus_per_learner`; `--link-rate 2gbps` ↔ `link_rate_gbps` through
/// [`parse_rate_gbps`], `--link-rtt 40ms` ↔ `link_rtt_ms` through [`parse_duration_s`]). Every field has a default ([`PlanInput::default`]):
/// the 12B, four-region job of the issue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanInput {
    /// A name from [`MODEL_PRESETS`]; ignored when `params` is given.
    pub model: Option<String>,
    /// Parameter count; overrides `model`.
    pub params: Option<u64>,
    /// Training FLOPs per token; default 6·params (forward + backward, attention neglected).
    pub flops_per_token: Option<f64>,
    /// Model FLOPs utilisation of the chips while they compute, in (0, 1].
    pub mfu: f64,
    /// Peak FLOP/s of one chip (default: H100 bf16 dense, 989 TFLOP/s).
    pub chip_peak_flops: f64,
    /// Compute time of one inner step, s, when known (measured, or the recipe's
    /// `sync.step_time_s` of `atoll simulate`); overrides the FLOPs/MFU estimate.
    pub step_time_s: Option<f64>,
    /// Tokens per inner step over the whole job (all learners together); each learner takes
    /// `batch_tokens / learners`.
    pub batch_tokens: u64,
    /// Tokens to train on; the wall clock is the time to get through them.
    pub token_budget: f64,
    /// M: learners (regions, DP replicas, DiLoCo workers).
    pub learners: u32,
    /// Chips per learner.
    pub gpus_per_learner: u32,
    /// Rate of each region's WAN link, per direction, Gbit/s.
    pub link_rate_gbps: f64,
    /// Round-trip time of each region's WAN link, ms.
    pub link_rtt_ms: f64,
    /// Codec of the outer gradients (DiLoCo, Streaming, Decoupled up-link).
    pub codec: Codec,
    /// Codec of the merged fragment broadcast down in Decoupled DiLoCo; default `codec`.
    pub down_codec: Option<Codec>,
    /// Codec of DP's gradient all-reduce.
    pub dp_codec: Codec,
    /// Share of an inner step DP's all-reduce can hide behind (buckets go out during the
    /// backward pass, ≈ 2/3 of the FLOPs); 0 = start only once the step is done.
    pub dp_overlap: f64,
    /// P: fragments (Streaming and Decoupled).
    pub fragments: u32,
    /// H: inner steps between two syncs of the same fragment.
    pub h: u32,
    /// τ: inner steps a learner keeps training while a fragment is in flight.
    pub tau: u32,
    /// H of classic DiLoCo (whole-model syncs); default `h`.
    pub diloco_h: Option<u32>,
    /// Syncer time to merge one fragment and take the outer step, s.
    pub merge_s: f64,
    /// Mean time between interruptions of one chip, years; `null` turns failures off.
    pub mtbi_chip_years: Option<f64>,
    /// R: time a non-elastic job (or learner) needs to restart after a failure (reschedule,
    /// reload, recompile), s; work since the last checkpoint is lost on top of it.
    pub restart_s: f64,
    /// Inner steps between two checkpoints of a non-elastic job (1: in-memory checkpoint
    /// every step). A failure loses the progress since the last one.
    pub checkpoint_interval_steps: u32,
    /// D: pause of an elastic job around one failure (re-mesh without the failed chips now,
    /// with their replacement later), s. An elastic job loses only the step in flight.
    pub reconfigure_s: f64,
    /// DP (and the lock-step DiLoCo modes) re-mesh around failures instead of restarting.
    pub dp_elastic: bool,
    /// A Decoupled learner re-meshes around failures (`reconfigure_s`) instead of restarting
    /// (`restart_s`). Either way it resumes from the syncer / a peer, not a checkpoint.
    pub learner_elastic: bool,
    /// Seed of the failure simulation.
    pub seed: u64,
}

impl Default for PlanInput {
    fn default() -> Self {
        PlanInput {
            model: Some("gemma4-12b".to_string()),
            params: None,
            flops_per_token: None,
            mfu: 0.4,
            chip_peak_flops: H100_BF16_PEAK_FLOPS,
            step_time_s: None,
            batch_tokens: 4 << 20,
            token_budget: 1e12,
            learners: 4,
            gpus_per_learner: 64,
            link_rate_gbps: 2.0,
            link_rtt_ms: 40.0,
            codec: Codec::E3m0,
            down_codec: None,
            dp_codec: Codec::Bf16,
            dp_overlap: 2.0 / 3.0,
            fragments: 24,
            h: 24,
            tau: 2,
            diloco_h: None,
            merge_s: 0.1,
            mtbi_chip_years: Some(1.0),
            // R and D are fitted to the paper's goodput table (docs/planning.md, "Failure
            // model"): with a 1 s step, R + half a step = 78 s and D + half a step = 22 s.
            restart_s: 77.5,
            checkpoint_interval_steps: 1,
            reconfigure_s: 21.5,
            dp_elastic: false,
            learner_elastic: true,
            seed: 1234,
        }
    }
}

/// The input with defaults filled in and units converted, after validation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub params: f64,
    pub flops_per_token: f64,
    pub learners: u32,
    pub chips_per_learner: u32,
    /// Compute time of one inner step of one learner, s.
    pub step_compute_s: f64,
    pub total_steps: u64,
    /// Link rate, bit/s.
    pub rate_bps: f64,
    /// One-way latency, s.
    pub one_way_s: f64,
    pub up_bits: f64,
    pub down_bits: f64,
    pub dp_bits: f64,
    pub dp_overlap: f64,
    pub fragments: u32,
    pub h: u32,
    pub tau: u32,
    pub diloco_h: u32,
    pub merge_s: f64,
    /// Failure rate of one chip, 1/s (0: no failures).
    pub chip_rate: f64,
    pub restart_s: f64,
    pub checkpoint_interval_steps: u32,
    pub reconfigure_s: f64,
    pub dp_elastic: bool,
    pub learner_elastic: bool,
    pub seed: u64,
}

fn positive(field: &'static str, v: f64) -> Result<f64, PlanError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(PlanError::invalid(
            field,
            format!("must be a positive number, got {v}"),
        ))
    }
}

fn non_negative(field: &'static str, v: f64) -> Result<f64, PlanError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(PlanError::invalid(
            field,
            format!("must be a number ≥ 0, got {v}"),
        ))
    }
}

fn at_least_one(field: &'static str, v: u32) -> Result<u32, PlanError> {
    if v >= 1 {
        Ok(v)
    } else {
        Err(PlanError::invalid(field, "must be at least 1"))
    }
}

fn at_most(field: &'static str, v: u32, max: u32) -> Result<u32, PlanError> {
    if v <= max {
        Ok(v)
    } else {
        Err(PlanError::invalid(
            field,
            format!("{v} is above the planner's limit of {max}"),
        ))
    }
}

impl PlanInput {
    /// The parameter count this input plans for (`params`, else the preset's).
    pub fn param_count(&self) -> Result<u64, PlanError> {
        if let Some(p) = self.params {
            if p == 0 {
                return Err(PlanError::invalid("params", "must be at least 1"));
            }
            return Ok(p);
        }
        let Some(name) = self.model.as_deref() else {
            return Err(PlanError::invalid(
                "model",
                "give a model preset or `params`",
            ));
        };
        model_preset(name).map(|p| p.params).ok_or_else(|| {
            let names: Vec<&str> = MODEL_PRESETS.iter().map(|p| p.name).collect();
            PlanError::invalid(
                "model",
                format!(
                    "unknown model `{name}` (known: {}; or pass `params`)",
                    names.join(", ")
                ),
            )
        })
    }

    /// Checks every field; the first problem is returned with the field's name.
    pub fn validate(&self) -> Result<(), PlanError> {
        self.resolve().map(|_| ())
    }

    pub(crate) fn resolve(&self) -> Result<Resolved, PlanError> {
        let params = self.param_count()? as f64;
        let flops_per_token = match self.flops_per_token {
            Some(f) => positive("flops_per_token", f)?,
            None => 6.0 * params,
        };
        let mfu = positive("mfu", self.mfu)?;
        if mfu > 1.0 {
            return Err(PlanError::invalid(
                "mfu",
                format!("is a fraction in (0, 1], got {mfu}"),
            ));
        }
        let peak = positive("chip_peak_flops", self.chip_peak_flops)?;
        let learners = at_least_one("learners", self.learners)?;
        let chips_per_learner = at_least_one("gpus_per_learner", self.gpus_per_learner)?;
        if self.batch_tokens < u64::from(learners) {
            return Err(PlanError::invalid(
                "batch_tokens",
                format!(
                    "{} tokens cannot be split over {learners} learners",
                    self.batch_tokens
                ),
            ));
        }
        let budget = positive("token_budget", self.token_budget)?;
        if budget < self.batch_tokens as f64 {
            return Err(PlanError::invalid(
                "token_budget",
                format!(
                    "{budget} is less than one step ({} tokens)",
                    self.batch_tokens
                ),
            ));
        }
        let total_steps = (budget / self.batch_tokens as f64).ceil();
        if total_steps > 1e15 {
            return Err(PlanError::invalid("token_budget", "more than 10^15 steps"));
        }
        let rate_gbps = positive("link_rate_gbps", self.link_rate_gbps)?;
        let rtt_ms = non_negative("link_rtt_ms", self.link_rtt_ms)?;
        let dp_overlap = non_negative("dp_overlap", self.dp_overlap)?;
        if dp_overlap > 1.0 {
            return Err(PlanError::invalid(
                "dp_overlap",
                "is a share of the step, in [0, 1]",
            ));
        }
        // The simulation walks a few periods of H steps event by event; bounds far above any
        // published setting keep that cheap.
        let fragments = at_most(
            "fragments",
            at_least_one("fragments", self.fragments)?,
            10_000,
        )?;
        let h = at_most("h", at_least_one("h", self.h)?, 100_000)?;
        if self.tau > h {
            return Err(PlanError::invalid(
                "tau",
                format!(
                    "τ = {} exceeds H = {h}: a fragment would be due again before it is applied",
                    self.tau
                ),
            ));
        }
        let diloco_h = at_most(
            "diloco_h",
            at_least_one("diloco_h", self.diloco_h.unwrap_or(h))?,
            100_000,
        )?;
        let chip_rate = match self.mtbi_chip_years {
            Some(y) => 1.0 / (positive("mtbi_chip_years", y)? * SECONDS_PER_YEAR),
            None => 0.0,
        };
        let per_learner_tokens = self.batch_tokens as f64 / f64::from(learners);
        let step_compute_s = match self.step_time_s {
            Some(t) => positive("step_time_s", t)?,
            None => {
                per_learner_tokens * flops_per_token / (f64::from(chips_per_learner) * peak * mfu)
            }
        };
        let codec_bits = self.codec.bits_per_value();
        Ok(Resolved {
            params,
            flops_per_token,
            learners,
            chips_per_learner,
            step_compute_s,
            total_steps: total_steps as u64,
            rate_bps: rate_gbps * 1e9,
            one_way_s: rtt_ms / 2e3,
            up_bits: codec_bits,
            down_bits: self.down_codec.unwrap_or(self.codec).bits_per_value(),
            dp_bits: self.dp_codec.bits_per_value(),
            dp_overlap,
            fragments,
            h,
            tau: self.tau,
            diloco_h,
            merge_s: non_negative("merge_s", self.merge_s)?,
            chip_rate,
            restart_s: non_negative("restart_s", self.restart_s)?,
            checkpoint_interval_steps: at_least_one(
                "checkpoint_interval_steps",
                self.checkpoint_interval_steps,
            )?,
            reconfigure_s: non_negative("reconfigure_s", self.reconfigure_s)?,
            dp_elastic: self.dp_elastic,
            learner_elastic: self.learner_elastic,
            seed: self.seed,
        })
    }
}

fn split_number(s: &str) -> Option<(f64, String)> {
    let t = s.trim();
    let end = t
        .find(|c: char| {
            !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-')
        })
        .unwrap_or(t.len());
    // "1e" would parse the unit's leading `e` as an exponent; back off to the digits.
    let (mut num, mut unit) = t.split_at(end);
    if num.parse::<f64>().is_err() {
        let digits = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        (num, unit) = t.split_at(digits);
    }
    let v: f64 = num.parse().ok()?;
    Some((v, unit.trim().to_ascii_lowercase()))
}

/// Parses a link rate into Gbit/s: `2gbps`, `2 Gbit/s`, `200mbps`, `2.5g`, `1tbps`; a bare
/// number is Gbit/s.
pub fn parse_rate_gbps(s: &str) -> Result<f64, PlanError> {
    let bad = || {
        PlanError::invalid(
            "link_rate",
            format!("cannot read `{s}` as a rate (e.g. 2gbps, 200mbps)"),
        )
    };
    let (v, unit) = split_number(s).ok_or_else(bad)?;
    let scale = match unit
        .trim_end_matches("/s")
        .trim_end_matches("ps")
        .trim_end_matches("it")
    {
        "" | "g" | "gb" => 1.0,
        "m" | "mb" => 1e-3,
        "k" | "kb" => 1e-6,
        "t" | "tb" => 1e3,
        _ => return Err(bad()),
    };
    positive("link_rate", v * scale)
}

/// Parses a duration into seconds: `40ms`, `1.5s`, `250us`, `2m`, `3h`, `7d`, `1y`; a bare
/// number is seconds.
pub fn parse_duration_s(s: &str) -> Result<f64, PlanError> {
    let bad = || {
        PlanError::invalid(
            "duration",
            format!("cannot read `{s}` as a duration (e.g. 40ms, 1y)"),
        )
    };
    let (v, unit) = split_number(s).ok_or_else(bad)?;
    let scale = match unit.as_str() {
        "" | "s" | "sec" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "y" | "yr" | "year" | "years" => SECONDS_PER_YEAR,
        _ => return Err(bad()),
    };
    non_negative("duration", v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_bits_match_the_wire_crate() {
        let bits: Vec<f64> = Codec::ALL.iter().map(|c| c.bits_per_value()).collect();
        assert_eq!(bits, vec![32.0, 16.0, 8.125, 4.125, 2.125]);
        assert_eq!(Codec::parse("E3M0").ok(), Some(Codec::E3m0));
        assert_eq!(Codec::parse("int4").ok(), Some(Codec::E3m0));
        assert!(Codec::parse("int3").is_err());
        let json: Codec = serde_json::from_str("\"bf16\"").expect("bf16 parses");
        assert_eq!(json, Codec::Bf16);
    }

    #[test]
    fn units_parse() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12 * b.abs().max(1.0);
        assert!(close(parse_rate_gbps("2gbps").expect("2gbps"), 2.0));
        assert!(close(parse_rate_gbps("2 Gbit/s").expect("Gbit/s"), 2.0));
        assert!(close(parse_rate_gbps("200mbps").expect("mbps"), 0.2));
        assert!(close(parse_rate_gbps("5").expect("bare"), 5.0));
        assert!(parse_rate_gbps("fast").is_err());
        assert!(parse_rate_gbps("0gbps").is_err());
        assert!(close(parse_duration_s("40ms").expect("ms"), 0.04));
        assert!(close(parse_duration_s("1y").expect("y"), SECONDS_PER_YEAR));
        assert!(close(parse_duration_s("1e3s").expect("exp"), 1000.0));
        assert!(parse_duration_s("-3s").is_err());
        assert!(parse_duration_s("3 fortnights").is_err());
    }

    #[test]
    fn defaults_resolve_to_the_issue_job() {
        let r = PlanInput::default().resolve().expect("defaults are valid");
        assert_eq!(r.params, 11_959_730_224.0);
        assert_eq!(r.flops_per_token, 6.0 * r.params);
        assert_eq!(r.total_steps, (1e12 / f64::from(4u32 << 20)).ceil() as u64);
        // 1M tokens × 71.8 GFLOP on 64 chips at 40 % of 989 TFLOP/s ≈ 2.97 s.
        assert!(
            (r.step_compute_s - 2.973).abs() < 0.01,
            "{}",
            r.step_compute_s
        );
        let measured = PlanInput {
            step_time_s: Some(0.25),
            ..PlanInput::default()
        };
        assert_eq!(measured.resolve().expect("valid").step_compute_s, 0.25);
    }

    #[test]
    fn invalid_inputs_name_the_field() {
        fn with(f: fn(&mut PlanInput)) -> PlanInput {
            let mut input = PlanInput::default();
            f(&mut input);
            input
        }
        let cases: Vec<(PlanInput, &str)> = vec![
            (with(|i| i.mfu = 0.0), "mfu"),
            (with(|i| i.mfu = 1.5), "mfu"),
            (with(|i| i.learners = 0), "learners"),
            (with(|i| i.model = Some("gpt-5".into())), "model"),
            (with(|i| i.model = None), "model"),
            (with(|i| i.link_rate_gbps = f64::NAN), "link_rate_gbps"),
            (with(|i| i.tau = 30), "tau"),
            (with(|i| i.token_budget = 10.0), "token_budget"),
            (with(|i| i.mtbi_chip_years = Some(0.0)), "mtbi_chip_years"),
            (with(|i| i.dp_overlap = 2.0), "dp_overlap"),
            (with(|i| i.h = 1_000_000), "h"),
            (with(|i| i.diloco_h = Some(0)), "diloco_h"),
            (with(|i| i.fragments = 0), "fragments"),
            (with(|i| i.step_time_s = Some(-1.0)), "step_time_s"),
            (with(|i| i.params = Some(0)), "params"),
        ];
        for (input, field) in cases {
            match input.validate() {
                Err(PlanError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected an error, got {other:?}"),
            }
        }
        let unknown = serde_json::from_str::<PlanInput>(r#"{"learner": 4}"#);
        assert!(unknown.is_err(), "typos in a plan file are refused");
        let params_win = PlanInput {
            model: Some("nope".into()),
            params: Some(7),
            ..Default::default()
        };
        assert_eq!(params_win.param_count().ok(), Some(7));
    }
}
