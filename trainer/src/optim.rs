//! The inner optimizer: AdamW with decoupled weight decay on matrices only, global-norm gradient
//! clipping, and a linear-warmup + cosine learning-rate schedule.
//!
//! State (moments, f32 master weights for low-precision parameters, step count) is held in plain
//! tensors so it can be checkpointed and so the Decoupled DiLoCo learner can read and overwrite
//! parameters between steps.

/// The hyperparameters and the schedule are the recipe's `train` section's (atoll-recipe), so that
/// the section can hand them out without the recipe depending on the trainer.
pub use atoll_recipe::train::{learning_rate, AdamWConfig};
use tch::{Kind, Tensor};

struct ParamState {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// f32 copy of a bf16/f16 parameter: updates accumulate here so small steps are not rounded away.
    master: Option<Tensor>,
    decay: bool,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// Trainable `params` in a stable order. Weight decay applies to tensors of rank ≥ 2.
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|param| {
                let decay = param.dim() >= 2;
                (param, decay)
            })
            .collect();
        Self::with_decay(params, config)
    }

    /// Trainable `params`, each with whether weight decay applies to it: for flattened tensors
    /// (the shards of [`crate::sharded`]) whose rank no longer tells matrices from vectors.
    pub fn with_decay(params: Vec<(Tensor, bool)>, config: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(param, decay)| {
                let zeros = || Tensor::zeros_like(&param).to_kind(Kind::Float);
                let master =
                    (param.kind() != Kind::Float).then(|| param.detach().to_kind(Kind::Float));
                ParamState {
                    decay,
                    exp_avg: zeros(),
                    exp_avg_sq: zeros(),
                    master,
                    param,
                }
            })
            .collect();
        AdamW {
            config,
            params,
            step: 0,
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Moments and master weights, named `exp_avg.<i>`, `exp_avg_sq.<i>`, `master.<i>` by
    /// parameter index: with the parameters themselves and the step count, everything a
    /// resumed run needs to continue bit for bit.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 3);
        for (i, p) in self.params.iter().enumerate() {
            out.push((format!("exp_avg.{i}"), p.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{i}"), p.exp_avg_sq.shallow_clone()));
            if let Some(m) = &p.master {
                out.push((format!("master.{i}"), m.shallow_clone()));
            }
        }
        out
    }

    /// Restores what [`AdamW::state_tensors`] saved, after `step` updates. Shapes must match
    /// this optimizer's parameters.
    pub fn load_state(&mut self, step: u64, tensors: Vec<(String, Tensor)>) -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        let mut by_name: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        for (i, p) in self.params.iter_mut().enumerate() {
            let mut take = |name: String, target: &mut Tensor| -> anyhow::Result<()> {
                let t = by_name
                    .remove(&name)
                    .ok_or_else(|| anyhow::anyhow!("optimizer state lacks {name}"))?;
                if t.size() != target.size() {
                    anyhow::bail!(
                        "optimizer state {name} has shape {:?}, the model needs {:?}",
                        t.size(),
                        target.size()
                    );
                }
                target.copy_(&t);
                Ok(())
            };
            take(format!("exp_avg.{i}"), &mut p.exp_avg)?;
            take(format!("exp_avg_sq.{i}"), &mut p.exp_avg_sq)?;
            if let Some(m) = &mut p.master {
                take(format!("master.{i}"), m)?;
            }
        }
        if let Some(extra) = by_name.keys().next() {
            anyhow::bail!("optimizer state has {extra}, which this model has no parameter for");
        }
        self.step = step;
        Ok(())
    }

    /// Parameter `i` (in construction order) at full precision: its f32 master copy for a
    /// low-precision parameter, else the parameter itself (shallow).
    pub fn full_precision(&self, i: usize) -> Tensor {
        let p = &self.params[i];
        p.master.as_ref().unwrap_or(&p.param).shallow_clone()
    }

    /// Replaces parameter `i`'s values between steps (a synchronisation overwriting the weights):
    /// the f32 master copy of a low-precision parameter takes `values` at full precision, so the
    /// next step continues from them instead of writing the stale master back. Moments are kept.
    pub fn set_values(&mut self, i: usize, values: &Tensor) {
        let _guard = tch::no_grad_guard();
        let p = &mut self.params[i];
        let src = values.view(p.param.size().as_slice());
        if let Some(master) = &mut p.master {
            master.copy_(&src.to_kind(Kind::Float).to_device(master.device()));
        }
        p.param
            .copy_(&src.to_kind(p.param.kind()).to_device(p.param.device()));
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Global L2 norm of the gradients; scales them to `max_norm` when above it (as
    /// torch.nn.utils.clip_grad_norm_). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: Option<f64>) -> f64 {
        let _guard = tch::no_grad_guard();
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.param.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if let Some(max) = max_norm {
            let coef = max / (total + 1e-6);
            if coef < 1.0 {
                for p in &mut self.params {
                    let mut g = p.param.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            }
        }
        total
    }

    /// The end of a training step: clip the gradients, update, zero them. Returns the
    /// gradient norm before clipping.
    pub fn clipped_step(&mut self, lr: f64, max_norm: Option<f64>) -> f64 {
        let norm = self.clip_grad_norm(max_norm);
        self.step(lr);
        self.zero_grad();
        norm
    }

    /// One AdamW update at learning rate `lr` (torch.optim.AdamW semantics).
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for p in &mut self.params {
            let grad = p.param.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(Kind::Float);
            let mut target = match &p.master {
                Some(m) => m.shallow_clone(),
                None => p.param.shallow_clone(),
            };
            if p.decay && c.weight_decay > 0.0 {
                let _ = target.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = p.exp_avg.lerp_(&grad, 1.0 - c.beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = p.exp_avg_sq.addcmul_(&(&grad * (1.0 - c.beta2)), &grad);
            let denom = (p.exp_avg_sq.sqrt() / bias2.sqrt()) + c.eps;
            let _ = target.addcdiv_(&(&p.exp_avg * (-lr / bias1)), &denom);
            if p.master.is_some() {
                p.param.copy_(&target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three AdamW steps on a quadratic against a float64 re-derivation of torch.optim.AdamW.
    #[test]
    fn adamw_matches_a_float64_reference() {
        let w0 = [0.5f64, -1.0, 2.0, 0.25];
        let param = Tensor::from_slice(&w0.map(|x| x as f32))
            .view([2, 2])
            .set_requires_grad(true);
        let bias = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![param.shallow_clone(), bias.shallow_clone()], cfg);
        let lr = 0.01;
        let (mut w, mut m, mut v) = (w0.to_vec(), vec![0.0; 4], vec![0.0; 4]);
        let (mut b, mut bm, mut bv) = (vec![1.0f64, -2.0], vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=3 {
            opt.zero_grad();
            let loss =
                (&param * &param).sum(Kind::Float) * 1.5 + (&bias * &bias * &bias).sum(Kind::Float);
            loss.backward();
            opt.step(lr);
            let update = |x: &mut Vec<f64>,
                          m: &mut Vec<f64>,
                          v: &mut Vec<f64>,
                          grads: Vec<f64>,
                          decay: bool| {
                for i in 0..x.len() {
                    if decay {
                        x[i] *= 1.0 - lr * cfg.weight_decay;
                    }
                    m[i] = 0.9 * m[i] + 0.1 * grads[i];
                    v[i] = 0.95 * v[i] + 0.05 * grads[i] * grads[i];
                    let mhat = m[i] / (1.0 - 0.9f64.powi(t));
                    let denom = (v[i] / (1.0 - 0.95f64.powi(t))).sqrt() + cfg.eps;
                    x[i] -= lr * mhat / denom;
                }
            };
            let gw: Vec<f64> = w.iter().map(|x| 3.0 * x).collect();
            let gb: Vec<f64> = b.iter().map(|x| 3.0 * x * x).collect();
            update(&mut w, &mut m, &mut v, gw, true);
            update(&mut b, &mut bm, &mut bv, gb, false);
        }
        let got: Vec<f64> = Vec::<f32>::try_from(param.view([-1]))
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let got_b: Vec<f64> = Vec::<f32>::try_from(&bias)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        for (a, e) in got.iter().chain(&got_b).zip(w.iter().chain(&b)) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
    }

    /// A bf16 parameter overwritten between steps (a DiLoCo broadcast) must keep the new values:
    /// the optimizer's f32 master copy follows them instead of being written back stale.
    #[test]
    fn set_values_moves_the_master_copy_of_a_low_precision_parameter() {
        let p = Tensor::from_slice(&[1.0f32, -1.0])
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(vec![p.shallow_clone()], cfg);
        let theta = Tensor::from_slice(&[10.0f32, 20.001]);
        opt.set_values(0, &theta);
        assert_eq!(
            Vec::<f32>::try_from(opt.full_precision(0)).unwrap(),
            vec![10.0, 20.001],
            "the master holds the f32 values, not their bf16 rounding"
        );
        (&p.to_kind(Kind::Float) * 0.0).sum(Kind::Float).backward(); // zero gradient
        opt.step(0.1);
        let after = Vec::<f32>::try_from(p.to_kind(Kind::Float)).unwrap();
        assert_eq!(
            after,
            vec![10.0, 20.0],
            "{after:?}: the step restored stale weights"
        );
    }

    #[test]
    fn clipping_scales_gradients_to_the_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![p.shallow_clone()],
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        );
        (&p * &p).sum(Kind::Float).backward(); // grad = (6, 8), norm 10
        let norm = opt.clip_grad_norm(Some(1.0));
        assert!((norm - 10.0).abs() < 1e-5);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
    }
}
