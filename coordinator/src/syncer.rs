//! The Decoupled DiLoCo syncer as a sans-IO state machine.
//!
//! It owns the global fragments Θ_p and their outer momentum (f32), the learners' vector clocks
//! and the merge log. It never reads a clock or touches a socket: the driver (a simulation on a
//! virtual clock, or the network service) feeds it timestamped [`Event`]s and carries out the
//! [`Action`]s it returns.
//!
//! Per fragment p, rounds r = 1, 2, … are scheduled at global steps offset_p + r·H with
//! offset_p = p·H/P (staggered), the global step being the furthest step any active learner has
//! reported. A round then:
//! 1. collects responders: active learners that report progress on p after the round opened;
//! 2. on reaching quorum K, waits a grace window γ·(τ·t_step − t_quorum − t_sync), clamped to
//!    [0, cap] (cap: one step unless configured), for more responders, unless all already answered;
//!    a learner the fragment's last `max_skipped_rounds` rounds all left out is waited for longer,
//!    up to two of its own steps, so that no learner's work waits for the job's end to be merged;
//! 3. pulls each responder's outer gradient Δ_m = Θ_base − θ_m, re-anchored at the current Θ_p;
//! 4. merges with weights c_tokens²/c_steps (RDA, or weighted mean for embeddings), applies the
//!    Nesterov outer step, bumps the version and broadcasts Θ_p.
//!
//! Step 4 is the one heavy computation (seconds per fragment at 12B), so the syncer does not run
//! it: it closes the round and hands the driver an [`Action::Merge`] holding everything the merge
//! reads, and the driver feeds the result back as [`Event::Merged`]. Meanwhile the syncer goes on
//! answering reports, joins and other fragments' rounds; the merging fragment opens no new round.
//! Drivers whose merges take no time (the simulator, tests) use [`Syncer::handle_in_place`].
//!
//! Contributions are keyed by (learner, fragment, round): a duplicate, a late one (round closed),
//! one nobody asked for, or one holding NaN/Inf is rejected and counted, never merged.

use crate::history::{KeptVersion, VersionHistory};
use crate::merge::{
    learner_weight, merge_tensor, BroadcastCodec, FinalStep, MergeRule, OuterOptimizer, OuterStep,
    TensorMerge,
};
use crate::plan::FragmentPlan;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub type LearnerId = u32;
pub type FragmentValues = Arc<Vec<Vec<f32>>>;

#[derive(Debug, Clone, PartialEq)]
pub struct SyncerConfig {
    pub h: u64,
    pub tau: u64,
    pub quorum: usize,
    pub grace_gamma: f64,
    /// Upper bound of the grace window in seconds; None: one (fastest) step time.
    pub grace_cap_s: Option<f64>,
    pub outer: OuterOptimizer,
    pub merge: MergeRule,
    /// The step of the rounds `flush` opens at the end of the job.
    pub final_step: FinalStep,
    /// A pulled learner that has not delivered after this long is dropped from the round.
    pub pull_timeout_s: f64,
    /// A learner silent for this long is marked absent (weight 0) until it reports or rejoins.
    pub heartbeat_timeout_s: f64,
    /// Past versions kept per fragment to re-anchor contributions made against them.
    pub version_history: usize,
    /// Broadcasts carry the outer update Θ_new − Θ_old in this codec (None: exact f32). The
    /// syncer applies the same quantised update to its own Θ, so learners and syncer agree bit
    /// for bit on every version.
    pub broadcast_codec: Option<atoll_wire::Codec>,
    /// Carry each broadcast's quantisation error into the fragment's next update (error
    /// feedback on the down-link), so Θ tracks the unquantised outer steps instead of drifting
    /// from them by one rounding per round.
    pub broadcast_error_feedback: bool,
    /// A learner left out of this many closed rounds of a fragment in a row is waited for in the
    /// fragment's next round, beyond the grace window, for up to two of its own step times (never
    /// longer than H of the fastest learner's steps); 0: never. Without it a learner that is
    /// never among the first to report (slower, or further away, when steps are shorter than a
    /// sync and the grace window is therefore 0) would enter no round until the job's end.
    pub max_skipped_rounds: u32,
    /// Pull a learner only once its report says it holds the fragment's newest version (for
    /// `apply: rebase`). A learner pulled before it has applied the last broadcast sends Δ from
    /// the version before, which the merge must re-anchor at Θ_p: that pulls Θ_p back towards
    /// the older version, by the outer learning rate, for every other learner's work merged in
    /// between. A responder still behind when the round pulls is pulled at its first report
    /// holding the version, or, if that takes more than τ of the fastest learner's steps (its
    /// link does not keep up with the rounds), from the version it holds.
    pub pull_current_only: bool,
}

impl SyncerConfig {
    /// A zero residual per tensor where broadcasts carry error feedback, none otherwise.
    fn fresh_residual(&self, theta: &[Vec<f32>]) -> FragmentValues {
        Arc::new(
            if self.broadcast_error_feedback && self.broadcast_codec.is_some() {
                theta.iter().map(|v| vec![0.0; v.len()]).collect()
            } else {
                Vec::new()
            },
        )
    }
}

