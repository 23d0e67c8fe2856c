//! `sync.mode: ddp`: the data-parallel baseline, in lockstep (no event queue needed).

use super::learner::Learner;
use super::probe::EvalProbe;
use super::Outcome;
use crate::data::PackedSequences;
use crate::recipe::Recipe;
use crate::train::{backward_micro_batches, evaluate};
use anyhow::Result;
use std::io::Write;

/// Data parallel: gradients of all M learners averaged every step. Equivalent to one model on
/// the M micro-batches; the step waits for the slowest learner and a ring all-reduce.
pub(super) fn simulate_ddp(
    recipe: &Recipe,
    learners: &mut [Learner],
    data: &PackedSequences,
    tokens_per_step: u64,
    parameters: u64,
    probe: &mut EvalProbe,
    metrics: &mut impl Write,
) -> Result<Outcome> {
    let sync = &recipe.sync;
    let t = &recipe.train;
    let m_count = learners.len();
    let slowest = learners
        .iter()
        .map(|l| l.speed)
        .fold(f64::INFINITY, f64::min);
    // Ring all-reduce of f32 gradients: each learner sends and receives 2(M−1)/M of the model.
    let ring_bytes = if m_count > 1 {
        (2 * (m_count as u64 - 1) * 4 * parameters) / m_count as u64
    } else {
        0
    };
    let link = &learners[0].link;
    let comm_s = 8.0 * ring_bytes as f64 / link.bandwidth_bps
        + 2.0 * (m_count as f64 - 1.0) * link.latency_s;
    let step_s = sync.step_time_s.0 / slowest;
    let mut wall = 0.0;
    let total_steps = t.max_steps.0;
    for step in 0..total_steps {
        let lr = t.lr_at(step);
        // Every learner draws its micro-batches from its own shard...
        let mut batches = Vec::with_capacity(t.grad_accum.0 * m_count);
        for l in learners.iter_mut() {
            batches.extend(l.next_micro_batches(t.batch_size.0, t.grad_accum.0));
            l.steps += 1;
            l.compute_s += sync.step_time_s.0 / l.speed;
        }
        // ...and their gradients, averaged, drive one model: learner 0's.
        let first = &mut learners[0];
        let loss_sum = backward_micro_batches(&first.model, data, &batches);
        first.optimizer.clipped_step(lr, t.clip());
        wall += step_s + comm_s;
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": step + 1, "loss": loss_sum, "lr": lr, "sim_time_s": wall})
        )?;
        // The last point is the final evaluation, taken by the caller.
        if probe.due(step + 1) && step + 1 < total_steps {
            let loss = evaluate(&learners[0].model, probe.eval, probe.batch, probe.batches);
            probe.record(step + 1, loss, wall, metrics)?;
        }
    }
    let first = &learners[0];
    let global: Vec<Vec<f32>> = (0..first.params.len()).map(|i| first.values(i)).collect();
    let merged_tokens = total_steps as u64 * tokens_per_step * m_count as u64;
    let bytes = ring_bytes * total_steps as u64 * m_count as u64;
    Ok(Outcome {
        wall_s: wall,
        bytes_up: bytes,
        bytes_down: bytes,
        merged_tokens,
        rejected: 0,
        merges: total_steps as u64,
        failures: 0,
        global,
        merge_log: Vec::new(),
    })
}
