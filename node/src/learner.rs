//! `atoll learner`: one region. The inner loop runs on this thread and never waits for the
//! network; a tokio runtime beside it keeps the control plane (join, per-step reports, pulls)
//! and the data plane (contributions up, fragments down) going, reconnecting with backoff when
//! the coordinator goes away.

use crate::contribution::{ContributionEncoder, Wire};
use crate::link_tuning::link_tuning;
use crate::parts::{receive_parts, send_part, ReceivedPart};
use crate::serial_worker::SerialWorker;
use crate::state::StateStore;
use anyhow::{anyhow, Context, Result};
use atoll_collective::RankConfig;
use atoll_coordinator::{
    apply_update, ApplyRule, FinalStep, FragmentPlan, FragmentValues, LearnerProtocol, Progress,
};
use atoll_link::{Hello, PartHeader, PartKind};
use atoll_proto::v1::{JoinRequest, Pull, ReportRequest};
use atoll_store::{CheckpointStore, ResumeFrom};
use atoll_trainer::recipe::{RankParallelism, Recipe};
use atoll_trainer::sharded::worker::RankedWorker;
use atoll_trainer::worker::{InnerLoop, Worker};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tonic::Code;

pub struct LearnerOptions {
    pub recipe: Recipe,
    pub region: String,
    pub coordinator: String,
    pub ca: PathBuf,
    pub secret: String,
    pub run_dir: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Largest data-plane frame accepted, in bytes; `None`: what the plan's largest part needs
    /// ([`crate::parts::frame_limit_for`]).
    pub max_frame_bytes: Option<u64>,
    /// Give up when the coordinator stays unreachable this long.
    pub give_up_after: Duration,
    /// Start from the global model of a coordinator checkpoint in `checkpoint.url`: the join
    /// then only downloads the fragments that changed since.
    pub resume: Option<ResumeFrom>,
    /// Send the QUIC data plane here instead of the coordinator's own data port (a link
    /// emulator or relay in between); the control plane still goes to `coordinator`.
    pub data_via: Option<SocketAddr>,
    /// This process's rank when the learner is sharded over several ranks
    /// (`atoll_trainer::sharded::worker`); `None` for a one-process learner. Rank 0 talks to
    /// the coordinator, the other ranks only follow it.
    pub ranks: Option<RankConfig>,
}

/// A fragment's version and values Θ_p.
type VersionedFragment = (u64, Vec<Vec<f32>>);

/// The global fragments (version, Θ_p) of a coordinator checkpoint.
fn fragments_from_checkpoint(
    recipe: &Recipe,
    run_dir: &std::path::Path,
    plan: &FragmentPlan,
    from: ResumeFrom,
) -> Result<BTreeMap<usize, VersionedFragment>> {
    let ckpt = &recipe.checkpoint;
    let store = CheckpointStore::open(&ckpt.location(run_dir), ckpt.store_options())?;
    let loaded = atoll_store::block_on(store.load_resume(from))??.ok_or_else(|| {
        anyhow!(
            "--resume: no intact checkpoint in {}; set checkpoint.url to the job's checkpoint location",
            store.url()
        )
    })?;
    if loaded.manifest.kind != "coordinator" {
        return Err(anyhow!(
            "{}/step-{} is a {} checkpoint; a learner resumes from the coordinator's",
            store.url(),
            loaded.manifest.step,
            loaded.manifest.kind
        ));
    }
    let scratch = run_dir.join(".resume");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    loaded.write_to(&scratch)?;
    let saved = StateStore::new(&scratch)?.load(plan.len());
    std::fs::remove_dir_all(&scratch)?;
    let (state, fragments) =
        saved?.ok_or_else(|| anyhow!("the checkpoint holds no coordinator state"))?;
    if state.plan_fingerprint != plan.fingerprint() {
        return Err(anyhow!(
            "{}/step-{} is another model's or fragment plan's checkpoint",
            store.url(),
            loaded.manifest.step
        ));
    }
    tracing::info!(
        "starting from the global model of {}/step-{} (fragment versions {:?})",
        store.url(),
        loaded.manifest.step,
        fragments.iter().map(|f| f.version).collect::<Vec<_>>()
    );
    Ok(fragments
        .into_iter()
        .enumerate()
        .map(|(p, f)| (p, (f.version, (*f.theta).clone())))
        .collect())
}

struct Joined {
    shard_index: u32,
    shard_count: u32,
    resume_step: u64,
    clock: Vec<u64>,
}

