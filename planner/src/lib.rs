//! The Atoll at-scale planner: what DP, classic DiLoCo, Streaming DiLoCo and Decoupled DiLoCo
//! would do on a given model, fleet, WAN and failure rate — projected by a discrete-event
//! simulation with no tensors, in milliseconds.
//!
//! For each mode it projects the wall clock to a token budget, the speedup over DP, compute
//! utilisation, goodput under chip failures, and the bytes and bandwidth each region's link
//! carries. [`plan`] computes a [`PlanOutput`]; [`write_plan`] also writes `plan.json` and
//! `plan.svg`. The model and its assumptions are in `docs/planning.md`; [`paper`] holds the
//! published settings the tests reproduce.
//!
//! ```
//! use atoll_planner::{plan, Codec, Mode, PlanInput};
//!
//! let input = PlanInput {
//!     model: Some("gemma4-12b".into()),
//!     learners: 4,
//!     gpus_per_learner: 128,
//!     link_rate_gbps: atoll_planner::parse_rate_gbps("2gbps")?,
//!     link_rtt_ms: atoll_planner::parse_duration_s("40ms")? * 1e3,
//!     codec: Codec::E3m0,
//!     ..PlanInput::default()
//! };
//! let out = plan(&input)?;
//! let decoupled = out.mode(Mode::Decoupled).expect("every mode is planned");
//! assert!(decoupled.speedup_vs_dp > 20.0);
//! // `atoll_planner::write_plan(dir, &input)` writes the same as plan.json and plan.svg.
//! # Ok::<(), atoll_planner::PlanError>(())
//! ```

pub mod failures;
mod input;
mod output;
pub mod paper;
mod sim;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use failures::{goodput_table, FailureModel, GoodputEstimate, GoodputRow, Layout};
pub use input::{
    model_preset, parse_duration_s, parse_rate_gbps, Codec, ModelPreset, PlanInput,
    H100_BF16_PEAK_FLOPS, MODEL_PRESETS, SECONDS_PER_YEAR,
};
pub use output::{human_duration, render_svg};
pub use sim::Mode;

/// Why a plan could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the plan: {0}")]
    Json(#[from] serde_json::Error),
}

impl PlanError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        PlanError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// The projection for one mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub label: String,
    /// Time to the token budget, failures included, s.
    pub wall_clock_s: f64,
    /// DP's wall clock over this mode's.
    pub speedup_vs_dp: f64,
    /// Mean time per inner step, communication stalls included, failures not, s.
    pub step_time_s: f64,
    /// Share of time the chips compute, communication stalls counted, failures not.
    pub compute_utilization: f64,
    /// Share of time the job's progress survives failures (useful time / elapsed time),
    /// from the seeded failure simulation.
    pub failure_goodput: f64,
    /// The same, expected value of the failure model.
    pub failure_goodput_expected: f64,
    /// Share of the chips' time that ends up as kept training: compute utilisation × failure
    /// goodput.
    pub goodput: f64,
    /// Share of time at least one learner trains.
    pub uptime: f64,
    /// Expected chip failures over the run.
    pub failures_expected: f64,
    /// Bytes one region's link carries over the run, both directions.
    pub bytes_per_link: f64,
    pub bytes_up_per_link: f64,
    pub bytes_down_per_link: f64,
    /// Mean rate over the run, busier direction, Gbit/s.
    pub avg_gbps_per_link: f64,
    /// Busiest one-step window of the run, busier direction, Gbit/s (at most the link rate).
    pub peak_gbps_per_link: f64,
    /// Link rate this mode needs for 90 % compute utilisation (Decoupled, which never idles:
    /// for fragments to land within τ steps); `null` if the mode does not use the WAN or is
    /// latency-bound.
    pub gbps_for_90pct: Option<f64>,
    /// Steps between sending a fragment and applying its merge (Streaming: τ, enforced by
    /// blocking; Decoupled: measured, budgeted at τ).
    pub sync_lag_steps: u64,
    pub warnings: Vec<String>,
}

