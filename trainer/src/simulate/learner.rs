//! A simulated learner: its own model, optimizer, data shard and protocol state, the inner step,
//! and how it applies the fragments broadcast to it.

use super::clock::Link;
use crate::data::{Batcher, PackedSequences};
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::TrainSection;
use crate::train::backward_micro_batches;
use anyhow::{anyhow, Result};
use atoll_coordinator::syncer::Progress;
use atoll_coordinator::{ApplyRule, FragmentPlan, LearnerProtocol};
use atoll_wire::ErrorFeedback;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// A learner's step count when it answered a pull, and its local values of the fragment then.
pub(super) type PullSnapshot = (u64, Vec<Vec<f32>>);

pub(super) struct Learner {
    pub(super) model: GemmaModel,
    pub(super) params: Vec<Tensor>,
    pub(super) optimizer: AdamW,
    pub(super) shard: Vec<usize>,
    pub(super) batcher: Batcher,
    pub(super) protocol: Option<LearnerProtocol>,
    pub(super) feedback: Vec<Vec<ErrorFeedback>>,
    /// Local values of a fragment when it was pulled, and the learner's step count then, per
    /// fragment and round (for `ApplyRule::Rebase`).
    pub(super) at_pull: BTreeMap<usize, BTreeMap<u64, PullSnapshot>>,
    /// (fragment, version) → the round of this learner's contribution merged into that version.
    pub(super) merged_in: BTreeMap<(usize, u64), u64>,
    pub(super) speed: f64,
    pub(super) alive: bool,
    pub(super) waiting_for_sync: bool,
    pub(super) steps: u64,
    pub(super) compute_s: f64,
    pub(super) link: Link,
}

fn flat(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32 tensor")
}

pub(super) fn set_flat(t: &mut Tensor, values: &[f32]) {
    let src = Tensor::from_slice(values)
        .view(t.size().as_slice())
        .to_kind(t.kind())
        .to_device(t.device());
    tch::no_grad(|| t.copy_(&src));
}

impl Learner {
    /// Tensor `ti` of the trainable parameters at full precision (the optimizer's f32 master
    /// copy for bf16 parameters), flattened.
    pub(super) fn values(&self, ti: usize) -> Vec<f32> {
        flat(&self.optimizer.full_precision(ti))
    }

    /// Overwrites tensor `ti` between steps, through the optimizer so that a bf16 parameter's
    /// master copy follows (else the next step would write the stale master back).
    pub(super) fn set_values(&mut self, ti: usize, values: &[f32]) {
        self.optimizer.set_values(ti, &Tensor::from_slice(values));
    }

    /// The window indices of one step's micro-batches, drawn from this learner's shard.
    pub(super) fn next_micro_batches(&mut self, batch: usize, accum: usize) -> Vec<Vec<usize>> {
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

pub(super) fn train_step(
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

/// Applies the broadcasts that arrived since the last step boundary.
///
/// `Rebase` keeps the local progress that the applied version does not hold: the steps taken
/// since this learner's latest pull that was merged into it (or, when none was, since the anchor
/// it last applied), so a learner left out of a round keeps its work instead of losing it. The
/// fragment's progress counters then count those kept steps (the next outer gradient holds them),
/// not zero: else the merge weights them wrongly and the final flush skips them.
///
/// `rule: None` holds the due versions without applying them: a learner that has stopped
/// keeps its model as at its last step (the final average is over those models) while its
/// anchors move to the newest versions and its counters keep the work no version holds, as
/// under `Rebase`.
pub(super) fn apply_due(
    l: &mut Learner,
    plan: &FragmentPlan,
    rule: Option<ApplyRule>,
    tokens_per_step: u64,
) {
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
        let keeps_work = rule.is_none_or(|r| r == ApplyRule::Rebase);
        for (k, &ti) in plan.fragments[fragment].tensors.iter().enumerate() {
            let values = &received.values[k];
            if let Some(rule) = rule {
                let applied = rule.applied(&l.values(ti), values, &base[k]);
                l.set_values(ti, &applied);
            }
            if rule == Some(ApplyRule::Rebase) {
                shifts.push(
                    values
                        .iter()
                        .zip(&base[k])
                        .map(|(g, s)| g - s)
                        .collect::<Vec<f32>>(),
                );
            }
        }
        if keeps_work {
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
