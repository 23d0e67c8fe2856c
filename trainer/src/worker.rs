//! One learner's inner loop as a plain object, for the learner process (and the coordinator,
//! which builds the same model to know the initial global parameters and to evaluate the final
//! one). No networking here: the process glue decides when to step, pull and apply.
//!
//! [`InnerLoop`] is what the learner process drives: a [`Worker`] (one process, one device) or
//! rank 0 of a learner with several ranks ([`crate::sharded::worker::RankedWorker`]), whose other ranks
//! follow its commands.

use crate::data::Batcher;
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::Recipe;
use crate::train::PreparedData;
use crate::train::{backward_micro_batches, build_model, evaluate, prepare_data, resolve_device};
use crate::GemmaConfig;
use anyhow::{anyhow, bail, Result};
use atoll_coordinator::{ApplyRule, FragmentPlan, TensorInfo};
use std::path::Path;
use tch::{Kind, Tensor};

/// A learner's model and inner optimizer as the learner process uses them. Tensors are named
/// by their index in the model's trainable-parameter order (the fragment plan's indices).
pub trait InnerLoop {
    /// The fragment plan every process derives identically from the model's tensors.
    fn plan(&self) -> Result<FragmentPlan>;
    /// Identifies the model and the plan: a learner whose hash differs from the coordinator's
    /// is refused at Join.
    fn model_hash(&self) -> Result<String>;
    fn tokens_per_step(&self) -> u64;
    fn step(&self) -> u64;
    /// Trains on the windows of learner `index` of `count`, continuing at `resume_step`.
    fn assign_shard(&mut self, index: usize, count: usize, resume_step: u64) -> Result<()>;
    /// One inner AdamW step; returns its loss.
    fn train_step(&mut self) -> Result<f64>;
    /// Host f32 copies of the given tensors.
    fn values(&mut self, tensors: &[usize]) -> Result<Vec<Vec<f32>>>;
    /// Applies a merged fragment by `rule`: `rebase_base` holds, per tensor, what the local work
    /// kept under [`ApplyRule::Rebase`] is measured from (the other rules do not read it).
    fn apply(
        &mut self,
        rule: ApplyRule,
        tensors: &[usize],
        values: &[Vec<f32>],
        rebase_base: Option<&[Vec<f32>]>,
    ) -> Result<()> {
        if rule == ApplyRule::Overwrite {
            // No need to read the local values.
            return self.overwrite(tensors, values);
        }
        let local = self.values(tensors)?;
        self.overwrite(tensors, &applied_values(rule, &local, values, rebase_base))
    }
    /// Sets the given tensors to `values`.
    fn overwrite(&mut self, tensors: &[usize], values: &[Vec<f32>]) -> Result<()>;
    /// Called while the learner waits on the network (a sharded learner's rank 0 tells its
    /// other ranks it is alive).
    fn keep_alive(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The tensors' values once a merged fragment is applied by `rule` to `local`.
pub fn applied_values(
    rule: ApplyRule,
    local: &[Vec<f32>],
    values: &[Vec<f32>],
    rebase_base: Option<&[Vec<f32>]>,
) -> Vec<Vec<f32>> {
    local
        .iter()
        .zip(values)
        .enumerate()
        .map(|(k, (local, global))| {
            let base = rebase_base.map_or(&[][..], |b| b[k].as_slice());
            assert!(
                rule != ApplyRule::Rebase || base.len() == global.len(),
                "rebase needs the values its kept work is measured from"
            );
            rule.applied(local, global, base)
        })
        .collect()
}

/// The fragment plan of a model with these trainable tensors.
pub fn fragment_plan(tensors: Vec<TensorInfo>, recipe: &Recipe) -> Result<FragmentPlan> {
    plan_with_fragments(tensors, recipe.sync.fragments.0, recipe)
}

/// The plan with `fragments` fragments and the recipe's other plan settings (classic DiLoCo
/// syncs the whole model as one fragment whatever `sync.fragments` says).
pub fn plan_with_fragments(
    tensors: Vec<TensorInfo>,
    fragments: usize,
    recipe: &Recipe,
) -> Result<FragmentPlan> {
    FragmentPlan::new(tensors, fragments)
        .map_err(|e| anyhow!("sync.fragments: {e}"))?
        .with_part_values(recipe.sync.link.part_values)
        .map_err(|e| anyhow!("sync.link.part_values: {e}"))
}

/// The model hash of [`InnerLoop::model_hash`]: the HF config and the plan's fingerprint.
pub fn model_hash(config: &GemmaConfig, plan: &FragmentPlan) -> Result<String> {
    let config = serde_json::to_string(&config.to_hf_json())?;
    let h = fnv(config.as_bytes(), 0xcbf2_9ce4_8422_2325);
    Ok(format!(
        "{:016x}",
        fnv(&plan.fingerprint().to_le_bytes(), h)
    ))
}

/// The trainable tensors' names and shapes, in trainable-parameter order.
pub fn tensor_infos(model: &GemmaModel) -> Vec<TensorInfo> {
    model
        .named_trainable_parameters()
        .into_iter()
        .map(|(n, t)| {
            let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
            TensorInfo::new(n, &shape)
        })
        .collect()
}

pub struct Worker {
    recipe: Recipe,
    model: GemmaModel,
    params: Vec<Tensor>,
    /// None in a worker that only holds, evaluates and saves the model (the coordinator's).
    optimizer: Option<AdamW>,
    data: LearnerData,
    step: u64,
}

/// A learner's data: the corpus prepared once, the windows of its shard and their order.
pub struct LearnerData {
    pub prepared: PreparedData,
    shard: Vec<usize>,
    batcher: Batcher,
}

impl LearnerData {
    /// Every window of the corpus until [`LearnerData::assign`] narrows it.
    pub fn prepare(recipe: &Recipe) -> Result<Self> {
        let prepared = prepare_data(recipe, crate::data::BOS_ID, crate::data::EOS_ID)?;
        let shard: Vec<usize> = (0..prepared.train.len()).collect();
        let batcher = Batcher::new(shard.len(), recipe.seed);
        Ok(LearnerData {
            prepared,
            shard,
            batcher,
        })
    }

    /// The windows of learner `index` of `count` (`data.sharding`, as the simulation does), in
    /// the order `resume_step` steps would have reached.
    pub fn assign(
        &mut self,
        recipe: &Recipe,
        index: usize,
        count: usize,
        resume_step: u64,
    ) -> Result<()> {
        let shard = crate::data::learner_windows(
            self.prepared.train.len(),
            index,
            count,
            recipe.data.sharding,
        )?;
        self.batcher = Batcher::new(shard.len(), recipe.seed.wrapping_add(index as u64));
        self.shard = shard;
        for _ in 0..resume_step {
            self.next_step(recipe);
        }
        Ok(())
    }

    /// The windows of the next step's micro-batches (`train.grad_accum` of `train.batch_size`).
    pub fn next_step(&mut self, recipe: &Recipe) -> Vec<Vec<usize>> {
        let t = &recipe.train;
        (0..t.grad_accum.0)
            .map(|_| {
                self.batcher
                    .next_windows(t.batch_size.0)
                    .into_iter()
                    .map(|i| self.shard[i])
                    .collect()
            })
            .collect()
    }
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
        Self::build(recipe, true)
    }

    /// The model and data without the inner optimizer's two moments per parameter: for a
    /// process that holds, evaluates and saves the global model but never trains (the
    /// coordinator), which at 12B would otherwise keep 96 GB of AdamW state it never uses.
    pub fn without_optimizer(recipe: &Recipe) -> Result<Self> {
        Self::build(recipe, false)
    }

    fn build(recipe: &Recipe, with_optimizer: bool) -> Result<Self> {
        if let Some(t) = recipe.train.threads {
            tch::set_num_threads(t.0 as i32);
        }
        let device = resolve_device(recipe.train.device)?;
        let data = LearnerData::prepare(recipe)?;
        let model = build_model(recipe, data.prepared.tokenizer.get_vocab_size(true), device)?;
        let params = model.trainable_parameters();
        let optimizer = with_optimizer.then(|| {
            AdamW::new(
                params.iter().map(Tensor::shallow_clone).collect(),
                recipe.train.adamw(),
            )
        });
        Ok(Worker {
            recipe: recipe.clone(),
            model,
            params,
            optimizer,
            data,
            step: 0,
        })
    }

    pub fn model(&self) -> &GemmaModel {
        &self.model
    }

    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        tensor_infos(&self.model)
    }

