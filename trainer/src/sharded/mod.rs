//! Sharded data parallel inside one learner (ZeRO-3 / FSDP style): R ranks, each holding 1/R of
//! the parameters, gradients and AdamW moments, so no rank keeps the whole model.
//!
//! Two data-parallel modes exist in Atoll:
//!
//! * **Replicated** (small models): every rank holds the whole model and optimizer, computes the
//!   gradients of its rows and averages them with `atoll_collective::average_gradients` (or
//!   `all_reduce_tensors`, as `train.devices` does in `atoll finetune`). Memory per rank is that
//!   of one process.
//! * **Sharded** (this module, models that do not fit one device): the parameters are split by
//!   *units* ([`plan_units`]): the outer unit (embedding, final norm, LM head when untied) and
//!   one unit per decoder layer. Each unit's trainable tensors are flattened into two groups
//!   (matrices, which take weight decay, and vectors, which do not), each padded with zeros to a
//!   multiple of R; rank r owns the contiguous slice `r·n/R .. (r+1)·n/R` of every group as an
//!   f32 master shard with its AdamW moments ([`ShardedModel`]).
//!
//! One step ([`ShardedModel::train_step`]) over a global batch of B rows, rank r taking rows
//! `r·B/R ..`: forward layer by layer without a graph, each unit all-gathered (in the compute
//! dtype) just before it runs and released right after, keeping only each layer's input; the
//! loss; backward from the top, gathering each unit again, recomputing its layer with a graph
//! and back-propagating the upstream gradient; the unit's flattened gradient is reduce-scattered
//! (summed) at once and the full parameters and gradients are dropped. Each rank scales its loss
//! by 1/(labelled tokens of the global batch) before the backward, so the sum over ranks is the
//! gradient of the global batch's mean loss, as one rank computing the whole batch would get
//! (scaling before the sum rather than after keeps low-precision gradients in range). Then the
//! global gradient norm (an all-reduce of each rank's squared shard norm) clips, and AdamW
//! updates each rank's shards only. Peak memory per rank: the shards, one gathered unit and its
//! gradient, one hidden state per layer and one layer's graph ([`memory`]).
//!
//! The model skeleton (a [`GemmaModel`] whose trainable tensors are emptied between uses) keeps
//! the layers' code unchanged: gathering a unit points its variables at the gathered storage
//! (`set_data`), releasing points them at an empty tensor.

pub mod checkpoint;
pub mod memory;
pub mod worker;

use crate::config::GemmaConfig;
use crate::models::recompute::TokenBatch;
use crate::models::GemmaModel;
use crate::optim::{AdamW, AdamWConfig};
use anyhow::{anyhow, bail, Context, Result};
use atoll_collective::{Collective, ReduceOp};
use tch::{Kind, Tensor};

/// Tensors of one unit flattened together: all matrices (weight decay) or all vectors (none).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<i64>>,
    /// Elements of the tensors together.
    pub numel: i64,
    /// `numel` rounded up to a multiple of the world size.
    pub padded: i64,
    pub decay: bool,
}

impl GroupPlan {
    /// Elements of one rank's shard.
    pub fn shard_len(&self, world: usize) -> i64 {
        self.padded / world as i64
    }
}

/// One unit: gathered, used and released together.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitPlan {
    /// `outer` or `layer <i>`.
    pub label: String,
    pub groups: Vec<GroupPlan>,
}

impl UnitPlan {
    pub fn numel(&self) -> i64 {
        self.groups.iter().map(|g| g.numel).sum()
    }

    pub fn shard_len(&self, world: usize) -> i64 {
        self.groups.iter().map(|g| g.shard_len(world)).sum()
    }
}

