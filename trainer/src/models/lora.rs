//! LoRA adapters on the model's linear layers (Hu et al. 2021, as PEFT implements them):
//! y = x·Wᵀ + s · B·A·dropout(x), with A [r, in], B [out, r], s = alpha / r, or alpha / sqrt(r)
//! with rsLoRA. The base weights are frozen (and may stay in bf16); the adapters live in their own
//! `VarStore` in f32, so only they reach the optimizer. `merge` folds s·B·A into W (for export),
//! `unmerge` takes it out again.

use super::layers::Linear;
use super::{rng_guard, GemmaModel};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

pub use crate::recipe::finetune::DEFAULT_TARGETS;

/// The adapter hyper-parameters (the `lora:` recipe section, or a PEFT `adapter_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names as PEFT's `target_modules` list: a module matches a target when its full name
    /// equals it or ends with `.<target>`.
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// The `lora:` recipe section as adapter hyper-parameters.
    pub fn from_section(section: &crate::recipe::finetune::LoraSection) -> LoraSpec {
        LoraSpec {
            rank: section.r.0 as i64,
            alpha: section.alpha.0,
            dropout: section.dropout,
            rslora: section.rslora,
            targets: section.targets.clone(),
        }
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank <= 0 {
            bail!("lora rank must be a positive integer, got {}", self.rank);
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("lora alpha must be a positive number, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("lora targets: name at least one module (e.g. q_proj)");
        }
        Ok(())
    }
}

/// Whether module `name` (e.g. `model.layers.3.mlp.up_proj`) is selected by `target`.
pub fn target_matches(name: &str, target: &str) -> bool {
    name == target
        || name
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// The adapter one linear layer carries. A and B are shared (shallow) with the `LoraSet`'s store.
#[derive(Debug)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
    merged: AtomicBool,
}

impl LoraAdapter {
    /// base + s·B·A·dropout(x), computed in the adapter's dtype (as PEFT casts x to lora_A's) and
    /// added in the base output's dtype.
    pub fn add_to(&self, x: &Tensor, base: Tensor) -> Tensor {
        if self.merged.load(Ordering::Relaxed) {
            return base;
        }
        let mut xa = x.to_kind(self.a.kind());
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            // An explicit Bernoulli mask: libtorch's `dropout` draws differently with and
            // without a graph, and a checkpointed layer is run both ways with the same seed.
            let keep = 1.0 - self.dropout;
            let mask = tch::no_grad(|| xa.bernoulli_p(keep));
            xa = &xa * mask / keep;
        }
        let delta = xa
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * self.scale;
        let kind = base.kind();
        base + delta.to_kind(kind)
    }

    /// s·B·A in f32, shaped like the base weight.
    fn delta_weight(&self) -> Tensor {
        self.b.to_kind(Kind::Float).mm(&self.a.to_kind(Kind::Float)) * self.scale
    }
}

/// The adapters attached to a model: their own store (trainable, f32), and the modules they sit on.
pub struct LoraSet {
    pub spec: LoraSpec,
    pub vs: nn::VarStore,
    /// Full module names, in model order.
    pub modules: Vec<String>,
    training: Arc<AtomicBool>,
}

fn adapter_path<'a>(root: &nn::Path<'a>, module: &str) -> nn::Path<'a> {
    module.split('.').fold(root.clone(), |p, part| p / part)
}

impl LoraSet {
    /// Freezes the model's weights and puts a fresh adapter (PEFT's initialisation: A uniform in
    /// ±1/sqrt(in), B = 0, so the model is unchanged at step 0) on every linear layer that
    /// `spec.targets` selects. A target that selects nothing is an error. Draws depend on `seed`.
    pub fn attach(model: &mut GemmaModel, spec: &LoraSpec, seed: u64) -> Result<LoraSet> {
        spec.validate()?;
        let names: Vec<String> = model.linears_mut().iter().map(|l| l.name.clone()).collect();
        for target in &spec.targets {
            if !names.iter().any(|n| target_matches(n, target)) {
                let mut kinds: Vec<&str> =
                    names.iter().filter_map(|n| n.rsplit('.').next()).collect();
                kinds.sort();
                kinds.dedup();
                bail!(
                    "lora target `{target}` matches no linear layer of this model (its layers: {}; or a full name such as {})",
                    kinds.join(", "),
                    names.first().map(String::as_str).unwrap_or("-")
                );
            }
        }
        let selected = |name: &str| spec.targets.iter().any(|t| target_matches(name, t));
        Self::attach_where(model, spec, seed, selected)
    }

