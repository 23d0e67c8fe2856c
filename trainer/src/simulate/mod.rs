//! `atoll simulate`: M learners in one process, each with its own Gemma model, optimizer and
//! data shard, synchronised by the real syncer state machine over simulated links, on a virtual
//! clock. Same seed, same results, bit for bit: events are ordered by (virtual time, sequence
//! number), and every random draw comes from seeded generators.
//!
//! Time model: an inner step takes `sync.step_time_s / speed` virtual seconds; a transfer of b
//! bytes on a learner's link starts when the link is free, takes 8·b / bandwidth, then arrives
//! after the one-way latency. Metadata reports cost latency only. Up-link outer gradients go
//! through the real wire codec and frame (so quantisation is what a real run sends); down-link
//! updates are quantised by the syncer itself (`broadcast_codec`) and accounted at their encoded
//! size.

//!
//! Where to look: `clock` (virtual time, the event queue, simulated links), `learner` (a learner's
//! model, inner step and how it applies broadcasts), `diloco` (the event loop of the DiLoCo modes
//! around the real syncer), `ddp` (the data-parallel baseline), `probe` (the eval curve); this
//! file sets a run up and writes its summary.

mod clock;
mod ddp;
mod diloco;
mod learner;
mod probe;

use crate::data::Batcher;
use crate::optim::AdamW;
use crate::recipe::{Recipe, SyncMode};
use crate::train::{build_model, dtype_name, evaluate, prepare_data, resolve_device};
use anyhow::Result;
use clock::Link;
use ddp::simulate_ddp;
use diloco::simulate_diloco_family;
use learner::{set_flat, Learner};
use probe::EvalProbe;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tch::Tensor;

#[derive(Debug, Clone, Serialize)]
pub struct SimSummary {
    pub name: String,
    pub mode: String,
    pub learners: usize,
    pub codec: String,
    pub parameters: u64,
    pub dtype: String,
    pub seed: u64,
    pub initial_eval_loss: f64,
    pub final_eval_loss: f64,
    /// The lowest eval loss on the curve (`train.eval_every`) and the step it was seen at: below
    /// the final value when the run trained past its best point.
    pub best_eval_loss: f64,
    pub best_eval_step: usize,
    pub tokens: u64,
    /// Tokens whose work reached the global model (per learner contribution, averaged over
    /// fragments); under `apply: rebase` every token, exactly once.
    pub merged_tokens: u64,
    /// Bytes sent up / down, summed over learners.
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bytes_per_learner: f64,
    pub sim_wall_clock_s: f64,
    /// Tokens that reached the global model / what M learners at full speed would process.
    pub goodput: f64,
    /// Time learners spent computing / (M × wall clock).
    pub compute_utilization: f64,
    pub rejected_contributions: u64,
    /// Contributions measured against an older version than the fragment's when merged.
    pub stale_contributions: u64,
    pub merges: u64,
    pub failures: u64,
}

