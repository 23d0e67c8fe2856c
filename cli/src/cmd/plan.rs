//! `atoll plan`: DP, classic DiLoCo, Streaming and Decoupled DiLoCo projected at scale (no
//! tensors), from a recipe, flags, or both (see docs/planning.md).

use anyhow::{anyhow, Result};
use atoll_trainer::presets::preset;
use atoll_trainer::recipe::Recipe;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct PlanArgs {
    /// A training recipe to take the model, learners, P/H/τ, codec and link from.
    recipe: Option<PathBuf>,
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
    /// A planner preset (gemma4-12b, gemma3-12b, ...) or any `atoll model presets` name.
    #[arg(long)]
    model: Option<String>,
    /// Parameter count instead of a model name.
    #[arg(long)]
    params: Option<u64>,
    #[arg(long)]
    learners: Option<u32>,
    #[arg(long)]
    gpus_per_learner: Option<u32>,
    /// Per-region link rate, e.g. 2gbps, 500mbps.
    #[arg(long)]
    link_rate: Option<String>,
    /// Round-trip time, e.g. 40ms.
    #[arg(long)]
    link_rtt: Option<String>,
    #[arg(long)]
    codec: Option<String>,
    #[arg(long)]
    fragments: Option<u32>,
    #[arg(long)]
    h: Option<u32>,
    #[arg(long)]
    tau: Option<u32>,
    /// Model FLOPs utilisation of the chips, e.g. 0.4.
    #[arg(long)]
    mfu: Option<f64>,
    /// Global batch in tokens per step.
    #[arg(long)]
    batch_tokens: Option<u64>,
    /// Tokens to train on, e.g. 1e12.
    #[arg(long)]
    token_budget: Option<f64>,
    /// Measured (or simulated) seconds per inner step instead of FLOPs / MFU.
    #[arg(long)]
    step_time: Option<String>,
    /// Mean time between interruptions of one chip, e.g. 1y, 30d; `none` for no failures.
    #[arg(long)]
    mtbi: Option<String>,
    /// Syncer time to merge one fragment and take the outer step, e.g. 20ms (default 100ms).
    #[arg(long)]
    merge_time: Option<String>,
    /// Sequence length of the per-rank memory estimate (default: the recipe's, else 4096).
    #[arg(long)]
    seq: Option<u64>,
    /// Where plan.json and plan.svg go.
    #[arg(long, default_value = "runs/plan")]
    out: PathBuf,
}

