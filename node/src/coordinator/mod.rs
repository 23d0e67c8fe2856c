//! `atoll coordinator`: the syncer behind a tonic gRPC control plane and a QUIC data plane.
//! One actor task owns the [`Syncer`] and every piece of job state; gRPC handlers, QUIC
//! connections and timers send it commands. Nothing here decides anything the state machine
//! should: the actor turns requests into events and actions into messages.

//!
//! Where to look:
//! - this file: the options, the actor's state (`Core`), start-up and the command loop;
//! - `service`: the gRPC control plane and the QUIC accept loop, which feed the actor;
//! - `membership`: joins, reports and the status view;
//! - `rounds`: the round lifecycle, from a contribution's parts to the merge, and the job's end;
//! - `broadcast`: fragments going down (updates after a merge, full values for a catch-up);
//! - `persistence`: the state store, checkpoints, and the restore paths.

mod broadcast;
mod membership;
mod persistence;
mod rounds;
mod service;

use crate::state::{CoordinatorState, StateStore};
use anyhow::{anyhow, Context, Result};
use atoll_coordinator::{
    ApplyRule, Event, FragmentPlan, LearnerId, MergedFragment, OuterOptimizer, Progress, Syncer,
    SyncerConfig, TimerId,
};
use atoll_link::JobTls;
use atoll_proto::v1::coordinator_server::CoordinatorServer;
use atoll_proto::v1::*;
use atoll_recipe::Recipe;
use atoll_store::{BackgroundWriter, CheckpointStore, ResumeFrom};
use atoll_trainer::worker::Worker;
use atoll_wire::Codec;
use persistence::{load_or_init, restore_checkpoint};
use service::{accept_data, Service};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

pub struct CoordinatorOptions {
    pub recipe: Recipe,
    pub listen: SocketAddr,
    pub run_dir: PathBuf,
    pub secret: String,
    /// Prometheus endpoint (None: off).
    pub metrics: Option<SocketAddr>,
    /// Extra names or addresses the server certificate must be valid for.
    pub hosts: Vec<String>,
    /// Largest data-plane frame accepted, in bytes; `None`: what the plan's largest part needs
    /// ([`crate::parts::frame_limit_for`]).
    pub max_frame_bytes: Option<u64>,
    /// Start from a checkpoint of `checkpoint.url` instead of the run directory's own state.
    pub resume: Option<ResumeFrom>,
}

/// Files of the run directory that make up a coordinator checkpoint (besides the fragments).
const COORDINATOR_JSON: &str = "state/coordinator.json";
const MERGES_LOG: &str = "merges.jsonl";
/// How long the last rounds wait for the learners to apply the newest versions (normally a
/// few heartbeats) before they open anyway.
const FINAL_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gRPC server may take, once the job is done, to finish the replies in flight.
const GRPC_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, Status>>;

enum Cmd {
    Join(JoinRequest, Reply<JoinReply>),
    Report(ReportRequest, Reply<ReportReply>),
    Status(oneshot::Sender<StatusReply>),
    Leave(String),
    Connected {
        session: String,
        conn: quinn::Connection,
        reply: oneshot::Sender<Option<LearnerId>>,
    },
    Part {
        learner: LearnerId,
        part: crate::parts::ReceivedPart,
    },
    BadData {
        learner: Option<LearnerId>,
        reason: String,
    },
    Timer(TimerId),
    /// A contribution whose tensors were joined from their parts on the blocking pool (a tensor
    /// cut into parts is a copy of up to `sync.link.part_values` × parts values, which the
    /// actor does not make itself).
    Assembled(atoll_coordinator::syncer::Contribution),
    /// A merge handed out by the syncer came back from its blocking thread, its fragment's state
    /// file already written and its broadcast framed (or the error that stopped it).
    Merged(Result<(MergedFragment, Option<Vec<bytes::Bytes>>)>),
}

struct Member {
    region: String,
    session: String,
    conns: Vec<quinn::Connection>,
    /// The version of each fragment this learner holds or has been sent.
    sent: Vec<Option<u64>>,
    /// Fragments to send in full once its data connection is up.
    catch_up: Vec<usize>,
    pulls: Vec<Pull>,
    progress: Vec<Progress>,
    step: u64,
    loss: f64,
    tokens_per_s: f64,
    /// When it joined, at which step, and when its step last moved: its average token rate while
    /// it trained, the ideal goodput is measured against.
    joined_at: Instant,
    joined_step: u64,
    stepped_at: Option<Instant>,
    bytes_up: u64,
    bytes_down: u64,
    last_report: Option<Instant>,
    finished: bool,
    /// The version of each fragment the learner reports having applied.
    applied: Vec<u64>,
    told_done: bool,
    in_flight: Arc<Semaphore>,
}

struct Partial {
    base_version: u64,
    progress: Progress,
    /// The parts received so far, in the plan's part order.
    parts: Vec<Option<Vec<f32>>>,
    /// Every part so far held only finite values.
    finite: bool,
}

