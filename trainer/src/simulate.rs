//! `atoll simulate`: M learners in one process, each with its own Gemma model, optimizer and
//! data shard, synchronised by the real syncer state machine over simulated links, on a virtual
//! clock. Same seed, same results, bit for bit: events are ordered by (virtual time, sequence
//! number), and every random draw comes from seeded generators.
//!
//! Time model: an inner step takes `sync.step_time_s / speed` virtual seconds; a transfer of b
//! bytes on a learner's link starts when the link is free, takes 8·b / bandwidth, then arrives
//! after the one-way latency. Metadata reports cost latency only. Up-link outer gradients go
//! through the real wire codec and frame (so quantisation is what a real run sends); down-link
//! updates are quantised by the syncer itself (`broadcast_codec`) and accounted at their encoded
//! size.

use crate::data::{Batcher, PackedSequences};
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::{Recipe, SyncMode, TrainSection};
use crate::train::{
    backward_micro_batches, build_model, dtype_name, evaluate, prepare_data, resolve_device,
};
use anyhow::{anyhow, Context, Result};
use atoll_coordinator::syncer::{Contribution, Event, FragmentValues, MergeRecord, Progress};
use atoll_coordinator::{
    Action, ApplyRule, FragmentPlan, LearnerProtocol, OuterOptimizer, Syncer, SyncerConfig,
    TensorInfo,
};
use atoll_wire::{decode_frame, encode_frame, ErrorFeedback, FrameLimits, DEFAULT_BLOCK};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct SimSummary {
    pub name: String,
    pub mode: String,
    pub learners: usize,
    pub codec: String,
    pub parameters: u64,
    pub dtype: String,
    pub seed: u64,
    pub initial_eval_loss: f64,
    pub final_eval_loss: f64,
    /// The lowest eval loss on the curve (`train.eval_every`) and the step it was seen at: below
    /// the final value when the run trained past its best point.
    pub best_eval_loss: f64,
    pub best_eval_step: usize,
    pub tokens: u64,
    /// Tokens whose work reached the global model (per learner contribution, averaged over
    /// fragments); under `apply: rebase` every token, exactly once.
    pub merged_tokens: u64,
    /// Bytes sent up / down, summed over learners.
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bytes_per_learner: f64,
    pub sim_wall_clock_s: f64,
    /// Tokens that reached the global model / what M learners at full speed would process.
    pub goodput: f64,
    /// Time learners spent computing / (M × wall clock).
    pub compute_utilization: f64,
    pub rejected_contributions: u64,
    pub merges: u64,
    pub failures: u64,
}

fn sim_time(seconds: f64) -> u64 {
    (seconds * 1e9).round() as u64
}

enum SimEvent {
    StepDone(usize),
    ToSyncer(Event),
    PullArrives {
        learner: usize,
        fragment: usize,
        round: u64,
    },
    BroadcastArrives {
        learner: usize,
        fragment: usize,
        version: u64,
        values: FragmentValues,
        /// The round whose merge produced this version, when this learner's contribution was in it.
        merged_round: Option<u64>,
    },
    CatchUpArrives {
        learner: usize,
        fragments: Vec<(usize, u64, FragmentValues)>,
    },
    Fail(usize),
    Recover(usize),
}

struct Queue {
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, SimEvent>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, at: f64, event: SimEvent) {
        self.seq += 1;
        self.heap.push(Reverse((sim_time(at), self.seq)));
        self.events.insert(self.seq, event);
    }
    fn pop(&mut self) -> Option<(f64, SimEvent)> {
        let Reverse((t, seq)) = self.heap.pop()?;
        Some((t as f64 / 1e9, self.events.remove(&seq).expect("queued")))
    }
}

struct Link {
    bandwidth_bps: f64,
    latency_s: f64,
    up_free_at: f64,
    down_free_at: f64,
}

impl Link {
    /// Arrival time of `bytes` sent at `now` on the up (true) or down link.
    fn send(&mut self, now: f64, bytes: u64, up: bool) -> f64 {
        let free = if up {
            &mut self.up_free_at
        } else {
            &mut self.down_free_at
        };
        let start = now.max(*free);
        let done = start + 8.0 * bytes as f64 / self.bandwidth_bps;
        *free = done;
        done + self.latency_s
    }
}

