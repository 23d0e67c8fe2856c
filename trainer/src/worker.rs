//! One learner's inner loop as a plain object, for the learner process (and the coordinator,
//! which builds the same model to know the initial global parameters and to evaluate the final
//! one). No networking here: the process glue decides when to step, pull and apply.

use crate::data::Batcher;
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::Recipe;
use crate::train::PreparedData;
use crate::train::{backward_micro_batches, build_model, evaluate, prepare_data, resolve_device};
use anyhow::{anyhow, Result};
use atoll_coordinator::{ApplyRule, FragmentPlan, TensorInfo};
use std::path::Path;
use tch::{Kind, Tensor};

pub struct Worker {
    recipe: Recipe,
    model: GemmaModel,
    params: Vec<Tensor>,
    optimizer: AdamW,
    data: PreparedData,
    shard: Vec<usize>,
    batcher: Batcher,
    step: u64,
}

/// Host copy of a tensor, flattened to f32.
pub fn flat(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32 tensor")
}

/// Overwrites a tensor (any dtype, any device) with host f32 values.
pub fn set_flat(t: &mut Tensor, values: &[f32]) {
    let src = Tensor::from_slice(values)
        .view(t.size().as_slice())
        .to_kind(t.kind())
        .to_device(t.device());
    tch::no_grad(|| t.copy_(&src));
}

/// FNV-1a, for fingerprints compared between processes.
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Worker {
    /// Prepares data and the seeded model; the learner trains on every window until
    /// [`Worker::assign_shard`] narrows it.
    pub fn new(recipe: &Recipe) -> Result<Self> {
        if let Some(t) = recipe.train.threads {
            tch::set_num_threads(t.0 as i32);
        }
        let device = resolve_device(recipe.train.device)?;
        let data = prepare_data(recipe, crate::data::BOS_ID, crate::data::EOS_ID)?;
        let model = build_model(recipe, data.tokenizer.get_vocab_size(true), device)?;
        let params = model.trainable_parameters();
        let optimizer = AdamW::new(
            params.iter().map(Tensor::shallow_clone).collect(),
            recipe.train.adamw(),
        );
        let shard: Vec<usize> = (0..data.train.len()).collect();
        let batcher = Batcher::new(shard.len(), recipe.seed);
        Ok(Worker {
            recipe: recipe.clone(),
            model,
            params,
            optimizer,
            data,
            shard,
            batcher,
            step: 0,
        })
    }

    pub fn model(&self) -> &GemmaModel {
        &self.model
    }

    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.model
            .named_trainable_parameters()
            .into_iter()
            .map(|(n, t)| {
                let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
                TensorInfo::new(n, &shape)
            })
            .collect()
    }

    /// The fragment plan every process derives identically from the model's tensors.
    pub fn plan(&self) -> Result<FragmentPlan> {
        FragmentPlan::new(self.tensor_infos(), self.recipe.sync.fragments.0)
            .map_err(|e| anyhow!("sync.fragments: {e}"))
    }

    /// Identifies the model (config and tensors) and the plan: a learner whose hash differs
    /// from the coordinator's is refused at Join.
    pub fn model_hash(&self) -> Result<String> {
        let config = serde_json::to_string(&self.model.config.to_hf_json())?;
        let h = fnv(config.as_bytes(), 0xcbf2_9ce4_8422_2325);
        Ok(format!(
            "{:016x}",
            fnv(&self.plan()?.fingerprint().to_le_bytes(), h)
        ))
    }

    /// Trains on the windows of learner `index` of `count` (`data.sharding`, as the simulation
    /// does), continuing at `resume_step` with the data order that step would have reached.
    pub fn assign_shard(&mut self, index: usize, count: usize, resume_step: u64) -> Result<()> {
        let shard = crate::data::learner_windows(
            self.data.train.len(),
            index,
            count,
            self.recipe.data.sharding,
        )?;
        self.batcher = Batcher::new(shard.len(), self.recipe.seed.wrapping_add(index as u64));
        self.shard = shard;
        let t = &self.recipe.train;
        for _ in 0..resume_step as usize * t.grad_accum.0 {
            self.batcher.next_windows(t.batch_size.0);
        }
        self.step = resume_step;
        Ok(())
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn tokens_per_step(&self) -> u64 {
        let t = &self.recipe.train;
        (t.batch_size.0 * t.grad_accum.0 * self.recipe.data.seq_len.0) as u64
    }

    /// One inner AdamW step; returns its loss.
    pub fn train_step(&mut self) -> Result<f64> {
        let t = &self.recipe.train;
        let lr = t.lr_at((self.step as usize).min(t.max_steps.0.saturating_sub(1)));
        let micro_batches: Vec<Vec<usize>> = (0..t.grad_accum.0)
            .map(|_| {
                self.batcher
                    .next_windows(t.batch_size.0)
                    .into_iter()
                    .map(|i| self.shard[i])
                    .collect()
            })
            .collect();
        let loss = backward_micro_batches(&self.model, &self.data.train, &micro_batches);
        if !loss.is_finite() {
            return Err(anyhow!(
                "the learner diverged: loss is {loss}; lower train.lr"
            ));
        }
        self.optimizer.clipped_step(lr, t.clip());
        self.step += 1;
        Ok(loss)
    }

    /// Host copies of the given tensors (indices in trainable-parameter order).
    pub fn values(&self, tensors: &[usize]) -> Vec<Vec<f32>> {
        tensors.iter().map(|&i| flat(&self.params[i])).collect()
    }

    pub fn all_values(&self) -> Vec<Vec<f32>> {
        self.params.iter().map(flat).collect()
    }

    /// Applies a merged fragment by `rule`; `rebase_base` holds, per tensor, what the local work
    /// kept under [`ApplyRule::Rebase`] is measured from (the other rules do not read it).
    pub fn apply(
        &mut self,
        rule: ApplyRule,
        tensors: &[usize],
        values: &[Vec<f32>],
        rebase_base: Option<&[Vec<f32>]>,
    ) {
        if rule == ApplyRule::Overwrite {
            // No need to copy the local values off the device.
            return self.overwrite(tensors, values);
        }
        for (k, &ti) in tensors.iter().enumerate() {
            let base = rebase_base.map_or(&[][..], |b| b[k].as_slice());
            assert!(
                rule != ApplyRule::Rebase || base.len() == values[k].len(),
                "rebase needs the values its kept work is measured from"
            );
            let target = rule.applied(&flat(&self.params[ti]), &values[k], base);
            set_flat(&mut self.params[ti], &target);
        }
    }

    /// Sets a fragment's tensors to `values`.
    pub fn overwrite(&mut self, tensors: &[usize], values: &[Vec<f32>]) {
        for (&ti, v) in tensors.iter().zip(values) {
            set_flat(&mut self.params[ti], v);
        }
    }

    pub fn set_all(&mut self, values: &[Vec<f32>]) {
        for (p, v) in self.params.iter_mut().zip(values) {
            set_flat(p, v);
        }
    }

    /// Mean loss on the held-out batches.
    pub fn evaluate(&self) -> f64 {
        let t = &self.recipe.train;
        evaluate(
            &self.model,
            &self.data.eval,
            t.batch_size.0,
            t.eval_batches.0,
        )
    }

    /// Writes the model as a Hugging Face checkpoint (and the tokenizer beside it).
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::save_model(&self.model, dir, self.model.kind(), 4 << 30)?;
        self.data
            .tokenizer
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow!("writing the tokenizer: {e}"))?;
        Ok(())
    }
}
