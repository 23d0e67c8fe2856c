//! A learner whose model lives on R ranks: rank 0 is the learner the coordinator sees and drives
//! the [`InnerLoop`]; ranks 1.. run [`RankedWorker::follow`], executing the commands rank 0
//! broadcasts before each operation that needs every rank. The model is either sharded over the
//! ranks ([`ShardedModel`], `train.parallel: sharded`, the default) or replicated on each
//! (`replicated`, for models that fit one device).
//!
//! * A step: every rank draws the same global batch (same shard, same seeded order). Sharded:
//!   [`ShardedModel::train_step`] trains on the rank's rows of it. Replicated: each rank
//!   back-propagates its rows, the gradients are averaged over the ranks, and every rank takes the
//!   same AdamW step.
//! * A fragment's values (the learner's side of an outer gradient). Sharded: the layer groups
//!   holding the fragment's tensors are all-gathered one at a time and only the fragment's tensors
//!   are kept, so rank 0 holds one fragment on the host, never the whole model on its device.
//!   Replicated: rank 0's own copy.
//! * Setting a fragment (a broadcast applied): rank 0 broadcasts one tensor at a time and every
//!   rank copies it (sharded: the part that falls in its shard) into its f32 weights; the AdamW
//!   moments stay, as they do for a one-process learner.
//!
//! Rank 0 keeps the others alive with a no-op command while it waits on the network, so their
//! collective timeout only fires when rank 0 is gone or hung; when it exits it tells them to stop
//! (and when it dies, their collective fails and they exit).

use super::ShardedModel;
use crate::models::recompute::TokenBatch;
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::{RankParallelism, Recipe};
use crate::train::{build_model, resolve_device};
use crate::worker::{flat, fragment_plan, model_hash, tensor_infos};
use crate::worker::{InnerLoop, LearnerData};
use crate::GemmaConfig;
use anyhow::{anyhow, bail, Context, Result};
use atoll_collective::{Collective, CollectiveOptions, RankConfig, ReduceOp};
use atoll_coordinator::{FragmentPlan, TensorInfo};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// What rank 0 reports when an operation across the ranks fails (the cause follows it).
const LOST_A_RANK: &str =
    "the sharded learner lost a rank; start it again with all its ranks to rejoin the job";

/// How often an idle rank 0 tells the other ranks it is alive.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// What rank 0 asks every rank to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Stop,
    KeepAlive,
    Step,
    Assign {
        index: usize,
        count: usize,
        resume_step: u64,
    },
    Gather(Vec<usize>),
    Set(Vec<usize>),
}

impl Command {
    fn header(&self) -> [i64; 4] {
        match self {
            Command::Stop => [0, 0, 0, 0],
            Command::KeepAlive => [1, 0, 0, 0],
            Command::Step => [2, 0, 0, 0],
            Command::Assign {
                index,
                count,
                resume_step,
            } => [3, *index as i64, *count as i64, *resume_step as i64],
            Command::Gather(t) => [4, t.len() as i64, 0, 0],
            Command::Set(t) => [5, t.len() as i64, 0, 0],
        }
    }
}

/// Where a trainable tensor lives: its unit, its group in the unit, and its offset in the
/// group's flattened values.
#[derive(Debug, Clone, Copy)]
struct Location {
    unit: usize,
    group: usize,
    offset: i64,
    numel: i64,
}

/// How this rank holds the model.
enum RankModel {
    /// 1/R of every unit, with where each trainable tensor lives in the units.
    Sharded {
        model: ShardedModel,
        locations: Vec<Location>,
    },
    /// The whole model and its optimizer.
    Replicated {
        model: GemmaModel,
        params: Vec<Tensor>,
        optimizer: AdamW,
    },
}

/// One rank of a learner with several ranks (see the module doc).
pub struct RankedWorker {
    recipe: Recipe,
    config: GemmaConfig,
    model: RankModel,
    collective: Box<dyn Collective>,
    data: LearnerData,
    infos: Vec<TensorInfo>,
    device: Device,
    step: u64,
    last_command: Instant,
    stopped: bool,
}