/// A learner's step count when it answered a pull, and its local values of the fragment then.
type PullSnapshot = (u64, Vec<Vec<f32>>);

struct Learner {
    model: GemmaModel,
    params: Vec<Tensor>,
    optimizer: AdamW,
    shard: Vec<usize>,
    batcher: Batcher,
    protocol: Option<LearnerProtocol>,
    feedback: Vec<Vec<ErrorFeedback>>,
    /// Local values of a fragment when it was pulled, and the learner's step count then, per
    /// fragment and round (for `ApplyRule::Rebase`).
    at_pull: BTreeMap<usize, BTreeMap<u64, PullSnapshot>>,
    /// (fragment, version) → the round of this learner's contribution merged into that version.
    merged_in: BTreeMap<(usize, u64), u64>,
    speed: f64,
    alive: bool,
    waiting_for_sync: bool,
    steps: u64,
    compute_s: f64,
    link: Link,
}

fn flat(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32 tensor")
}

fn set_flat(t: &mut Tensor, values: &[f32]) {
    let src = Tensor::from_slice(values)
        .view(t.size().as_slice())
        .to_kind(t.kind())
        .to_device(t.device());
    tch::no_grad(|| t.copy_(&src));
}

/// Periodic evaluation of the model a job would ship (DP's model; the syncer's global Θ in the
/// DiLoCo modes) every `train.eval_every` steps per learner, so a run's eval curve shows whether
/// the final value is still falling or already past a minimum (on a small corpus trained for
/// several epochs, overfitting shows up here first).
struct EvalProbe<'a> {
    /// A model of its own, so loading Θ never disturbs a learner.
    model: Option<(GemmaModel, Vec<Tensor>)>,
    every: usize,
    next_at: usize,
    eval: &'a PackedSequences,
    batch: usize,
    batches: usize,
    /// The lowest point so far: (step, eval loss).
    best: (usize, f64),
}