enum Inbound {
    Joined(Joined),
    Pulls(Vec<Pull>),
    Part(ReceivedPart),
    /// A message whose tensors were joined from their parts by the [`PartJoiner`].
    Assembled(PartHeader, Result<Tensors>),
    JobDone(Vec<u64>),
    Fatal(String),
}

#[derive(Clone, Default)]
struct ReportState {
    step: u64,
    progress: Vec<Progress>,
    loss: f64,
    tokens_per_s: f64,
    finished: bool,
}

struct Outgoing {
    header: PartHeader,
    frame: Vec<u8>,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

pub fn run(opts: LearnerOptions) -> Result<()> {
    atoll_link::tls::install_crypto_provider();
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating {}", opts.run_dir.display()))?;
    let recipe = opts.recipe.clone();
    let mut worker: Box<dyn InnerLoop> = match &opts.ranks {
        None => Box::new(Worker::new(&recipe)?),
        Some(ranks) => {
            let ranked = RankedWorker::connect(&recipe, ranks)?;
            if ranks.rank != 0 {
                tracing::info!(
                    "rank {} of {}: following rank 0 of region {}",
                    ranks.rank,
                    ranks.world_size,
                    opts.region
                );
                return ranked.follow();
            }
            let how = match recipe.train.parallel {
                RankParallelism::Sharded => "sharded over",
                RankParallelism::Replicated => "replicated on",
            };
            tracing::info!(
                "rank 0 of {}: the model is {how} {} ranks",
                ranks.world_size,
                ranks.world_size
            );
            Box::new(ranked)
        }
    };
    let worker = worker.as_mut();
    let plan = worker.plan()?;
    let max_frame = crate::parts::frame_limit_for(&plan, opts.max_frame_bytes);
    let model_hash = worker.model_hash()?;
    let tokens_per_step = worker.tokens_per_step();
    let max_steps = recipe.train.max_steps.0 as u64;
    let rule = recipe.sync.apply_rule();
    let final_average = recipe.sync.final_step == FinalStep::Average;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (inbound_tx, inbound) = std_mpsc::channel::<Inbound>();
    let fatal_tx = inbound_tx.clone();
    let (report_tx, report_rx) = watch::channel(ReportState::default());
    let (out_tx, out_rx) = mpsc::channel::<Vec<Outgoing>>(2 * plan.len().max(1));
    let initial = match opts.resume {
        Some(from) => fragments_from_checkpoint(&recipe, &opts.run_dir, &plan, from)?,
        None => BTreeMap::new(),
    };
    // Declared at join: the coordinator sends only fragments whose version differs.
    let held: Arc<Mutex<Vec<u64>>> =
        Arc::new(Mutex::new(initial.values().map(|(v, _)| *v).collect()));
    let counters = Arc::new(Counters::default());
    if let Some(addr) = opts.metrics {
        let bound = runtime.block_on(crate::metrics_endpoint::serve(
            addr,
            &[("region", opts.region.as_str())],
        ))?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let net = Net {
        coordinator: opts.coordinator.clone(),
        ca: opts.ca.clone(),
        secret: opts.secret.clone(),
        region: opts.region.clone(),
        model_hash,
        fragments: plan.len(),
        connections: recipe.sync.link.connections.0,
        tuning: link_tuning(&recipe),
        max_frame,
        give_up_after: opts.give_up_after,
        data_via: opts.data_via,
        inbound: inbound_tx,
        held: held.clone(),
        counters: counters.clone(),
    };
    runtime.spawn(net.run(report_rx, out_rx));

    let mut metrics_file =
        std::io::BufWriter::new(std::fs::File::create(opts.run_dir.join("metrics.jsonl"))?);
    let wire = Wire {
        codec: recipe.sync.codec.codec(),
        error_feedback: recipe.sync.error_feedback,
        zstd_level: recipe.sync.zstd_level,
    };
    let joiner = start_part_joiner(plan.clone(), fatal_tx.clone())?;
    let encoder = ContributionEncoder::start(
        wire,
        plan.clone(),
        send_contribution(out_tx.clone(), fatal_tx),
    )?;
    let mut state = LearnerState {
        plan: plan.clone(),
        protocol: None,
        initial,
        assembling: BTreeMap::new(),
        waiting_updates: BTreeMap::new(),
        at_pull: BTreeMap::new(),
        pulls: Vec::new(),
        pulled_at: BTreeMap::new(),
        round_trips: (0.0, 0),
        encoder,
        joiner,
        clock: Vec::new(),
        resume_step: 0,
        final_versions: None,
        last_step_model: None,
        answered_final_average: false,
    };
    let mut done_waiting_since: Option<Instant> = None;
    let mut network_gone = false;
    let mut last = Instant::now();
    let mut rate = crate::step_rate::StepRate::default();
    let mut last_loss = f64::NAN;
    loop {
        worker.keep_alive()?;
        // Everything that arrived since the last step boundary, without waiting...
        let block = state.protocol.is_none() || worker.step() >= max_steps;
        let first = if block {
            match inbound.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => Some(m),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    if state.final_versions.is_some() {
                        // The job is over and the coordinator gone: end with what arrived.
                        network_gone = true;
                        None
                    } else {
                        return Err(anyhow!("the network side stopped"));
                    }
                }
            }
        } else {
            None
        };
        for message in first.into_iter().chain(inbound.try_iter()) {
            match message {
                Inbound::Fatal(why) => return Err(anyhow!(why)),
                other => state.on_message(other, worker, &counters)?,
            }
        }
        let Some(protocol) = state.protocol.as_mut() else {
            continue; // still waiting for the catch-up
        };
        if let Some(finals) = &state.final_versions {
            // End holding the global model: wait (briefly) for the last broadcasts.
            let held = (0..plan.len())
                .all(|p| protocol.latest(p).0 >= finals.get(p).copied().unwrap_or(0));
            let since = *done_waiting_since.get_or_insert_with(Instant::now);
            if held || network_gone || since.elapsed() > Duration::from_secs(10) {
                for due in protocol.take_due() {
                    let tensors = &plan.fragments[due.received.fragment].tensors;
                    worker.overwrite(tensors, &due.received.values)?;
                }
                if !held {
                    tracing::warn!(
                        "the final broadcasts did not all arrive; exiting with versions {:?}",
                        protocol.versions()
                    );
                }
                break;
            }
            continue;
        }
        // ...applied at this boundary.
        let step_now = worker.step();
        let finished = step_now >= max_steps;
        if finished && final_average && state.last_step_model.is_none() {
            // What the job's final average takes from this learner (`FinalStep::Average`).
            let model = plan
                .fragments
                .iter()
                .map(|f| worker.values(&f.tensors).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            state.last_step_model = Some(model);
        }
        // Once it has stopped, a learner keeps its unmerged work whatever the rule: there is
        // no training left for which to hold the global model, and its later outer gradients
        // then still carry that work to the learners that are training.
        let rule = if finished && final_average {
            ApplyRule::Rebase
        } else {
            rule
        };
        for due in protocol.take_due() {
            let p = due.received.fragment;
            let tensors = &plan.fragments[p].tensors;
            let at_pull = state.at_pull.remove(&p);
            if rule != ApplyRule::Rebase {
                worker.apply(rule, tensors, &due.received.values, None)?;
                tracing::debug!(
                    "step {step_now}: applied fragment {p} v{}",
                    due.received.version
                );
                continue;
            }
            // The kept work is what this version does not hold: the steps since the pull it
            // answers or, when this learner was left out of the round, since the anchor it
            // replaces; the counters then describe that work, so the next merge weighs it.
            let (base, kept) = match at_pull {
                Some((pulled_at_step, local)) => (
                    local,
                    Progress::of_steps(step_now - pulled_at_step, tokens_per_step),
                ),
                None => (due.replaced_anchor.clone(), due.progress),
            };
            worker.apply(rule, tensors, &due.received.values, Some(&base))?;
            tracing::debug!(
                "step {step_now}: applied fragment {p} v{} by rebase, keeping {} steps",
                due.received.version,
                kept.c_steps
            );
            protocol.keep_progress(p, kept);
        }
        state.answer_pulls(worker)?;
        let protocol = state.protocol.as_mut().expect("started above");
        let versions = protocol.versions();
        crate::job_metrics::learner_versions(&versions);
        *held.lock().expect("held") = versions;
        if finished {
            // Done training, still applying broadcasts: the counters and versions reported now
            // are what the job's last rounds are opened on.
            let progress = protocol.progress();
            report_tx.send_if_modified(|r| {
                let changed = !r.finished || r.progress != progress;
                r.finished = true;
                r.progress = progress.to_vec();
                changed
            });
            continue;
        }
        last_loss = worker.train_step()?;
        let progress = protocol.on_step(tokens_per_step);
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        let tokens_per_s = rate.record(elapsed, tokens_per_step);
        let step = worker.step();
        report_tx.send_replace(ReportState {
            step,
            progress,
            loss: last_loss,
            tokens_per_s,
            finished: step >= max_steps,
        });
        crate::job_metrics::learner_step(step, last_loss, tokens_per_s);
        writeln!(
            metrics_file,
            "{}",
            serde_json::json!({"step": step, "loss": last_loss, "tokens_per_s": tokens_per_s,
                "bytes_up": counters.up.load(Ordering::Relaxed), "bytes_down": counters.down.load(Ordering::Relaxed)})
        )?;
        if step % 10 == 0 || step == max_steps {
            metrics_file.flush()?;
            tracing::info!("step {step}/{max_steps} loss {last_loss:.4} {tokens_per_s:.0} tok/s");
        }
    }
    metrics_file.flush()?;
    let summary = serde_json::json!({
        "region": opts.region,
        "final_step": worker.step(),
        "final_loss": last_loss,
        "bytes_up": counters.up.load(Ordering::Relaxed),
        "bytes_down": counters.down.load(Ordering::Relaxed),
        "fragment_versions": state.protocol.as_ref().map(|p| p.versions()),
        "fragment_round_trips": state.round_trips.1,
        "fragment_round_trip_s_mean": state.round_trips.0 / state.round_trips.1.max(1) as f64,
    });
    atoll_trainer::checkpoint::write_json_atomic(&opts.run_dir.join("summary.json"), &summary)?;
    tracing::info!("job done at step {}", worker.step());
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

struct LearnerState {
    plan: FragmentPlan,
    protocol: Option<LearnerProtocol>,
    /// Full fragments received before the protocol starts (the first catch-up).
    initial: BTreeMap<usize, VersionedFragment>,
    assembling: Assembling,
    /// Updates whose base version has not arrived yet, by (fragment, base version).
    waiting_updates: BTreeMap<(usize, u64), (u64, Tensors)>,
    /// The step and local values of each fragment's latest pull (what `rebase` keeps work from).
    at_pull: BTreeMap<usize, (u64, FragmentValues)>,
    /// Pulls received since the last step boundary, answered after it.
    pulls: Vec<Pull>,
    /// When each fragment was last sent up: its round trip ends when a new version arrives.
    pulled_at: BTreeMap<usize, Instant>,
    /// Sum and count of those round trips, for the summary.
    round_trips: (f64, u64),
    /// Encodes contributions off this thread; its frames go straight to the up link.
    encoder: ContributionEncoder<PartHeader>,
    /// Joins messages whose tensors were cut into parts off this thread.
    joiner: PartJoiner,
    clock: Vec<u64>,
    resume_step: u64,
    /// Set when the job is done: the versions to hold before exiting.
    final_versions: Option<Vec<u64>>,
    /// Each fragment's values after the last inner step, which the job's final average
    /// (`FinalStep::Average`) is over; later broadcasts do not change them.
    last_step_model: Option<Vec<FragmentValues>>,
    answered_final_average: bool,
}

/// Parts of one message being reassembled, keyed by (kind, fragment, round or version), in the
/// plan's part order.
type Assembling = BTreeMap<(u8, u32, u64), (PartHeader, Vec<Option<Vec<f32>>>)>;
/// Per-tensor values of one fragment.
type Tensors = Vec<Vec<f32>>;

/// Joins the parts of messages that cut a tensor into parts, which copies that tensor (at 12B
/// the embedding, 4 GB), on a thread of its own rather than the training thread, one message
/// after another in the order they completed; the tensors come back as [`Inbound::Assembled`].
type PartJoiner = SerialWorker<(PartHeader, Vec<Vec<f32>>)>;

fn start_part_joiner(plan: FragmentPlan, inbound: std_mpsc::Sender<Inbound>) -> Result<PartJoiner> {
    Ok(SerialWorker::start(
        "atoll-joiner",
        move |(h, parts): (PartHeader, _)| {
            let tensors = plan.join_parts(h.fragment as usize, parts);
            // A learner that stopped listening is exiting: nothing waits for these tensors.
            let _ = inbound.send(Inbound::Assembled(h, tensors.map_err(anyhow::Error::from)));
        },
    )?)
}

/// What becomes of an encoded contribution: its frames, one part each, onto the up-link queue, or
/// the encoding error to the learner's loop.
fn send_contribution(
    out: mpsc::Sender<Vec<Outgoing>>,
    fatal: std_mpsc::Sender<Inbound>,
) -> impl FnMut(PartHeader, Result<Vec<Vec<u8>>>) + Send + 'static {
    move |header: PartHeader, frames: Result<Vec<Vec<u8>>>| match frames {
        Ok(frames) => {
            let p = header.fragment;
            let parts = frames
                .into_iter()
                .enumerate()
                .map(|(k, frame)| Outgoing {
                    header: PartHeader {
                        part: k as u32,
                        frame_len: frame.len() as u32,
                        ..header
                    },
                    frame,
                })
                .collect();
            // A full queue means the up link is behind: drop this contribution (the
            // syncer's pull times out) rather than buffer without bound.
            match out.try_send(parts) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("up link saturated: contribution to fragment {p} dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::debug!("network side gone: contribution to fragment {p} not sent")
                }
            }
        }
        Err(e) => {
            let _ = fatal.send(Inbound::Fatal(format!(
                "cannot encode a contribution to fragment {}: {e:#}",
                header.fragment
            )));
        }
    }
}

