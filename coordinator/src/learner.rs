//! The learner's side of the protocol, as pure logic: per-fragment progress counters, the anchor
//! (last applied Θ_p) each outer gradient is measured from, and broadcasts applied only at step
//! boundaries, so the inner loop never waits for the network.

use crate::syncer::{FragmentValues, Progress};
use serde::{Deserialize, Serialize};

/// How a received fragment replaces the local one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "rule")]
pub enum ApplyRule {
    /// θ_p ← Θ_p (Decoupled DiLoCo).
    #[default]
    Overwrite,
    /// θ_p ← α·θ_p + (1 − α)·Θ_p (Streaming DiLoCo).
    Mix { alpha: f32 },
    /// θ_p ← Θ_p + (θ_p − θ_p at the pull): the steps taken while the fragment was in flight are
    /// kept instead of overwritten, and flow into the next outer gradient.
    Rebase,
}

impl ApplyRule {
    /// One tensor's local values once Θ_p (`global`) is applied to `local`. `base` is where the
    /// local work kept under `Rebase` is measured from (the values at the pull this version
    /// answers, or the anchor it replaces); the other rules do not read it.
    pub fn applied(self, local: &[f32], global: &[f32], base: &[f32]) -> Vec<f32> {
        match self {
            ApplyRule::Overwrite => global.to_vec(),
            ApplyRule::Mix { alpha } => local
                .iter()
                .zip(global)
                .map(|(x, g)| alpha * x + (1.0 - alpha) * g)
                .collect(),
            ApplyRule::Rebase => global
                .iter()
                .zip(local)
                .zip(base)
                .map(|((g, x), s)| g + (x - s))
                .collect(),
        }
    }
}

impl Progress {
    /// The counters of `steps` steps of `tokens_per_step` tokens.
    pub fn of_steps(steps: u64, tokens_per_step: u64) -> Self {
        Progress {
            c_steps: steps,
            c_tokens: steps * tokens_per_step,
        }
    }
}

/// A broadcast applied at a step boundary, with what it replaced: the anchor and the counters
/// of the work done since that anchor (what a rule keeping local work measures it from).
#[derive(Debug, Clone)]
pub struct Due {
    pub received: Received,
    pub replaced_anchor: FragmentValues,
    pub progress: Progress,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub fragment: usize,
    pub version: u64,
    pub values: FragmentValues,
}

#[derive(Debug, Clone)]
pub struct LearnerProtocol {
    progress: Vec<Progress>,
    anchors: Vec<(u64, FragmentValues)>,
    pending: Vec<Option<Received>>,
    step: u64,
}