pub fn run(args: PlanArgs) -> Result<()> {
    use atoll_planner::{parse_duration_s, parse_rate_gbps, Codec as PlanCodec, PlanInput};
    let PlanArgs {
        recipe,
        overrides,
        model,
        params,
        learners,
        gpus_per_learner,
        link_rate,
        link_rtt,
        codec,
        fragments,
        h,
        tau,
        mfu,
        batch_tokens,
        token_budget,
        step_time,
        mtbi,
        merge_time,
        seq,
        out,
    } = args;
    let recipe = match &recipe {
        Some(path) => Some(Recipe::from_file(path, &overrides)?),
        None => None,
    };
    let mut input = match &recipe {
        Some(recipe) => plan_input_from_recipe(recipe)?,
        None => PlanInput::default(),
    };
    let seq = seq
        .or(recipe.as_ref().map(|r| r.data.seq_len.0 as u64))
        .unwrap_or(4096);
    if let Some(m) = model {
        match atoll_planner::model_preset(&m) {
            Some(_) => {
                input.model = Some(m);
                input.params = None;
            }
            None => {
                let config = preset(&m).map_err(|_| {
                    anyhow!("--model {m:?}: unknown model (planner presets: {}; or any of `atoll model presets`)",
                        atoll_planner::MODEL_PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
                })?;
                input.model = Some(m);
                input.params = Some(config.config.num_parameters());
            }
        }
    }
    if let Some(p) = params {
        input.model = None;
        input.params = Some(p);
    }
    let plan_err = |e: atoll_planner::PlanError| anyhow!("{e}");
    let flag_err = |flag: &'static str| move |e| anyhow!("--{flag}: {}", plan_err(e));
    if let Some(v) = learners {
        input.learners = v;
    }
    if let Some(v) = gpus_per_learner {
        input.gpus_per_learner = v;
    }
    if let Some(v) = link_rate {
        input.link_rate_gbps = parse_rate_gbps(&v).map_err(flag_err("link-rate"))?;
    }
    if let Some(v) = link_rtt {
        input.link_rtt_ms = parse_duration_s(&v).map_err(flag_err("link-rtt"))? * 1e3;
    }
    if let Some(v) = codec {
        input.codec = PlanCodec::parse(&v).map_err(flag_err("codec"))?;
    }
    if let Some(v) = fragments {
        input.fragments = v;
    }
    if let Some(v) = h {
        input.h = v;
    }
    if let Some(v) = tau {
        input.tau = v;
    }
    if let Some(v) = mfu {
        input.mfu = v;
    }
    if let Some(v) = batch_tokens {
        input.batch_tokens = v;
    }
    if let Some(v) = token_budget {
        input.token_budget = v;
    }
    if let Some(v) = step_time {
        input.step_time_s = Some(parse_duration_s(&v).map_err(flag_err("step-time"))?);
    }
    if let Some(v) = merge_time {
        input.merge_s = parse_duration_s(&v).map_err(flag_err("merge-time"))?;
    }
    if let Some(v) = mtbi {
        input.mtbi_chip_years = match v.as_str() {
            "none" | "never" => None,
            _ => Some(
                parse_duration_s(&v).map_err(flag_err("mtbi"))? / atoll_planner::SECONDS_PER_YEAR,
            ),
        };
    }
    let plan = atoll_planner::write_plan(&out, &input).map_err(plan_err)?;
    print_plan(&plan);
    // Sequences one rank computes at once: the recipe's micro-batch over its ranks, else one
    // (gradient accumulation makes up the rest of the batch).
    let micro_rows = recipe.as_ref().map_or(1, |r| r.train.batch_size.0 as u64);
    print_rank_memory(&input, seq, micro_rows)?;
    println!(
        "wrote {} and {}",
        out.join("plan.json").display(),
        out.join("plan.svg").display()
    );
    Ok(())
}

/// The planner's view of a training recipe: its model, learners, fragments, H, τ, codec, link
/// (one-way latency → RTT), batch and token budget; one accelerator per rank of a learner, the recipe's
/// simulated step time, f32 DP gradients without overlap (as `atoll simulate` runs DP), no
/// failures unless the recipe injects them.
fn plan_input_from_recipe(recipe: &Recipe) -> Result<atoll_planner::PlanInput> {
    let s = &recipe.sync;
    let model = recipe
        .model
        .preset
        .clone()
        .ok_or_else(|| anyhow!("atoll plan needs a recipe with model.preset"))?;
    let config = preset(&model)?;
    let learners = s.learners.0 as u64;
    let tokens_per_learner_step =
        (recipe.train.batch_size.0 * recipe.train.grad_accum.0 * recipe.data.seq_len.0) as u64;
    let codec = atoll_planner::Codec::parse(s.codec.codec().name()).map_err(|e| anyhow!("{e}"))?;
    Ok(atoll_planner::PlanInput {
        model: Some(model),
        params: Some(config.config.num_parameters()),
        learners: s.learners.0 as u32,
        // A sharded learner has one chip per rank; the planner takes one figure for every region.
        gpus_per_learner: s
            .region_names()
            .iter()
            .map(|r| recipe.deploy.region(r).ranks.0 as u32)
            .max()
            .unwrap_or(1),
        link_rate_gbps: s.link.bandwidth_gbps.0,
        link_rtt_ms: 2.0 * s.link.latency_ms.0,
        codec,
        dp_codec: atoll_planner::Codec::F32,
        // `atoll simulate` and the coordinator do not overlap DP's all-reduce with compute.
        dp_overlap: 0.0,
        fragments: s.fragments.0 as u32,
        h: s.h.0 as u32,
        tau: s.tau.0 as u32,
        batch_tokens: tokens_per_learner_step * learners,
        token_budget: (tokens_per_learner_step * learners * recipe.train.max_steps.0 as u64) as f64,
        step_time_s: Some(s.step_time_s.0),
        mtbi_chip_years: s
            .failures
            .mtbf_s
            .map(|m| m.0 / atoll_planner::SECONDS_PER_YEAR),
        reconfigure_s: s.failures.recovery_s.0,
        ..atoll_planner::PlanInput::default()
    })
}

/// Memory per chip of a learner sharded over its `gpus_per_learner` ranks, from the same model
/// as `atoll model info --ranks` (a model given by name only: a bare parameter count has no
/// shapes).
fn print_rank_memory(input: &atoll_planner::PlanInput, seq: u64, micro_rows: u64) -> Result<()> {
    let Some(name) = &input.model else {
        return Ok(());
    };
    let Ok(p) = preset(name) else {
        return Ok(());
    };
    let ranks = input.gpus_per_learner.max(1) as u64;
    let learners = input.learners.max(1) as u64;
    let rows = (input.batch_tokens / learners / seq.max(1)).max(1);
    let per_rank = micro_rows.div_ceil(ranks);
    let accumulation = rows.div_ceil(per_rank * ranks);
    println!(
        "memory per chip: {rows} sequences of {seq} tokens per learner step, {per_rank} per rank \
         at once ({accumulation} accumulation step(s))"
    );
    super::model::print_sharded_memory(&p.config, ranks as usize, seq, per_rank)
}

fn print_plan(plan: &atoll_planner::PlanOutput) {
    println!(
        "{}: {:.3e} parameters, {} chips, {} steps of {:.3} s compute",
        plan.model, plan.params, plan.chips, plan.total_steps, plan.step_compute_s
    );
    println!(
        "{:<22}{:>14}{:>10}{:>12}{:>10}{:>14}{:>12}",
        "mode", "wall clock", "vs DP", "compute", "goodput", "GB per link", "peak Gbps"
    );
    for m in &plan.modes {
        println!(
            "{:<22}{:>14}{:>9.1}x{:>11.1}%{:>9.1}%{:>14.1}{:>12.2}",
            m.label,
            atoll_planner::human_duration(m.wall_clock_s),
            m.speedup_vs_dp,
            100.0 * m.compute_utilization,
            100.0 * m.goodput,
            m.bytes_per_link / 1e9,
            m.peak_gbps_per_link
        );
        for w in &m.warnings {
            println!("  warning: {w}");
        }
    }
}