impl EvalProbe<'_> {
    /// True when `steps` (per learner) has reached the next evaluation point.
    fn due(&self, steps: usize) -> bool {
        self.every > 0 && steps >= self.next_at
    }

    /// Records one evaluation at `steps` and schedules the next.
    fn record(
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
    fn evaluate_values(&mut self, values: &[Vec<f32>]) -> f64 {
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

pub fn simulate(recipe: &Recipe, run_dir: &Path) -> Result<SimSummary> {
    let sync = &recipe.sync;
    let m_count = sync.learners.0;
    if let Some(t) = recipe.train.threads {
        tch::set_num_threads(t.0 as i32);
    }
    let device = resolve_device(recipe.train.device)?;
    std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;
    let prepared = prepare_data(recipe, crate::data::BOS_ID, crate::data::EOS_ID)?;
    let vocab = prepared.tokenizer.get_vocab_size(true);
    let t = &recipe.train;
    let (batch, seq_len) = (t.batch_size.0, recipe.data.seq_len.0);
    let tokens_per_step = (batch * t.grad_accum.0 * seq_len) as u64;
    let budget = t.max_steps.0 as u64 * tokens_per_step * m_count as u64;
    let mut metrics =
        std::io::BufWriter::new(std::fs::File::create(run_dir.join("metrics.jsonl"))?);

    // One model per learner, all starting from the same seeded weights.
    let mut learners = Vec::with_capacity(m_count);
    for m in 0..m_count {
        let model = build_model(recipe, vocab, device)?;
        let params = model.trainable_parameters();
        let optimizer = AdamW::new(
            params.iter().map(Tensor::shallow_clone).collect(),
            t.adamw(),
        );
        let shard =
            crate::data::learner_windows(prepared.train.len(), m, m_count, recipe.data.sharding)?;
        let batcher = Batcher::new(shard.len(), recipe.seed.wrapping_add(m as u64));
        let speed = sync.speeds.get(m).map_or(1.0, |s| s.0);
        let link = Link {
            bandwidth_bps: sync.link.bandwidth_gbps.0 * 1e9,
            latency_s: sync.link.latency_ms.0 / 1000.0,
            up_free_at: 0.0,
            down_free_at: 0.0,
        };
        learners.push(Learner {
            model,
            params,
            optimizer,
            shard,
            batcher,
            protocol: None,
            feedback: Vec::new(),
            at_pull: BTreeMap::new(),
            merged_in: BTreeMap::new(),
            speed,
            alive: true,
            waiting_for_sync: false,
            steps: 0,
            compute_s: 0.0,
            link,
        });
    }
    let initial_eval = evaluate(&learners[0].model, &prepared.eval, batch, t.eval_batches.0);
    tracing::info!(
        "{} learners, mode {:?}, initial eval loss {initial_eval:.4}",
        m_count,
        sync.mode
    );

    let names: Vec<(String, Vec<i64>)> = learners[0]
        .model
        .named_trainable_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    let parameters: u64 = names
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as u64)
        .sum();

    let mut probe = EvalProbe {
        model: None,
        every: t.eval_every.0,
        next_at: t.eval_every.0,
        eval: &prepared.eval,
        batch,
        batches: t.eval_batches.0,
        best: (0, f64::INFINITY),
    };
    if sync.mode != SyncMode::Ddp && probe.every > 0 {
        let model = build_model(recipe, vocab, device)?;
        let params = model.trainable_parameters();
        probe.model = Some((model, params));
    }
    let summary = if sync.mode == SyncMode::Ddp {
        simulate_ddp(
            recipe,
            &mut learners,
            &prepared.train,
            tokens_per_step,
            parameters,
            &mut probe,
            &mut metrics,
        )?
    } else {
        simulate_diloco_family(
            recipe,
            &mut learners,
            &prepared.train,
            tokens_per_step,
            budget,
            &names,
            &mut probe,
            &mut metrics,
        )?
    };
    let Outcome {
        wall_s: wall,
        bytes_up,
        bytes_down,
        merged_tokens,
        rejected,
        merges,
        failures,
        global,
    } = summary;

    if sync.mode != SyncMode::Ddp {
        // Diagnostics: how far apart the learners ended (the final round averages them into Θ).
        let locals: Vec<f64> = learners
            .iter()
            .map(|l| evaluate(&l.model, &prepared.eval, batch, t.eval_batches.0))
            .collect();
        tracing::info!("learners' own models: eval {locals:.4?}");
    }
    // The global model: learner 0's network loaded with Θ.
    let eval_model = &mut learners[0];
    for (p, values) in eval_model.params.iter_mut().zip(&global) {
        set_flat(p, values);
    }
    let final_eval = evaluate(&eval_model.model, &prepared.eval, batch, t.eval_batches.0);
    probe.record(t.max_steps.0, final_eval, wall, &mut metrics)?;
    metrics.flush()?;
    let (best_eval_step, best_eval_loss) = probe.best;
    let tokens: u64 = learners.iter().map(|l| l.steps * tokens_per_step).sum();
    let compute: f64 = learners.iter().map(|l| l.compute_s).sum();
    let ideal_tokens_per_s = m_count as f64 * tokens_per_step as f64 / sync.step_time_s.0;
    let summary = SimSummary {
        name: recipe.name().to_string(),
        mode: format!("{:?}", sync.mode).to_lowercase(),
        learners: m_count,
        codec: if sync.mode == SyncMode::Ddp {
            "f32".into()
        } else {
            format!("{:?}", sync.codec).to_lowercase()
        },
        parameters,
        dtype: dtype_name(learners[0].model.kind()).into(),
        seed: recipe.seed,
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        best_eval_loss,
        best_eval_step,
        tokens,
        merged_tokens,
        bytes_up,
        bytes_down,
        bytes_per_learner: (bytes_up + bytes_down) as f64 / m_count as f64,
        sim_wall_clock_s: wall,
        goodput: merged_tokens as f64 / (ideal_tokens_per_s * wall).max(1e-9),
        compute_utilization: compute / (m_count as f64 * wall).max(1e-9),
        rejected_contributions: rejected,
        merges,
        failures,
    };
    crate::checkpoint::write_json_atomic(
        &run_dir.join("summary.json"),
        &serde_json::to_value(&summary)?,
    )?;
    tracing::info!(
        "done: eval {:.4} -> {:.4}, {} tokens, {:.1} MB per learner, {:.0} simulated s",
        initial_eval,
        final_eval,
        tokens,
        summary.bytes_per_learner / 1e6,
        wall
    );
    Ok(summary)
}

/// What a mode's event loop hands back for the summary.
struct Outcome {
    wall_s: f64,
    bytes_up: u64,
    bytes_down: u64,
    merged_tokens: u64,
    rejected: u64,
    merges: u64,
    failures: u64,
    /// The global parameters, in trainable-parameter order.
    global: Vec<Vec<f32>>,
}

impl Learner {
    /// Tensor `ti` of the trainable parameters at full precision (the optimizer's f32 master
    /// copy for bf16 parameters), flattened.
    fn values(&self, ti: usize) -> Vec<f32> {
        flat(&self.optimizer.full_precision(ti))
    }

    /// Overwrites tensor `ti` between steps, through the optimizer so that a bf16 parameter's
    /// master copy follows (else the next step would write the stale master back).
    fn set_values(&mut self, ti: usize, values: &[f32]) {
        self.optimizer.set_values(ti, &Tensor::from_slice(values));
    }

    /// The window indices of one step's micro-batches, drawn from this learner's shard.
    fn next_micro_batches(&mut self, batch: usize, accum: usize) -> Vec<Vec<usize>> {
        (0..accum)
            .map(|_| {
                self.batcher
                    .next_windows(batch)
                    .into_iter()
                    .map(|i| self.shard[i])
                    .collect()
            })
            .collect()
    }
}

fn train_step(
    learner: &mut Learner,
    data: &PackedSequences,
    t: &TrainSection,
    lr: f64,
) -> Result<f64> {
    let micro_batches = learner.next_micro_batches(t.batch_size.0, t.grad_accum.0);
    let loss_sum = backward_micro_batches(&learner.model, data, &micro_batches);
    if !loss_sum.is_finite() {
        return Err(anyhow!(
            "a learner diverged: loss is {loss_sum}; lower train.lr"
        ));
    }
    learner.optimizer.clipped_step(lr, t.clip());
    learner.steps += 1;
    Ok(loss_sum)
}

/// Data parallel: gradients of all M learners averaged every step. Equivalent to one model on
/// the M micro-batches; the step waits for the slowest learner and a ring all-reduce.
fn simulate_ddp(
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
    })
}