/// The units of `cfg` for `world` ranks: index 0 is the outer unit (every trainable tensor not
/// under `model.layers.`), index i + 1 decoder layer i. Tensors keep checkpoint layout order.
pub fn plan_units(cfg: &GemmaConfig, world: usize) -> Result<Vec<UnitPlan>> {
    if world == 0 {
        bail!("sharded data parallel needs at least one rank");
    }
    let layers = cfg.num_hidden_layers;
    // Names and shapes of each unit's (matrices, vectors).
    type Tensors = Vec<(String, Vec<i64>)>;
    let mut members: Vec<[Tensors; 2]> = vec![[Vec::new(), Vec::new()]; layers + 1];
    for spec in cfg.tensor_specs().into_iter().filter(|s| s.trainable) {
        let unit = match spec.name.strip_prefix("model.layers.") {
            Some(rest) => {
                let index = rest
                    .split('.')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|i| *i < layers)
                    .ok_or_else(|| anyhow!("tensor {} names no decoder layer", spec.name))?;
                index + 1
            }
            None => 0,
        };
        let group = if spec.shape.len() >= 2 { 0 } else { 1 };
        members[unit][group].push((spec.name, spec.shape));
    }
    let r = world as i64;
    Ok(members
        .into_iter()
        .enumerate()
        .map(|(unit, groups)| UnitPlan {
            label: if unit == 0 {
                "outer".to_string()
            } else {
                format!("layer {}", unit - 1)
            },
            groups: groups
                .into_iter()
                .zip([true, false])
                .filter(|(tensors, _)| !tensors.is_empty())
                .map(|(tensors, decay)| {
                    let numel: i64 = tensors.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
                    GroupPlan {
                        names: tensors.iter().map(|(n, _)| n.clone()).collect(),
                        shapes: tensors.into_iter().map(|(_, s)| s).collect(),
                        numel,
                        padded: (numel + r - 1) / r * r,
                        decay,
                    }
                })
                .collect(),
        })
        .collect())
}

/// A group's live state on one rank: the model's variables it fills, and the rank's shard.
struct Group {
    plan: GroupPlan,
    /// The skeleton's variables (shallow), empty except while the unit is gathered.
    variables: Vec<Tensor>,
    /// This rank's f32 master shard; a leaf whose `.grad()` receives the reduce-scattered
    /// gradient, so the project's [`AdamW`] updates it unchanged.
    shard: Tensor,
}

/// What one sharded step reports (identical on every rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Mean loss over the labelled tokens of the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Labelled tokens of the global batch.
    pub tokens: i64,
}

/// One rank's share of a model trained with sharded data parallel (see the module doc).
pub struct ShardedModel {
    model: GemmaModel,
    units: Vec<Vec<Group>>,
    rank: usize,
    world: usize,
    compute_kind: Kind,
    optimizer: AdamW,
}