/// A plan: the input, what it resolved to, and one [`ModeResult`] per mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanOutput {
    pub input: PlanInput,
    /// The model's name, or "custom".
    pub model: String,
    pub params: f64,
    pub flops_per_token: f64,
    pub chips: u64,
    /// Compute time of one inner step of one learner, s.
    pub step_compute_s: f64,
    pub total_steps: u64,
    pub modes: Vec<ModeResult>,
}

impl PlanOutput {
    pub fn mode(&self, mode: Mode) -> Option<&ModeResult> {
        self.modes.iter().find(|m| m.mode == mode)
    }
}

/// Compute utilisation the bandwidth figure aims at (the Streaming DiLoCo paper's 90 %).
pub const UTILIZATION_TARGET: f64 = 0.9;

/// Projects every mode for `input`.
pub fn plan(input: &PlanInput) -> Result<PlanOutput, PlanError> {
    let r = input.resolve()?;
    let chips = u64::from(r.learners) * u64::from(r.chips_per_learner);
    let mut modes = Vec::with_capacity(Mode::ALL.len());
    for mode in Mode::ALL {
        let tl = sim::timeline(&r, mode);
        // Lock-step modes lose a step of their real (communication-stretched) length; a
        // Decoupled learner only its compute step.
        let failure_model = FailureModel::from_input(input, tl.step_s);
        let layout = match (mode, r.dp_elastic) {
            (Mode::Decoupled, _) => Layout::Decoupled {
                learners: r.learners,
            },
            (_, true) => Layout::DpElastic,
            (_, false) => Layout::DpNoElastic,
        };
        let fail = failure_model.goodput(layout, chips as f64, tl.wall_s);
        let wall = tl.wall_s / fail.simulated;
        let mut warnings = Vec::new();
        if mode == Mode::Decoupled && tl.lag_steps > u64::from(r.tau.max(1)) {
            warnings.push(format!(
                "fragments land {} steps after they are sent (budget τ = {}): the links cannot carry one fragment every {:.2} s; raise H, lower the codec's bits, compress the frames (sync.zstd_level: 1 takes about 15% off e3m0 frames and a third off int2 ones) or add bandwidth",
                tl.lag_steps,
                r.tau,
                r.step_compute_s * f64::from(r.h) / f64::from(r.fragments),
            ));
        }
        if mode != Mode::Decoupled && tl.compute_utilization < UTILIZATION_TARGET && r.learners > 1
        {
            warnings.push(format!(
                "chips idle {:.0} % of the time waiting for the WAN",
                100.0 * (1.0 - tl.compute_utilization)
            ));
        }
        modes.push(ModeResult {
            mode,
            label: mode.label().to_string(),
            wall_clock_s: wall,
            speedup_vs_dp: 0.0,
            step_time_s: tl.step_s,
            compute_utilization: tl.compute_utilization,
            failure_goodput: fail.simulated,
            failure_goodput_expected: fail.analytic,
            goodput: tl.compute_utilization * fail.simulated,
            uptime: fail.uptime,
            failures_expected: r.chip_rate * chips as f64 * wall,
            bytes_per_link: (tl.up_bits + tl.down_bits) / 8.0,
            bytes_up_per_link: tl.up_bits / 8.0,
            bytes_down_per_link: tl.down_bits / 8.0,
            avg_gbps_per_link: tl.up_bits.max(tl.down_bits) / wall / 1e9,
            peak_gbps_per_link: tl.peak_bps / 1e9,
            gbps_for_90pct: sim::gbps_needed(&r, mode, UTILIZATION_TARGET),
            sync_lag_steps: tl.lag_steps,
            warnings,
        });
    }
    let dp_wall = modes[0].wall_clock_s;
    for m in &mut modes {
        m.speedup_vs_dp = dp_wall / m.wall_clock_s;
    }
    let model = match (input.params, input.model.as_deref()) {
        (None, Some(name)) => name.to_string(),
        _ => "custom".to_string(),
    };
    Ok(PlanOutput {
        input: input.clone(),
        model,
        params: r.params,
        flops_per_token: r.flops_per_token,
        chips,
        step_compute_s: r.step_compute_s,
        total_steps: r.total_steps,
        modes,
    })
}

