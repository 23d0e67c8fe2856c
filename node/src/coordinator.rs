//! `atoll coordinator`: the syncer behind a tonic gRPC control plane and a QUIC data plane.
//! One actor task owns the [`Syncer`] and every piece of job state; gRPC handlers, QUIC
//! connections and timers send it commands. Nothing here decides anything the state machine
//! should: the actor turns requests into events and actions into messages.

use crate::parts::{receive_parts, send_part};
use crate::state::{CoordinatorState, StateStore};
use crate::{random_token, same_secret};
use anyhow::{anyhow, Context, Result};
use atoll_coordinator::syncer::Contribution;
use atoll_coordinator::{
    Action, ApplyRule, Event, FragmentPlan, LearnerId, OuterOptimizer, Progress, Syncer,
    SyncerConfig, TimerId,
};
use atoll_link::data::HEADER_LEN;
use atoll_link::{Hello, JobTls, LinkTuning, PartHeader, PartKind};
use atoll_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use atoll_proto::v1::*;
use atoll_store::{BackgroundWriter, CheckpointStore, ResumeFrom, Snapshot};
use atoll_trainer::checkpoint::{HostModel, DEFAULT_MAX_SHARD_BYTES};
use atoll_trainer::recipe::Recipe;
use atoll_trainer::worker::Worker;
use atoll_wire::{encode_frame, frame_encoded, Codec, DEFAULT_BLOCK};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::{Request, Response, Status};

pub struct CoordinatorOptions {
    pub recipe: Recipe,
    pub listen: SocketAddr,
    pub run_dir: PathBuf,
    pub secret: String,
    /// Prometheus endpoint (None: off).
    pub metrics: Option<SocketAddr>,
    /// Extra names or addresses the server certificate must be valid for.
    pub hosts: Vec<String>,
    /// Largest data-plane frame accepted, in bytes.
    pub max_frame_bytes: u64,
    /// Start from a checkpoint of `checkpoint.url` instead of the run directory's own state.
    pub resume: Option<ResumeFrom>,
}

/// Files of the run directory that make up a coordinator checkpoint (besides the fragments).
const COORDINATOR_JSON: &str = "state/coordinator.json";
const MERGES_LOG: &str = "merges.jsonl";
/// How long the last rounds wait for the learners to apply the newest versions (normally a
/// few heartbeats) before they open anyway.
const FINAL_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

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
        header: PartHeader,
        values: Vec<f32>,
        bytes: u64,
    },
    BadData {
        learner: Option<LearnerId>,
        reason: String,
    },
    Timer(TimerId),
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
    tensors: Vec<Option<Vec<f32>>>,
}

struct Core {
    recipe: Recipe,
    syncer: Syncer,
    plan: FragmentPlan,
    worker: Worker,
    model_hash: String,
    start: Instant,
    tx: mpsc::Sender<Cmd>,
    store: StateStore,
    state: CoordinatorState,
    members: BTreeMap<LearnerId, Member>,
    partial: BTreeMap<(LearnerId, u32, u64), Partial>,
    flushed: bool,
    /// Since when every learner has finished while the last rounds wait for the job to settle.
    settling_since: Option<Instant>,
    done_at: Option<Instant>,
    down_codec: Codec,
    zstd_level: i32,
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
    }
}

pub fn link_tuning(recipe: &Recipe) -> LinkTuning {
    let l = &recipe.sync.link;
    LinkTuning {
        bandwidth_bps: l.bandwidth_gbps.0 * 1e9,
        rtt: Duration::from_secs_f64((2.0 * l.latency_ms.0 / 1000.0).max(0.001)),
        congestion: match l.congestion {
            atoll_trainer::recipe::CongestionChoice::Cubic => atoll_link::Congestion::Cubic,
            atoll_trainer::recipe::CongestionChoice::Bbr => atoll_link::Congestion::Bbr,
            atoll_trainer::recipe::CongestionChoice::Provisioned => {
                atoll_link::Congestion::Provisioned
            }
        },
        idle_timeout: Duration::from_secs_f64(recipe.sync.heartbeat_timeout_s.0.max(5.0)),
        connections: l.connections.0,
    }
}