impl ShardedModel {
    /// Takes this rank's shards of `model` (every rank passes the same weights, e.g. the same
    /// seeded initialisation or checkpoint) and releases the rest: afterwards the rank holds
    /// only its f32 shards. `compute_kind` is the dtype units are gathered and computed in
    /// (bf16 on GPU; f32 on the CPU, where results then equal one rank's). Ranks whose model
    /// config or compute dtype differ all fail here, the error naming them.
    pub fn new(
        model: GemmaModel,
        collective: &mut dyn Collective,
        compute_kind: Kind,
        adamw: AdamWConfig,
    ) -> Result<Self> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let identity = format!("{} compute {compute_kind:?}", model.config.to_hf_json());
        atoll_collective::verify_same_config(
            collective,
            "sharded model config",
            identity.as_bytes(),
        )
        .with_context(|| format!("rank {rank}"))?;
        let plans = plan_units(&model.config, world)?;
        let vars = model.vs.variables();
        let device = model.device();
        let _guard = tch::no_grad_guard();
        let mut units = Vec::with_capacity(plans.len());
        let mut shards = Vec::new();
        for unit in plans {
            let mut groups = Vec::with_capacity(unit.groups.len());
            for plan in unit.groups {
                let variables = plan
                    .names
                    .iter()
                    .map(|n| {
                        vars.get(n)
                            .map(|t| t.shallow_clone())
                            .ok_or_else(|| anyhow!("the model has no variable {n}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut flat: Vec<Tensor> = variables
                    .iter()
                    .map(|v| v.detach().to_kind(Kind::Float).reshape([-1]))
                    .collect();
                flat.push(Tensor::zeros(
                    [plan.padded - plan.numel],
                    (Kind::Float, device),
                ));
                let len = plan.shard_len(world);
                let shard = Tensor::cat(&flat, 0)
                    .narrow(0, rank as i64 * len, len)
                    .contiguous()
                    .detach()
                    .set_requires_grad(true);
                shards.push((shard.shallow_clone(), plan.decay));
                groups.push(Group {
                    plan,
                    variables,
                    shard,
                });
            }
            units.push(groups);
        }
        drop(_guard);
        // Define every shard's gradient buffer once (zeros); steps add into it.
        for (shard, _) in &shards {
            (shard.sum(Kind::Float) * 0.0).backward();
        }
        let mut sharded = ShardedModel {
            model,
            units,
            rank,
            world,
            compute_kind,
            optimizer: AdamW::with_decay(shards, adamw),
        };
        for unit in 0..sharded.units.len() {
            sharded.release(unit);
        }
        Ok(sharded)
    }

    pub fn config(&self) -> &GemmaConfig {
        &self.model.config
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Parameters this rank holds (its shards, padding included).
    pub fn shard_numel(&self) -> i64 {
        self.units
            .iter()
            .flatten()
            .map(|g| g.shard.numel() as i64)
            .sum()
    }

    /// Elements of the whole model's trainable tensors this rank has materialised: 0 between
    /// steps (every unit released), one unit's during a step.
    pub fn resident_parameters(&self) -> i64 {
        self.units
            .iter()
            .flatten()
            .flat_map(|g| &g.variables)
            .map(|v| v.numel() as i64)
            .sum()
    }

    /// All-gathers unit `unit` into the skeleton's variables, in `kind`.
    fn gather(&mut self, collective: &mut dyn Collective, unit: usize, kind: Kind) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for group in &mut self.units[unit] {
            let piece = group.shard.detach().to_kind(kind);
            let parts = collective
                .all_gather(&piece)
                .with_context(|| format!("rank {}: all-gather of a unit failed", self.rank))?;
            let flat = Tensor::cat(&parts, 0);
            let mut offset = 0;
            for (variable, shape) in group.variables.iter_mut().zip(&group.plan.shapes) {
                let n: i64 = shape.iter().product();
                variable.set_data(&flat.narrow(0, offset, n).view(shape.as_slice()));
                offset += n;
            }
        }
        Ok(())
    }

    /// Points unit `unit`'s variables at empty tensors, freeing the gathered storage.
    /// The empty tensors keep the compute dtype, so the skeleton reports it (`model.kind()`),
    /// and what is derived from that (rotary tables, masks) matches the gathered units.
    fn release(&mut self, unit: usize) {
        let (device, kind) = (self.model.device(), self.compute_kind);
        for group in &mut self.units[unit] {
            for variable in &mut group.variables {
                variable.set_data(&Tensor::empty([0], (kind, device)));
            }
        }
    }

    /// The unit's variables, in group order (the order [`Self::scatter_gradients`] expects).
    fn unit_variables(&self, unit: usize) -> Vec<Tensor> {
        self.units[unit]
            .iter()
            .flat_map(|g| g.variables.iter().map(|v| v.shallow_clone()))
            .collect()
    }

    /// Reduce-scatters (sums) the unit's gradients, given in [`Self::unit_variables`] order
    /// (undefined ones, of tensors this pass did not use, count as zero), and adds this rank's
    /// shard of the sum to its shards' gradients.
    fn scatter_gradients(
        &mut self,
        collective: &mut dyn Collective,
        unit: usize,
        grads: &[Tensor],
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let device = self.model.device();
        let mut next = grads.iter();
        for group in &mut self.units[unit] {
            let mut flat = Vec::with_capacity(group.variables.len() + 1);
            for shape in &group.plan.shapes {
                let g = next
                    .next()
                    .ok_or_else(|| anyhow!("fewer gradients than unit tensors"))?;
                flat.push(if g.defined() {
                    g.to_kind(Kind::Float).reshape([-1])
                } else {
                    Tensor::zeros([shape.iter().product::<i64>()], (Kind::Float, device))
                });
            }
            flat.push(Tensor::zeros(
                [group.plan.padded - group.plan.numel],
                (Kind::Float, device),
            ));
            let summed = collective
                .reduce_scatter(&Tensor::cat(&flat, 0), ReduceOp::Sum)
                .with_context(|| format!("rank {}: gradient reduce-scatter failed", self.rank))?;
            let mut buffer = group.shard.grad();
            let _ = buffer.f_add_(&summed)?;
        }
        Ok(())
    }

    /// Sums a scalar over the ranks.
    fn sum_over_ranks(&self, collective: &mut dyn Collective, value: f64) -> Result<f64> {
        let mut t = Tensor::from_slice(&[value]).to_device(self.model.device());
        collective
            .all_reduce_(&mut t, ReduceOp::Sum)
            .with_context(|| format!("rank {}: all-reduce failed", self.rank))?;
        Ok(t.double_value(&[0]))
    }

    /// This rank's rows of a global batch of B rows: `rank·B/R .. (rank+1)·B/R`.
    pub fn local_rows(&self, global: &TokenBatch) -> Result<TokenBatch> {
        let rows = global.ids.size()[0];
        let r = self.world as i64;
        if rows % r != 0 {
            bail!(
                "a global batch of {rows} rows does not split over {r} ranks: use a batch size \
                 that is a multiple of the world size"
            );
        }
        let (start, len) = (self.rank as i64 * rows / r, rows / r);
        let take = |t: &Tensor| t.narrow(0, start, len);
        Ok(TokenBatch {
            ids: take(&global.ids),
            labels: take(&global.labels),
            positions: take(&global.positions),
            segments: take(&global.segments),
        })
    }

    /// One optimizer step on `global` (the same global batch on every rank) at learning rate
    /// `lr`, clipping the global gradient norm to `max_norm`. Every rank returns the same outcome.
    pub fn train_step(
        &mut self,
        collective: &mut dyn Collective,
        global: &TokenBatch,
        lr: f64,
        max_norm: Option<f64>,
    ) -> Result<StepOutcome> {
        let batch = self.local_rows(global)?;
        let kind = self.compute_kind;
        let layers = self.model.config.num_hidden_layers;
        let tokens = self.sum_over_ranks(collective, batch.target_count() as f64)?;
        if tokens <= 0.0 {
            bail!("the global batch has no labelled token");
        }
        self.optimizer.zero_grad();
        let inputs = self
            .model
            .packed_layer_inputs(&batch.positions, &batch.segments);

        // Forward without a graph, one unit gathered at a time, keeping each layer's input.
        let mut saved = Vec::with_capacity(layers);
        self.gather(collective, 0, kind)?;
        let mut x = tch::no_grad(|| self.model.embed(&batch.ids));
        self.release(0);
        for i in 0..layers {
            self.gather(collective, i + 1, kind)?;
            saved.push(x.shallow_clone());
            x = tch::no_grad(|| self.model.layer_forward(i, &x, &inputs, None));
            self.release(i + 1);
        }

        // The loss and its gradient for the outer unit (final norm, head) and the top state.
        self.gather(collective, 0, kind)?;
        let outer = self.unit_variables(0);
        let top = x.detach().set_requires_grad(true);
        let loss_sum = self
            .model
            .labelled_loss_sum(&self.model.final_norm(&top), &batch.labels);
        let local_loss = loss_sum.double_value(&[]);
        let mut wrt: Vec<&Tensor> = outer.iter().collect();
        wrt.push(&top);
        let mut grads = Tensor::f_run_backward(&[loss_sum / tokens], &wrt, false, false)?;
        let mut upstream = grads
            .pop()
            .ok_or_else(|| anyhow!("no gradient for the top"))?;
        self.release(0);
        self.scatter_gradients(collective, 0, &grads)?;
        drop(grads);

        // Backward from the top: recompute each layer with a graph, reduce-scatter its gradient.
        for i in (0..layers).rev() {
            self.gather(collective, i + 1, kind)?;
            let variables = self.unit_variables(i + 1);
            let input = saved
                .pop()
                .ok_or_else(|| anyhow!("no saved input for layer {i}"))?
                .detach()
                .set_requires_grad(true);
            let out = self.model.layer_forward(i, &input, &inputs, None);
            let mut wrt: Vec<&Tensor> = variables.iter().collect();
            wrt.push(&input);
            let objective = (out * upstream.detach()).sum(Kind::Float);
            let mut grads = Tensor::f_run_backward(&[objective], &wrt, false, false)?;
            upstream = grads
                .pop()
                .ok_or_else(|| anyhow!("no gradient for layer {i}'s input"))?;
            drop(variables);
            self.release(i + 1);
            self.scatter_gradients(collective, i + 1, &grads)?;
        }

        // The embedding's share of the outer unit's gradient.
        self.gather(collective, 0, kind)?;
        let outer = self.unit_variables(0);
        let embedded = self.model.embed(&batch.ids);
        let objective = (embedded * upstream.detach()).sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[objective], &outer, false, false)?;
        drop(outer);
        self.release(0);
        self.scatter_gradients(collective, 0, &grads)?;
        drop(grads);

        let loss = self.sum_over_ranks(collective, local_loss)? / tokens;
        let grad_norm = self.clip_global_norm(collective, max_norm)?;
        self.optimizer.step(lr);
        Ok(StepOutcome {
            loss,
            grad_norm,
            tokens: tokens as i64,
        })
    }

    /// The global L2 norm of the gradient (every rank's shards together; padding is zero) and,
    /// above `max_norm`, the shards' gradients scaled to it, as `AdamW::clip_grad_norm` does on
    /// one rank.
    fn clip_global_norm(
        &mut self,
        collective: &mut dyn Collective,
        max_norm: Option<f64>,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let squares: Vec<Tensor> = self
            .units
            .iter()
            .flatten()
            .map(|g| {
                g.shard
                    .grad()
                    .to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
            })
            .collect();
        let local = Tensor::stack(&squares, 0)
            .sum(Kind::Double)
            .double_value(&[]);
        let total = self.sum_over_ranks(collective, local)?.sqrt();
        if let Some(max) = max_norm {
            let coef = max / (total + 1e-6);
            if coef < 1.0 {
                for group in self.units.iter().flatten() {
                    let mut g = group.shard.grad();
                    let _ = g.f_mul_scalar_(coef)?;
                }
            }
        }
        Ok(total)
    }

    /// The whole model's trainable parameters at full precision (f32), gathered from every
    /// rank's shards, by Hugging Face name in checkpoint layout order. Every rank must call it;
    /// every rank gets the whole model (for tests, evaluation and writing a whole checkpoint).
    pub fn full_parameters(
        &mut self,
        collective: &mut dyn Collective,
    ) -> Result<Vec<(String, Tensor)>> {
        self.gather_whole(collective, false)
    }

    /// The gradient of the last [`Self::train_step`] (after clipping), whole, like
    /// [`Self::full_parameters`]: what one rank computing the global batch would have.
    pub fn full_gradients(
        &mut self,
        collective: &mut dyn Collective,
    ) -> Result<Vec<(String, Tensor)>> {
        self.gather_whole(collective, true)
    }

    fn gather_whole(
        &mut self,
        collective: &mut dyn Collective,
        gradients: bool,
    ) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::new();
        for group in self.units.iter().flatten() {
            let piece = if gradients {
                group.shard.grad()
            } else {
                group.shard.detach()
            };
            let parts = collective
                .all_gather(&piece)
                .with_context(|| format!("rank {}: all-gather of the model failed", self.rank))?;
            let flat = Tensor::cat(&parts, 0);
            let mut offset = 0;
            for (name, shape) in group.plan.names.iter().zip(&group.plan.shapes) {
                let n: i64 = shape.iter().product();
                out.push((
                    name.clone(),
                    flat.narrow(0, offset, n).view(shape.as_slice()),
                ));
                offset += n;
            }
        }
        sort_in_checkpoint_order(&self.model.config, &mut out);
        Ok(out)
    }
}

/// Puts named tensors in the order of `config.tensor_specs()` (the checkpoint's own order);
/// names it does not list go last.
pub(crate) fn sort_in_checkpoint_order(config: &GemmaConfig, tensors: &mut [(String, Tensor)]) {
    let order: std::collections::HashMap<String, usize> = config
        .tensor_specs()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s.name, i))
        .collect();
    tensors.sort_by_key(|(name, _)| order.get(name).copied().unwrap_or(usize::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;

    /// gemma3-tiny on 3 ranks: every trainable tensor lands in exactly one unit, and padding
    /// makes each group a multiple of 3 (524 288 embedding elements → 524 289).
    #[test]
    fn sharded_plan_covers_every_tensor_once() {
        let cfg = preset("gemma3-tiny").unwrap().config;
        let units = plan_units(&cfg, 3).unwrap();
        assert_eq!(units.len(), 5);
        let total: i64 = units.iter().map(|u| u.numel()).sum();
        assert_eq!(total as u64, cfg.num_parameters());
        let outer = &units[0];
        assert_eq!(outer.groups[0].names, vec!["model.embed_tokens.weight"]);
        assert_eq!(outer.groups[0].padded, 524_289);
        assert_eq!(outer.groups[1].names, vec!["model.norm.weight"]);
        assert_eq!(outer.groups[1].padded, 129);
        for u in &units[1..] {
            assert_eq!(u.groups[0].numel, 245_760);
            assert_eq!(u.groups[1].numel, 576);
            assert!(u.groups.iter().all(|g| g.padded % 3 == 0));
        }
        assert!(plan_units(&cfg, 0).is_err());
    }
}