/// Plans `input` and writes `plan.json` and `plan.svg` into `dir` (created if missing).
pub fn write_plan(dir: &Path, input: &PlanInput) -> Result<PlanOutput, PlanError> {
    let out = plan(input)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PlanError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = dir.join("plan.json");
    let mut text = serde_json::to_string_pretty(&out)?;
    text.push('\n');
    std::fs::write(&json, text).map_err(io(&json))?;
    let svg = dir.join("plan.svg");
    std::fs::write(&svg, render_svg(&out)).map_err(io(&svg))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_and_svg() {
        let dir = std::env::temp_dir().join(format!("atoll-planner-test-{}", std::process::id()));
        let out = write_plan(&dir, &PlanInput::default()).expect("plan written");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("plan.json")).expect("plan.json"),
        )
        .expect("json");
        let modes = json["modes"].as_array().expect("modes");
        assert_eq!(modes.len(), 4);
        for (m, name) in modes.iter().zip(["dp", "diloco", "streaming", "decoupled"]) {
            assert_eq!(m["mode"], name);
            for key in [
                "wall_clock_s",
                "speedup_vs_dp",
                "compute_utilization",
                "goodput",
                "bytes_per_link",
                "peak_gbps_per_link",
            ] {
                assert!(m[key].is_number(), "{name}.{key}");
            }
        }
        assert_eq!(json["modes"][0]["speedup_vs_dp"], 1.0);
        let svg = std::fs::read_to_string(dir.join("plan.svg")).expect("plan.svg");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for m in &out.modes {
            assert!(svg.contains(&m.label), "{}", m.label);
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn write_plan_reports_the_path_it_cannot_write() {
        let file = std::env::temp_dir().join(format!("atoll-planner-file-{}", std::process::id()));
        std::fs::write(&file, "not a directory").expect("scratch file");
        let err =
            write_plan(&file.join("sub"), &PlanInput::default()).expect_err("a file is in the way");
        assert!(matches!(err, PlanError::Io { .. }), "{err}");
        assert!(err.to_string().contains("atoll-planner-file"), "{err}");
        std::fs::remove_file(&file).expect("clean up");
        let bad = PlanInput {
            learners: 0,
            ..PlanInput::default()
        };
        assert!(matches!(
            plan(&bad),
            Err(PlanError::Invalid {
                field: "learners",
                ..
            })
        ));
    }

    #[test]
    fn plans_are_deterministic() {
        let input = PlanInput {
            gpus_per_learner: 16_384,
            learners: 8,
            ..PlanInput::default()
        };
        assert_eq!(plan(&input).expect("plan"), plan(&input).expect("plan"));
        let other = PlanInput {
            seed: 99,
            ..input.clone()
        };
        assert_ne!(
            plan(&input).expect("plan").modes[0].failure_goodput,
            plan(&other).expect("plan").modes[0].failure_goodput
        );
    }

    #[test]
    fn failures_cost_dp_more_than_decoupled() {
        // 8 × 16k chips: a failure every ≈4 min over the whole fleet.
        let input = PlanInput {
            gpus_per_learner: 16_384,
            learners: 8,
            link_rate_gbps: 1e4,
            ..PlanInput::default()
        };
        let out = plan(&input).expect("plan");
        let dp = out.mode(Mode::Dp).expect("dp");
        let dec = out.mode(Mode::Decoupled).expect("decoupled");
        assert!(dp.failure_goodput < 0.9, "{}", dp.failure_goodput);
        assert!(
            dec.failure_goodput > dp.failure_goodput + 0.05,
            "{} vs {}",
            dec.failure_goodput,
            dp.failure_goodput
        );
        assert!((dp.failure_goodput - dp.failure_goodput_expected).abs() < 0.01);
        let none = plan(&PlanInput {
            mtbi_chip_years: None,
            ..input
        })
        .expect("plan");
        assert!(none
            .modes
            .iter()
            .all(|m| m.failure_goodput == 1.0 && m.failures_expected == 0.0));
    }
}