/// Runs the coordinator until the job is done (every fragment merged for the last time and the
/// learners told), then returns.
pub async fn run(opts: CoordinatorOptions) -> Result<()> {
    atoll_link::tls::install_crypto_provider();
    let recipe = opts.recipe.clone();
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating {}", opts.run_dir.display()))?;
    let worker = tokio::task::block_in_place(|| Worker::new(&recipe))?;
    let plan = worker.plan()?;
    let model_hash = worker.model_hash()?;
    let ckpt = &recipe.checkpoint;
    let ckpt_store = CheckpointStore::open(&ckpt.location(&opts.run_dir), ckpt.store_options())?;
    let mut last_checkpoint_step = 0;
    if let Some(from) = opts.resume {
        let loaded = ckpt_store.load_resume(from).await?.ok_or_else(|| {
            anyhow!(
                "--resume latest: no intact checkpoint in {}",
                ckpt_store.url()
            )
        })?;
        if loaded.manifest.kind != "coordinator" {
            return Err(anyhow!(
                "{}/step-{} is a {} checkpoint, not a coordinator's",
                ckpt_store.url(),
                loaded.manifest.step,
                loaded.manifest.kind
            ));
        }
        // The checkpoint replaces the run directory's state; the usual restore path takes it
        // from there.
        let state_dir = opts.run_dir.join("state");
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)?;
        }
        for (path, bytes) in &loaded.files {
            if path.starts_with("state/") || path == MERGES_LOG {
                let target = opts.run_dir.join(path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&target, bytes)
                    .with_context(|| format!("writing {}", target.display()))?;
            }
        }
        last_checkpoint_step = loaded.manifest.step;
        tracing::info!(
            "resuming from checkpoint {}/step-{}",
            ckpt_store.url(),
            loaded.manifest.step
        );
    }
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
    let (syncer, state) = match store.load(plan.len())? {
        Some((state, fragments)) => {
            if state.plan_fingerprint != plan.fingerprint() {
                return Err(anyhow!(
                    "{} holds the state of another model or fragment plan; use a fresh --run-dir",
                    opts.run_dir.display()
                ));
            }
            let mut state = state;
            let max_steps = recipe.train.max_steps.0 as u64;
            if state.done && state.learners.iter().any(|l| l.step < max_steps) {
                // A finished job continued with a larger train.max_steps.
                tracing::info!("continuing a finished job to train.max_steps = {max_steps}");
                state.done = false;
            }
            tracing::info!(
                "resuming from the saved state: fragment versions {:?}, {} merges",
                fragments.iter().map(|f| f.version).collect::<Vec<_>>(),
                state.stats.merges
            );
            let syncer = Syncer::restore(
                config,
                plan.clone(),
                fragments,
                state.learners.clone(),
                Vec::new(),
                state.stats.clone(),
            );
            (syncer, state)
        }
        None => {
            let initial = worker.all_values();
            let syncer = Syncer::new(config, plan.clone(), &initial);
            for p in 0..plan.len() {
                store.save_fragment(p, &syncer.fragment_snapshot(p))?;
            }
            let state = CoordinatorState {
                plan_fingerprint: plan.fingerprint(),
                ..Default::default()
            };
            store.save(&state)?;
            (syncer, state)
        }
    };

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
    let endpoint = atoll_link::quic::server_endpoint(bound, &tls, link_tuning(&recipe))?;
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

    let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
    let merges_log = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(opts.run_dir.join(MERGES_LOG))?,
    );
    let s = &recipe.sync;
    let mut core = Core {
        down_codec: s.down_codec.unwrap_or(s.codec).codec(),
        zstd_level: s.zstd_level,
        recipe: recipe.clone(),
        syncer,
        plan,
        worker,
        model_hash,
        start: Instant::now(),
        tx: tx.clone(),
        store,
        state,
        members: BTreeMap::new(),
        partial: BTreeMap::new(),
        flushed: false,
        settling_since: None,
        done_at: None,
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
    let server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?
        .add_service(CoordinatorServer::new(svc))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let grpc = tokio::spawn(server);
    let data = tokio::spawn(accept_data(
        endpoint.clone(),
        tx.clone(),
        opts.max_frame_bytes,
    ));

    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => core.handle(cmd)?,
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
    grpc.abort();
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
            Cmd::Part {
                learner,
                header,
                values,
                bytes,
            } => self.on_part(learner, header, values, bytes)?,
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
        }
        Ok(())
    }

    fn learner_by_session(&self, session: &str) -> Option<LearnerId> {
        self.members
            .iter()
            .find(|(_, m)| same_secret(&m.session, session))
            .map(|(id, _)| *id)
    }

    fn join(&mut self, req: JoinRequest) -> Result<JoinReply, Status> {
        if req.protocol_version != atoll_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "incompatible protocol version {} (the coordinator speaks {}); use the same atoll release",
                req.protocol_version,
                atoll_proto::PROTOCOL_VERSION
            )));
        }
        if req.model_hash != self.model_hash {
            return Err(Status::failed_precondition(format!(
                "model mismatch: this learner's model hash is {} but the job's is {}; use the job's recipe",
                req.model_hash, self.model_hash
            )));
        }
        let m_count = self.recipe.sync.learners.0;
        let id = match self.state.regions.get(&req.region) {
            Some(&id) => id,
            None => {
                if self.state.regions.len() >= m_count {
                    return Err(Status::resource_exhausted(format!(
                        "the job has its {m_count} regions ({}); region {:?} cannot join",
                        self.state
                            .regions
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        req.region
                    )));
                }
                let id = self.state.regions.len() as LearnerId;
                self.state.regions.insert(req.region.clone(), id);
                id
            }
        };
        let fragments = self.plan.len();
        let held: Vec<Option<u64>> = (0..fragments)
            .map(|p| req.held_versions.get(p).copied())
            .collect();
        let resume_step = self.syncer.learner_step(id).unwrap_or(0);
        let session = random_token();
        let actions = self.syncer.handle(self.now(), Event::Join { learner: id });
        let in_flight = Arc::new(Semaphore::new(self.down_permits()));
        self.members.insert(
            id,
            Member {
                region: req.region.clone(),
                session: session.clone(),
                conns: Vec::new(),
                sent: held,
                catch_up: Vec::new(),
                pulls: Vec::new(),
                progress: vec![Progress::default(); fragments],
                step: resume_step,
                loss: f64::NAN,
                tokens_per_s: 0.0,
                bytes_up: 0,
                bytes_down: 0,
                last_report: Some(Instant::now()),
                finished: false,
                applied: Vec::new(),
                told_done: false,
                in_flight,
            },
        );
        self.execute(actions)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.persist()
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!("learner {id} ({}) joined at step {resume_step}", req.region);
        let clock = self.syncer.vector_clock(id).unwrap_or_default();
        Ok(JoinReply {
            learner_id: id,
            session,
            plan_fingerprint: self.plan.fingerprint(),
            vector_clock: clock,
            shard_index: id,
            shard_count: m_count as u32,
            resume_step,
            max_steps: self.recipe.train.max_steps.0 as u64,
            data_port: self.data_port as u32,
        })
    }

    fn report(&mut self, req: ReportRequest) -> Result<ReportReply, Status> {
        let Some(id) = self.learner_by_session(&req.session) else {
            return Err(Status::unauthenticated("unknown session: join again"));
        };
        let fragments = self.plan.len();
        if req.progress.len() != fragments {
            return Err(Status::invalid_argument(format!(
                "progress for {} fragments, the plan has {fragments}",
                req.progress.len()
            )));
        }
        let progress: Vec<Progress> = req
            .progress
            .iter()
            .map(|p| Progress {
                c_steps: p.steps,
                c_tokens: p.tokens,
            })
            .collect();
        {
            let m = self.members.get_mut(&id).expect("member");
            m.progress = progress.clone();
            m.step = req.step;
            m.loss = req.loss;
            m.tokens_per_s = req.tokens_per_s;
            m.bytes_up = req.bytes_up;
            m.bytes_down = req.bytes_down;
            m.last_report = Some(Instant::now());
            m.finished = req.finished;
            m.applied = req.applied_versions.clone();
        }
        metrics::gauge!("atoll_learner_step", "learner" => id.to_string()).set(req.step as f64);
        let actions = self.syncer.handle(
            self.now(),
            Event::Report {
                learner: id,
                step: req.step,
                progress,
            },
        );
        self.execute(actions)
            .map_err(|e| Status::internal(e.to_string()))?;
        let done = self.done_at.is_some();
        let m = self.members.get_mut(&id).expect("member");
        if done {
            m.told_done = true;
        }
        let pulls = std::mem::take(&mut m.pulls);
        Ok(ReportReply {
            pulls,
            job_done: done,
            final_versions: if done {
                self.syncer.versions()
            } else {
                Vec::new()
            },
        })
    }

    fn status(&self) -> StatusReply {
        let learners = self
            .members
            .iter()
            .map(|(&id, m)| LearnerStatus {
                id,
                region: m.region.clone(),
                state: if !self.syncer.is_active(id) {
                    "absent"
                } else if m.finished {
                    "finished"
                } else {
                    "active"
                }
                .into(),
                step: m.step,
                loss: m.loss,
                tokens_per_s: m.tokens_per_s,
                bytes_up: m.bytes_up,
                bytes_down: m.bytes_down,
                last_report_age_s: m.last_report.map_or(-1.0, |t| t.elapsed().as_secs_f64()),
            })
            .collect();
        let uptime = self.now();
        let ideal = self.recipe.sync.learners.0 as f64 * self.members_tokens_per_s_nominal();
        StatusReply {
            job: self.recipe.name().to_string(),
            uptime_s: uptime,
            learners,
            fragment_versions: self.syncer.versions(),
            merges: self.syncer.stats().merges,
            rejected: self.syncer.stats().rejected,
            tokens_merged: self.state.tokens_merged,
            goodput: if ideal > 0.0 && uptime > 0.0 {
                (self.state.tokens_merged as f64 / (ideal * uptime)).min(1.0)
            } else {
                0.0
            },
            job_done: self.done_at.is_some(),
            max_steps: self.recipe.train.max_steps.0 as u64,
        }
    }

    /// The fastest learner's token rate: what every region would do at full speed.
    fn members_tokens_per_s_nominal(&self) -> f64 {
        self.members
            .values()
            .map(|m| m.tokens_per_s)
            .fold(0.0, f64::max)
    }

    fn on_part(
        &mut self,
        learner: LearnerId,
        h: PartHeader,
        values: Vec<f32>,
        bytes: u64,
    ) -> Result<()> {
        metrics::counter!("atoll_bytes_up_total", "learner" => learner.to_string())
            .increment(bytes);
        let p = h.fragment as usize;
        if h.kind != PartKind::Contribution
            || p >= self.plan.len()
            || h.tensors as usize != self.plan.fragments[p].tensors.len()
        {
            metrics::counter!("atoll_bad_data_total").increment(1);
            tracing::warn!("learner {learner} sent a part that matches no fragment of the plan");
            return Ok(());
        }
        let key = (learner, h.fragment, h.round_or_version);
        let partial = self.partial.entry(key).or_insert_with(|| Partial {
            base_version: h.base_version,
            progress: Progress {
                c_steps: h.steps,
                c_tokens: h.tokens,
            },
            tensors: vec![None; h.tensors as usize],
        });
        partial.tensors[h.tensor as usize] = Some(values);
        if partial.tensors.iter().all(Option::is_some) {
            let partial = self.partial.remove(&key).expect("present");
            let c = Contribution {
                learner,
                fragment: p,
                round: h.round_or_version,
                base_version: partial.base_version,
                progress: partial.progress,
                delta: partial.tensors.into_iter().flatten().collect(),
            };
            let actions = self.syncer.handle(self.now(), Event::Contribution(c));
            self.execute(actions)?;
        }
        Ok(())
    }

    fn execute(&mut self, actions: Vec<Action>) -> Result<()> {
        for action in actions {
            match action {
                Action::Pull {
                    learner,
                    fragment,
                    round,
                } => {
                    if let Some(m) = self.members.get_mut(&learner) {
                        m.pulls.push(Pull {
                            fragment: fragment as u32,
                            round,
                        });
                    }
                }
                Action::Broadcast {
                    fragment,
                    version,
                    to,
                    ..
                } => {
                    self.on_merged(fragment)?;
                    for l in to {
                        self.send_fragment(l, fragment, version, false);
                    }
                }
                Action::CatchUp { learner, fragments } => {
                    let Some(m) = self.members.get_mut(&learner) else {
                        continue;
                    };
                    let stale: Vec<usize> = fragments
                        .iter()
                        .filter(|(p, v, _)| m.sent[*p] != Some(*v))
                        .map(|(p, _, _)| *p)
                        .collect();
                    if m.conns.is_empty() {
                        m.catch_up = stale;
                    } else {
                        for p in stale {
                            let v = self.syncer.version(p);
                            self.send_fragment(learner, p, v, true);
                        }
                    }
                }
                Action::ArmTimer { id, at } => {
                    let tx = self.tx.clone();
                    let deadline = self.start + Duration::from_secs_f64(at.max(0.0));
                    tokio::spawn(async move {
                        tokio::time::sleep_until(deadline.into()).await;
                        let _ = tx.send(Cmd::Timer(id)).await;
                    });
                }
                Action::Rejected {
                    learner,
                    fragment,
                    reason,
                    ..
                } => {
                    metrics::counter!("atoll_rejected_contributions_total", "reason" => format!("{reason:?}")).increment(1);
                    tracing::warn!("rejected learner {learner}'s contribution to fragment {fragment}: {reason:?}");
                }
                Action::MarkedAbsent { learner } => {
                    tracing::warn!("learner {learner} missed its heartbeat: marked absent");
                }
            }
        }
        Ok(())
    }

    /// A merge happened: persist the fragment before its broadcast leaves, log the merge.
    fn on_merged(&mut self, p: usize) -> Result<()> {
        self.store
            .save_fragment(p, &self.syncer.fragment_snapshot(p))?;
        if let Some(record) = self.syncer.merge_log().last() {
            let tokens: u64 = record.contributors.iter().map(|c| c.3).sum();
            self.state.tokens_merged += tokens / self.plan.len() as u64;
            crate::job_metrics::merged(record, tokens / self.plan.len() as u64);
            metrics::gauge!("atoll_quorum_size").set(record.contributors.len() as f64);
            metrics::histogram!("atoll_grace_wait_seconds").record(record.grace_s);
            metrics::counter!("atoll_merges_total").increment(1);
            writeln!(self.merges_log, "{}", serde_json::to_string(record)?)?;
            metrics::gauge!("atoll_goodput").set(self.status().goodput);
            self.merges_log.flush()?;
        }
        self.persist()?;
        self.maybe_checkpoint(false)
    }

    /// Θ of every tensor, assembled from the fragments.
    fn global_values(&self) -> Vec<Vec<f32>> {
        let mut global: Vec<Vec<f32>> = vec![Vec::new(); self.plan.tensors.len()];
        for (p, f) in self.plan.fragments.iter().enumerate() {
            let values = self.syncer.fragment_values(p);
            for (k, &t) in f.tensors.iter().enumerate() {
                global[t] = values[k].clone();
            }
        }
        global
    }

    /// Hands a checkpoint to the background writer when the furthest learner has crossed a
    /// multiple of `checkpoint.every` steps since the last one (or `force`, at the end). It holds
    /// the persisted state just written (fragments with outer momentum, clocks, merge log) and
    /// the global model as a Hugging Face checkpoint.
    fn maybe_checkpoint(&mut self, force: bool) -> Result<()> {
        let every = self.recipe.checkpoint.every as u64;
        if self.checkpoints.is_none() || every == 0 {
            return Ok(());
        }
        let step = self
            .syncer
            .learner_snapshots()
            .iter()
            .map(|l| l.step)
            .max()
            .unwrap_or(0);
        let due = step / every > self.last_checkpoint_step / every;
        if !(due || (force && step > self.last_checkpoint_step)) {
            return Ok(());
        }
        self.merges_log.flush()?;
        let mut snap = Snapshot::new(step, "coordinator");
        let mut files = vec![COORDINATOR_JSON.to_string(), MERGES_LOG.to_string()];
        files.extend((0..self.plan.len()).map(|p| format!("state/fragment-{p}.safetensors")));
        for f in files {
            let bytes = std::fs::read(self.run_dir.join(&f))
                .with_context(|| format!("reading {f} for the checkpoint"))?;
            snap.add(&f, bytes);
        }
        let global = self.global_values();
        let weights = tokio::task::block_in_place(|| {
            self.worker.set_all(&global);
            HostModel::copy_of(
                self.worker.model(),
                self.worker.model().kind(),
                DEFAULT_MAX_SHARD_BYTES,
            )
        })?;
        snap.defer(move || weights.into_files());
        if let Some(writer) = self.checkpoints.as_mut() {
            tokio::task::block_in_place(|| writer.submit(snap))?;
        }
        self.last_checkpoint_step = step;
        Ok(())
    }

    fn persist(&mut self) -> Result<()> {
        self.state.learners = self.syncer.learner_snapshots();
        self.state.stats = self.syncer.stats().clone();
        self.store.save(&self.state)
    }

    /// Fragment sends in flight to one learner at most.
    fn down_permits(&self) -> usize {
        4 * self.plan.len().max(1)
    }

    /// Sends fragment `p` at `version` to a learner: the encoded update when it holds the base,
    /// the full f32 values otherwise. A learner already holding too much in flight is skipped
    /// (and gets the full fragment next time) rather than buffered without bound.
    fn send_fragment(&mut self, learner: LearnerId, p: usize, version: u64, full: bool) {
        let Some(m) = self.members.get_mut(&learner) else {
            return;
        };
        m.conns.retain(|c| c.close_reason().is_none());
        if m.conns.is_empty() {
            m.sent[p] = None;
            return;
        }
        let Ok(permit) = m.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(
                "learner {learner}'s down link is saturated: fragment {p} v{version} skipped"
            );
            m.sent[p] = None;
            return;
        };
        let update = self.syncer.broadcast_update(p, version).cloned();
        let shapes: Vec<u64> = self.plan.fragments[p]
            .tensors
            .iter()
            .map(|&t| self.plan.tensors[t].elements())
            .collect();
        let (kind, base, frames) = match update {
            Some(u) if !full && m.sent[p] == Some(u.base_version) => {
                let frames: Result<Vec<Vec<u8>>, _> = u
                    .tensors
                    .iter()
                    .zip(&shapes)
                    .map(|(bytes, &n)| {
                        frame_encoded(
                            u.codec,
                            DEFAULT_BLOCK as u32,
                            &[n],
                            bytes.clone(),
                            self.zstd_level,
                        )
                    })
                    .collect();
                (PartKind::Update, u.base_version, frames)
            }
            _ => {
                let values = self.syncer.fragment_values(p);
                let frames: Result<Vec<Vec<u8>>, _> = values
                    .iter()
                    .zip(&shapes)
                    .map(|(v, &n)| encode_frame(Codec::F32, DEFAULT_BLOCK as u32, &[n], v, 0))
                    .collect();
                (PartKind::Full, version, frames)
            }
        };
        let _ = self.down_codec;
        let frames = match frames {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("encoding fragment {p} for learner {learner}: {e}");
                return;
            }
        };
        m.sent[p] = Some(version);
        let conns = m.conns.clone();
        let tensors = frames.len() as u32;
        let bytes: u64 = frames.iter().map(|f| (f.len() + HEADER_LEN) as u64).sum();
        metrics::counter!("atoll_bytes_down_total", "learner" => learner.to_string())
            .increment(bytes);
        tokio::spawn(async move {
            let _permit = permit;
            let mut streams = Vec::with_capacity(frames.len());
            for (k, frame) in frames.into_iter().enumerate() {
                let header = PartHeader {
                    kind,
                    fragment: p as u32,
                    round_or_version: version,
                    base_version: base,
                    steps: 0,
                    tokens: 0,
                    tensor: k as u32,
                    tensors,
                    frame_len: frame.len() as u32,
                };
                let conn = &conns[k % conns.len()];
                match send_part(conn, &header, &frame).await {
                    Ok(stream) => streams.push(stream),
                    Err(e) => {
                        tracing::debug!("sending fragment {p} to learner {learner}: {e}");
                        return;
                    }
                }
            }
            // Hold the permit until the learner has acknowledged every part: the coordinator
            // reads "no permit out" as "nothing still travelling" before it exits.
            for stream in streams {
                let _ = stream.stopped().await;
            }
        });
    }

    /// Ends the job once every active learner has done its steps: a last round for every
    /// fragment, then the final model.
    fn check_end(&mut self) -> Result<()> {
        // Learners that went silent are marked absent by the syncer's heartbeat timers.
        if self.done_at.is_some() {
            return Ok(());
        }
        let m_count = self.recipe.sync.learners.0;
        let active: Vec<LearnerId> = self.syncer.active_learners();
        let all_finished = !active.is_empty()
            && self.state.regions.len() == m_count
            && active
                .iter()
                .all(|id| self.members.get(id).is_some_and(|m| m.finished));
        if !self.flushed && all_finished {
            // The last rounds measure each learner's work against the version it last applied,
            // without re-anchoring (see `FinalStep::Average`). Where learners keep their local
            // work when they apply a version (`rebase`), the rounds wait until no round is in
            // flight and every learner holds its result: else a learner merged in a round whose
            // broadcast it has not applied yet would count that work twice. Under `overwrite`
            // they do not wait: applying a version it was left out of would discard the
            // learner's last work, which costs more than counting part of it twice (measured on
            // the demo: docs/diloco.md).
            let keeps_work = self.recipe.sync.apply_rule() == ApplyRule::Rebase;
            let newest = self.syncer.versions();
            let settled = !keeps_work
                || !self.syncer.round_in_flight()
                    && active
                        .iter()
                        .all(|id| self.members.get(id).is_some_and(|m| m.applied == newest));
            let since = *self.settling_since.get_or_insert_with(Instant::now);
            if !settled {
                if since.elapsed() < FINAL_SETTLE_TIMEOUT {
                    return Ok(());
                }
                tracing::warn!(
                    "the learners did not all apply the newest versions within {:?}; \
                     opening the last rounds anyway",
                    FINAL_SETTLE_TIMEOUT
                );
            }
            self.flushed = true;
            let progress: BTreeMap<LearnerId, Vec<Progress>> = active
                .iter()
                .filter_map(|id| self.members.get(id).map(|m| (*id, m.progress.clone())))
                .collect();
            tracing::info!("every learner finished: final round for every fragment");
            let actions = self.syncer.flush(self.now(), &progress);
            self.execute(actions)?;
        }
        if self.flushed && !self.syncer.round_in_flight() {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.done_at = Some(Instant::now());
        self.state.done = true;
        self.persist()?;
        self.maybe_checkpoint(true)?;
        if let Some(writer) = self.checkpoints.take() {
            let failed: Vec<String> = tokio::task::block_in_place(|| writer.finish())
                .into_iter()
                .filter_map(|o| o.error.map(|e| format!("step-{}: {e}", o.step)))
                .collect();
            if !failed.is_empty() {
                tracing::error!(
                    "{} coordinator checkpoints were not written: {}",
                    failed.len(),
                    failed.join("; ")
                );
            }
        }
        let global = self.global_values();
        let (eval_loss, wall) = tokio::task::block_in_place(|| -> Result<(f64, f64)> {
            self.worker.set_all(&global);
            let eval = self.worker.evaluate();
            if self.recipe.run.save_final {
                self.worker.save(&self.run_dir.join("final"))?;
            }
            Ok((eval, self.now()))
        })?;
        let status = self.status();
        let bytes_up: u64 = status.learners.iter().map(|l| l.bytes_up).sum();
        let bytes_down: u64 = status.learners.iter().map(|l| l.bytes_down).sum();
        let m_count = self.recipe.sync.learners.0;
        let tokens: u64 = status
            .learners
            .iter()
            .map(|l| l.step * self.worker.tokens_per_step())
            .sum();
        let summary = serde_json::json!({
            "name": self.recipe.name(),
            "mode": "decoupled",
            "learners": m_count,
            "codec": self.recipe.sync.codec.codec().name(),
            "final_eval_loss": eval_loss,
            "tokens": tokens,
            "tokens_merged": self.state.tokens_merged,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "bytes_per_learner": (bytes_up + bytes_down) as f64 / m_count as f64,
            "wall_clock_s": wall,
            "goodput": status.goodput,
            "rejected_contributions": self.syncer.stats().rejected,
            "merges": self.syncer.stats().merges,
            "fragment_versions": status.fragment_versions,
            "learner_steps": status.learners.iter().map(|l| (l.region.clone(), l.step)).collect::<BTreeMap<_, _>>(),
        });
        atoll_trainer::checkpoint::write_json_atomic(&self.run_dir.join("summary.json"), &summary)?;
        tracing::info!(
            "final eval loss {eval_loss:.4}; {} merges; fragment versions {:?}",
            self.syncer.stats().merges,
            status.fragment_versions
        );
        Ok(())
    }

    /// Done, every active learner has heard so and received the final broadcasts (or had a few
    /// seconds to).
    fn finished(&self) -> bool {
        let Some(done_at) = self.done_at else {
            return false;
        };
        let told = self.syncer.active_learners().iter().all(|id| {
            self.members.get(id).is_none_or(|m| {
                m.told_done && m.in_flight.available_permits() == self.down_permits()
            })
        });
        told || done_at.elapsed() > Duration::from_secs(10)
    }
}

