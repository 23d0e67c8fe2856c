//! The published results the planner reproduces, with the settings assumed for them.
//!
//! The papers state results, not every parameter behind them; where one is missing the choice
//! below is ours, made the way the paper most plausibly ran, and documented as such (also in
//! `docs/planning.md`, which has the paper-vs-planner table).

use crate::failures::{goodput_table, FailureModel, GoodputRow, Layout};
use crate::input::{Codec, PlanInput, H100_BF16_PEAK_FLOPS, SECONDS_PER_YEAR};

/// Chips per region assumed for the 12B headline (H100-equivalents at 40 % MFU).
pub const HEADLINE_CHIPS_PER_LEARNER: u32 = 128;

/// Decoupled DiLoCo's headline: a 12B Gemma 4 over four US regions at 2–5 Gbit/s, ">20× faster
/// than conventional synchronization".
///
/// Stated: 12B Gemma 4, four regions, 2–5 Gbit/s. Assumed: 4 learners × 128 H100-equivalent
/// chips at 40 % MFU; 4M-token global batch (1M per learner, a usual size for 12B pre-training),
/// so 1.49 s of compute per step; P = H = 24, τ = 2 (the paper's); 4-bit E3M0 both ways; 40 ms
/// RTT between US regions; DP all-reduces bf16 gradients over the same links, overlapped with
/// the backward pass; 1T tokens. The claim needs the compute step under ≈ 2.9 s at 5 Gbit/s
/// (DP's 57 s all-reduce over 20) and over ≈ 1.1 s at 2 Gbit/s (the 4-bit fragment's round
/// trip within τ steps); 64–256 chips per region at 1M tokens each span most of that window.
pub fn headline_12b(link_rate_gbps: f64) -> PlanInput {
    PlanInput {
        model: Some("gemma4-12b".to_string()),
        learners: 4,
        gpus_per_learner: HEADLINE_CHIPS_PER_LEARNER,
        mfu: 0.4,
        chip_peak_flops: H100_BF16_PEAK_FLOPS,
        batch_tokens: 4 << 20,
        token_budget: 1e12,
        link_rate_gbps,
        link_rtt_ms: 40.0,
        codec: Codec::E3m0,
        down_codec: None,
        dp_codec: Codec::Bf16,
        fragments: 24,
        h: 24,
        tau: 2,
        ..PlanInput::default()
    }
}

/// Decoupled DiLoCo's cross-datacenter bandwidth, 8 datacenters: DP 198 Gbit/s, Decoupled
/// 0.84 Gbit/s (≈ 236× less).
pub const EIGHT_DC_PAPER_GBPS: (f64, f64) = (198.0, 0.84);

/// The 8-datacenter bandwidth comparison. Stated: 8 datacenters, 198 → 0.84 Gbit/s. Assumed:
/// the 12B headline model and settings, 8 learners of 76 H100-equivalents with 1M tokens each
/// (2.5 s steps; the step time is the one free choice here and sets both figures, roughly as
/// 1/step); "needed" = the link rate for 90 % compute utilisation (DP) or for fragments to land
/// within τ steps (Decoupled). The ratio does not depend on the step time.
pub fn eight_datacenters_12b() -> PlanInput {
    PlanInput {
        learners: 8,
        gpus_per_learner: 76,
        batch_tokens: 8 << 20,
        ..headline_12b(2.0)
    }
}

/// Streaming DiLoCo's bandwidth for 90 % compute utilisation, 1B model: DP 184.2 Gbit/s,
/// Streaming 6.2 Gbit/s (simulated in the paper).
pub const STREAMING_1B_PAPER_GBPS: (f64, f64) = (184.2, 6.2);

/// The 1B setting of Streaming DiLoCo's bandwidth simulation.
///
/// Stated: 1B parameters, 2 workers, H = 100, overlap τ = 1, the compute of "6.75 h for 250B
/// tokens at infinite bandwidth" (≈ 10.3M tokens/s). Assumed: a 2M-token (2^21) global batch,
/// so a 0.20 s step — reproduced with 78 H100-equivalents per worker at 40 % MFU; 8 fragments
/// (their 1B has 24 layers in fragments of 3); 10 ms RTT; f32 values on the wire for both DP
/// and Streaming (DP's 184 Gbit/s is what a 1B f32 gradient needs in 78 % of a 0.2 s step,
/// which is how the paper's simulator overlaps reduction with the backward pass).
pub fn streaming_1b() -> PlanInput {
    PlanInput {
        model: None,
        params: Some(1_000_000_000),
        learners: 2,
        gpus_per_learner: 78,
        mfu: 0.4,
        chip_peak_flops: H100_BF16_PEAK_FLOPS,
        batch_tokens: 2 << 20,
        token_budget: 250e9,
        link_rate_gbps: 1.0,
        link_rtt_ms: 10.0,
        codec: Codec::F32,
        down_codec: None,
        dp_codec: Codec::F32,
        dp_overlap: 2.0 / 3.0,
        fragments: 8,
        h: 100,
        tau: 1,
        mtbi_chip_years: None,
        ..PlanInput::default()
    }
}