#[allow(clippy::too_many_arguments)]
fn simulate_diloco_family(
    recipe: &Recipe,
    learners: &mut [Learner],
    data: &PackedSequences,
    tokens_per_step: u64,
    budget: u64,
    names: &[(String, Vec<i64>)],
    probe: &mut EvalProbe,
    metrics: &mut impl Write,
) -> Result<Outcome> {
    let sync = &recipe.sync;
    let t = &recipe.train;
    let m_count = learners.len();
    let (classic, streaming) = (
        sync.mode == SyncMode::Diloco,
        sync.mode == SyncMode::Streaming,
    );
    let fragments = if classic { 1 } else { sync.fragments.0 };
    let tensors: Vec<TensorInfo> = names
        .iter()
        .map(|(n, s)| TensorInfo::new(n.clone(), &s.iter().map(|&d| d as u64).collect::<Vec<_>>()))
        .collect();
    let plan = FragmentPlan::new(tensors, fragments).map_err(|e| anyhow!("sync.fragments: {e}"))?;
    let initial: Vec<Vec<f32>> = (0..learners[0].params.len())
        .map(|i| learners[0].values(i))
        .collect();
    let codec = sync.codec.codec();
    let down_codec = sync.down_codec.unwrap_or(sync.codec).codec();
    let config = SyncerConfig {
        h: sync.h.0 as u64,
        tau: sync.tau.0 as u64,
        // Classic and Streaming DiLoCo wait for every learner; Decoupled merges what arrived.
        quorum: if classic || streaming {
            m_count
        } else {
            sync.quorum.0
        },
        grace_gamma: if classic || streaming {
            0.0
        } else {
            sync.grace_gamma.0
        },
        grace_cap_s: None,
        outer: OuterOptimizer {
            lr: sync.outer_lr.0,
            momentum: sync.outer_momentum.0,
        },
        merge: sync.merge,
        final_step: sync.final_step,
        pull_timeout_s: 100.0 * sync.step_time_s.0 * sync.h.0 as f64,
        heartbeat_timeout_s: 10.0 * sync.step_time_s.0
            / learners
                .iter()
                .map(|l| l.speed)
                .fold(f64::INFINITY, f64::min),
        version_history: 4,
        broadcast_codec: (down_codec != atoll_wire::Codec::F32).then_some(down_codec),
    };
    let apply_rule = sync.apply_rule();
    let mut syncer = Syncer::new(config, plan.clone(), &initial);
    let mut queue = Queue {
        heap: BinaryHeap::new(),
        events: BTreeMap::new(),
        seq: 0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(recipe.seed ^ 0x5eed_fa11);
    let failure_draw = |rng: &mut ChaCha8Rng| -> Option<f64> {
        sync.failures
            .mtbf_s
            .map(|mtbf| -mtbf.0 * (1.0 - rng.random::<f64>()).ln())
    };
    for m in 0..m_count {
        queue.push(0.0, SimEvent::ToSyncer(Event::Join { learner: m as u32 }));
        if let Some(dt) = failure_draw(&mut rng) {
            queue.push(dt, SimEvent::Fail(m));
        }
    }
    let limits = FrameLimits::default();
    let (mut bytes_up, mut bytes_down, mut failures) = (0u64, 0u64, 0u64);
    let mut tokens_done = 0u64;
    let mut last_step_at = 0.0;
    let total_steps = t.max_steps.0;
    let fragment_bytes = |c: atoll_wire::Codec, p: usize| -> u64 {
        plan.fragments[p]
            .tensors
            .iter()
            .map(|&i| c.encoded_len(plan.tensors[i].elements() as usize, DEFAULT_BLOCK) as u64 + 64)
            .sum()
    };

    let mut flushed = false;
    loop {
        let Some((now, event)) = queue.pop() else {
            // The budget is spent and everything in flight has landed: one last round per
            // fragment with every learner, so the global model holds all the work done.
            if flushed {
                break;
            }
            flushed = true;
            // The learners are idle at a step boundary: they apply what arrived after their last
            // step first, so each outer gradient below holds exactly the work no version holds
            // yet (measured from a stale anchor it would be re-anchored at the newest Θ_p and
            // pull Θ_p back towards the learner's stale copy).
            for l in learners.iter_mut().filter(|l| l.alive) {
                apply_due(l, &plan, apply_rule, tokens_per_step);
            }
            let progress = learners
                .iter()
                .enumerate()
                .filter(|(_, l)| l.alive)
                .filter_map(|(m, l)| {
                    l.protocol
                        .as_ref()
                        .map(|p| (m as u32, p.progress().to_vec()))
                })
                .collect();
            let actions = syncer.flush(last_step_at, &progress);
            bytes_down += carry_out(
                actions,
                syncer.merge_log(),
                last_step_at,
                learners,
                &mut queue,
                &fragment_bytes,
                down_codec,
            );
            continue;
        };
        match event {
            SimEvent::ToSyncer(e) => {
                // Once the budget is spent learners stop on purpose: silence is not a failure.
                let job_over = tokens_done >= budget;
                if job_over
                    && matches!(
                        e,
                        Event::Timer(atoll_coordinator::TimerId::Heartbeat { .. })
                    )
                {
                    continue;
                }
                let actions = syncer.handle(now, e);
                bytes_down += carry_out(
                    actions,
                    syncer.merge_log(),
                    now,
                    learners,
                    &mut queue,
                    &fragment_bytes,
                    down_codec,
                );
            }
            SimEvent::CatchUpArrives {
                learner: m,
                fragments,
            } => {
                let l = &mut learners[m];
                if !l.alive {
                    continue;
                }
                for (p, _, values) in &fragments {
                    for (k, &ti) in plan.fragments[*p].tensors.iter().enumerate() {
                        l.set_values(ti, &values[k]);
                    }
                }
                l.feedback = plan
                    .fragments
                    .iter()
                    .map(|f| vec![ErrorFeedback::default(); f.tensors.len()])
                    .collect();
                l.protocol = Some(LearnerProtocol::new(fragments));
                l.at_pull.clear();
                l.merged_in.clear();
                l.waiting_for_sync = false;
                queue.push(now + sync.step_time_s.0 / l.speed, SimEvent::StepDone(m));
            }
            SimEvent::StepDone(m) => {
                if !learners[m].alive || tokens_done >= budget {
                    continue;
                }
                let progress = (tokens_done as f64 / budget as f64).min(1.0);
                let step_index = ((progress * total_steps as f64) as usize).min(total_steps - 1);
                let lr = t.lr_at(step_index);
                let l = &mut learners[m];
                let loss = train_step(l, data, t, lr)?;
                l.compute_s += sync.step_time_s.0 / l.speed;
                tokens_done += tokens_per_step;
                last_step_at = now;
                let protocol = l
                    .protocol
                    .as_mut()
                    .expect("stepping learners have caught up");
                let reported: Vec<Progress> = protocol.on_step(tokens_per_step);
                let step = protocol.step();
                queue.push(
                    now + l.link.latency_s,
                    SimEvent::ToSyncer(Event::Report {
                        learner: m as u32,
                        step,
                        progress: reported,
                    }),
                );
                apply_due(l, &plan, apply_rule, tokens_per_step);
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"learner": m, "step": step, "loss": loss, "lr": lr, "sim_time_s": now, "tokens": tokens_done})
                )?;
                let steps_per_learner = (tokens_done / (tokens_per_step * m_count as u64)) as usize;
                if probe.due(steps_per_learner) && steps_per_learner < total_steps {
                    let loss = probe.evaluate_values(&global_values(&syncer, &plan, &initial));
                    probe.record(steps_per_learner, loss, now, metrics)?;
                }
                if classic && step.is_multiple_of(sync.h.0 as u64) {
                    l.waiting_for_sync = true; // resumes when the merged model arrives
                } else if tokens_done < budget {
                    queue.push(now + sync.step_time_s.0 / l.speed, SimEvent::StepDone(m));
                }
            }
            SimEvent::PullArrives {
                learner: m,
                fragment,
                round,
            } => {
                let l = &mut learners[m];
                let Some(protocol) = l.protocol.as_ref() else {
                    continue;
                };
                if !l.alive {
                    continue;
                }
                let (base_version, progress) = protocol.on_pull(fragment);
                let anchor = protocol.anchor(fragment).clone();
                let mut delta = Vec::new();
                let mut bytes = 0u64;
                let mut snapshot = Vec::new();
                for (k, &ti) in plan.fragments[fragment].tensors.iter().enumerate() {
                    let local = l.values(ti);
                    let raw: Vec<f32> = anchor[k].iter().zip(&local).map(|(a, x)| a - x).collect();
                    let values = if sync.error_feedback {
                        let mut buf = Vec::new();
                        l.feedback[fragment][k]
                            .encode(codec, &raw, DEFAULT_BLOCK, &mut buf)
                            .context("encoding an outer gradient")?;
                        let mut out = vec![0.0; raw.len()];
                        atoll_wire::decode(codec, &buf, DEFAULT_BLOCK, &mut out)?;
                        out
                    } else {
                        raw
                    };
                    let frame = encode_frame(
                        codec,
                        DEFAULT_BLOCK as u32,
                        &[values.len() as u64],
                        &values,
                        sync.zstd_level,
                    )
                    .context("encoding an outer gradient")?;
                    bytes += frame.len() as u64;
                    delta.push(decode_frame(&frame, limits)?.values);
                    snapshot.push(local);
                }
                let pulled_at_step = protocol.step();
                l.at_pull
                    .entry(fragment)
                    .or_default()
                    .insert(round, (pulled_at_step, snapshot));
                bytes_up += bytes;
                let arrive = l.link.send(now, bytes, true);
                let c = Contribution {
                    learner: m as u32,
                    fragment,
                    round,
                    base_version,
                    progress,
                    delta,
                };
                queue.push(arrive, SimEvent::ToSyncer(Event::Contribution(c)));
            }
            SimEvent::BroadcastArrives {
                learner: m,
                fragment,
                version,
                values,
                merged_round,
            } => {
                let l = &mut learners[m];
                let Some(protocol) = l.protocol.as_mut() else {
                    continue;
                };
                if !l.alive {
                    continue;
                }
                protocol.on_broadcast(fragment, version, values);
                if let Some(round) = merged_round {
                    l.merged_in.insert((fragment, version), round);
                }
                if l.waiting_for_sync {
                    apply_due(l, &plan, apply_rule, tokens_per_step);
                    l.waiting_for_sync = false;
                    if tokens_done < budget {
                        queue.push(now + sync.step_time_s.0 / l.speed, SimEvent::StepDone(m));
                    }
                }
            }
            SimEvent::Fail(m) => {
                if tokens_done >= budget {
                    continue;
                }
                failures += 1;
                learners[m].alive = false;
                learners[m].waiting_for_sync = false;
                queue.push(now + sync.failures.recovery_s.0, SimEvent::Recover(m));
            }
            SimEvent::Recover(m) => {
                if tokens_done >= budget {
                    continue;
                }
                learners[m].alive = true;
                queue.push(now, SimEvent::ToSyncer(Event::Join { learner: m as u32 }));
                if let Some(dt) = failure_draw(&mut rng) {
                    queue.push(now + dt, SimEvent::Fail(m));
                }
            }
        }
    }
    let global = global_values(&syncer, &plan, &initial);
    let merged_tokens: u64 = {
        // Tokens count once per learner contribution, averaged over fragments.
        let per_fragment: u64 = syncer
            .merge_log()
            .iter()
            .flat_map(|r| r.contributors.iter().map(|c| c.3))
            .sum();
        per_fragment / plan.len() as u64
    };
    let stats = syncer.stats();
    Ok(Outcome {
        wall_s: last_step_at,
        bytes_up,
        bytes_down,
        merged_tokens,
        rejected: stats.rejected,
        merges: stats.merges,
        failures,
        global,
    })
}