impl LearnerState {
    fn on_message(
        &mut self,
        message: Inbound,
        worker: &mut dyn InnerLoop,
        counters: &Counters,
    ) -> Result<()> {
        match message {
            Inbound::Joined(j) => {
                if self.protocol.is_none() {
                    worker.assign_shard(
                        j.shard_index as usize,
                        j.shard_count as usize,
                        j.resume_step,
                    )?;
                    self.resume_step = j.resume_step;
                }
                self.clock = j.clock;
                self.try_start(worker)?;
            }
            // Answered at the step boundary, once the broadcasts that arrived with them are
            // applied (`answer_pulls`). Before the catch-up there is nothing to answer from.
            Inbound::Pulls(pulls) => {
                if self.protocol.is_some() {
                    self.pulls.extend(pulls);
                }
            }
            Inbound::Part(part) => {
                counters.down.fetch_add(part.wire_bytes, Ordering::Relaxed);
                metrics::counter!("atoll_bytes_down_total").increment(part.wire_bytes);
                self.on_part(part.header, part.values, worker)?;
            }
            Inbound::Assembled(h, tensors) => self.on_fragment_message(h, tensors, worker)?,
            Inbound::JobDone(versions) => self.final_versions = Some(versions),
            Inbound::Fatal(_) => unreachable!("handled by the caller"),
        }
        Ok(())
    }

