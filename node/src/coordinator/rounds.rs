//! The round lifecycle: contributions assembled from their parts and handed to the syncer, the
//! syncer's actions carried out (pulls, broadcasts, catch-ups, timers), merges logged, and the
//! job's end (the last rounds, the final model and summary).

use super::broadcast::frame_update;
use super::{Cmd, Core, Partial, FINAL_SETTLE_TIMEOUT};
use crate::parts::ReceivedPart;
use anyhow::{anyhow, Context, Result};
use atoll_coordinator::syncer::Contribution;
use atoll_coordinator::{Action, ApplyRule, Event, FinalStep, LearnerId, MergeJob, Progress};
use atoll_link::PartKind;
use atoll_proto::v1::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

impl Core {
    pub(super) fn on_part(&mut self, learner: LearnerId, part: ReceivedPart) -> Result<()> {
        let ReceivedPart {
            header: h,
            values,
            finite,
            wire_bytes,
        } = part;
        metrics::counter!("atoll_bytes_up_total", "learner" => learner.to_string())
            .increment(wire_bytes);
        let p = h.fragment as usize;
        if h.kind != PartKind::Contribution
            || p >= self.plan.len()
            || h.parts as usize != self.plan.part_count(p)
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
            parts: vec![None; h.parts as usize],
            finite: true,
        });
        partial.parts[h.part as usize] = Some(values);
        partial.finite &= finite;
        if partial.parts.iter().all(Option::is_some) {
            let partial = self.partial.remove(&key).expect("present");
            let plan = self.plan.clone();
            let round = h.round_or_version;
            // Parts of the wrong length leave no tensors: the syncer rejects that as the wrong
            // shape, as it does a whole tensor of the wrong length.
            let assemble = move || {
                let delta = plan
                    .join_parts(p, partial.parts.into_iter().flatten().collect())
                    .unwrap_or_else(|e| {
                        tracing::warn!("learner {learner}'s contribution: {e}");
                        Vec::new()
                    });
                Contribution {
                    learner,
                    fragment: p,
                    round,
                    base_version: partial.base_version,
                    progress: partial.progress,
                    delta,
                    finite: partial.finite,
                }
            };
            if !self.plan.is_cut(p) {
                // One part per tensor: joining moves them.
                let actions = self
                    .syncer
                    .handle(self.now(), Event::Contribution(assemble()));
                self.execute(actions)?;
            } else {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if let Ok(c) = tokio::task::spawn_blocking(assemble).await {
                        let _ = tx.send(Cmd::Assembled(c)).await;
                    }
                });
            }
        }
        Ok(())
    }

    pub(super) fn execute(&mut self, actions: Vec<Action>) -> Result<()> {
        for action in actions {
            match action {
                Action::Pull {
                    learner,
                    fragment,
                    round,
                    average,
                } => {
                    if let Some(m) = self.members.get_mut(&learner) {
                        m.pulls.push(Pull {
                            fragment: fragment as u32,
                            round,
                            final_average: average,
                        });
                    }
                }
                Action::Merge(job) => self.start_merge(job),
                Action::Broadcast {
                    fragment,
                    version,
                    to,
                    ..
                } => {
                    self.on_merged()?;
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

    /// Runs a merge on a blocking thread, with the fragment's new state file and the frames of
    /// its broadcast: at 12B a fragment's merge takes seconds of every core and its file is
    /// gigabytes, and meanwhile this actor goes on answering reports, joins and parts. The result
    /// comes back as a command.
    fn start_merge(&self, job: MergeJob) {
        let (tx, store, p) = (self.tx.clone(), self.store.clone(), job.fragment());
        let plan = self.plan.clone();
        let zstd_level = self.zstd_level;
        tokio::spawn(async move {
            let merged = tokio::task::spawn_blocking(move || -> Result<_> {
                let merged = job.run();
                store
                    .save_fragment(p, &merged.state)
                    .with_context(|| format!("saving fragment {p} after its merge"))?;
                // A frame that fails here is framed again, and its error reported, at the send.
                let frames = merged.encoded_update().and_then(|(codec, tensors)| {
                    frame_update(&plan, p, codec, tensors, zstd_level).ok()
                });
                Ok((merged, frames))
            })
            .await
            .map_err(|e| anyhow!("the merge of fragment {p} failed: {e}"))
            .and_then(|r| r);
            let _ = tx.send(Cmd::Merged(merged)).await;
        });
    }

    /// A merge happened (its fragment's state file is written): log it, persist the rest.
    pub(super) fn on_merged(&mut self) -> Result<()> {
        if let Some(record) = self.syncer.merge_log().last() {
            let tokens: u64 = record.contributors.iter().map(|c| c.3).sum();
            self.state.tokens_merged += tokens / self.plan.len() as u64;
            crate::job_metrics::merged(record, tokens / self.plan.len() as u64);
            metrics::gauge!("atoll_quorum_size").set(record.contributors.len() as f64);
            metrics::histogram!("atoll_grace_wait_seconds").record(record.grace_s);
            metrics::histogram!("atoll_merge_seconds").record(record.merge_s);
            metrics::counter!("atoll_merges_total").increment(1);
            writeln!(self.merges_log, "{}", serde_json::to_string(record)?)?;
            metrics::gauge!("atoll_goodput").set(self.status().goodput);
            self.merges_log.flush()?;
        }
        self.persist()?;
        self.maybe_checkpoint(false)
    }

    /// Ends the job once every active learner has done its steps: a last round for every
    /// fragment, then the final model.
    pub(super) fn check_end(&mut self) -> Result<()> {
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
        // The last rounds open once no merge is out: `flush` passes over a merging fragment.
        if !self.syncer.flushed() && all_finished && !self.syncer.merge_in_flight() {
            // The last rounds measure each learner's model against the version it last
            // applied, without re-anchoring (see `FinalStep::Average`), so they wait until no
            // pull or merge is in flight and every learner holds the newest versions (a round
            // still gathering its quorum is not waited for: `flush` replaces it). The average is then
            // exactly the mean of the learners' models at their last steps; and where learners
            // keep their local work when they apply a version (`rebase`), a learner merged in a
            // round whose broadcast it has not applied yet would otherwise count that work twice.
            // An outer final step under `overwrite` does not wait: applying a version it was left
            // out of would discard the learner's last work, which costs more than counting part
            // of it twice (measured on the demo: docs/diloco.md).
            let waits = self.recipe.sync.apply_rule() == ApplyRule::Rebase
                || self.recipe.sync.final_step == FinalStep::Average;
            let newest = self.syncer.versions();
            let settled = !waits
                || !self.syncer.pull_in_flight()
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
            let progress: BTreeMap<LearnerId, Vec<Progress>> = active
                .iter()
                .filter_map(|id| self.members.get(id).map(|m| (*id, m.progress.clone())))
                .collect();
            tracing::info!("every learner finished: final round for every fragment");
            let actions = self.syncer.flush(self.now(), &progress);
            self.execute(actions)?;
        }
        if self.syncer.flushed() && !self.syncer.round_in_flight() {
            self.finish()?;
        }
        Ok(())
    }

    pub(super) fn finish(&mut self) -> Result<()> {
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
        let (eval_loss, wall) = tokio::task::block_in_place(|| -> Result<(f64, f64)> {
            self.load_global_model();
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
        // How many learners the rounds merged (the job's final average rounds, which take
        // everyone, left out): with a working grace window close to M.
        let rounds: Vec<usize> = self
            .syncer
            .merge_log()
            .iter()
            .filter(|r| !r.average)
            .map(|r| r.contributors.len())
            .collect();
        let learners_per_round = if rounds.is_empty() {
            0.0
        } else {
            rounds.iter().sum::<usize>() as f64 / rounds.len() as f64
        };
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
            "stale_contributions": atoll_coordinator::stale_contributions(self.syncer.merge_log()),
            "merges": self.syncer.stats().merges,
            "learners_per_round": (learners_per_round * 100.0).round() / 100.0,
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
    pub(super) fn finished(&self) -> bool {
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