/// Where each trainable tensor (in `infos` order) lives in the sharded units.
fn tensor_locations(model: &ShardedModel, infos: &[TensorInfo]) -> Result<Vec<Location>> {
    let mut by_name = std::collections::HashMap::new();
    for (u, unit) in model.units.iter().enumerate() {
        for (g, group) in unit.iter().enumerate() {
            let mut offset = 0;
            for (name, shape) in group.plan.names.iter().zip(&group.plan.shapes) {
                let numel: i64 = shape.iter().product();
                by_name.insert(
                    name.as_str(),
                    Location {
                        unit: u,
                        group: g,
                        offset,
                        numel,
                    },
                );
                offset += numel;
            }
        }
    }
    infos
        .iter()
        .map(|i| {
            by_name
                .get(i.name.as_str())
                .copied()
                .ok_or_else(|| anyhow!("tensor {} is in no sharded unit", i.name))
        })
        .collect()
}

/// The device of this rank: its `LOCAL_RANK`-th GPU when the recipe trains on CUDA.
fn rank_device(recipe: &Recipe, local_rank: usize) -> Result<Device> {
    Ok(match resolve_device(recipe.train.device)? {
        Device::Cuda(_) => {
            let visible = tch::Cuda::device_count() as usize;
            if local_rank >= visible {
                bail!(
                    "local rank {local_rank} has no GPU: this host shows {visible}; launch at most \
                     {visible} ranks per host"
                );
            }
            Device::Cuda(local_rank)
        }
        other => other,
    })
}

impl RankedWorker {
    /// Builds this rank's share: every rank prepares the same data and seeded model, checks that
    /// the others run the same recipe, and keeps only its shards. `local_rank` picks the GPU.
    pub fn new(
        recipe: &Recipe,
        collective: Box<dyn Collective>,
        local_rank: usize,
    ) -> Result<Self> {
        let mut collective = collective;
        let rank = collective.rank();
        let recipe_text = serde_json::to_string(recipe)?;
        atoll_collective::verify_same_config(collective.as_mut(), "recipe", recipe_text.as_bytes())
            .with_context(|| {
                format!("rank {rank}: the ranks of a learner must share the recipe")
            })?;
        if let Some(t) = recipe.train.threads {
            tch::set_num_threads(t.0 as i32);
        }
        let device = rank_device(recipe, local_rank)?;
        let data = LearnerData::prepare(recipe)?;
        let t = &recipe.train;
        let rows = t.batch_size.0 * t.grad_accum.0;
        let world = collective.world_size();
        if !rows.is_multiple_of(world) {
            bail!(
                "train.batch_size x train.grad_accum = {rows} rows per step do not split over {world} \
                 ranks: use a multiple of the learner's ranks"
            );
        }
        let model = build_model(recipe, data.prepared.tokenizer.get_vocab_size(true), device)?;
        let infos = tensor_infos(&model);
        let config = model.config.clone();
        let model = match t.parallel {
            RankParallelism::Sharded => {
                let compute = match device {
                    Device::Cuda(_) => Kind::BFloat16,
                    _ => Kind::Float,
                };
                let model = ShardedModel::new(model, collective.as_mut(), compute, t.adamw())?;
                let locations = tensor_locations(&model, &infos)?;
                RankModel::Sharded { model, locations }
            }
            RankParallelism::Replicated => {
                let params = model.trainable_parameters();
                let optimizer = AdamW::new(
                    params.iter().map(Tensor::shallow_clone).collect(),
                    t.adamw(),
                );
                RankModel::Replicated {
                    model,
                    params,
                    optimizer,
                }
            }
        };
        Ok(RankedWorker {
            recipe: recipe.clone(),
            config,
            model,
            collective,
            data,
            infos,
            device,
            step: 0,
            last_command: Instant::now(),
            stopped: false,
        })
    }

