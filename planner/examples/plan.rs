//! Writes plan.json and plan.svg until `atoll plan` exists:
//! `cargo run -p atoll-planner --example plan -- OUT_DIR [INPUT.json]`
//! (INPUT.json: any subset of the `PlanInput` fields; the rest take their defaults).

use std::path::PathBuf;

use atoll_planner::{human_duration, write_plan, PlanInput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: plan OUT_DIR [INPUT.json]")?);
    let input: PlanInput = match args.next() {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(&path)?)?,
        None => PlanInput::default(),
    };
    let plan = write_plan(&out, &input)?;
    for m in &plan.modes {
        println!(
            "{:<18} {:>10} {:>7.1}x  goodput {:>5.1} %",
            m.label,
            human_duration(m.wall_clock_s),
            m.speedup_vs_dp,
            100.0 * m.goodput
        );
        for w in &m.warnings {
            println!("    warning: {w}");
        }
    }
    println!("wrote {}/plan.json and plan.svg", out.display());
    Ok(())
}