    /// Sends Δ for every pull received since the last step boundary. Called after that
    /// boundary's broadcasts are applied: a pull that arrived together with the broadcast of the
    /// fragment's new version is then answered from that version, not from the one before (which
    /// the syncer would have to re-anchor, pulling Θ back towards it).
    fn answer_pulls(&mut self, worker: &mut dyn InnerLoop) -> Result<()> {
        let pulls = std::mem::take(&mut self.pulls);
        if let Some(protocol) = &self.protocol {
            for pull in pulls {
                let p = pull.fragment as usize;
                if p >= self.plan.len() {
                    continue;
                }
                let (base_version, progress) = protocol.on_pull(p);
                let anchor = protocol.anchor(p);
                let tensors = &self.plan.fragments[p].tensors;
                let last_step = self
                    .last_step_model
                    .as_ref()
                    .filter(|_| pull.final_average)
                    .map(|m| m[p].clone());
                tracing::debug!(
                    "step {}: answering fragment {p} round {} from v{base_version}, {} steps{}",
                    worker.step(),
                    pull.round,
                    progress.c_steps,
                    if last_step.is_some() {
                        " (the final average: the last step's model)"
                    } else {
                        ""
                    }
                );
                if last_step.is_some() && !self.answered_final_average {
                    self.answered_final_average = true;
                    tracing::info!(
                        "the job's final average: answering from the model at step {}",
                        worker.step()
                    );
                }
                let local = match last_step {
                    Some(values) => values,
                    None => Arc::new(worker.values(tensors)?),
                };
                let header = PartHeader {
                    kind: PartKind::Contribution,
                    fragment: p as u32,
                    round_or_version: pull.round,
                    base_version,
                    steps: progress.c_steps,
                    tokens: progress.c_tokens,
                    part: 0,
                    parts: self.plan.part_count(p) as u32,
                    frame_len: 0,
                };
                self.encoder
                    .submit(p, anchor.clone(), local.clone(), header)?;
                self.at_pull.insert(p, (worker.step(), local));
                self.pulled_at.insert(p, Instant::now());
            }
        }
        Ok(())
    }