    /// Connects to the learner's other ranks (TCP on the CPU, NCCL on CUDA; rank 0 listens at
    /// `MASTER_ADDR:MASTER_PORT`) and builds this rank's share.
    pub fn connect(recipe: &Recipe, ranks: &RankConfig) -> Result<Self> {
        let device = rank_device(recipe, ranks.local_rank)?;
        let collective = atoll_collective::connect(ranks, device, &CollectiveOptions::default())
            .with_context(|| {
                format!(
                    "rank {} of {}: connecting to the learner's other ranks through {}:{}",
                    ranks.rank, ranks.world_size, ranks.master_addr, ranks.master_port
                )
            })?;
        Self::new(recipe, collective, ranks.local_rank)
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// Rank 0 tells the other ranks it is alive if it has not spoken for a while (call it while
    /// waiting on the network).
    pub fn keep_alive(&mut self) -> Result<()> {
        if self.last_command.elapsed() >= KEEPALIVE {
            self.send(&Command::KeepAlive).context(LOST_A_RANK)?;
        }
        Ok(())
    }

    /// Ranks 1..: executes rank 0's commands until it says stop.
    pub fn follow(mut self) -> Result<()> {
        if self.rank() == 0 {
            bail!("rank 0 leads; only ranks 1.. follow");
        }
        loop {
            let command = self.receive()?;
            if command == Command::Stop {
                self.stopped = true;
                return Ok(());
            }
            self.execute(&command, None)?;
        }
    }

    /// Rank 0: broadcasts a command.
    fn send(&mut self, command: &Command) -> Result<()> {
        let mut header = Tensor::from_slice(&command.header());
        self.collective
            .broadcast_(&mut header, 0)
            .context("rank 0: the learner's other ranks are gone")?;
        if let Command::Gather(t) | Command::Set(t) = command {
            let ids: Vec<i64> = t.iter().map(|&i| i as i64).collect();
            let mut ids = Tensor::from_slice(&ids);
            self.collective.broadcast_(&mut ids, 0)?;
        }
        self.last_command = Instant::now();
        Ok(())
    }

    /// Ranks 1..: the next command from rank 0.
    fn receive(&mut self) -> Result<Command> {
        let rank = self.rank();
        let mut header = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        self.collective
            .broadcast_(&mut header, 0)
            .with_context(|| format!("rank {rank}: rank 0 of this learner is gone"))?;
        let h: Vec<i64> = Vec::try_from(&header)?;
        let tensor_list = |collective: &mut Box<dyn Collective>, n: i64| -> Result<Vec<usize>> {
            let mut ids = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
            collective.broadcast_(&mut ids, 0)?;
            Ok(Vec::<i64>::try_from(&ids)?
                .into_iter()
                .map(|i| i as usize)
                .collect())
        };
        Ok(match h[0] {
            0 => Command::Stop,
            1 => Command::KeepAlive,
            2 => Command::Step,
            3 => Command::Assign {
                index: h[1] as usize,
                count: h[2] as usize,
                resume_step: h[3] as u64,
            },
            4 => Command::Gather(tensor_list(&mut self.collective, h[1])?),
            5 => Command::Set(tensor_list(&mut self.collective, h[1])?),
            other => bail!("rank {rank}: unknown command {other} from rank 0"),
        })
    }

    /// Runs a command on this rank (rank 0 after sending it). `values` are rank 0's for `Set`;
    /// `Gather` returns the values on rank 0 and nothing elsewhere.
    fn execute(
        &mut self,
        command: &Command,
        values: Option<&[Vec<f32>]>,
    ) -> Result<(f64, Vec<Vec<f32>>)> {
        match command {
            Command::Stop | Command::KeepAlive => Ok((0.0, Vec::new())),
            Command::Step => Ok((self.local_step()?, Vec::new())),
            Command::Assign {
                index,
                count,
                resume_step,
            } => {
                self.data
                    .assign(&self.recipe, *index, *count, *resume_step)?;
                self.step = *resume_step;
                Ok((0.0, Vec::new()))
            }
            Command::Gather(tensors) => Ok((0.0, self.gather(tensors)?)),
            Command::Set(tensors) => {
                self.set(tensors, values)?;
                Ok((0.0, Vec::new()))
            }
        }
    }

    fn local_step(&mut self) -> Result<f64> {
        let t = &self.recipe.train;
        let lr = t.lr_at((self.step as usize).min(t.max_steps.0.saturating_sub(1)));
        let clip = t.clip();
        let windows: Vec<usize> = self.data.next_step(&self.recipe).concat();
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        let train = &self.data.prepared.train;
        let loss = match &mut self.model {
            RankModel::Sharded { model, .. } => {
                let (ids, labels) = train.batch(&windows, self.device);
                let batch = TokenBatch::from_pair(ids, labels);
                model
                    .train_step(self.collective.as_mut(), &batch, lr, clip)?
                    .loss
            }
            RankModel::Replicated {
                model,
                params,
                optimizer,
            } => {
                // Every window holds seq_len labelled tokens, so the mean of the ranks' mean
                // losses is the global batch's, and so are the averaged gradients.
                let per_rank = windows.len() / world;
                let mine = &windows[rank * per_rank..(rank + 1) * per_rank];
                let (x, y) = train.batch(mine, self.device);
                let loss = model.loss(&x, &y);
                loss.backward();
                atoll_collective::average_gradients(self.collective.as_mut(), params)
                    .with_context(|| format!("rank {rank}: averaging gradients failed"))?;
                let mut mean = Tensor::from_slice(&[loss.double_value(&[])]);
                self.collective.all_reduce_(&mut mean, ReduceOp::Mean)?;
                optimizer.clipped_step(lr, clip);
                mean.double_value(&[0])
            }
        };
        if !loss.is_finite() {
            bail!("the learner diverged: loss is {loss}; lower train.lr");
        }
        self.step += 1;
        Ok(loss)
    }

    /// The tensors' values on rank 0 (nothing elsewhere). Sharded: gathered group by group in
    /// ascending order (the same on every rank).
    fn gather(&mut self, tensors: &[usize]) -> Result<Vec<Vec<f32>>> {
        let rank = self.rank();
        let _guard = tch::no_grad_guard();
        let (model, locations) = match &self.model {
            RankModel::Replicated { params, .. } => {
                return Ok(if rank == 0 {
                    tensors.iter().map(|&i| flat(&params[i])).collect()
                } else {
                    Vec::new()
                });
            }
            RankModel::Sharded { model, locations } => (model, locations),
        };
        let located = |i: usize| {
            locations
                .get(i)
                .copied()
                .ok_or_else(|| anyhow!("no trainable tensor {i}"))
        };
        let groups: std::collections::BTreeSet<(usize, usize)> = tensors
            .iter()
            .map(|&i| located(i).map(|l| (l.unit, l.group)))
            .collect::<Result<_>>()?;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); tensors.len()];
        for (unit, group) in groups {
            let shard = model.units[unit][group].shard.detach();
            let parts = self
                .collective
                .all_gather(&shard)
                .with_context(|| format!("rank {rank}: gathering a fragment failed"))?;
            if rank != 0 {
                continue;
            }
            let whole = Tensor::cat(&parts, 0).to_device(Device::Cpu);
            for (k, &i) in tensors.iter().enumerate() {
                let l = locations[i];
                if (l.unit, l.group) == (unit, group) {
                    out[k] = Vec::<f32>::try_from(&whole.narrow(0, l.offset, l.numel))?;
                }
            }
        }
        Ok(out)
    }

    /// Sets the tensors to rank 0's `values`: one broadcast per tensor, each rank keeping what it
    /// holds of it (sharded: the part inside its shard).
    fn set(&mut self, tensors: &[usize], values: Option<&[Vec<f32>]>) -> Result<()> {
        let rank = self.rank();
        let _guard = tch::no_grad_guard();
        for (k, &i) in tensors.iter().enumerate() {
            let info = self
                .infos
                .get(i)
                .ok_or_else(|| anyhow!("no trainable tensor {i}"))?;
            let numel: i64 = info.shape.iter().product::<u64>() as i64;
            let mut whole = match values {
                Some(v) if v[k].len() as i64 == numel => Tensor::from_slice(&v[k]),
                Some(v) => bail!(
                    "tensor {} has {} values, expected {numel}",
                    info.name,
                    v[k].len()
                ),
                None => Tensor::zeros([numel], (Kind::Float, Device::Cpu)),
            };
            self.collective
                .broadcast_(&mut whole, 0)
                .with_context(|| format!("rank {rank}: setting a fragment failed"))?;
            match &mut self.model {
                RankModel::Replicated { params, .. } => {
                    let param = &mut params[i];
                    let src = whole
                        .view(param.size().as_slice())
                        .to_kind(param.kind())
                        .to_device(param.device());
                    param.copy_(&src);
                }
                RankModel::Sharded { model, locations } => {
                    let l = locations[i];
                    let shard = &model.units[l.unit][l.group].shard;
                    let len = shard.size()[0];
                    let (start, end) = (rank as i64 * len, (rank as i64 + 1) * len);
                    let (from, to) = (l.offset.max(start), (l.offset + l.numel).min(end));
                    if from < to {
                        let src = whole
                            .narrow(0, from - l.offset, to - from)
                            .to_device(shard.device());
                        let mut inside = shard.detach().narrow(0, from - start, to - from);
                        inside.copy_(&src);
                    }
                }
            }
        }
        Ok(())
    }

    /// Rank 0: sends `command` and runs its own share.
    fn lead(
        &mut self,
        command: Command,
        values: Option<&[Vec<f32>]>,
    ) -> Result<(f64, Vec<Vec<f32>>)> {
        if self.rank() != 0 {
            bail!("only rank 0 drives a sharded learner");
        }
        self.send(&command)
            .and_then(|()| self.execute(&command, values))
            .context(LOST_A_RANK)
    }
}