pub fn simulate(recipe: &Recipe, run_dir: &Path) -> Result<SimSummary> {
    let sync = &recipe.sync;
    let m_count = sync.learners.0;
    if let Some(t) = recipe.train.threads {
        tch::set_num_threads(t.0 as i32);
    }
    let device = resolve_device(recipe.train.device)?;
    std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;
    let prepared = prepare_data(recipe, crate::data::BOS_ID, crate::data::EOS_ID)?;
    let vocab = prepared.tokenizer.get_vocab_size(true);
    let t = &recipe.train;
    let (batch, seq_len) = (t.batch_size.0, recipe.data.seq_len.0);
    let tokens_per_step = (batch * t.grad_accum.0 * seq_len) as u64;
    let budget = t.max_steps.0 as u64 * tokens_per_step * m_count as u64;
    let mut metrics =
        std::io::BufWriter::new(std::fs::File::create(run_dir.join("metrics.jsonl"))?);

    // One model per learner, all starting from the same seeded weights.
    let mut learners = Vec::with_capacity(m_count);
    for m in 0..m_count {
        let model = build_model(recipe, vocab, device)?;
        let params = model.trainable_parameters();
        let optimizer = AdamW::new(
            params.iter().map(Tensor::shallow_clone).collect(),
            t.adamw(),
        );
        let shard =
            crate::data::learner_windows(prepared.train.len(), m, m_count, recipe.data.sharding)?;
        let batcher = Batcher::new(shard.len(), recipe.seed.wrapping_add(m as u64));
        let speed = sync.speeds.get(m).map_or(1.0, |s| s.0);
        let link = Link {
            bandwidth_bps: sync.link.bandwidth_gbps.0 * 1e9,
            latency_s: sync.link.latency_ms.0 / 1000.0,
            up_free_at: 0.0,
            down_free_at: 0.0,
        };
        learners.push(Learner {
            model,
            params,
            optimizer,
            shard,
            batcher,
            protocol: None,
            feedback: Vec::new(),
            at_pull: BTreeMap::new(),
            merged_in: BTreeMap::new(),
            speed,
            alive: true,
            waiting_for_sync: false,
            steps: 0,
            compute_s: 0.0,
            link,
        });
    }
    let initial_eval = evaluate(&learners[0].model, &prepared.eval, batch, t.eval_batches.0);
    tracing::info!(
        "{} learners, mode {:?}, initial eval loss {initial_eval:.4}",
        m_count,
        sync.mode
    );

    let names: Vec<(String, Vec<i64>)> = learners[0]
        .model
        .named_trainable_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    let parameters: u64 = names
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as u64)
        .sum();

    let mut probe = EvalProbe {
        model: None,
        every: t.eval_every.0,
        next_at: t.eval_every.0,
        eval: &prepared.eval,
        batch,
        batches: t.eval_batches.0,
        best: (0, f64::INFINITY),
    };
    if sync.mode != SyncMode::Ddp && probe.every > 0 {
        let model = build_model(recipe, vocab, device)?;
        let params = model.trainable_parameters();
        probe.model = Some((model, params));
    }
    let summary = if sync.mode == SyncMode::Ddp {
        simulate_ddp(
            recipe,
            &mut learners,
            &prepared.train,
            tokens_per_step,
            parameters,
            &mut probe,
            &mut metrics,
        )?
    } else {
        simulate_diloco_family(
            recipe,
            &mut learners,
            &prepared.train,
            tokens_per_step,
            budget,
            &names,
            &mut probe,
            &mut metrics,
        )?
    };
    let Outcome {
        wall_s: wall,
        bytes_up,
        bytes_down,
        merged_tokens,
        rejected,
        merges,
        failures,
        global,
        merge_log,
    } = summary;
    let mut merges_file =
        std::io::BufWriter::new(std::fs::File::create(run_dir.join("merges.jsonl"))?);
    for record in &merge_log {
        writeln!(merges_file, "{}", serde_json::to_string(record)?)?;
    }
    merges_file.flush()?;

    if sync.mode != SyncMode::Ddp {
        // Diagnostics: how far apart the learners ended (the final round averages them into Θ).
        let locals: Vec<f64> = learners
            .iter()
            .map(|l| evaluate(&l.model, &prepared.eval, batch, t.eval_batches.0))
            .collect();
        tracing::info!("learners' own models: eval {locals:.4?}");
    }
    // The global model: learner 0's network loaded with Θ.
    let eval_model = &mut learners[0];
    for (p, values) in eval_model.params.iter_mut().zip(&global) {
        set_flat(p, values);
    }
    let final_eval = evaluate(&eval_model.model, &prepared.eval, batch, t.eval_batches.0);
    probe.record(t.max_steps.0, final_eval, wall, &mut metrics)?;
    metrics.flush()?;
    let (best_eval_step, best_eval_loss) = probe.best;
    let tokens: u64 = learners.iter().map(|l| l.steps * tokens_per_step).sum();
    let compute: f64 = learners.iter().map(|l| l.compute_s).sum();
    let ideal_tokens_per_s = m_count as f64 * tokens_per_step as f64 / sync.step_time_s.0;
    let summary = SimSummary {
        name: recipe.name().to_string(),
        mode: format!("{:?}", sync.mode).to_lowercase(),
        learners: m_count,
        codec: if sync.mode == SyncMode::Ddp {
            "f32".into()
        } else {
            format!("{:?}", sync.codec).to_lowercase()
        },
        parameters,
        dtype: dtype_name(learners[0].model.kind()).into(),
        seed: recipe.seed,
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        best_eval_loss,
        best_eval_step,
        tokens,
        merged_tokens,
        bytes_up,
        bytes_down,
        bytes_per_learner: (bytes_up + bytes_down) as f64 / m_count as f64,
        sim_wall_clock_s: wall,
        goodput: merged_tokens as f64 / (ideal_tokens_per_s * wall).max(1e-9),
        compute_utilization: compute / (m_count as f64 * wall).max(1e-9),
        rejected_contributions: rejected,
        stale_contributions: atoll_coordinator::stale_contributions(&merge_log),
        merges,
        failures,
    };
    crate::checkpoint::write_json_atomic(
        &run_dir.join("summary.json"),
        &serde_json::to_value(&summary)?,
    )?;
    tracing::info!(
        "done: eval {:.4} -> {:.4}, {} tokens, {:.1} MB per learner, {:.0} simulated s",
        initial_eval,
        final_eval,
        tokens,
        summary.bytes_per_learner / 1e6,
        wall
    );
    Ok(summary)
}

/// What a mode's event loop hands back for the summary.
struct Outcome {
    wall_s: f64,
    bytes_up: u64,
    bytes_down: u64,
    merged_tokens: u64,
    rejected: u64,
    merges: u64,
    failures: u64,
    /// The global parameters, in trainable-parameter order.
    global: Vec<Vec<f32>>,
    /// Every merge, as `atoll run` logs it to `coordinator/merges.jsonl` (none under DP).
    merge_log: Vec<atoll_coordinator::MergeRecord>,
}