    fn on_part(
        &mut self,
        h: PartHeader,
        values: Vec<f32>,
        worker: &mut dyn InnerLoop,
    ) -> Result<()> {
        let p = h.fragment as usize;
        if p >= self.plan.len() || h.parts as usize != self.plan.part_count(p) {
            tracing::warn!("the coordinator sent a part for no fragment of the plan");
            return Ok(());
        }
        let key = (h.kind as u8, h.fragment, h.round_or_version);
        let entry = self
            .assembling
            .entry(key)
            .or_insert_with(|| (h, vec![None; h.parts as usize]));
        entry.1[h.part as usize] = Some(values);
        if !entry.1.iter().all(Option::is_some) {
            return Ok(());
        }
        let (h, parts) = self.assembling.remove(&key).expect("present");
        let parts: Vec<Vec<f32>> = parts.into_iter().flatten().collect();
        if !self.plan.is_cut(p) {
            // One part per tensor: joining moves them.
            let tensors = self.plan.join_parts(p, parts);
            self.on_fragment_message(h, tensors.map_err(anyhow::Error::from), worker)
        } else {
            if !self.joiner.send((h, parts)) {
                return Err(anyhow!("the part joiner has stopped"));
            }
            Ok(())
        }
    }

    /// A whole message from the coordinator: a full fragment or an encoded update.
    fn on_fragment_message(
        &mut self,
        h: PartHeader,
        tensors: Result<Tensors>,
        worker: &mut dyn InnerLoop,
    ) -> Result<()> {
        let (p, version) = (h.fragment as usize, h.round_or_version);
        let tensors =
            tensors.with_context(|| format!("fragment {p} v{version} from the coordinator"))?;
        match h.kind {
            PartKind::Full => self.on_fragment(p, version, tensors, worker)?,
            PartKind::Update => {
                self.waiting_updates
                    .insert((p, h.base_version), (version, tensors));
                self.drain_updates(p);
            }
            PartKind::Contribution => {}
        }
        Ok(())
    }