impl InnerLoop for RankedWorker {
    fn plan(&self) -> Result<FragmentPlan> {
        fragment_plan(self.infos.clone(), &self.recipe)
    }

    fn model_hash(&self) -> Result<String> {
        model_hash(&self.config, &self.plan()?)
    }

    fn tokens_per_step(&self) -> u64 {
        let t = &self.recipe.train;
        (t.batch_size.0 * t.grad_accum.0 * self.recipe.data.seq_len.0) as u64
    }

    fn step(&self) -> u64 {
        self.step
    }

    fn assign_shard(&mut self, index: usize, count: usize, resume_step: u64) -> Result<()> {
        self.lead(
            Command::Assign {
                index,
                count,
                resume_step,
            },
            None,
        )
        .map(drop)
    }

    fn train_step(&mut self) -> Result<f64> {
        self.lead(Command::Step, None).map(|(loss, _)| loss)
    }

    fn values(&mut self, tensors: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.lead(Command::Gather(tensors.to_vec()), None)
            .map(|(_, v)| v)
    }

    fn overwrite(&mut self, tensors: &[usize], values: &[Vec<f32>]) -> Result<()> {
        self.lead(Command::Set(tensors.to_vec()), Some(values))
            .map(drop)
    }

    fn keep_alive(&mut self) -> Result<()> {
        RankedWorker::keep_alive(self)
    }
}

impl Drop for RankedWorker {
    fn drop(&mut self) {
        if self.rank() == 0 && !self.stopped {
            self.stopped = true;
            // Best effort: when the others are already gone there is nobody to tell.
            let _ = self.send(&Command::Stop);
        }
    }
}