    /// Attaches adapters to the modules `select` accepts (targets already checked).
    pub(crate) fn attach_where(
        model: &mut GemmaModel,
        spec: &LoraSpec,
        seed: u64,
        select: impl Fn(&str) -> bool,
    ) -> Result<LoraSet> {
        spec.validate()?;
        let device = model.device();
        model.vs.freeze();
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let training = Arc::new(AtomicBool::new(false));
        let mut modules = Vec::new();
        let _rng = rng_guard();
        tch::manual_seed(seed as i64);
        for linear in model.linears_mut() {
            if !select(&linear.name) {
                continue;
            }
            if linear.lora.is_some() {
                bail!("{} already carries an adapter", linear.name);
            }
            let (out_dim, in_dim) = (linear.weight.size()[0], linear.weight.size()[1]);
            let p = adapter_path(&root, &linear.name);
            let bound = 1.0 / (in_dim as f64).sqrt();
            let a = (&p / "lora_A").uniform("weight", &[spec.rank, in_dim], -bound, bound);
            let b = (&p / "lora_B").zeros("weight", &[out_dim, spec.rank]);
            linear.lora = Some(LoraAdapter {
                a,
                b,
                scale: spec.scale(),
                dropout: spec.dropout,
                training: training.clone(),
                merged: AtomicBool::new(false),
            });
            modules.push(linear.name.clone());
        }
        if modules.is_empty() {
            bail!("lora: no linear layer selected");
        }
        Ok(LoraSet {
            spec: spec.clone(),
            vs,
            modules,
            training,
        })
    }