    fn on_fragment(
        &mut self,
        p: usize,
        version: u64,
        values: Vec<Vec<f32>>,
        worker: &mut dyn InnerLoop,
    ) -> Result<()> {
        self.note_round_trip(p);
        match self.protocol.as_mut() {
            Some(protocol) => protocol.on_broadcast(p, version, Arc::new(values)),
            None => {
                self.initial.insert(p, (version, values));
                self.try_start(worker)?;
            }
        }
        self.drain_updates(p);
        Ok(())
    }

    /// A new version of fragment `p` arrived: the round trip since its pull is over.
    fn note_round_trip(&mut self, p: usize) {
        if let Some(t) = self.pulled_at.remove(&p) {
            let seconds = t.elapsed().as_secs_f64();
            metrics::histogram!("atoll_fragment_round_trip_seconds").record(seconds);
            self.round_trips.0 += seconds;
            self.round_trips.1 += 1;
        }
    }

    /// Applies queued updates whose base is now the newest version held.
    fn drain_updates(&mut self, p: usize) {
        let Some(protocol) = self.protocol.as_mut() else {
            return;
        };
        let mut applied = false;
        loop {
            let (held, base_values) = protocol.latest(p);
            self.waiting_updates
                .retain(|(f, base), _| *f != p || *base >= held);
            let Some((version, quantised)) = self.waiting_updates.remove(&(p, held)) else {
                break;
            };
            let mut next: Vec<Vec<f32>> = base_values.iter().cloned().collect();
            for (k, q) in quantised.iter().enumerate() {
                let old = base_values[k].clone();
                apply_update(&old, q, &mut next[k]);
            }
            protocol.on_broadcast(p, version, Arc::new(next));
            applied = true;
        }
        if applied {
            self.note_round_trip(p);
        }
    }

    /// Starts training once every fragment of the join's clock has arrived.
    fn try_start(&mut self, worker: &mut dyn InnerLoop) -> Result<()> {
        if self.protocol.is_some() || self.clock.is_empty() {
            return Ok(());
        }
        let complete = (0..self.plan.len()).all(|p| {
            self.initial
                .get(&p)
                .is_some_and(|(v, _)| *v >= self.clock[p])
        });
        if !complete {
            return Ok(());
        }
        let catch_up: Vec<(usize, u64, Arc<Tensors>)> = std::mem::take(&mut self.initial)
            .into_iter()
            .map(|(p, (v, values))| (p, v, Arc::new(values)))
            .collect();
        for (p, _, values) in &catch_up {
            worker.overwrite(&self.plan.fragments[*p].tensors, values)?;
        }
        let mut protocol = LearnerProtocol::new(catch_up);
        protocol.resume_at(self.resume_step);
        tracing::info!(
            "caught up with the global model (versions {:?})",
            protocol.versions()
        );
        self.protocol = Some(protocol);
        Ok(())
    }
}