/// Chip counts of the paper's goodput table (Table 1, MTBI 1 year per chip).
pub const TABLE1_CHIPS: [u64; 5] = [150_000, 300_000, 600_000, 1_200_000, 2_400_000];

/// Rows of Table 1.
pub const TABLE1_LAYOUTS: [Layout; 6] = [
    Layout::DpNoElastic,
    Layout::DpElastic,
    Layout::Decoupled { learners: 2 },
    Layout::Decoupled { learners: 4 },
    Layout::Decoupled { learners: 8 },
    Layout::Decoupled { learners: 16 },
];

/// The paper's goodput, %, row by row as [`TABLE1_LAYOUTS`], columns as [`TABLE1_CHIPS`].
pub const TABLE1_PAPER: [[f64; 5]; 6] = [
    [72.0, 57.0, 38.0, 27.0, 18.0],
    [88.0, 80.0, 69.0, 58.0, 40.0],
    [94.0, 88.0, 80.0, 70.0, 54.0],
    [96.0, 93.0, 89.0, 82.0, 73.0],
    [98.0, 96.0, 94.0, 88.0, 80.0],
    [99.0, 98.0, 96.0, 93.0, 86.0],
];

/// Step time assumed for Table 1 (the 5B model's step is not published); it only sets how much
/// work a failure loses (half a step), which the fitted constants absorb.
pub const TABLE1_STEP_S: f64 = 1.0;

/// The failure model of Table 1: MTBI 1 year per chip and the default (fitted) constants.
pub fn table1_model() -> FailureModel {
    FailureModel {
        chip_rate: 1.0 / SECONDS_PER_YEAR,
        ..FailureModel::from_input(&PlanInput::default(), TABLE1_STEP_S)
    }
}