/// The syncer's global parameters Θ, in trainable-parameter order (`template` gives the shapes).
fn global_values(syncer: &Syncer, plan: &FragmentPlan, template: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut g = template.to_vec();
    for (p, f) in plan.fragments.iter().enumerate() {
        let values = syncer.fragment_values(p);
        for (k, &ti) in f.tensors.iter().enumerate() {
            g[ti] = values[k].clone();
        }
    }
    g
}

/// Carries out the syncer's actions on the simulated network; returns the bytes sent down.
#[allow(clippy::too_many_arguments)]
fn carry_out(
    actions: Vec<Action>,
    merge_log: &[MergeRecord],
    now: f64,
    learners: &mut [Learner],
    queue: &mut Queue,
    fragment_bytes: &dyn Fn(atoll_wire::Codec, usize) -> u64,
    down_codec: atoll_wire::Codec,
) -> u64 {
    let mut bytes_down = 0;
    for action in actions {
        match action {
            Action::Pull {
                learner,
                fragment,
                round,
            } => {
                let l = &learners[learner as usize];
                queue.push(
                    now + l.link.latency_s,
                    SimEvent::PullArrives {
                        learner: learner as usize,
                        fragment,
                        round,
                    },
                );
            }
            Action::Broadcast {
                fragment,
                version,
                values,
                to,
            } => {
                let bytes = fragment_bytes(down_codec, fragment);
                let record = merge_log
                    .iter()
                    .rev()
                    .find(|r| r.fragment == fragment && r.version == version);
                for m in to {
                    let merged_round = record
                        .filter(|r| r.contributors.iter().any(|c| c.0 == m))
                        .map(|r| r.round);
                    bytes_down += bytes;
                    let arrive = learners[m as usize].link.send(now, bytes, false);
                    queue.push(
                        arrive,
                        SimEvent::BroadcastArrives {
                            learner: m as usize,
                            fragment,
                            version,
                            values: values.clone(),
                            merged_round,
                        },
                    );
                }
            }
            Action::CatchUp { learner, fragments } => {
                let bytes: u64 = (0..fragments.len())
                    .map(|p| fragment_bytes(atoll_wire::Codec::F32, p))
                    .sum();
                // The initial download is the same for every mode; count only re-joins.
                if learners[learner as usize].protocol.is_some() {
                    bytes_down += bytes;
                }
                let arrive = learners[learner as usize].link.send(now, bytes, false);
                queue.push(
                    arrive,
                    SimEvent::CatchUpArrives {
                        learner: learner as usize,
                        fragments,
                    },
                );
            }
            Action::ArmTimer { id, at } => queue.push(at, SimEvent::ToSyncer(Event::Timer(id))),
            Action::Rejected { .. } | Action::MarkedAbsent { .. } => {}
        }
    }
    bytes_down
}