struct Net {
    coordinator: String,
    ca: PathBuf,
    secret: String,
    region: String,
    model_hash: String,
    fragments: usize,
    connections: usize,
    tuning: atoll_link::LinkTuning,
    max_frame: u64,
    give_up_after: Duration,
    data_via: Option<SocketAddr>,
    inbound: std_mpsc::Sender<Inbound>,
    held: Arc<Mutex<Vec<u64>>>,
    counters: Arc<Counters>,
}

/// How long the data plane may take to accept a connection's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// What one session (one successful join) shares with the sender task.
type Conns = Arc<Mutex<Vec<quinn::Connection>>>;

impl Net {
    async fn run(
        self,
        mut reports: watch::Receiver<ReportState>,
        mut out: mpsc::Receiver<Vec<Outgoing>>,
    ) {
        let conns: Conns = Arc::new(Mutex::new(Vec::new()));
        let sender_conns = conns.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            while let Some(parts) = out.recv().await {
                let current: Vec<quinn::Connection> = sender_conns.lock().expect("conns").clone();
                if current.is_empty() {
                    continue;
                }
                for (k, part) in parts.into_iter().enumerate() {
                    let conn = &current[k % current.len()];
                    let len = part.frame.len();
                    if send_part(conn, &part.header, part.frame.into())
                        .await
                        .is_ok()
                    {
                        counters.up.fetch_add(
                            (len + atoll_link::data::HEADER_LEN) as u64,
                            Ordering::Relaxed,
                        );
                        metrics::counter!("atoll_bytes_up_total").increment(len as u64);
                    }
                }
            }
        });
        let mut unreachable_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session(&mut reports, &conns).await {
                Ok(SessionEnd::JobDone(versions)) => {
                    let _ = self.inbound.send(Inbound::JobDone(versions));
                    return;
                }
                Ok(SessionEnd::Rejoin) => {
                    unreachable_since = None;
                    backoff = Duration::from_millis(100);
                }
                Err(SessionError::Fatal(why)) => {
                    let _ = self.inbound.send(Inbound::Fatal(why));
                    return;
                }
                Err(SessionError::Retry(why)) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.give_up_after {
                        let _ = self.inbound.send(Inbound::Fatal(format!(
                            "the coordinator at {} has been unreachable for {:.0} s: {why}",
                            self.coordinator,
                            since.elapsed().as_secs_f64()
                        )));
                        return;
                    }
                    tracing::warn!("coordinator unreachable ({why}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
            }
        }
    }

    async fn session(
        &self,
        reports: &mut watch::Receiver<ReportState>,
        conns: &Conns,
    ) -> Result<SessionEnd, SessionError> {
        let retry = |e: anyhow::Error| SessionError::Retry(format!("{e:#}"));
        let mut client = atoll_proto::client::connect(&self.coordinator, &self.ca)
            .await
            .map_err(retry)?;
        let held = self.held.lock().expect("held").clone();
        let reply = client
            .join(JoinRequest {
                protocol_version: atoll_proto::PROTOCOL_VERSION,
                secret: self.secret.clone(),
                region: self.region.clone(),
                model_hash: self.model_hash.clone(),
                held_versions: held,
            })
            .await
            .map_err(|s| match s.code() {
                Code::PermissionDenied | Code::FailedPrecondition | Code::ResourceExhausted => {
                    SessionError::Fatal(format!(
                        "the coordinator refused this learner: {}",
                        s.message()
                    ))
                }
                _ => SessionError::Retry(s.message().to_string()),
            })?
            .into_inner();
        tracing::info!(
            "joined as learner {} (shard {}/{}), resuming at step {}",
            reply.learner_id,
            reply.shard_index,
            reply.shard_count,
            reply.resume_step
        );
        // The data plane on the same host, the UDP port the coordinator names.
        let host = self
            .coordinator
            .rsplit_once(':')
            .map_or(self.coordinator.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let addr = match self.data_via {
            Some(via) => via,
            None => (host, reply.data_port as u16)
                .to_socket_addrs()
                .map_err(|e| retry(anyhow!("resolving {host}: {e}")))?
                .next()
                .ok_or_else(|| retry(anyhow!("{host} has no address")))?,
        };
        let ca_pem = std::fs::read(&self.ca)
            .map_err(|e| SessionError::Fatal(format!("{}: {e}", self.ca.display())))?;
        // The client's own UDP port: on loopback when the coordinator (or relay) is, so a
        // local job opens nothing to the network.
        let bind: SocketAddr = match (addr.is_ipv4(), addr.ip().is_loopback()) {
            (true, true) => "127.0.0.1:0",
            (true, false) => "0.0.0.0:0",
            (false, true) => "[::1]:0",
            (false, false) => "[::]:0",
        }
        .parse()
        .expect("literal");
        let endpoint =
            atoll_link::quic::client_endpoint(&ca_pem, self.tuning, bind).map_err(retry)?;
        let mut opened = Vec::new();
        for _ in 0..self.connections {
            let conn = atoll_link::quic::connect(&endpoint, addr)
                .await
                .map_err(retry)?;
            // Reading starts before the hello is answered: the coordinator may send the
            // catch-up at once, and unread parts would fill the connection's flow-control
            // window ahead of the answer.
            let inbound = self.inbound.clone();
            let max_frame = self.max_frame;
            let reader = conn.clone();
            tokio::spawn(async move {
                let mut parts = receive_parts(reader.clone(), max_frame, false);
                while let Some(part) = parts.recv().await {
                    match part {
                        Ok(part) => {
                            if inbound.send(Inbound::Part(part)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("bad data from the coordinator: {e:#}");
                            reader.close(2u32.into(), b"bad frame");
                            return;
                        }
                    }
                }
            });
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| retry(e.into()))?;
            let hello = Hello {
                session: reply.session.clone(),
            }
            .encode()
            .map_err(|e| SessionError::Fatal(e.to_string()))?;
            send.write_all(&hello).await.map_err(|e| retry(e.into()))?;
            send.finish().map_err(|e| retry(e.into()))?;
            let answer = tokio::time::timeout(HELLO_TIMEOUT, recv.read_to_end(256))
                .await
                .map_err(|_| retry(anyhow!("the data plane did not answer the hello")))?
                .map_err(|e| retry(e.into()))?;
            if answer.first() != Some(&0) {
                return Err(SessionError::Retry(
                    "the data plane refused the session".into(),
                ));
            }
            opened.push(conn);
        }
        *conns.lock().expect("conns") = opened.clone();
        let _ = self.inbound.send(Inbound::Joined(Joined {
            shard_index: reply.shard_index,
            shard_count: reply.shard_count,
            resume_step: reply.resume_step,
            clock: reply.vector_clock,
        }));

        let session = reply.session;
        let mut failures = 0;
        loop {
            // A report per step; while finished, one every 250 ms as the heartbeat.
            let _ = tokio::time::timeout(Duration::from_millis(250), reports.changed()).await;
            let r = reports.borrow_and_update().clone();
            // Until the catch-up has arrived (a large model over a slow link can take minutes)
            // the report is a bare heartbeat: the resume step and no progress on any fragment.
            let progress = if r.progress.len() == self.fragments {
                r.progress
                    .iter()
                    .map(|p| atoll_proto::v1::Progress {
                        steps: p.c_steps,
                        tokens: p.c_tokens,
                    })
                    .collect()
            } else {
                vec![atoll_proto::v1::Progress::default(); self.fragments]
            };
            let request = ReportRequest {
                session: session.clone(),
                step: r.step.max(reply.resume_step),
                progress,
                loss: r.loss,
                tokens_per_s: r.tokens_per_s,
                finished: r.finished,
                bytes_up: self.counters.up.load(Ordering::Relaxed),
                bytes_down: self.counters.down.load(Ordering::Relaxed),
                applied_versions: self.held.lock().expect("held").clone(),
            };
            match client.report(request).await {
                Ok(reply) => {
                    failures = 0;
                    let reply = reply.into_inner();
                    if !reply.pulls.is_empty() {
                        let _ = self.inbound.send(Inbound::Pulls(reply.pulls));
                    }
                    if reply.job_done {
                        return Ok(SessionEnd::JobDone(reply.final_versions));
                    }
                }
                Err(s) if s.code() == Code::Unauthenticated => {
                    tracing::warn!("the coordinator no longer knows this session: joining again");
                    return Ok(SessionEnd::Rejoin);
                }
                Err(s) => {
                    failures += 1;
                    if failures >= 3 {
                        return Err(SessionError::Retry(s.message().to_string()));
                    }
                }
            }
            if opened.iter().all(|c| c.close_reason().is_some()) {
                return Err(SessionError::Retry("the data connection closed".into()));
            }
        }
    }
}

enum SessionEnd {
    JobDone(Vec<u64>),
    Rejoin,
}

enum SessionError {
    Fatal(String),
    Retry(String),
}
