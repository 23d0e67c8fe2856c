//! Who is in the job: joins (a region gets its learner id, a session and the versions it must
//! catch up on), reports (progress, heartbeats, pulls handed back) and the status view.

use super::{Core, Member};
use crate::{random_token, same_secret};
use atoll_coordinator::{Event, LearnerId, Progress};
use atoll_proto::v1::*;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tonic::Status;

impl Core {
    pub(super) fn learner_by_session(&self, session: &str) -> Option<LearnerId> {
        self.members
            .iter()
            .find(|(_, m)| same_secret(&m.session, session))
            .map(|(id, _)| *id)
    }

    pub(super) fn join(&mut self, req: JoinRequest) -> Result<JoinReply, Status> {
        if req.protocol_version != atoll_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "incompatible protocol version {} (the coordinator speaks {}); use the same atoll release",
                req.protocol_version,
                atoll_proto::PROTOCOL_VERSION
            )));
        }
        if req.model_hash != self.model_hash {
            return Err(Status::failed_precondition(format!(
                "model mismatch: this learner's model hash is {} but the job's is {}; use the job's recipe (the hash covers the model's config, sync.fragments and sync.link.part_values)",
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
        self.training_since.get_or_insert_with(Instant::now);
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
                joined_at: Instant::now(),
                joined_step: resume_step,
                stepped_at: None,
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

    pub(super) fn report(&mut self, req: ReportRequest) -> Result<ReportReply, Status> {
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
            if req.step > m.step {
                m.stepped_at = Some(Instant::now());
            }
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
                applied: req.applied_versions.clone(),
            },
        );
        self.execute(actions)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.resend_skipped(id);
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

    /// A learner that reports an older version of a fragment than the newest, with nothing on
    /// its way to it (the broadcast was skipped on a saturated down link), gets the fragment
    /// now: under `apply: rebase` the syncer defers the pulls of a learner behind the newest
    /// version, and without it every such pull would wait out its τ steps and be re-anchored.
    fn resend_skipped(&mut self, id: LearnerId) {
        let Some(m) = self.members.get(&id) else {
            return;
        };
        let stale: Vec<(usize, u64)> = (0..self.plan.len())
            .filter_map(|p| {
                let newest = self.syncer.version(p);
                let held = *m.applied.get(p)?;
                (held < newest && m.sent.get(p).is_some_and(Option::is_none)).then_some((p, newest))
            })
            .collect();
        for (p, version) in stale {
            tracing::debug!("learner {id} missed fragment {p} v{version}: sending it again");
            self.send_fragment(id, p, version, true);
        }
    }

    pub(super) fn status(&self) -> StatusReply {
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
        let ideal = self.recipe.sync.learners.0 as f64 * self.fastest_average_tokens_per_s();
        let training_s = self.training_s();
        StatusReply {
            job: self.recipe.name().to_string(),
            uptime_s: uptime,
            learners,
            fragment_versions: self.syncer.versions(),
            merges: self.syncer.stats().merges,
            rejected: self.syncer.stats().rejected,
            tokens_merged: self.state.tokens_merged,
            goodput: if ideal > 0.0 && training_s > 0.0 {
                (self.state.tokens_merged as f64 / (ideal * training_s)).min(1.0)
            } else {
                0.0
            },
            job_done: self.done_at.is_some(),
            max_steps: self.recipe.train.max_steps.0 as u64,
        }
    }

    /// Seconds from the first learner's join to the end of the last rounds (or now).
    fn training_s(&self) -> f64 {
        let Some(since) = self.training_since else {
            return 0.0;
        };
        let end = self.done_at.unwrap_or_else(Instant::now);
        end.saturating_duration_since(since).as_secs_f64()
    }

    /// The fastest learner's average token rate from its join to its last step: what every
    /// region would do at full speed. Averaged over the whole stretch rather than its last steps,
    /// so a learner that speeds up once the others finish (they share this machine's cores in
    /// `atoll run`) does not make everyone's earlier work look slow.
    fn fastest_average_tokens_per_s(&self) -> f64 {
        let tokens_per_step = self.worker.tokens_per_step() as f64;
        self.members
            .values()
            .filter_map(|m| {
                let seconds = m.stepped_at?.duration_since(m.joined_at).as_secs_f64();
                let steps = m.step.saturating_sub(m.joined_step) as f64;
                (seconds > 0.0).then(|| steps * tokens_per_step / seconds)
            })
            .fold(0.0, f64::max)
    }
}