/// Applies the broadcasts that arrived since the last step boundary.
///
/// `Rebase` keeps the local progress that the applied version does not hold: the steps taken
/// since this learner's latest pull that was merged into it (or, when none was, since the anchor
/// it last applied), so a learner left out of a round keeps its work instead of losing it. The
/// fragment's progress counters then count those kept steps (the next outer gradient holds them),
/// not zero: else the merge weights them wrongly and the final flush skips them.
fn apply_due(l: &mut Learner, plan: &FragmentPlan, rule: ApplyRule, tokens_per_step: u64) {
    let Some(protocol) = l.protocol.as_mut() else {
        return;
    };
    let step_now = protocol.step();
    for due in protocol.take_due() {
        let received = due.received;
        let fragment = received.fragment;
        // The newest of this learner's pulls merged into a version up to the applied one.
        let merged_round = l
            .merged_in
            .range((fragment, 0)..=(fragment, received.version))
            .map(|(_, &r)| r)
            .max();
        let (kept, base): (Progress, Vec<Vec<f32>>) =
            match merged_round.and_then(|r| l.at_pull.get(&fragment).and_then(|s| s.get(&r))) {
                Some((pulled_at_step, values)) => (
                    Progress::of_steps(step_now - pulled_at_step, tokens_per_step),
                    values.clone(),
                ),
                None => (due.progress, due.replaced_anchor.to_vec()),
            };
        let mut shifts = Vec::new();
        for (k, &ti) in plan.fragments[fragment].tensors.iter().enumerate() {
            let values = &received.values[k];
            let applied = rule.applied(&l.values(ti), values, &base[k]);
            l.set_values(ti, &applied);
            if rule == ApplyRule::Rebase {
                shifts.push(
                    values
                        .iter()
                        .zip(&base[k])
                        .map(|(g, s)| g - s)
                        .collect::<Vec<f32>>(),
                );
            }
        }
        if rule == ApplyRule::Rebase {
            if let Some(protocol) = l.protocol.as_mut() {
                protocol.keep_progress(fragment, kept);
            }
        }
        // Pulls the applied version holds are done with; later ones (still in flight) move with
        // the local parameters so that their own rebase measures the right steps.
        l.merged_in
            .retain(|&(p, v), _| p != fragment || v > received.version);
        if let Some(pulls) = l.at_pull.get_mut(&fragment) {
            if let Some(r) = merged_round {
                pulls.retain(|&round, _| round > r);
            }
            for (_, snapshot) in pulls.values_mut() {
                for (s, shift) in snapshot.iter_mut().zip(&shifts) {
                    for (x, d) in s.iter_mut().zip(shift) {
                        *x += d;
                    }
                }
            }
            while pulls.len() > 4 {
                pulls.pop_first();
            }
        }
    }
}
