//! `train`: the inner optimizer, its schedule, evaluation and the device.

use crate::field_defaults;
use crate::value::{Count, Fraction, NonNegativeF64, PositiveF64, PositiveInt};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is visible, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// How a learner with several ranks (`deploy.regions.<r>.ranks`) spreads its model over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RankParallelism {
    /// ZeRO-3 style: each rank holds 1/R of the parameters, gradients and AdamW moments, and
    /// gathers one layer at a time (models that do not fit one device).
    #[default]
    Sharded,
    /// Every rank holds the whole model and optimizer; gradients are averaged once per step
    /// (models that fit one device: less traffic between ranks).
    Replicated,
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
    /// How a learner of several ranks holds its model (docs/scale.md).
    #[serde(default)]
    pub parallel: RankParallelism,
    /// Data-parallel ranks of `atoll finetune`, one per device: CUDA device indices with
    /// `device: cuda` (or auto on a GPU machine), or that many ranks on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<usize>>,
    /// CPU threads for libtorch; absent: all cores.
    #[serde(default)]
    pub threads: Option<PositiveInt>,
    /// Plain log line every N steps when stderr is not a terminal.
    #[serde(default = "defaults::log_every")]
    pub log_every: PositiveInt,
}

impl TrainSection {
    /// Whether a run evaluates after `done` of its `total` steps: every `eval_every` steps
    /// (0: never) and always at the end.
    pub fn eval_due(&self, done: usize, total: usize) -> bool {
        (self.eval_every.0 > 0 && done.is_multiple_of(self.eval_every.0)) || done == total
    }

    /// The learning rate at optimizer step `step` (from 0) of this section's schedule.
    pub fn lr_at(&self, step: usize) -> f64 {
        learning_rate(
            step,
            self.lr.0,
            self.warmup_steps.0,
            self.max_steps.0,
            self.min_lr_ratio.0,
        )
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
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

/// AdamW's hyperparameters (the trainer's `optim::AdamW` takes them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `peak·min_ratio` at
/// `total` steps. `step` counts from 0.
pub fn learning_rate(step: usize, peak: f64, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

impl Default for TrainSection {
    fn default() -> Self {
        field_defaults()
    }
}

mod defaults {
    use super::*;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| learning_rate(s, 1.0, 10, 110, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.55).abs() < 1e-12);
        assert!((lr(110) - 0.1).abs() < 1e-12);
        assert!(lr(30) > lr(31));
    }
}