async fn accept_data(endpoint: quinn::Endpoint, tx: mpsc::Sender<Cmd>, max_frame: u64) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("data connection failed: {e}");
                    return;
                }
            };
            let learner = match hello(&conn, &tx).await {
                Ok(id) => id,
                Err(e) => {
                    let _ = tx
                        .send(Cmd::BadData {
                            learner: None,
                            reason: format!("{e:#}"),
                        })
                        .await;
                    conn.close(1u32.into(), b"refused");
                    return;
                }
            };
            let mut parts = receive_parts(conn.clone(), max_frame);
            while let Some(part) = parts.recv().await {
                match part {
                    Ok((header, values, bytes)) => {
                        let _ = tx
                            .send(Cmd::Part {
                                learner,
                                header,
                                values,
                                bytes,
                            })
                            .await;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Cmd::BadData {
                                learner: Some(learner),
                                reason: format!("{e:#}"),
                            })
                            .await;
                        conn.close(2u32.into(), b"bad frame");
                        return;
                    }
                }
            }
        });
    }
}

async fn hello(conn: &quinn::Connection, tx: &mpsc::Sender<Cmd>) -> Result<LearnerId> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| anyhow!("no hello within 10 s"))??;
    let bytes = recv
        .read_to_end(Hello::MAX_LEN)
        .await
        .map_err(|e| anyhow!("bad hello: {e}"))?;
    let hello = Hello::decode(&bytes)?;
    let (reply, answer) = oneshot::channel();
    tx.send(Cmd::Connected {
        session: hello.session,
        conn: conn.clone(),
        reply,
    })
    .await
    .map_err(|_| anyhow!("coordinator stopping"))?;
    match answer.await? {
        Some(id) => {
            send.write_all(&[0]).await?;
            send.finish()?;
            Ok(id)
        }
        None => {
            send.write_all(b"\x01unknown session").await?;
            send.finish()?;
            Err(anyhow!("data connection with an unknown session"))
        }
    }
}

struct Service {
    tx: mpsc::Sender<Cmd>,
    secret: Arc<String>,
}

impl Service {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<Response<T>, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("coordinator stopping"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("coordinator stopping"))?
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let req = request.into_inner();
        if !same_secret(&req.secret, &self.secret) {
            metrics::counter!("atoll_refused_joins_total", "reason" => "secret").increment(1);
            tracing::warn!(
                "refused a join from region {:?}: wrong job secret",
                req.region
            );
            return Err(Status::permission_denied("wrong job secret"));
        }
        self.ask(|r| Cmd::Join(req, r)).await
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportReply>, Status> {
        self.ask(|r| Cmd::Report(request.into_inner(), r)).await
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        if !same_secret(&request.get_ref().secret, &self.secret) {
            return Err(Status::permission_denied("wrong job secret"));
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Cmd::Status(reply))
            .await
            .map_err(|_| Status::unavailable("coordinator stopping"))?;
        answer
            .await
            .map(Response::new)
            .map_err(|_| Status::unavailable("coordinator stopping"))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let _ = self.tx.send(Cmd::Leave(request.into_inner().session)).await;
        Ok(Response::new(LeaveReply {}))
    }
}