    /// The fragment plan every process derives identically from the model's tensors.
    pub fn plan(&self) -> Result<FragmentPlan> {
        fragment_plan(self.tensor_infos(), &self.recipe)
    }

    /// Identifies the model (config and tensors) and the plan: a learner whose hash differs
    /// from the coordinator's is refused at Join.
    pub fn model_hash(&self) -> Result<String> {
        model_hash(&self.model.config, &self.plan()?)
    }

    /// Trains on the windows of learner `index` of `count` (`data.sharding`, as the simulation
    /// does), continuing at `resume_step` with the data order that step would have reached.
    pub fn assign_shard(&mut self, index: usize, count: usize, resume_step: u64) -> Result<()> {
        self.data.assign(&self.recipe, index, count, resume_step)?;
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
        let Some(optimizer) = self.optimizer.as_mut() else {
            bail!("this worker was built without an optimizer: it evaluates, it does not train");
        };
        let t = &self.recipe.train;
        let lr = t.lr_at((self.step as usize).min(t.max_steps.0.saturating_sub(1)));
        let micro_batches = self.data.next_step(&self.recipe);
        let loss = backward_micro_batches(&self.model, &self.data.prepared.train, &micro_batches);
        if !loss.is_finite() {
            return Err(anyhow!(
                "the learner diverged: loss is {loss}; lower train.lr"
            ));
        }
        optimizer.clipped_step(lr, t.clip());
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

    /// Sets a fragment's tensors to `values`.
    pub fn overwrite(&mut self, tensors: &[usize], values: &[Vec<f32>]) {
        for (&ti, v) in tensors.iter().zip(values) {
            set_flat(&mut self.params[ti], v);
        }
    }

    /// Mean loss on the held-out batches.
    pub fn evaluate(&self) -> f64 {
        let t = &self.recipe.train;
        evaluate(
            &self.model,
            &self.data.prepared.eval,
            t.batch_size.0,
            t.eval_batches.0,
        )
    }

    /// Writes the model as a Hugging Face checkpoint (and the tokenizer beside it).
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::save_model(&self.model, dir, self.model.kind(), 4 << 30)?;
        self.data
            .prepared
            .tokenizer
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow!("writing the tokenizer: {e}"))?;
        Ok(())
    }
}

impl InnerLoop for Worker {
    fn plan(&self) -> Result<FragmentPlan> {
        Worker::plan(self)
    }

    fn model_hash(&self) -> Result<String> {
        Worker::model_hash(self)
    }

    fn tokens_per_step(&self) -> u64 {
        Worker::tokens_per_step(self)
    }

    fn step(&self) -> u64 {
        Worker::step(self)
    }

    fn assign_shard(&mut self, index: usize, count: usize, resume_step: u64) -> Result<()> {
        Worker::assign_shard(self, index, count, resume_step)
    }

    fn train_step(&mut self) -> Result<f64> {
        Worker::train_step(self)
    }

    fn values(&mut self, tensors: &[usize]) -> Result<Vec<Vec<f32>>> {
        Ok(Worker::values(self, tensors))
    }

    fn overwrite(&mut self, tensors: &[usize], values: &[Vec<f32>]) -> Result<()> {
        Worker::overwrite(self, tensors, values);
        Ok(())
    }
}