/// Table 1 as the planner sees it (each cell: at least 20,000 simulated failures per domain).
pub fn table1() -> Vec<GoodputRow> {
    goodput_table(&table1_model(), &TABLE1_LAYOUTS, &TABLE1_CHIPS, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{plan, Mode, UTILIZATION_TARGET};

    #[test]
    fn decoupled_is_more_than_20x_faster_than_dp_for_12b_on_four_regions() {
        for gbps in [2.0, 5.0] {
            // 96–128 chips per region: 2.0–1.5 s steps, inside the window where both hold.
            for chips in [96, HEADLINE_CHIPS_PER_LEARNER] {
                let input = PlanInput {
                    gpus_per_learner: chips,
                    ..headline_12b(gbps)
                };
                let out = plan(&input).expect("plan");
                let dec = out.mode(Mode::Decoupled).expect("decoupled");
                assert!(
                    dec.speedup_vs_dp > 20.0,
                    "{gbps} Gbit/s, {chips} chips: {:.1}×",
                    dec.speedup_vs_dp
                );
                // Not bought with staleness: every fragment is back within τ steps.
                assert!(dec.sync_lag_steps <= 2, "lag {}", dec.sync_lag_steps);
                assert!(dec.warnings.is_empty(), "{:?}", dec.warnings);
                assert!(dec.peak_gbps_per_link <= gbps);
                let dp = out.mode(Mode::Dp).expect("dp");
                assert!(
                    dp.compute_utilization < 0.05,
                    "DP idles on the WAN: {}",
                    dp.compute_utilization
                );
            }
        }
    }

    #[test]
    fn goodput_table_within_five_points_of_the_paper() {
        let rows = table1();
        let mut worst = (0.0f64, String::new());
        for (row, paper) in rows.iter().zip(TABLE1_PAPER) {
            for ((cell, want), chips) in row.cells.iter().zip(paper).zip(TABLE1_CHIPS) {
                let got = 100.0 * cell.simulated;
                let err = (got - want).abs();
                assert!(
                    err <= 5.0,
                    "{} at {chips} chips: planner {got:.1} %, paper {want} %",
                    row.label
                );
                // The simulation estimates the renewal formula's expectation.
                assert!(
                    (cell.simulated - cell.analytic).abs() < 0.01,
                    "{} at {chips}",
                    row.label
                );
                if err > worst.0 {
                    worst = (err, format!("{} at {chips}", row.label));
                }
            }
        }
        // The two headline cells, tighter.
        let dp_1m2 = 100.0 * rows[0].cells[3].simulated;
        let m8_1m2 = 100.0 * rows[4].cells[3].simulated;
        assert!(
            (dp_1m2 - 27.0).abs() < 3.0,
            "DP no elasticity at 1.2M: {dp_1m2:.1}"
        );
        assert!(
            (m8_1m2 - 88.0).abs() < 3.0,
            "Decoupled M=8 at 1.2M: {m8_1m2:.1}"
        );
        assert!(worst.0 < 5.0, "worst cell {worst:?}");
        // Uptime ≈ 100 % for M ≥ 4, as the paper reports.
        for row in &rows[3..] {
            assert!(row.cells.iter().all(|c| c.uptime > 0.99), "{}", row.label);
        }
    }

    #[test]
    fn streaming_needs_tens_of_times_less_bandwidth_than_dp_for_1b() {
        let out = plan(&streaming_1b()).expect("plan");
        let dp = out
            .mode(Mode::Dp)
            .and_then(|m| m.gbps_for_90pct)
            .expect("dp bandwidth");
        let st = out
            .mode(Mode::Streaming)
            .and_then(|m| m.gbps_for_90pct)
            .expect("streaming bandwidth");
        let (paper_dp, paper_st) = STREAMING_1B_PAPER_GBPS;
        // The right order of magnitude: within 2× of each published figure.
        assert!(
            dp / paper_dp < 2.0 && paper_dp / dp < 2.0,
            "DP {dp:.1} vs {paper_dp}"
        );
        assert!(
            st / paper_st < 2.0 && paper_st / st < 2.0,
            "Streaming {st:.2} vs {paper_st}"
        );
        let ratio = dp / st;
        assert!(
            ratio > 15.0 && ratio < 60.0,
            "ratio {ratio:.1} vs the paper's {:.1}",
            paper_dp / paper_st
        );
        // At the paper's 1 Gbit/s, Streaming still computes most of the time and DP does not.
        let st_util = out
            .mode(Mode::Streaming)
            .expect("streaming")
            .compute_utilization;
        assert!(
            st_util < UTILIZATION_TARGET,
            "1 Gbit/s is below Streaming's 90 % point: {st_util}"
        );
        let dp_util = out.mode(Mode::Dp).expect("dp").compute_utilization;
        assert!(dp_util < 0.01, "{dp_util}");
    }

    #[test]
    fn dp_needs_hundreds_of_times_the_bandwidth_of_decoupled_over_eight_datacenters() {
        let out = plan(&eight_datacenters_12b()).expect("plan");
        let dp = out
            .mode(Mode::Dp)
            .and_then(|m| m.gbps_for_90pct)
            .expect("dp");
        let dec = out
            .mode(Mode::Decoupled)
            .and_then(|m| m.gbps_for_90pct)
            .expect("decoupled");
        let (paper_dp, paper_dec) = EIGHT_DC_PAPER_GBPS;
        let (ratio, paper_ratio) = (dp / dec, paper_dp / paper_dec);
        assert!(
            (ratio / paper_ratio - 1.0).abs() < 0.25,
            "{dp:.1} / {dec:.2} = {ratio:.0}× vs {paper_ratio:.0}×"
        );
        assert!(dp / paper_dp < 2.0 && paper_dp / dp < 2.0, "DP {dp:.1}");
    }

    #[test]
    fn streaming_1b_compute_matches_the_papers_infinite_bandwidth_run() {
        // 250B tokens in 6.75 h at infinite bandwidth.
        let fast = PlanInput {
            link_rate_gbps: 1e5,
            ..streaming_1b()
        };
        let out = plan(&fast).expect("plan");
        let st = out.mode(Mode::Streaming).expect("streaming");
        let hours = st.wall_clock_s / 3600.0;
        assert!((hours - 6.75).abs() < 0.2, "{hours:.2} h");
    }
}