    /// Dropout is active only while training.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// (A, B) of each module, in model order, named `<module>.lora_A.weight` / `.lora_B.weight`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        let mut out = Vec::with_capacity(2 * self.modules.len());
        for m in &self.modules {
            for ab in ["lora_A", "lora_B"] {
                let name = format!("{m}.{ab}.weight");
                if let Some(t) = vars.get(&name) {
                    out.push((name, t.shallow_clone()));
                }
            }
        }
        out
    }

    /// The trainable tensors in a stable order (for the optimizer and the gradient all-reduce).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_tensors().into_iter().map(|(_, t)| t).collect()
    }

    pub fn num_parameters(&self) -> u64 {
        self.parameters().iter().map(|t| t.numel() as u64).sum()
    }

    /// Folds s·B·A into each adapted base weight; the adapters then add nothing until `unmerge`.
    pub fn merge(&self, model: &mut GemmaModel) -> Result<()> {
        self.fold(model, true)
    }

    /// Takes s·B·A back out of the base weights (exact in f32; bf16 rounds as PEFT's does).
    pub fn unmerge(&self, model: &mut GemmaModel) -> Result<()> {
        self.fold(model, false)
    }

    fn fold(&self, model: &mut GemmaModel, merge: bool) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for linear in model.linears_mut() {
            let Linear { weight, lora, name } = linear;
            let Some(adapter) = lora else { continue };
            if adapter.merged.load(Ordering::Relaxed) == merge {
                bail!(
                    "{name}: adapter is already {}",
                    if merge { "merged" } else { "unmerged" }
                );
            }
            let delta = adapter.delta_weight().to_device(weight.device());
            let updated = if merge {
                weight.to_kind(Kind::Float) + delta
            } else {
                weight.to_kind(Kind::Float) - delta
            };
            weight.copy_(&updated.to_kind(weight.kind()));
            adapter.merged.store(merge, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;
    use tch::Device;

    fn tiny() -> GemmaModel {
        let mut cfg = preset("gemma3-tiny").unwrap().config;
        cfg.vocab_size = 97;
        GemmaModel::new_seeded(cfg, Device::Cpu, Kind::Float, 3).unwrap()
    }

    fn spec(targets: &[&str]) -> LoraSpec {
        LoraSpec {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            rslora: false,
            targets: targets.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn randomise_b(set: &LoraSet) {
        let _g = tch::no_grad_guard();
        tch::manual_seed(11);
        for (name, mut t) in set.named_tensors() {
            if name.contains("lora_B") {
                t.copy_(&(Tensor::randn_like(&t) * 0.05));
            }
        }
    }

    #[test]
    fn targets_select_modules_by_suffix_and_unknown_names_are_errors() {
        assert!(target_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(target_matches(
            "model.layers.0.self_attn.q_proj",
            "self_attn.q_proj"
        ));
        assert!(!target_matches("model.layers.0.self_attn.q_proj", "_proj"));
        let mut m = tiny();
        let set = LoraSet::attach(&mut m, &spec(&["q_proj", "down_proj"]), 0).unwrap();
        assert_eq!(set.modules.len(), 2 * m.config.num_hidden_layers);
        let mut m = tiny();
        let err = LoraSet::attach(&mut m, &spec(&["qkv_proj"]), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`qkv_proj` matches no linear layer") && err.contains("q_proj"),
            "{err}"
        );
        let mut bad = spec(&["q_proj"]);
        bad.rank = 0;
        let err = LoraSet::attach(&mut tiny(), &bad, 0).err().unwrap();
        assert!(err.to_string().contains("rank must be a positive"), "{err}");
    }

    /// Fresh adapters leave the model unchanged (B = 0); trained ones change it; merging folds
    /// them into W with the same logits, and unmerging restores W (f32: within 1e-6).
    #[test]
    fn merge_and_unmerge_keep_the_logits() {
        let mut m = tiny();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 33, 2, 70, 4, 8]).unsqueeze(0);
        let base = tch::no_grad(|| m.forward(&ids));
        let w0 = m.vs.variables()["model.layers.1.mlp.up_proj.weight"].copy();
        let mut s = spec(&DEFAULT_TARGETS);
        s.rslora = true;
        let set = LoraSet::attach(&mut m, &s, 5).unwrap();
        let fresh = tch::no_grad(|| m.forward(&ids));
        assert!(
            fresh.allclose(&base, 0.0, 0.0, false),
            "B = 0 must be a no-op"
        );
        randomise_b(&set);
        let adapted = tch::no_grad(|| m.forward(&ids));
        assert!((&adapted - &base).abs().max().double_value(&[]) > 1e-3);
        set.merge(&mut m).unwrap();
        let merged = tch::no_grad(|| m.forward(&ids));
        let diff = (&merged - &adapted).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "merged logits differ by {diff}");
        assert!(set.merge(&mut m).is_err(), "merging twice is refused");
        set.unmerge(&mut m).unwrap();
        let w1 = &m.vs.variables()["model.layers.1.mlp.up_proj.weight"];
        assert!((w1 - &w0).abs().max().double_value(&[]) < 1e-6);
        let back = tch::no_grad(|| m.forward(&ids));
        assert!((&back - &adapted).abs().max().double_value(&[]) < 1e-4);
    }

    /// Only the adapters receive gradients: the base is frozen.
    #[test]
    fn only_adapters_train() {
        let mut m = tiny();
        let set = LoraSet::attach(&mut m, &spec(&["v_proj", "o_proj"]), 1).unwrap();
        randomise_b(&set);
        let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8]).unsqueeze(0);
        let targets = Tensor::from_slice(&[4i64, 5, 6, 7, 8, 9]).unsqueeze(0);
        m.loss(&ids, &targets).backward();
        for (name, t) in m.vs.variables() {
            assert!(!t.requires_grad(), "{name} is not frozen");
        }
        for (name, t) in set.named_tensors() {
            assert!(t.grad().defined(), "{name} got no gradient");
            assert_eq!(t.kind(), Kind::Float);
        }
    }
}
