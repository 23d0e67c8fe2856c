//! The eval curve of a simulated run.

use super::learner::set_flat;
use crate::data::PackedSequences;
use crate::models::GemmaModel;
use crate::train::evaluate;
use anyhow::Result;
use std::io::Write;
use tch::Tensor;

/// Periodic evaluation of the model a job would ship (DP's model; the syncer's global Θ in the
/// DiLoCo modes) every `train.eval_every` steps per learner, so a run's eval curve shows whether
/// the final value is still falling or already past a minimum (on a small corpus trained for
/// several epochs, overfitting shows up here first).
pub(super) struct EvalProbe<'a> {
    /// A model of its own, so loading Θ never disturbs a learner.
    pub(super) model: Option<(GemmaModel, Vec<Tensor>)>,
    pub(super) every: usize,
    pub(super) next_at: usize,
    pub(super) eval: &'a PackedSequences,
    pub(super) batch: usize,
    pub(super) batches: usize,
    /// The lowest point so far: (step, eval loss).
    pub(super) best: (usize, f64),
}

impl EvalProbe<'_> {
    /// True when `steps` (per learner) has reached the next evaluation point.
    pub(super) fn due(&self, steps: usize) -> bool {
        self.every > 0 && steps >= self.next_at
    }

    /// Records one evaluation at `steps` and schedules the next.
    pub(super) fn record(
        &mut self,
        steps: usize,
        loss: f64,
        now: f64,
        metrics: &mut impl Write,
    ) -> Result<()> {
        if let Some(done) = steps.checked_div(self.every) {
            self.next_at = (done + 1) * self.every;
        }
        if loss < self.best.1 {
            self.best = (steps, loss);
        }
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": steps, "eval_loss": loss, "sim_time_s": now})
        )?;
        Ok(())
    }

    /// Evaluates `values` (trainable-parameter order) on the probe's own model.
    pub(super) fn evaluate_values(&mut self, values: &[Vec<f32>]) -> f64 {
        let (model, params) = self
            .model
            .as_mut()
            .expect("a probe that is due has a model");
        for (p, v) in params.iter_mut().zip(values) {
            set_flat(p, v);
        }
        evaluate(model, self.eval, self.batch, self.batches)
    }
}
