//! Merging learners' outer gradients and the outer optimizer, in f32 storage with f64 sums.
//!
//! Learner weights are c_tokens² / c_steps ("quantity × quality": tokens seen, times tokens per
//! step). Non-embedding tensors use the RDA merge, Σw‖Δ‖/Σw · φ(Σw·φ(Δ)/Σw) with φ(x) = x/‖x‖,
//! φ(0) = 0: the weighted mean of norms times the normalised weighted mean of directions, so the
//! merged step keeps the learners' typical length even when their directions are near-orthogonal.
//! Embedding tensors (and everything under `merge: mean`) use the weighted mean Σw·Δ/Σw.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MergeRule {
    #[default]
    Rda,
    Mean,
}

/// What the job's last round (the flush once every learner has stopped) does with the merged
/// outer gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FinalStep {
    /// Θ becomes the plain average of the learners' models (outer lr 1, no momentum, every
    /// learner once): Nesterov's look-ahead along old, large-lr updates would overshoot the
    /// learners' final, low-lr models.
    #[default]
    Average,
    /// The usual merge rule and outer Nesterov step.
    Outer,
}

pub fn learner_weight(c_tokens: u64, c_steps: u64) -> f64 {
    if c_steps == 0 {
        0.0
    } else {
        (c_tokens as f64) * (c_tokens as f64) / c_steps as f64
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Weighted mean of `deltas` (all of one length) with `weights`; weights need not sum to 1.
pub fn weighted_mean(deltas: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    let n = deltas.first().map_or(0, |d| d.len());
    let mut acc = vec![0.0f64; n];
    for (d, w) in deltas.iter().zip(weights) {
        for (a, x) in acc.iter_mut().zip(d.iter()) {
            *a += w * *x as f64;
        }
    }
    acc.into_iter()
        .map(|a| if total > 0.0 { (a / total) as f32 } else { 0.0 })
        .collect()
}

/// RDA merge of one tensor.
pub fn rda(deltas: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    let n = deltas.first().map_or(0, |d| d.len());
    if total <= 0.0 {
        return vec![0.0; n];
    }
    let norms: Vec<f64> = deltas.iter().map(|d| norm(d)).collect();
    let radius: f64 = norms.iter().zip(weights).map(|(r, w)| r * w).sum::<f64>() / total;
    let mut direction = vec![0.0f64; n];
    for ((d, w), r) in deltas.iter().zip(weights).zip(&norms) {
        if *r > 0.0 {
            for (a, x) in direction.iter_mut().zip(d.iter()) {
                *a += w * (*x as f64) / r;
            }
        }
    }
    let dir_norm = direction.iter().map(|x| x * x).sum::<f64>().sqrt();
    if dir_norm == 0.0 {
        return vec![0.0; n];
    }
    direction
        .into_iter()
        .map(|x| (radius * x / dir_norm) as f32)
        .collect()
}

/// SGD with Nesterov momentum on the outer gradient Δ (= anchor − local, so a step of −lr·Δ moves
/// the global parameters towards the learners): buf ← μ·buf + Δ; Θ ← Θ − lr·(Δ + μ·buf).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OuterOptimizer {
    pub lr: f64,
    pub momentum: f64,
}

impl OuterOptimizer {
    pub fn step(&self, theta: &mut [f32], momentum_buf: &mut [f32], delta: &[f32]) {
        for ((t, b), d) in theta.iter_mut().zip(momentum_buf.iter_mut()).zip(delta) {
            let buf = self.momentum * *b as f64 + *d as f64;
            *b = buf as f32;
            *t = (*t as f64 - self.lr * (*d as f64 + self.momentum * buf)) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_nesterov_step_moves_theta_by_minus_1_33_delta() {
        let opt = OuterOptimizer {
            lr: 0.7,
            momentum: 0.9,
        };
        let (mut theta, mut buf) = (vec![1.0f32, -2.0], vec![0.0f32; 2]);
        opt.step(&mut theta, &mut buf, &[0.5, 1.0]);
        assert!(
            (theta[0] - (1.0 - 1.33 * 0.5)).abs() < 1e-6 && (theta[1] - (-2.0 - 1.33)).abs() < 1e-6,
            "{theta:?}"
        );
        assert_eq!(buf, vec![0.5, 1.0]);
    }

    /// RDA against a float64 computation written from the formula.
    #[test]
    fn rda_matches_the_float64_formula() {
        let a = [3.0f32, 4.0, 0.0];
        let b = [0.0f32, 0.0, 2.0];
        let c = [-1.0f32, 1.0, 1.0];
        let w = [
            learner_weight(100, 10),
            learner_weight(50, 10),
            learner_weight(80, 20),
        ];
        let got = rda(&[&a, &b, &c], &w);
        let vs = [a, b, c].map(|v| v.map(|x| x as f64));
        let norms: Vec<f64> = vs
            .iter()
            .map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        let tw: f64 = w.iter().sum();
        let radius: f64 = norms.iter().zip(&w).map(|(n, w)| n * w).sum::<f64>() / tw;
        let mut dir = [0.0f64; 3];
        for i in 0..3 {
            for k in 0..3 {
                dir[k] += w[i] * vs[i][k] / norms[i] / tw;
            }
        }
        let dn = dir.iter().map(|x| x * x).sum::<f64>().sqrt();
        for k in 0..3 {
            assert!(
                (got[k] as f64 - radius * dir[k] / dn).abs() < 1e-6,
                "{got:?}"
            );
        }
        // The merged step keeps the mean norm, unlike a plain mean of orthogonal vectors.
        let merged_norm = got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((merged_norm - radius).abs() < 1e-5);
        let mean = weighted_mean(&[&a, &b], &[1.0, 1.0]);
        assert!(mean.iter().map(|x| x * x).sum::<f32>().sqrt() < 0.6 * 5.0);
    }

    #[test]
    fn zero_weights_and_zero_deltas_give_zero() {
        assert_eq!(rda(&[&[1.0, 2.0]], &[0.0]), vec![0.0, 0.0]);
        assert_eq!(
            rda(&[&[0.0, 0.0], &[0.0, 0.0]], &[1.0, 2.0]),
            vec![0.0, 0.0]
        );
        assert_eq!(
            weighted_mean(&[&[2.0, 4.0], &[4.0, 8.0]], &[1.0, 3.0]),
            vec![3.5, 7.0]
        );
        assert_eq!(learner_weight(10, 0), 0.0);
        assert_eq!(learner_weight(100, 4), 2500.0);
    }
}