struct Core {
    recipe: Recipe,
    syncer: Syncer,
    plan: Arc<FragmentPlan>,
    worker: Worker,
    model_hash: String,
    start: Instant,
    tx: mpsc::Sender<Cmd>,
    store: StateStore,
    state: CoordinatorState,
    members: BTreeMap<LearnerId, Member>,
    partial: BTreeMap<(LearnerId, u32, u64), Partial>,
    /// Since when every learner has finished while the last rounds wait for the job to settle.
    settling_since: Option<Instant>,
    done_at: Option<Instant>,
    /// When the first learner joined: goodput counts the learners' training window, from then
    /// to the end of the last rounds, not the coordinator's start-up or its final evaluation.
    training_since: Option<Instant>,
    zstd_level: i32,
    /// Per fragment, the newest encoded update framed for the wire (version, one frame per
    /// tensor): framed (and zstd-compressed) once, sent to every learner holding its base.
    framed_updates: Vec<Option<(u64, Vec<bytes::Bytes>)>>,
    data_port: u16,
    run_dir: PathBuf,
    merges_log: std::io::BufWriter<std::fs::File>,
    checkpoints: Option<BackgroundWriter>,
    last_checkpoint_step: u64,
}

fn syncer_config(recipe: &Recipe) -> SyncerConfig {
    let s = &recipe.sync;
    let down = s.down_codec.unwrap_or(s.codec).codec();
    SyncerConfig {
        h: s.h.0 as u64,
        tau: s.tau.0 as u64,
        quorum: s.quorum.0,
        grace_gamma: s.grace_gamma.0,
        grace_cap_s: None,
        outer: OuterOptimizer {
            lr: s.outer_lr.0,
            momentum: s.outer_momentum.0,
        },
        merge: s.merge,
        final_step: s.final_step,
        pull_timeout_s: 4.0 * s.heartbeat_timeout_s.0,
        heartbeat_timeout_s: s.heartbeat_timeout_s.0,
        version_history: 4,
        broadcast_codec: (down != Codec::F32).then_some(down),
        broadcast_error_feedback: s.down_error_feedback,
        max_skipped_rounds: s.max_skipped_rounds.0 as u32,
        pull_current_only: s.apply_rule() == ApplyRule::Rebase,
    }
}

