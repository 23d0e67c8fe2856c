//! Prints the paper-vs-planner comparison of `docs/planning.md`:
//! `cargo run -p atoll-planner --example paper`.

use atoll_planner::paper::{self, STREAMING_1B_PAPER_GBPS, TABLE1_CHIPS, TABLE1_PAPER};
use atoll_planner::{human_duration, plan, Mode, PlanError};

fn main() -> Result<(), PlanError> {
    println!("## 12B Gemma 4, four regions (paper: Decoupled > 20x faster than DP)\n");
    println!("| link | chips/region | step | DP wall | Decoupled wall | speedup | Decoupled lag | DP / Decoupled Gbit/s for 90 % |");
    println!("|---|---|---|---|---|---|---|---|");
    for gbps in [2.0, 5.0] {
        for chips in [64, 96, 128, 256] {
            let input = atoll_planner::PlanInput {
                gpus_per_learner: chips,
                ..paper::headline_12b(gbps)
            };
            let out = plan(&input)?;
            let (dp, dec) = (out.mode(Mode::Dp), out.mode(Mode::Decoupled));
            if let (Some(dp), Some(dec)) = (dp, dec) {
                println!(
                    "| {gbps} Gbit/s | {chips} | {:.2} s | {} | {} | {:.1}x | {} steps | {:.0} / {:.2} |",
                    out.step_compute_s,
                    human_duration(dp.wall_clock_s),
                    human_duration(dec.wall_clock_s),
                    dec.speedup_vs_dp,
                    dec.sync_lag_steps,
                    dp.gbps_for_90pct.unwrap_or(f64::NAN),
                    dec.gbps_for_90pct.unwrap_or(f64::NAN),
                );
            }
        }
    }
    let out = plan(&paper::headline_12b(2.0))?;
    println!("\nAll modes, 128 chips/region, 2 Gbit/s:\n");
    println!(
        "| mode | wall | speedup | util | goodput | GB/link | peak Gbit/s | Gbit/s for 90 % |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for m in &out.modes {
        println!(
            "| {} | {} | {:.1}x | {:.1} % | {:.1} % | {:.0} | {:.2} | {} |",
            m.label,
            human_duration(m.wall_clock_s),
            m.speedup_vs_dp,
            100.0 * m.compute_utilization,
            100.0 * m.goodput,
            m.bytes_per_link / 1e9,
            m.peak_gbps_per_link,
            m.gbps_for_90pct
                .map_or("-".to_string(), |g| format!("{g:.2}")),
        );
    }

    println!("\n## Goodput, Table 1 (paper / planner, %)\n");
    print!("| setting |");
    for n in TABLE1_CHIPS {
        print!(" {}k |", n / 1000);
    }
    println!("\n|---|---|---|---|---|---|");
    let mut worst = 0.0f64;
    for (row, want) in paper::table1().iter().zip(TABLE1_PAPER) {
        print!("| {} |", row.label);
        for (cell, w) in row.cells.iter().zip(want) {
            let got = 100.0 * cell.simulated;
            worst = worst.max((got - w).abs());
            print!(" {w:.0} / {got:.1} |");
        }
        println!();
    }
    println!("\nlargest difference: {worst:.1} points");

    let out = plan(&paper::eight_datacenters_12b())?;
    let need = |m: Mode| {
        out.mode(m)
            .and_then(|r| r.gbps_for_90pct)
            .unwrap_or(f64::NAN)
    };
    let (dp, dec) = (need(Mode::Dp), need(Mode::Decoupled));
    let (pdp, pdec) = paper::EIGHT_DC_PAPER_GBPS;
    println!("\n## 12B over 8 datacenters: Gbit/s needed per link\n");
    println!("| | paper | planner |\n|---|---|---|");
    println!("| DP | {pdp} | {dp:.0} |\n| Decoupled | {pdec} | {dec:.2} |");
    println!("| ratio | {:.0}x | {:.0}x |", pdp / pdec, dp / dec);

    let out = plan(&paper::streaming_1b())?;
    let need = |m: Mode| {
        out.mode(m)
            .and_then(|r| r.gbps_for_90pct)
            .unwrap_or(f64::NAN)
    };
    let (dp, st) = (need(Mode::Dp), need(Mode::Streaming));
    println!("\n## Streaming DiLoCo, 1B: Gbit/s for 90 % compute utilisation\n");
    println!("| | paper | planner |\n|---|---|---|");
    println!("| DP | {} | {dp:.1} |", STREAMING_1B_PAPER_GBPS.0);
    println!(
        "| Streaming DiLoCo | {} | {st:.2} |",
        STREAMING_1B_PAPER_GBPS.1
    );
    println!(
        "| ratio | {:.1} | {:.1} |",
        STREAMING_1B_PAPER_GBPS.0 / STREAMING_1B_PAPER_GBPS.1,
        dp / st
    );
    Ok(())
}