impl Default for SyncerConfig {
    fn default() -> Self {
        SyncerConfig {
            h: 24,
            tau: 2,
            quorum: 1,
            grace_gamma: 0.5,
            grace_cap_s: None,
            outer: OuterOptimizer {
                lr: 0.7,
                momentum: 0.5,
            },
            merge: MergeRule::Rda,
            final_step: FinalStep::Average,
            pull_timeout_s: 600.0,
            heartbeat_timeout_s: 60.0,
            version_history: 4,
            broadcast_codec: None,
            broadcast_error_feedback: false,
            max_skipped_rounds: 2,
            pull_current_only: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
pub struct Progress {
    pub c_steps: u64,
    pub c_tokens: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub learner: LearnerId,
    pub fragment: usize,
    pub round: u64,
    /// The fragment version the learner's anchor holds (Δ = Θ_base − θ_local).
    pub base_version: u64,
    pub progress: Progress,
    /// One vector per tensor of the fragment, in plan order.
    pub delta: Vec<Vec<f32>>,
    /// Whether every value of `delta` is finite (one that is not is rejected). [`Contribution::new`]
    /// checks; a driver that decodes the values checks where it decodes them ([`all_finite`]),
    /// so that the syncer's own thread does not read a whole fragment once more per learner.
    pub finite: bool,
}

impl Contribution {
    pub fn new(
        learner: LearnerId,
        fragment: usize,
        round: u64,
        base_version: u64,
        progress: Progress,
        delta: Vec<Vec<f32>>,
    ) -> Contribution {
        let finite = delta.iter().all(|d| all_finite(d));
        Contribution {
            learner,
            fragment,
            round,
            base_version,
            progress,
            delta,
            finite,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Join {
        learner: LearnerId,
    },
    Leave {
        learner: LearnerId,
    },
    /// Per-step metadata; doubles as the heartbeat. `progress[p]` counts steps and tokens since the
    /// learner last applied fragment p.
    Report {
        learner: LearnerId,
        step: u64,
        progress: Vec<Progress>,
        /// The version of each fragment the learner holds (applied); empty when not known.
        applied: Vec<u64>,
    },
    Contribution(Contribution),
    Timer(TimerId),
    /// The result of an [`Action::Merge`].
    Merged(MergedFragment),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerId {
    Grace {
        fragment: usize,
        round: u64,
    },
    PullTimeout {
        fragment: usize,
        round: u64,
    },
    /// The end of the wait for responders still behind Θ_p's version (`pull_current_only`).
    DeferredPull {
        fragment: usize,
        round: u64,
    },
    Heartbeat {
        learner: LearnerId,
        seq: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RejectReason {
    Duplicate,
    Late,
    NotRequested,
    NonFinite,
    WrongShape,
    StaleBase,
    UnknownFragment,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask a learner for its outer gradient of `fragment` in `round`.
    Pull {
        learner: LearnerId,
        fragment: usize,
        round: u64,
        /// The job's last round under `FinalStep::Average`: the learner answers from its model
        /// as it was at its last inner step (see [`FinalStep::Average`]).
        average: bool,
    },
    /// Run this round's merge (anywhere, on any thread) and feed its result back as
    /// [`Event::Merged`].
    Merge(MergeJob),
    /// Send the new Θ_p to these learners.
    Broadcast {
        fragment: usize,
        version: u64,
        values: FragmentValues,
        to: Vec<LearnerId>,
    },
    /// A (re)joining learner receives every current fragment and the vector clock.
    CatchUp {
        learner: LearnerId,
        fragments: Vec<(usize, u64, FragmentValues)>,
    },
    ArmTimer {
        id: TimerId,
        at: f64,
    },
    Rejected {
        learner: LearnerId,
        fragment: usize,
        round: u64,
        reason: RejectReason,
    },
    MarkedAbsent {
        learner: LearnerId,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct MergeRecord {
    pub fragment: usize,
    pub round: u64,
    pub version: u64,
    pub at: f64,
    /// (learner, weight, steps, tokens, base_version): the steps and tokens this merge added to
    /// what the learner's earlier merged contributions reported (see `newly_merged`).
    pub contributors: Vec<(LearnerId, f64, u64, u64, u64)>,
    pub quorum_wait_s: f64,
    pub grace_s: f64,
    /// From the pull to the last contribution: the round's sync time, which the grace window of
    /// later rounds budgets for (an average of these).
    #[serde(default)]
    pub pull_s: f64,
    /// From the round's close to its merged version (`at`): what the merge itself took.
    #[serde(default)]
    pub merge_s: f64,
    /// The job's last round, which set Θ_p to the learners' average (`FinalStep::Average`).
    pub average: bool,
    /// The lowest agreement of the learners' directions over the fragment's RDA-merged tensors
    /// (see [`crate::merge::MergedTensor::agreement`]); absent for plain means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
}

impl MergeRecord {
    /// How many versions behind the one this merge replaced each contributor's base was (0:
    /// built on it), in contributor order.
    pub fn staleness(&self) -> impl Iterator<Item = u64> + '_ {
        let replaced = self.version.saturating_sub(1);
        self.contributors
            .iter()
            .map(move |c| replaced.saturating_sub(c.4))
    }
}

/// Contributions the merges of `log` re-anchored: measured against an older version than the one
/// they replaced (the learner had not applied the newest broadcast when pulled). The job's final
/// averages do not re-anchor and are left out.
pub fn stale_contributions(log: &[MergeRecord]) -> u64 {
    log.iter()
        .filter(|r| !r.average)
        .map(|r| r.staleness().filter(|&s| s > 0).count() as u64)
        .sum()
}

/// A closed round's merge: everything it reads, owned or shared, so that it can run on another
/// thread while the syncer goes on. It shares the fragment's momentum and residual and steps
/// copies of them: until the result is back the fragment (and a snapshot of it) keeps its state
/// from before the round.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeJob {
    fragment: usize,
    /// Θ_p, its momentum and residual, with the version and next round the merge produces.
    before: FragmentSnapshot,
    /// Each contribution with the older version its Δ was measured against, if any.
    contributions: Vec<(Contribution, Option<KeptVersion>)>,
    weights: Vec<f64>,
    rules: Vec<MergeRule>,
    /// None: the job's final average (no outer step).
    outer: Option<OuterOptimizer>,
    broadcast_codec: Option<atoll_wire::Codec>,
    threads: usize,
    /// The version the fragment's history must rebuild in full once this merge is in it.
    promotion: Option<(u64, KeptVersion)>,
}

/// What a merge produced: the fragment's new state, as it is persisted, and the broadcast's
/// encoded update.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedFragment {
    pub fragment: usize,
    pub state: FragmentSnapshot,
    /// The update in the broadcast codec, per tensor (None without a codec, or when one
    /// tensor's update did not encode: learners then get the full values).
    encoded: Option<(atoll_wire::Codec, Vec<Vec<u8>>)>,
    /// The values [`MergeJob`]'s promotion asked for.
    promoted: Option<(u64, FragmentValues)>,
    /// The lowest agreement over the fragment's RDA-merged tensors.
    agreement: Option<f64>,
}

impl MergedFragment {
    /// The broadcast's encoded update (codec and one buffer per tensor), if it has one.
    pub fn encoded_update(&self) -> Option<(atoll_wire::Codec, &[Vec<u8>])> {
        self.encoded
            .as_ref()
            .map(|(codec, tensors)| (*codec, tensors.as_slice()))
    }
}

impl MergeJob {
    pub fn fragment(&self) -> usize {
        self.fragment
    }

    /// The merge itself: contributions measured against an older version re-anchored at Θ_p,
    /// then per tensor the merge rule, the outer step and the broadcast's quantisation
    /// (`merge::merge_tensor`), on `threads` threads; and the history's rebuild.
    pub fn run(self) -> MergedFragment {
        let MergeJob {
            fragment,
            before,
            contributions,
            weights,
            rules,
            outer,
            broadcast_codec,
            threads,
            promotion,
        } = self;
        // Contributions measured against the same older version share its rebuild.
        let mut bases: BTreeMap<u64, FragmentValues> = BTreeMap::new();
        let contributions: Vec<Contribution> = contributions
            .into_iter()
            .map(|(mut c, base)| {
                if let Some(base) = base {
                    let values = bases.entry(c.base_version).or_insert_with(|| base.values());
                    re_anchor(&mut c.delta, &before.theta, values, threads);
                }
                c
            })
            .collect();
        let FragmentSnapshot {
            version,
            next_round,
            theta: old,
            momentum,
            residual,
        } = before;
        let mut momentum = Arc::unwrap_or_clone(momentum);
        let mut residual = Arc::unwrap_or_clone(residual);
        let mut theta = Vec::with_capacity(old.len());
        let mut encoded = Vec::with_capacity(old.len());
        let mut agreement: Option<f64> = None;
        for (k, (old_k, rule)) in old.iter().zip(rules).enumerate() {
            let deltas: Vec<&[f32]> = contributions
                .iter()
                .map(|c| c.delta[k].as_slice())
                .collect();
            let step = match outer {
                None => OuterStep::Average,
                Some(optimizer) => OuterStep::Nesterov {
                    optimizer,
                    momentum: &mut momentum[k],
                },
            };
            let broadcast = broadcast_codec.map(|codec| BroadcastCodec {
                codec,
                residual: residual.get_mut(k).map(Vec::as_mut_slice),
            });
            let round = TensorMerge {
                deltas: &deltas,
                weights: &weights,
                rule,
            };
            let merged = merge_tensor(&round, old_k, step, broadcast, threads);
            theta.push(merged.values);
            encoded.push(merged.encoded);
            if let Some(a) = merged.agreement {
                agreement = Some(agreement.map_or(a, |b: f64| b.min(a)));
            }
        }
        let encoded = broadcast_codec.and_then(|codec| {
            let tensors = encoded.into_iter().collect::<Option<Vec<_>>>()?;
            Some((codec, tensors))
        });
        MergedFragment {
            fragment,
            state: FragmentSnapshot {
                version,
                next_round,
                theta: Arc::new(theta),
                momentum: Arc::new(momentum),
                residual: Arc::new(residual),
            },
            encoded,
            promoted: promotion.map(|(v, kept)| (v, kept.values())),
            agreement,
        }
    }
}

/// Whether no value is NaN or infinite. It reads every value of every contribution, so it is
/// written to vectorise: the largest exponent field of each block of values, compared once per
/// block, instead of a branch per value.
pub fn all_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    values.chunks(1024).all(|block| {
        let largest = block
            .iter()
            .map(|x| x.to_bits() & EXPONENT)
            .fold(0, u32::max);
        largest != EXPONENT
    })
}

/// Re-anchors an outer gradient measured against `base` at `current`:
/// Θ_cur − θ_m = Δ_m + (Θ_cur − Θ_base), element by element in f32, in chunks over `threads`.
fn re_anchor(delta: &mut [Vec<f32>], current: &[Vec<f32>], base: &[Vec<f32>], threads: usize) {
    let work: Vec<_> = delta
        .iter_mut()
        .zip(current)
        .zip(base)
        .flat_map(|((d, cur), old)| {
            d.chunks_mut(crate::merge::MERGE_CHUNK)
                .zip(cur.chunks(crate::merge::MERGE_CHUNK))
                .zip(old.chunks(crate::merge::MERGE_CHUNK))
        })
        .collect();
    crate::parallel::map(work, threads, |((d, cur), old)| {
        for ((x, a), b) in d.iter_mut().zip(cur).zip(old) {
            *x += a - b;
        }
    });
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Collecting,
    Grace,
    Pulling,
}

#[derive(Debug, Clone)]
struct Round {
    round: u64,
    opened_at: f64,
    quorum_at: Option<f64>,
    grace_s: f64,
    pulled_at: f64,
    phase: Phase,
    responders: BTreeSet<LearnerId>,
    awaiting: BTreeSet<LearnerId>,
    /// Awaited learners not pulled yet: they last reported an older version than Θ_p's.
    deferred: BTreeSet<LearnerId>,
    /// Each admitted contribution with the kept version it was measured against, when that is
    /// not the current one (the merge job re-anchors it).
    received: BTreeMap<LearnerId, (Contribution, Option<KeptVersion>)>,
    /// Opened by `flush` with `FinalStep::Average`: Θ_p becomes the learners' plain average.
    average: bool,
    /// Learners skipped by too many rounds in a row: the grace window waits for them.
    owed: BTreeSet<LearnerId>,
    /// The end of the grace window proper; past it, the round waits only for `owed` learners,
    /// and at most until the whole window (`grace_s` from the quorum) ends.
    regular_grace_until: f64,
}

impl Round {
    /// This round's request for `learner`'s outer gradient of fragment `fragment`.
    fn pull(&self, learner: LearnerId, fragment: usize) -> Action {
        Action::Pull {
            learner,
            fragment,
            round: self.round,
            average: self.average,
        }
    }

    fn opened(round: u64, now: f64) -> Round {
        Round {
            round,
            opened_at: now,
            quorum_at: None,
            grace_s: 0.0,
            pulled_at: 0.0,
            phase: Phase::Collecting,
            responders: BTreeSet::new(),
            awaiting: BTreeSet::new(),
            deferred: BTreeSet::new(),
            received: BTreeMap::new(),
            average: false,
            owed: BTreeSet::new(),
            regular_grace_until: now,
        }
    }
}

/// The active learners that have not answered fragment `p`'s round and were left out of its
/// last `max_skipped` rounds, and how long the round waits for them: two of the slowest one's
/// steps (it reports every step, so one is enough but for the jitter of its reports), never
/// longer than `cap` (the interval between the fragment's rounds).
fn owed_learners(
    learners: &BTreeMap<LearnerId, LearnerState>,
    p: usize,
    active: &BTreeSet<LearnerId>,
    responders: &BTreeSet<LearnerId>,
    max_skipped: u32,
    cap: f64,
) -> (BTreeSet<LearnerId>, f64) {
    if max_skipped == 0 {
        return (BTreeSet::new(), 0.0);
    }
    let owed: BTreeSet<LearnerId> = active
        .iter()
        .filter(|l| !responders.contains(l))
        .filter(|l| {
            learners
                .get(l)
                .is_some_and(|s| s.skipped.get(p).copied().unwrap_or(0) >= max_skipped)
        })
        .copied()
        .collect();
    let wait = owed
        .iter()
        .filter_map(|l| learners.get(l).and_then(LearnerState::step_time))
        .map(|t| 2.0 * t)
        .fold(0.0, f64::max)
        .min(cap);
    (owed, wait)
}

#[derive(Debug, Clone)]
struct FragmentState {
    theta: FragmentValues,
    momentum: FragmentValues,
    version: u64,
    history: VersionHistory,
    next_round: u64,
    open: Option<Round>,
    last_update: Option<EncodedUpdate>,
    /// Per tensor, what the broadcasts so far left out of the outer steps (empty without
    /// `broadcast_error_feedback`).
    residual: FragmentValues,
    /// A closed round whose merge has not come back yet.
    merging: Option<PendingMerge>,
}

/// What the syncer keeps of a round while its merge runs: the version it waits for and the
/// merge log's record, finished when the result arrives.
#[derive(Debug, Clone)]
struct PendingMerge {
    version: u64,
    closed_at: f64,
    record: MergeRecord,
}

#[derive(Debug, Clone)]
struct LearnerState {
    active: bool,
    step: u64,
    step_time_s: Option<f64>,
    /// Where the current step-time measurement started, and the last report: (time, step).
    rate_since: Option<(f64, u64)>,
    last_report: Option<(f64, u64)>,
    heartbeat_seq: u64,
    /// Vector clock: the version of each fragment last sent to this learner.
    clock: Vec<u64>,
    /// Per fragment, the base version and counters of this learner's latest merged contribution.
    last_merged: BTreeMap<usize, (u64, Progress)>,
    /// Per fragment, the closed rounds in a row that did not merge this learner's work.
    skipped: Vec<u32>,
    /// Per fragment, the version its last report said it holds (empty: not reported).
    applied: Vec<u64>,
}

impl LearnerState {
    /// Its step time: the average of its windowed samples, or, before the first window is
    /// complete, its average since it started reporting.
    fn step_time(&self) -> Option<f64> {
        self.step_time_s.or_else(|| {
            let ((t0, s0), (t1, s1)) = (self.rate_since?, self.last_report?);
            (s1 > s0 && t1 > t0).then(|| (t1 - t0) / (s1 - s0) as f64)
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct SyncerStats {
    pub merges: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub pull_timeouts: u64,
}

pub struct Syncer {
    config: SyncerConfig,
    plan: FragmentPlan,
    fragments: Vec<FragmentState>,
    learners: BTreeMap<LearnerId, LearnerState>,
    sync_time_s: Option<f64>,
    merge_log: Vec<MergeRecord>,
    stats: SyncerStats,
    /// Threads a merge may use (the result does not depend on it).
    merge_threads: usize,
    /// `flush` has opened the job's last rounds: no other round opens after them.
    flushed: bool,
}

const EMA: f64 = 0.3;

/// Steps a learner's step-time sample spans. Reports reach the syncer with the jitter of the
/// network and of its own queue (a busy coordinator handles several back to back), so one-step
/// intervals are noise: on a loaded machine their average came out at a fifth of the real step,
/// which closed every grace window and let the first learner to report make each round alone.
/// Over eight steps the same jitter is an eighth of a step's worth of error.
const STEP_TIME_WINDOW: u64 = 8;

/// Θ_new = Θ_old + Q(update), element by element in f32: the one rule both the syncer and the
/// learners use, so they agree bit for bit.
pub fn apply_update(old: &[f32], quantised: &[f32], new: &mut [f32]) {
    for ((v, o), q) in new.iter_mut().zip(old).zip(quantised) {
        *v = o + q;
    }
}

/// The encoded outer update that turned version `base_version` of a fragment into the next one
/// (one buffer per tensor, in the broadcast codec).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedUpdate {
    pub base_version: u64,
    pub codec: atoll_wire::Codec,
    pub tensors: Arc<Vec<Vec<u8>>>,
}

/// What survives a coordinator restart, per fragment.
#[derive(Debug, Clone, PartialEq)]
pub struct FragmentSnapshot {
    pub version: u64,
    pub next_round: u64,
    pub theta: FragmentValues,
    pub momentum: FragmentValues,
    /// The broadcast error-feedback residual per tensor; empty when the job runs without it.
    pub residual: FragmentValues,
}

/// What survives a coordinator restart, per learner: it comes back absent and rejoins.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct LearnerSnapshot {
    pub learner: LearnerId,
    pub step: u64,
    pub clock: Vec<u64>,
}

fn ema(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| (1.0 - EMA) * o + EMA * sample))
}

impl Syncer {
    /// `initial[t]` holds tensor t of the plan (flattened, f32): the starting global parameters.
    pub fn new(config: SyncerConfig, plan: FragmentPlan, initial: &[Vec<f32>]) -> Self {
        let fragments = plan
            .fragments
            .iter()
            .map(|f| {
                let theta: Vec<Vec<f32>> = f.tensors.iter().map(|&t| initial[t].clone()).collect();
                let momentum = Arc::new(theta.iter().map(|v| vec![0.0; v.len()]).collect());
                let residual = config.fresh_residual(&theta);
                FragmentState {
                    theta: Arc::new(theta),
                    momentum,
                    version: 0,
                    history: VersionHistory::new(config.version_history),
                    next_round: 1,
                    open: None,
                    last_update: None,
                    residual,
                    merging: None,
                }
            })
            .collect();
        Syncer {
            config,
            plan,
            fragments,
            learners: BTreeMap::new(),
            sync_time_s: None,
            merge_log: Vec::new(),
            stats: SyncerStats::default(),
            merge_threads: crate::parallel::available_threads(),
            flushed: false,
        }
    }

    /// Rebuilds a syncer from persisted state: fragments as saved, learners absent until they
    /// rejoin, rounds in flight dropped (their learners' progress is still counted on their side
    /// and flows into the next round).
    pub fn restore(
        config: SyncerConfig,
        plan: FragmentPlan,
        fragments: Vec<FragmentSnapshot>,
        learners: Vec<LearnerSnapshot>,
        merge_log: Vec<MergeRecord>,
        stats: SyncerStats,
    ) -> Self {
        let fragments = fragments
            .into_iter()
            .map(|f| {
                // A state saved without a residual (or by a job that ran without error feedback)
                // resumes owing nothing.
                let residual = if f.residual.is_empty() {
                    config.fresh_residual(&f.theta)
                } else {
                    f.residual
                };
                FragmentState {
                    theta: f.theta,
                    momentum: f.momentum,
                    version: f.version,
                    history: VersionHistory::new(config.version_history),
                    next_round: f.next_round,
                    open: None,
                    last_update: None,
                    residual,
                    merging: None,
                }
            })
            .collect();
        let learners = learners
            .into_iter()
            .map(|l| {
                (
                    l.learner,
                    LearnerState {
                        active: false,
                        step: l.step,
                        step_time_s: None,
                        rate_since: None,
                        last_report: None,
                        heartbeat_seq: 0,
                        clock: l.clock,
                        last_merged: BTreeMap::new(),
                        skipped: Vec::new(), // set when it rejoins
                        applied: Vec::new(),
                    },
                )
            })
            .collect();
        Syncer {
            config,
            plan,
            fragments,
            learners,
            sync_time_s: None,
            merge_log,
            stats,
            merge_threads: crate::parallel::available_threads(),
            flushed: false,
        }
    }

    pub fn fragment_snapshot(&self, fragment: usize) -> FragmentSnapshot {
        let f = &self.fragments[fragment];
        FragmentSnapshot {
            version: f.version,
            next_round: f.next_round,
            theta: f.theta.clone(),
            momentum: f.momentum.clone(),
            residual: f.residual.clone(),
        }
    }

    pub fn learner_snapshots(&self) -> Vec<LearnerSnapshot> {
        self.learners
            .iter()
            .map(|(&learner, l)| LearnerSnapshot {
                learner,
                step: l.step,
                clock: l.clock.clone(),
            })
            .collect()
    }

    /// The encoded update behind `version` of `fragment`, while it is the current version and a
    /// broadcast codec is set.
    pub fn broadcast_update(&self, fragment: usize, version: u64) -> Option<&EncodedUpdate> {
        let f = &self.fragments[fragment];
        if f.version == version {
            f.last_update.as_ref()
        } else {
            None
        }
    }

    /// The last step a learner reported (kept while it is absent).
    pub fn learner_step(&self, learner: LearnerId) -> Option<u64> {
        self.learners.get(&learner).map(|l| l.step)
    }

    /// Whether any fragment has a round in flight, its merge included.
    pub fn round_in_flight(&self) -> bool {
        self.fragments
            .iter()
            .any(|f| f.open.is_some() || f.merging.is_some())
    }

    /// Whether any fragment has asked learners for contributions, or merged them, and not yet
    /// finished. A round still gathering its quorum does not count: once every learner has
    /// stopped it may never gather one, and `flush` replaces it.
    pub fn pull_in_flight(&self) -> bool {
        self.fragments.iter().any(|f| {
            f.merging.is_some() || f.open.as_ref().is_some_and(|r| r.phase == Phase::Pulling)
        })
    }

    /// Whether `flush` has opened the job's last rounds.
    pub fn flushed(&self) -> bool {
        self.flushed
    }

    /// Whether any fragment's merge has been handed out and not come back.
    pub fn merge_in_flight(&self) -> bool {
        self.fragments.iter().any(|f| f.merging.is_some())
    }

    pub fn plan(&self) -> &FragmentPlan {
        &self.plan
    }
    pub fn stats(&self) -> &SyncerStats {
        &self.stats
    }
    pub fn merge_log(&self) -> &[MergeRecord] {
        &self.merge_log
    }
    pub fn version(&self, fragment: usize) -> u64 {
        self.fragments[fragment].version
    }
    /// Every fragment's current version, in plan order.
    pub fn versions(&self) -> Vec<u64> {
        self.fragments.iter().map(|f| f.version).collect()
    }
    pub fn fragment_values(&self, fragment: usize) -> FragmentValues {
        self.fragments[fragment].theta.clone()
    }
    pub fn vector_clock(&self, learner: LearnerId) -> Option<Vec<u64>> {
        self.learners.get(&learner).map(|l| l.clock.clone())
    }
    pub fn is_active(&self, learner: LearnerId) -> bool {
        self.learners.get(&learner).is_some_and(|l| l.active)
    }
    pub fn active_learners(&self) -> Vec<LearnerId> {
        self.learners
            .iter()
            .filter(|(_, l)| l.active)
            .map(|(id, _)| *id)
            .collect()
    }

    fn offset(&self, fragment: usize) -> u64 {
        fragment as u64 * self.config.h / self.plan.len() as u64
    }

    /// The furthest step any active learner has reported: it drives the fragment schedule.
    fn global_step(&self) -> u64 {
        self.learners
            .values()
            .filter(|l| l.active)
            .map(|l| l.step)
            .max()
            .unwrap_or(0)
    }

    /// The fastest active learner's smoothed step time.
    fn step_time(&self) -> Option<f64> {
        self.learners
            .values()
            .filter(|l| l.active)
            .filter_map(LearnerState::step_time)
            .min_by(f64::total_cmp)
    }

    pub fn handle(&mut self, now: f64, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Join { learner } => self.on_join(now, learner, &mut actions),
            Event::Leave { learner } => self.mark_absent(now, learner, &mut actions, false),
            Event::Report {
                learner,
                step,
                progress,
                applied,
            } => self.on_report(now, learner, step, &progress, applied, &mut actions),
            Event::Contribution(c) => self.on_contribution(now, c, &mut actions),
            Event::Timer(id) => self.on_timer(now, id, &mut actions),
            Event::Merged(m) => self.on_merged(now, m, &mut actions),
        }
        actions
    }

    /// [`Syncer::handle`] for drivers whose merges take no time: every merge it asks for runs
    /// at once, and what its result asks for takes the merge's place among the actions.
    pub fn handle_in_place(&mut self, now: f64, event: Event) -> Vec<Action> {
        let actions = self.handle(now, event);
        self.merge_in_place(now, actions)
    }

    /// Runs the merges among `actions` at once (see [`Syncer::handle_in_place`]).
    pub fn merge_in_place(&mut self, now: f64, actions: Vec<Action>) -> Vec<Action> {
        let mut done = Vec::with_capacity(actions.len());
        for action in actions {
            match action {
                Action::Merge(job) => {
                    let after = self.handle(now, Event::Merged(job.run()));
                    done.extend(self.merge_in_place(now, after));
                }
                other => done.push(other),
            }
        }
        done
    }

    /// Ends a job: every fragment without a pull in flight gets its last round now (replacing a
    /// round still gathering its quorum), so the final global model holds all the work done;
    /// no other round opens afterwards. Under `FinalStep::Average` every fragment is averaged over
    /// every active learner; under `Outer` only fragments with new work get a round, pulling the
    /// learners that did it.
    pub fn flush(
        &mut self,
        now: f64,
        progress: &BTreeMap<LearnerId, Vec<Progress>>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        self.flushed = true;
        let active = self.active_learners();
        let average = self.config.final_step == FinalStep::Average;
        for p in 0..self.fragments.len() {
            // A round that has pulled finishes as it is. One that has not asked anyone yet is
            // replaced: it waits for a quorum of learners reporting new work, which learners
            // that have stopped (and applied its last version) may never report.
            let frag = &mut self.fragments[p];
            if frag.merging.is_some()
                || frag
                    .open
                    .as_ref()
                    .is_some_and(|r| r.phase == Phase::Pulling)
            {
                continue;
            }
            frag.open = None;
            let has_progress = |l: &LearnerId| {
                progress
                    .get(l)
                    .and_then(|g| g.get(p))
                    .is_some_and(|g| g.c_steps > 0)
            };
            // The average replaces Θ_p even where every learner's work is merged already: Θ_p
            // then still holds the outer step's look-ahead, which the learners' models do not.
            if !average && !active.iter().any(has_progress) {
                continue;
            }
            // The average is over the learners' models, so a learner with nothing new since
            // Θ_p counts too; an outer step only wants the new work.
            let responders: BTreeSet<LearnerId> = active
                .iter()
                .copied()
                .filter(|l| {
                    if average {
                        progress.contains_key(l)
                    } else {
                        has_progress(l)
                    }
                })
                .collect();
            let frag = &mut self.fragments[p];
            frag.open = Some(Round {
                quorum_at: Some(now),
                responders,
                average,
                ..Round::opened(frag.next_round, now)
            });
            self.start_pull(now, p, &mut actions);
        }
        actions
    }

    fn arm_heartbeat(&mut self, now: f64, learner: LearnerId, actions: &mut Vec<Action>) {
        let timeout = self.config.heartbeat_timeout_s;
        if let Some(l) = self.learners.get_mut(&learner) {
            l.heartbeat_seq += 1;
            actions.push(Action::ArmTimer {
                id: TimerId::Heartbeat {
                    learner,
                    seq: l.heartbeat_seq,
                },
                at: now + timeout,
            });
        }
    }

    fn on_join(&mut self, now: f64, learner: LearnerId, actions: &mut Vec<Action>) {
        let clock: Vec<u64> = self.fragments.iter().map(|f| f.version).collect();
        let entry = self.learners.entry(learner).or_insert(LearnerState {
            active: true,
            step: 0,
            step_time_s: None,
            rate_since: None,
            last_report: None,
            heartbeat_seq: 0,
            clock: clock.clone(),
            last_merged: BTreeMap::new(),
            skipped: Vec::new(),
            applied: Vec::new(),
        });
        entry.active = true;
        entry.skipped = vec![0; clock.len()];
        entry.clock = clock;
        entry.rate_since = None;
        entry.last_report = None;
        entry.last_merged.clear(); // its contributions are measured from the catch-up on
        entry.applied.clear();
        let fragments = self
            .fragments
            .iter()
            .enumerate()
            .map(|(p, f)| (p, f.version, f.theta.clone()))
            .collect();
        actions.push(Action::CatchUp { learner, fragments });
        self.arm_heartbeat(now, learner, actions);
    }

    fn on_report(
        &mut self,
        now: f64,
        learner: LearnerId,
        step: u64,
        progress: &[Progress],
        applied: Vec<u64>,
        actions: &mut Vec<Action>,
    ) {
        let Some(l) = self.learners.get_mut(&learner) else {
            return; // unknown learners must Join first; the driver refuses them
        };
        if !l.active {
            // Back after a partition: it keeps its state but is caught up like a rejoin.
            self.on_join(now, learner, actions);
        }
        let l = self.learners.get_mut(&learner).expect("present");
        match l.rate_since {
            Some((t0, s0)) if step >= s0 + STEP_TIME_WINDOW && now > t0 => {
                l.step_time_s = ema(l.step_time_s, (now - t0) / (step - s0) as f64);
                l.rate_since = Some((now, step));
            }
            Some((_, s0)) if step >= s0 => {}
            _ => l.rate_since = Some((now, step)),
        }
        l.last_report = Some((now, step));
        l.step = l.step.max(step);
        l.applied = applied;
        self.send_deferred_pulls(learner, actions);
        self.arm_heartbeat(now, learner, actions);

        let global_step = self.global_step();
        for p in 0..self.fragments.len() {
            let offset = self.offset(p);
            let frag = &mut self.fragments[p];
            let idle = frag.open.is_none() && frag.merging.is_none();
            if idle && !self.flushed && global_step >= offset + frag.next_round * self.config.h {
                frag.open = Some(Round::opened(frag.next_round, now));
            }
            let has_progress = progress.get(p).is_some_and(|g| g.c_steps > 0);
            if let Some(round) = self.fragments[p].open.as_mut() {
                if matches!(round.phase, Phase::Collecting | Phase::Grace) && has_progress {
                    round.responders.insert(learner);
                }
            }
            self.advance_collection(now, p, actions);
        }
    }

    /// Moves a collecting round to grace or pulling when its quorum allows.
    fn advance_collection(&mut self, now: f64, p: usize, actions: &mut Vec<Action>) {
        let active: BTreeSet<LearnerId> = self.active_learners().into_iter().collect();
        let step_time = self.step_time();
        let sync_time = self.sync_time_s.unwrap_or(0.0);
        let cfg = self.config.clone();
        let t_step = step_time.unwrap_or(0.0);
        let Some(round) = self.fragments[p].open.as_mut() else {
            return;
        };
        round.responders.retain(|l| active.contains(l));
        round.owed.retain(|l| active.contains(l));
        match round.phase {
            Phase::Collecting if round.responders.len() >= cfg.quorum.max(1) => {
                round.quorum_at = Some(now);
                let everyone = active.iter().all(|l| round.responders.contains(l));
                let cap = cfg.grace_cap_s.unwrap_or(t_step);
                let wanted = cfg.grace_gamma
                    * (cfg.tau as f64 * t_step - (now - round.opened_at) - sync_time);
                let regular = if everyone {
                    0.0
                } else {
                    wanted.clamp(0.0, cap.max(0.0))
                };
                let (owed, owed_wait) = owed_learners(
                    &self.learners,
                    p,
                    &active,
                    &round.responders,
                    cfg.max_skipped_rounds,
                    cfg.h as f64 * t_step,
                );
                round.owed = owed;
                round.grace_s = regular.max(owed_wait);
                round.regular_grace_until = now + regular;
                if round.grace_s > 0.0 {
                    round.phase = Phase::Grace;
                    let first_deadline = if regular > 0.0 {
                        round.regular_grace_until
                    } else {
                        now + round.grace_s
                    };
                    actions.push(Action::ArmTimer {
                        id: TimerId::Grace {
                            fragment: p,
                            round: round.round,
                        },
                        at: first_deadline,
                    });
                } else {
                    self.start_pull(now, p, actions);
                }
            }
            Phase::Grace => {
                let everyone = active.iter().all(|l| round.responders.contains(l));
                let owed_in = round.owed.iter().all(|l| round.responders.contains(l));
                if everyone || (owed_in && now >= round.regular_grace_until) {
                    self.start_pull(now, p, actions); // nobody left to wait for
                }
            }
            _ => {}
        }
    }

    /// Whether `learner` last reported holding an older version of fragment `p` than Θ_p's
    /// (see [`SyncerConfig::pull_current_only`]).
    fn behind(&self, learner: LearnerId, p: usize) -> bool {
        self.config.pull_current_only
            && self.learners.get(&learner).is_some_and(|l| {
                l.applied
                    .get(p)
                    .is_some_and(|&v| v < self.fragments[p].version)
            })
    }

    /// Pulls `learner` for the rounds that deferred its pull, now that it holds their version.
    fn send_deferred_pulls(&mut self, learner: LearnerId, actions: &mut Vec<Action>) {
        for p in 0..self.fragments.len() {
            let deferred = self.fragments[p]
                .open
                .as_ref()
                .is_some_and(|r| r.deferred.contains(&learner));
            if !deferred || self.behind(learner, p) {
                continue;
            }
            let round = self.fragments[p].open.as_mut().expect("checked above");
            round.deferred.remove(&learner);
            actions.push(round.pull(learner, p));
        }
    }

    fn start_pull(&mut self, now: f64, p: usize, actions: &mut Vec<Action>) {
        let timeout = self.config.pull_timeout_s;
        // τ of the fastest learner's steps, the overlap a sync is budgeted: a broadcast that
        // takes longer than that would, waited for, hold back the fragment's rounds.
        let defer_s = self.step_time().unwrap_or(0.0) * self.config.tau as f64;
        let behind: BTreeSet<LearnerId> = self.fragments[p]
            .open
            .as_ref()
            .map(|r| {
                r.responders
                    .iter()
                    .copied()
                    .filter(|&l| self.behind(l, p))
                    .collect()
            })
            .unwrap_or_default();
        let Some(round) = self.fragments[p].open.as_mut() else {
            return;
        };
        round.phase = Phase::Pulling;
        round.pulled_at = now;
        round.awaiting = round.responders.clone();
        for &learner in &round.responders {
            if behind.contains(&learner) {
                // Pulled when a report shows the version, or when the wait ends.
                round.deferred.insert(learner);
                continue;
            }
            actions.push(round.pull(learner, p));
        }
        if !round.deferred.is_empty() {
            actions.push(Action::ArmTimer {
                id: TimerId::DeferredPull {
                    fragment: p,
                    round: round.round,
                },
                at: now + defer_s,
            });
        }
        actions.push(Action::ArmTimer {
            id: TimerId::PullTimeout {
                fragment: p,
                round: round.round,
            },
            at: now + timeout,
        });
        if round.awaiting.is_empty() {
            self.finish_round(now, p, actions);
        }
    }

    fn reject(&mut self, c: &Contribution, reason: RejectReason, actions: &mut Vec<Action>) {
        self.stats.rejected += 1;
        *self
            .stats
            .rejected_by_reason
            .entry(format!("{reason:?}"))
            .or_default() += 1;
        actions.push(Action::Rejected {
            learner: c.learner,
            fragment: c.fragment,
            round: c.round,
            reason,
        });
    }

    /// Checks a contribution against the open round; returns the kept version it was measured
    /// against when that is not the current one (the merge re-anchors it at Θ_p).
    fn admit(&self, c: &Contribution) -> Result<Option<KeptVersion>, RejectReason> {
        let frag = self
            .fragments
            .get(c.fragment)
            .ok_or(RejectReason::UnknownFragment)?;
        let average = match &frag.open {
            Some(r) if r.round == c.round && r.phase == Phase::Pulling => {
                if r.received.contains_key(&c.learner) {
                    return Err(RejectReason::Duplicate);
                }
                if !r.awaiting.contains(&c.learner) {
                    return Err(RejectReason::NotRequested);
                }
                r.average
            }
            _ if c.round < frag.next_round => return Err(RejectReason::Late),
            _ => return Err(RejectReason::NotRequested),
        };
        let shapes_ok = c.delta.len() == frag.theta.len()
            && c.delta
                .iter()
                .zip(frag.theta.iter())
                .all(|(d, t)| d.len() == t.len());
        if !shapes_ok {
            return Err(RejectReason::WrongShape);
        }
        if !c.finite {
            return Err(RejectReason::NonFinite);
        }
        // The final average adds each learner's own work to the current Θ_p (as a rebase
        // would): re-anchored, a learner still holding an older version would pull Θ_p back.
        if c.base_version == frag.version || average {
            return Ok(None);
        }
        frag.history
            .lookup(c.base_version)
            .map(Some)
            .ok_or(RejectReason::StaleBase)
    }

    fn on_contribution(&mut self, now: f64, c: Contribution, actions: &mut Vec<Action>) {
        let verdict = self.admit(&c);
        let (p, learner) = (c.fragment, c.learner);
        let in_round = |r: &Round| {
            r.round == c.round && r.phase == Phase::Pulling && r.awaiting.contains(&learner)
        };
        match verdict {
            Err(reason) => {
                // A bad payload from a pulled learner still ends its part in the round.
                if matches!(
                    reason,
                    RejectReason::NonFinite | RejectReason::WrongShape | RejectReason::StaleBase
                ) {
                    if let Some(r) = self.fragments[p].open.as_mut().filter(|r| in_round(r)) {
                        r.awaiting.remove(&learner);
                    }
                }
                self.reject(&c, reason, actions);
            }
            Ok(base) => {
                if let Some(r) = self.fragments[p].open.as_mut() {
                    r.awaiting.remove(&learner);
                    r.received.insert(learner, (c, base));
                }
            }
        }
        let done = self
            .fragments
            .get(p)
            .and_then(|f| f.open.as_ref())
            .is_some_and(|r| r.phase == Phase::Pulling && r.awaiting.is_empty());
        if done {
            self.finish_round(now, p, actions);
        }
    }

    /// Closes a round: its contributions go to a merge job, and the merge log's record waits
    /// for the result (`on_merged`).
    fn finish_round(&mut self, now: f64, p: usize, actions: &mut Vec<Action>) {
        let Some(round) = self.fragments[p].open.take() else {
            return;
        };
        if !round.average {
            for (id, learner) in self.learners.iter_mut().filter(|(_, l)| l.active) {
                if let Some(skipped) = learner.skipped.get_mut(p) {
                    *skipped = if round.received.contains_key(id) {
                        0
                    } else {
                        *skipped + 1
                    };
                }
            }
        }
        let contributions: Vec<(Contribution, Option<KeptVersion>)> =
            round.received.into_values().collect();
        // The job's last round may set Θ_p to the learners' plain average: every model counts
        // once, however much of its work Θ_p already holds (weighting by the progress since the
        // last sync would let a slow learner's stale drift dominate).
        let average = round.average;
        let weights: Vec<f64> = contributions
            .iter()
            .map(|(c, _)| {
                if average {
                    1.0
                } else {
                    learner_weight(c.progress.c_tokens, c.progress.c_steps)
                }
            })
            .collect();
        let offset = self.offset(p);
        let global_step = self.global_step();
        let h = self.config.h;
        let frag = &mut self.fragments[p];
        // Rounds whose step already passed while this one ran are folded into the next.
        frag.next_round = (round.round + 1).max(global_step.saturating_sub(offset) / h);
        if weights.iter().sum::<f64>() <= 0.0 {
            return; // nothing usable arrived: Θ_p stays, no broadcast
        }
        let rules = self.plan.fragments[p]
            .tensors
            .iter()
            .map(|&t| {
                if average || crate::plan::is_embedding(&self.plan.tensors[t].name) {
                    MergeRule::Mean
                } else {
                    self.config.merge
                }
            })
            .collect();
        let version = frag.version + 1;
        // The version this merge replaces joins the history when the result is back.
        let promotion = frag
            .history
            .promotion(frag.version, frag.last_update.as_ref());
        let before = FragmentSnapshot {
            version,
            next_round: frag.next_round,
            theta: frag.theta.clone(),
            momentum: frag.momentum.clone(),
            residual: frag.residual.clone(),
        };
        self.sync_time_s = ema(self.sync_time_s, now - round.pulled_at);
        let contributors = contributions
            .iter()
            .zip(&weights)
            .map(|((c, _), w)| {
                let new = self.newly_merged(c);
                (c.learner, *w, new.c_steps, new.c_tokens, c.base_version)
            })
            .collect();
        let record = MergeRecord {
            fragment: p,
            round: round.round,
            version,
            at: now,
            contributors,
            quorum_wait_s: round.quorum_at.map_or(0.0, |q| q - round.opened_at),
            grace_s: round.grace_s,
            pull_s: now - round.pulled_at,
            merge_s: 0.0,
            average,
            agreement: None,
        };
        self.fragments[p].merging = Some(PendingMerge {
            version,
            closed_at: now,
            record,
        });
        actions.push(Action::Merge(MergeJob {
            fragment: p,
            before,
            contributions,
            weights,
            rules,
            outer: (!average).then_some(self.config.outer),
            broadcast_codec: self.config.broadcast_codec,
            threads: self.merge_threads,
            promotion,
        }));
    }

    /// A merge came back: the fragment takes its new version and the learners get it.
    fn on_merged(&mut self, now: f64, merged: MergedFragment, actions: &mut Vec<Action>) {
        let p = merged.fragment;
        let Some(frag) = self.fragments.get_mut(p) else {
            return;
        };
        let expected = frag.merging.as_ref().map(|m| m.version);
        if expected != Some(merged.state.version) {
            return; // not the merge this fragment waits for (one from before a restore)
        }
        let pending = frag.merging.take().expect("checked above");
        let reached_by = frag.last_update.take();
        frag.last_update = merged.encoded.map(|(codec, tensors)| EncodedUpdate {
            base_version: frag.version,
            codec,
            tensors: Arc::new(tensors),
        });
        frag.history.push(
            frag.version,
            frag.theta.clone(),
            reached_by.as_ref(),
            merged.promoted,
        );
        let state = merged.state;
        frag.version = state.version;
        frag.theta = state.theta;
        frag.momentum = state.momentum;
        frag.residual = state.residual;
        let version = frag.version;
        let values = frag.theta.clone();
        self.stats.merges += 1;
        let mut record = pending.record;
        record.at = now;
        record.merge_s = now - pending.closed_at;
        record.agreement = merged.agreement;
        self.merge_log.push(record);
        let to = self.active_learners();
        for l in &to {
            if let Some(state) = self.learners.get_mut(l) {
                state.clock[p] = version;
            }
        }
        actions.push(Action::Broadcast {
            fragment: p,
            version,
            values,
            to,
        });
    }

    /// The work a merged contribution adds to what this learner's earlier merged contributions
    /// of the fragment reported, which is what the merge log and the job's tokens-merged count.
    /// A learner pulled again before it applied the broadcast answering its previous pull still
    /// measures Δ and its counters from the same anchor, so the counters include the steps that
    /// pull already reported (the syncer re-anchors Δ itself, so the model holds them once).
    /// Counters from one anchor only grow: the difference is the new work.
    fn newly_merged(&mut self, c: &Contribution) -> Progress {
        let Some(learner) = self.learners.get_mut(&c.learner) else {
            return c.progress;
        };
        let new = match learner.last_merged.get(&c.fragment) {
            Some((base, earlier)) if *base == c.base_version => Progress {
                c_steps: c.progress.c_steps.saturating_sub(earlier.c_steps),
                c_tokens: c.progress.c_tokens.saturating_sub(earlier.c_tokens),
            },
            _ => c.progress,
        };
        learner
            .last_merged
            .insert(c.fragment, (c.base_version, c.progress));
        new
    }

    fn mark_absent(
        &mut self,
        now: f64,
        learner: LearnerId,
        actions: &mut Vec<Action>,
        timed_out: bool,
    ) {
        let Some(l) = self.learners.get_mut(&learner) else {
            return;
        };
        if !l.active {
            return;
        }
        l.active = false;
        if timed_out {
            actions.push(Action::MarkedAbsent { learner });
        }
        for p in 0..self.fragments.len() {
            let done = match self.fragments[p].open.as_mut() {
                Some(r) if r.phase == Phase::Pulling => {
                    r.awaiting.remove(&learner);
                    r.awaiting.is_empty()
                }
                _ => false,
            };
            if done {
                self.finish_round(now, p, actions);
            } else {
                self.advance_collection(now, p, actions);
            }
        }
    }

    fn on_timer(&mut self, now: f64, id: TimerId, actions: &mut Vec<Action>) {
        match id {
            TimerId::Grace { fragment, round } => {
                let Some(r) = self.fragments[fragment]
                    .open
                    .as_ref()
                    .filter(|r| r.round == round && r.phase == Phase::Grace)
                else {
                    return;
                };
                let owed_in = r.owed.iter().all(|l| r.responders.contains(l));
                let grace_until = r.quorum_at.map_or(now, |q| q + r.grace_s);
                if owed_in || now >= grace_until {
                    self.start_pull(now, fragment, actions);
                } else {
                    // The window proper is over; the owed learners get the rest of theirs.
                    actions.push(Action::ArmTimer {
                        id: TimerId::Grace { fragment, round },
                        at: grace_until,
                    });
                }
            }
            TimerId::DeferredPull { fragment, round } => {
                // Their link does not bring the broadcast within the wait: pulled from the
                // version they hold, re-anchored by the merge, rather than kept out.
                let Some(r) = self.fragments[fragment]
                    .open
                    .as_mut()
                    .filter(|r| r.round == round && r.phase == Phase::Pulling)
                else {
                    return;
                };
                for learner in std::mem::take(&mut r.deferred) {
                    actions.push(r.pull(learner, fragment));
                }
            }
            TimerId::PullTimeout { fragment, round } => {
                let pending = match &self.fragments[fragment].open {
                    Some(r) if r.round == round && r.phase == Phase::Pulling => {
                        r.awaiting.len() as u64
                    }
                    _ => return,
                };
                self.stats.pull_timeouts += pending;
                self.finish_round(now, fragment, actions);
            }
            TimerId::Heartbeat { learner, seq } => {
                if self
                    .learners
                    .get(&learner)
                    .is_some_and(|l| l.active && l.heartbeat_seq == seq)
                {
                    self.mark_absent(now, learner, actions, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::all_finite;

    #[test]
    fn all_finite_finds_one_nan_or_infinity_anywhere() {
        let mut values = vec![1.5f32; 5000];
        values[7] = f32::MAX;
        values[4999] = -f32::MIN_POSITIVE / 2.0; // subnormal
        assert!(all_finite(&values));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1023, 1024, 4999] {
                let mut v = values.clone();
                v[at] = bad;
                assert!(!all_finite(&v), "{bad} at {at}");
            }
        }
        assert!(all_finite(&[]));
    }
}