impl LearnerProtocol {
    /// Starts from the syncer's catch-up: every fragment's version and values.
    pub fn new(catch_up: Vec<(usize, u64, FragmentValues)>) -> Self {
        let n = catch_up.len();
        let mut anchors = vec![(0, FragmentValues::default()); n];
        for (p, v, values) in catch_up {
            anchors[p] = (v, values);
        }
        LearnerProtocol {
            progress: vec![Progress::default(); n],
            anchors,
            pending: vec![None; n],
            step: 0,
        }
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Records one finished inner step of `tokens` tokens; returns the metadata to report.
    pub fn on_step(&mut self, tokens: u64) -> Vec<Progress> {
        self.step += 1;
        for p in &mut self.progress {
            p.c_steps += 1;
            p.c_tokens += tokens;
        }
        self.progress.clone()
    }

    /// Queues a broadcast; a newer version replaces an older queued one, stale ones are dropped.
    pub fn on_broadcast(&mut self, fragment: usize, version: u64, values: FragmentValues) {
        let current = self.pending[fragment]
            .as_ref()
            .map_or(self.anchors[fragment].0, |r| r.version);
        if version > current {
            self.pending[fragment] = Some(Received {
                fragment,
                version,
                values,
            });
        }
    }

    /// At a step boundary: the fragments to apply now. Their anchors move and counters reset.
    pub fn take_due(&mut self) -> Vec<Due> {
        let mut due = Vec::new();
        for (p, slot) in self.pending.iter_mut().enumerate() {
            if let Some(r) = slot.take() {
                let (_, replaced_anchor) =
                    std::mem::replace(&mut self.anchors[p], (r.version, r.values.clone()));
                due.push(Due {
                    received: r,
                    replaced_anchor,
                    progress: std::mem::take(&mut self.progress[p]),
                });
            }
        }
        due
    }

    /// After `take_due`, for a rule that keeps local work on top of the applied version
    /// (`ApplyRule::Rebase`): the counters of fragment `p` describe that kept work, the steps
    /// θ_local − anchor still holds, so they must not start from zero.
    pub fn keep_progress(&mut self, fragment: usize, progress: Progress) {
        self.progress[fragment] = progress;
    }

    /// What a pull needs besides Δ = anchor − θ_local: the anchor's version and the counters.
    pub fn on_pull(&self, fragment: usize) -> (u64, Progress) {
        (self.anchors[fragment].0, self.progress[fragment])
    }

    /// The newest version received (queued or applied): what the next broadcast update of this
    /// fragment is relative to.
    pub fn latest(&self, fragment: usize) -> (u64, &FragmentValues) {
        match &self.pending[fragment] {
            Some(r) => (r.version, &r.values),
            None => (self.anchors[fragment].0, &self.anchors[fragment].1),
        }
    }

    /// Continues the step count of an earlier life of this learner (after a restart).
    pub fn resume_at(&mut self, step: u64) {
        self.step = step;
    }

    pub fn anchor(&self, fragment: usize) -> &FragmentValues {
        &self.anchors[fragment].1
    }

    /// Steps and tokens since each fragment's anchor (what a pull would report now).
    pub fn progress(&self) -> &[Progress] {
        &self.progress
    }

    pub fn versions(&self) -> Vec<u64> {
        self.anchors.iter().map(|(v, _)| *v).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn apply_rules_overwrite_mix_or_keep_the_work_since_the_base() {
        let (local, global, base) = ([3.0f32, -1.0], [1.0f32, 1.0], [2.0f32, 0.0]);
        assert_eq!(ApplyRule::Overwrite.applied(&local, &global, &base), global);
        assert_eq!(
            ApplyRule::Mix { alpha: 0.25 }.applied(&local, &global, &base),
            vec![1.5, 0.5]
        );
        // Θ + (θ − base): the one step of local work since the base survives.
        assert_eq!(
            ApplyRule::Rebase.applied(&local, &global, &base),
            vec![2.0, 0.0]
        );
    }

    #[test]
    fn broadcasts_wait_for_a_step_boundary_and_reset_counters() {
        let v = |x: f32| Arc::new(vec![vec![x]]);
        let mut l = LearnerProtocol::new(vec![(0, 0, v(0.0)), (1, 0, v(0.0))]);
        l.on_step(10);
        l.on_step(10);
        l.on_broadcast(1, 1, v(1.0));
        l.on_broadcast(1, 3, v(3.0));
        l.on_broadcast(1, 2, v(2.0)); // older than the queued one: dropped
        assert_eq!(
            l.on_pull(1),
            (
                0,
                Progress {
                    c_steps: 2,
                    c_tokens: 20
                }
            ),
            "not applied before the boundary"
        );
        let due = l.take_due();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].received.fragment, due[0].received.version), (1, 3));
        assert_eq!(*due[0].replaced_anchor, vec![vec![0.0]]);
        assert_eq!(due[0].progress, Progress::of_steps(2, 10));
        assert_eq!(l.on_pull(1), (3, Progress::default()));
        assert_eq!(
            l.on_pull(0),
            (
                0,
                Progress {
                    c_steps: 2,
                    c_tokens: 20
                }
            )
        );
        assert_eq!(**l.anchor(1), vec![vec![3.0]]);
        l.on_broadcast(1, 3, v(9.0)); // a duplicate of the applied version
        assert!(l.take_due().is_empty());
        assert_eq!(l.versions(), vec![0, 3]);
    }
}