/// Runs the coordinator until the job is done (every fragment merged for the last time and the
/// learners told), then returns.
pub async fn run(opts: CoordinatorOptions) -> Result<()> {
    atoll_link::tls::install_crypto_provider();
    let recipe = opts.recipe.clone();
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating {}", opts.run_dir.display()))?;
    let worker = tokio::task::block_in_place(|| Worker::without_optimizer(&recipe))?;
    let plan = worker.plan()?;
    let max_frame = crate::parts::frame_limit_for(&plan, opts.max_frame_bytes);
    crate::parts::check_contribution_limit(&plan, recipe.sync.codec.codec(), max_frame)?;
    let model_hash = worker.model_hash()?;
    let ckpt = &recipe.checkpoint;
    let ckpt_store = CheckpointStore::open(&ckpt.location(&opts.run_dir), ckpt.store_options())?;
    let last_checkpoint_step = match opts.resume {
        Some(from) => restore_checkpoint(&ckpt_store, from, &opts.run_dir).await?,
        None => 0,
    };
    let checkpoints = (ckpt.every > 0)
        .then(|| {
            BackgroundWriter::start(
                ckpt_store.clone(),
                ckpt.keep_last.0,
                ckpt.keep_every.map(|k| k.0 as u64),
            )
        })
        .transpose()?;
    let store = StateStore::new(&opts.run_dir)?;
    let config = syncer_config(&recipe);
    let (syncer, state) = load_or_init(&store, config, &plan, &worker, &recipe, &opts.run_dir)?;

    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    hosts.push(opts.listen.ip().to_string());
    hosts.extend(opts.hosts.iter().cloned());
    let tls = JobTls::load_or_create(&opts.run_dir.join("tls"), recipe.name(), &hosts)?;

    // gRPC on TCP and the data plane on UDP share the port number.
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| anyhow!("binding the coordinator on tcp/{}: {e}", opts.listen))?;
    let bound = listener.local_addr()?;
    let endpoint =
        atoll_link::quic::server_endpoint(bound, &tls, crate::link_tuning::link_tuning(&recipe))?;
    let metrics_addr = match opts.metrics {
        Some(a) => Some(crate::metrics_endpoint::serve(a, &[]).await?),
        None => None,
    };
    tracing::info!(
        "coordinator for {:?} on {bound} (gRPC/TLS on tcp, fragments over QUIC on udp){}",
        recipe.name(),
        metrics_addr.map_or(String::new(), |m| format!(
            ", metrics on http://{m}/metrics"
        ))
    );
    crate::launcher::write_endpoint_file(&opts.run_dir, bound, &tls, metrics_addr)?;
    let parts: usize = (0..plan.len()).map(|p| plan.part_count(p)).sum();
    let tensors = plan.tensors.len();
    if parts > tensors {
        tracing::info!(
            "data plane: {tensors} tensors travel as {parts} parts of at most {} values",
            plan.part_values
        );
    }

    let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
    let merges_log = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(opts.run_dir.join(MERGES_LOG))?,
    );
    let s = &recipe.sync;
    let mut core = Core {
        zstd_level: s.zstd_level,
        framed_updates: vec![None; plan.len()],
        recipe: recipe.clone(),
        syncer,
        plan: Arc::new(plan),
        worker,
        model_hash,
        start: Instant::now(),
        tx: tx.clone(),
        store,
        state,
        members: BTreeMap::new(),
        partial: BTreeMap::new(),
        settling_since: None,
        done_at: None,
        training_since: None,
        data_port: bound.port(),
        run_dir: opts.run_dir.clone(),
        merges_log,
        checkpoints,
        last_checkpoint_step,
    };
    if core.state.done {
        core.done_at = Some(Instant::now());
    }
    crate::job_metrics::coordinator_started(&core.syncer.versions());

    let svc = Service {
        tx: tx.clone(),
        secret: Arc::new(opts.secret.clone()),
    };
    let (cert, key) = tls.server_pem()?;
    let (stop_grpc, stop_serving) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?
        .add_service(CoordinatorServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stop_serving.await;
            },
        );
    let mut grpc = tokio::spawn(server);
    let data = tokio::spawn(accept_data(endpoint.clone(), tx.clone(), max_frame));

    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                // Merges run on blocking threads (`rounds.rs`), but a broadcast's framing or a
                // checkpoint's serialisation can still take a while at 12B: the runtime hands
                // this worker's other tasks (QUIC connections) to another thread meanwhile.
                Some(cmd) => tokio::task::block_in_place(|| core.handle(cmd))?,
                None => break,
            },
            _ = tick.tick() => {}
        }
        core.check_end()?;
        if core.finished() {
            break;
        }
    }
    tracing::info!("job done; coordinator exiting");
    endpoint.close(0u32.into(), b"job done");
    // The replies that told the learners the job is done are written before the server goes
    // (aborted at once, a learner's last reply could be lost and it would retry for good); a
    // peer that never reads its reply holds the exit up for a few seconds at most.
    // Requests still queued for the actor (and any that come) fail at once instead of waiting.
    drop(rx);
    let _ = stop_grpc.send(());
    if tokio::time::timeout(GRPC_DRAIN_TIMEOUT, &mut grpc)
        .await
        .is_err()
    {
        grpc.abort();
    }
    data.abort();
    Ok(())
}

impl Core {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn handle(&mut self, cmd: Cmd) -> Result<()> {
        match cmd {
            Cmd::Join(req, reply) => {
                let r = self.join(req);
                let _ = reply.send(r);
            }
            Cmd::Report(req, reply) => {
                let r = self.report(req);
                let _ = reply.send(r);
            }
            Cmd::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Cmd::Leave(session) => {
                if let Some(id) = self.learner_by_session(&session) {
                    let actions = self.syncer.handle(self.now(), Event::Leave { learner: id });
                    self.execute(actions)?;
                }
            }
            Cmd::Connected {
                session,
                conn,
                reply,
            } => {
                let id = self.learner_by_session(&session);
                if let Some(id) = id {
                    let m = self.members.get_mut(&id).expect("member");
                    m.conns.retain(|c| c.close_reason().is_none());
                    m.conns.push(conn);
                    let pending = std::mem::take(&mut m.catch_up);
                    for p in pending {
                        self.send_fragment(id, p, self.syncer.version(p), true);
                    }
                }
                let _ = reply.send(id);
            }
            Cmd::Part { learner, part } => self.on_part(learner, part)?,
            Cmd::Assembled(c) => {
                let actions = self.syncer.handle(self.now(), Event::Contribution(c));
                self.execute(actions)?;
            }
            Cmd::BadData { learner, reason } => {
                metrics::counter!("atoll_bad_data_total").increment(1);
                tracing::warn!(
                    "refused data from {}: {reason}; connection closed",
                    learner.map_or("an unauthenticated peer".to_string(), |l| format!(
                        "learner {l}"
                    ))
                );
            }
            Cmd::Timer(id) => {
                let actions = self.syncer.handle(self.now(), Event::Timer(id));
                self.execute(actions)?;
            }
            Cmd::Merged(merged) => {
                let (merged, frames) = merged?;
                let (p, version) = (merged.fragment, merged.state.version);
                let actions = self.syncer.handle(self.now(), Event::Merged(merged));
                // The broadcast's frames, made with the merge, for the version it produced.
                if let Some(frames) = frames.filter(|_| self.syncer.version(p) == version) {
                    self.framed_updates[p] = Some((version, frames));
                }
                self.execute(actions)?;
            }
        }
        Ok(())
    }
}
