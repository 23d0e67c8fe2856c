//! The event loop of classic, Streaming and Decoupled DiLoCo: the real syncer driven by the
//! virtual clock, its actions carried out on the simulated links.

use super::clock::{Queue, SimEvent};
use super::learner::{apply_due, train_step, Learner};
use super::probe::EvalProbe;
use super::Outcome;
use crate::data::PackedSequences;
use crate::recipe::{Recipe, SyncMode};
use anyhow::{bail, Context, Result};
use atoll_coordinator::syncer::{Contribution, Event, Progress};
use atoll_coordinator::{
    Action, FinalStep, FragmentPlan, LearnerProtocol, OuterOptimizer, Syncer, SyncerConfig,
    TensorInfo,
};
use atoll_wire::{decode_frame, encode_frame, ErrorFeedback, FrameLimits, DEFAULT_BLOCK};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;

#[allow(clippy::too_many_arguments)]
pub(super) fn simulate_diloco_family(
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
    let plan = crate::worker::plan_with_fragments(tensors, fragments, recipe)?;
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
        broadcast_error_feedback: sync.down_error_feedback,
        max_skipped_rounds: sync.max_skipped_rounds.0 as u32,
        // Here a pull follows its fragment's broadcast down the same link, so a learner still
        // holds the version before only when the link is too slow for the rounds, where waiting
        // for the broadcast only delays them (2 Mbit/s in `trainer/tests/simulate.rs`: 78% of
        // the tokens merged by the job's end against 90%). `atoll run` pulls on the control
        // plane, ahead of the data plane's broadcasts, and waits (docs/diloco.md).
        pull_current_only: false,
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
    let down_wire = DownWire {
        plan: &plan,
        codec: down_codec,
        zstd_level: sync.zstd_level,
    };

    loop {
        let Some((now, event)) = queue.pop() else {
            // The budget is spent and everything in flight has landed: one last round per
            // fragment with every learner, so the global model holds all the work done.
            if syncer.flushed() {
                break;
            }
            // The learners are idle at a step boundary: they apply what arrived after their last
            // step first, so each outer gradient below holds exactly the work no version holds
            // yet (measured from a stale anchor it would be re-anchored at the newest Θ_p and
            // pull Θ_p back towards the learner's stale copy).
            //
            // Under `final_step: average` they hold those versions without applying them: the
            // average is over each learner's model as it was at its last step, measured from
            // the newest Θ_p.
            let final_rule = (sync.final_step == FinalStep::Outer).then_some(apply_rule);
            for l in learners.iter_mut().filter(|l| l.alive) {
                apply_due(l, &plan, final_rule, tokens_per_step);
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
            let actions = syncer.merge_in_place(last_step_at, actions);
            bytes_down += carry_out(
                actions,
                &syncer,
                last_step_at,
                learners,
                &mut queue,
                &down_wire,
            )?;
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
                // Merges take no virtual time: the version exists the moment its round closes.
                let actions = syncer.handle_in_place(now, e);
                bytes_down += carry_out(actions, &syncer, now, learners, &mut queue, &down_wire)?;
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
                apply_due(l, &plan, Some(apply_rule), tokens_per_step);
                // What it holds once this boundary's broadcasts are applied: the version a pull
                // answering this report finds.
                let applied = l.protocol.as_ref().map_or_else(Vec::new, |p| p.versions());
                queue.push(
                    now + l.link.latency_s,
                    SimEvent::ToSyncer(Event::Report {
                        learner: m as u32,
                        step,
                        progress: reported,
                        applied,
                    }),
                );
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
                let c = Contribution::new(m as u32, fragment, round, base_version, progress, delta);
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
                    apply_due(l, &plan, Some(apply_rule), tokens_per_step);
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
        merge_log: syncer.merge_log().to_vec(),
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

/// What the down-link sends, and how many bytes it costs.
struct DownWire<'a> {
    plan: &'a FragmentPlan,
    codec: atoll_wire::Codec,
    zstd_level: i32,
}

impl DownWire<'_> {
    /// Fragment `p` in `codec`, uncompressed: a catch-up, or a broadcast without an encoded update.
    fn fragment_bytes(&self, codec: atoll_wire::Codec, p: usize) -> u64 {
        self.plan
            .part_spans(p)
            .iter()
            .map(|s| codec.encoded_len(s.len(), DEFAULT_BLOCK) as u64 + 64)
            .sum()
    }

    /// The broadcast of `version` of fragment `p`: its encoded update in the frames `atoll run`
    /// sends, compressed with the recipe's zstd level.
    fn broadcast_bytes(&self, syncer: &Syncer, p: usize, version: u64) -> Result<u64> {
        let Some(update) = syncer.broadcast_update(p, version) else {
            return Ok(self.fragment_bytes(self.codec, p));
        };
        if self.zstd_level == 0 {
            return Ok(self.fragment_bytes(update.codec, p));
        }
        let frames = self
            .plan
            .frame_parts(p, update.codec, &update.tensors, self.zstd_level)
            .context("framing a broadcast")?;
        Ok(frames.iter().map(|f| f.len() as u64).sum())
    }
}

/// Carries out the syncer's actions on the simulated network; returns the bytes sent down.
fn carry_out(
    actions: Vec<Action>,
    syncer: &Syncer,
    now: f64,
    learners: &mut [Learner],
    queue: &mut Queue,
    wire: &DownWire,
) -> Result<u64> {
    let mut bytes_down = 0;
    for action in actions {
        match action {
            Action::Pull {
                learner,
                fragment,
                round,
                ..
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
                let bytes = wire.broadcast_bytes(syncer, fragment, version)?;
                let record = syncer
                    .merge_log()
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
                    .map(|p| wire.fragment_bytes(atoll_wire::Codec::F32, p))
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
            Action::Merge(_) => bail!("internal: a merge reached the simulated network"),
        }
    }
    Ok(bytes_down)
}
