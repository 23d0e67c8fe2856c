//! The past versions of one fragment that the syncer keeps to re-anchor contributions measured
//! against them. A version reached by a quantised broadcast is kept as that broadcast's encoded
//! update (an eighth of the values' size with e3m0), and only the oldest kept version in full:
//! any kept version is rebuilt exactly by replaying the updates on the nearest full one with the
//! same f32 additions that produced it ([`apply_update`]). At 12B scale this is the difference
//! between four extra copies of the model in the coordinator's memory and about one and a half.

use crate::syncer::{apply_update, EncodedUpdate, FragmentValues};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Kept {
    Full(FragmentValues),
    /// Θ_v = Θ_{v−1} + Q(update): the broadcast that led to this version.
    Reached(EncodedUpdate),
}

/// A kept version, not yet rebuilt: the nearest full version at or before it and the updates
/// from there. Cheap to hold (shared buffers), so a merge job can carry it and rebuild the values
/// on its own thread.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptVersion {
    full: FragmentValues,
    updates: Vec<EncodedUpdate>,
}

impl KeptVersion {
    /// The version's values, replayed exactly as they were reached.
    pub fn values(&self) -> FragmentValues {
        let Some((first, rest)) = self.updates.split_first() else {
            return self.full.clone();
        };
        let mut values = replay(&self.full, first);
        for update in rest {
            values = replay(&values, update);
        }
        Arc::new(values)
    }
}

#[derive(Debug, Clone)]
pub struct VersionHistory {
    /// Oldest first; the oldest is always `Full`.
    kept: VecDeque<(u64, Kept)>,
    capacity: usize,
}

impl VersionHistory {
    pub fn new(capacity: usize) -> Self {
        VersionHistory {
            kept: VecDeque::new(),
            capacity,
        }
    }

    /// Whether `version`, pushed with `reached_by`, would be kept as that update (else in
    /// full), and whether it continues the kept chain (else the history restarts with it).
    fn kept_as_update(&self, version: u64, reached_by: Option<&EncodedUpdate>) -> (bool, bool) {
        let follows_the_newest = self.kept.back().is_some_and(|(v, _)| v + 1 == version);
        let as_update =
            follows_the_newest && reached_by.is_some_and(|u| u.base_version + 1 == version);
        (as_update, follows_the_newest)
    }

    /// The rebuild that pushing `version` will need: at capacity the push drops the oldest
    /// version (kept in full), and the next one, if kept as an update, must become full. Its
    /// values are returned here unbuilt, so that a merge job can build them off the syncer's
    /// thread and hand them to [`VersionHistory::push`].
    pub fn promotion(
        &self,
        version: u64,
        reached_by: Option<&EncodedUpdate>,
    ) -> Option<(u64, KeptVersion)> {
        let (as_update, follows_the_newest) = self.kept_as_update(version, reached_by);
        if self.capacity == 0 || !follows_the_newest || self.kept.len() < self.capacity {
            return None;
        }
        let (_, Kept::Full(oldest)) = &self.kept[0] else {
            unreachable!("the oldest kept version is full")
        };
        let (next, update) = match self.kept.get(1) {
            Some((v, Kept::Reached(u))) => (*v, u.clone()),
            Some((_, Kept::Full(_))) => return None,
            None if as_update => (version, reached_by?.clone()),
            None => return None,
        };
        Some((
            next,
            KeptVersion {
                full: oldest.clone(),
                updates: vec![update],
            },
        ))
    }

    /// Keeps `theta`, the values of `version`, which the fragment is leaving; `reached_by` is
    /// the encoded update that turned the version before into this one, if there was one.
    /// `promoted`: the values [`VersionHistory::promotion`] asked for, already built (else the
    /// push builds them itself).
    pub fn push(
        &mut self,
        version: u64,
        theta: FragmentValues,
        reached_by: Option<&EncodedUpdate>,
        promoted: Option<(u64, FragmentValues)>,
    ) {
        if self.capacity == 0 {
            return;
        }
        let (as_update, follows_the_newest) = self.kept_as_update(version, reached_by);
        let kept = match reached_by {
            Some(u) if as_update => Kept::Reached(u.clone()),
            _ => {
                // A gap (or an exact step) breaks the chain: what came before cannot be replayed.
                if !follows_the_newest {
                    self.kept.clear();
                }
                Kept::Full(theta)
            }
        };
        self.kept.push_back((version, kept));
        while self.kept.len() > self.capacity {
            let (_, oldest) = self.kept.pop_front().expect("longer than capacity");
            let Kept::Full(oldest) = oldest else {
                unreachable!("the oldest kept version is full")
            };
            if let Some((v, next)) = self.kept.front_mut() {
                if let Kept::Reached(update) = next {
                    let values = match &promoted {
                        Some((p, values)) if p == v => values.clone(),
                        _ => Arc::new(replay(&oldest, update)),
                    };
                    *next = Kept::Full(values);
                }
            }
        }
    }

    /// The values of `version`, if it is kept.
    pub fn get(&self, version: u64) -> Option<FragmentValues> {
        self.lookup(version).map(|k| k.values())
    }

    /// `version`, if it is kept, unbuilt (see [`KeptVersion`]).
    pub fn lookup(&self, version: u64) -> Option<KeptVersion> {
        let at = self.kept.iter().position(|(v, _)| *v == version)?;
        let full = (0..=at)
            .rev()
            .find(|&i| matches!(self.kept[i].1, Kept::Full(_)))
            .expect("the oldest kept version is full");
        let Kept::Full(base) = &self.kept[full].1 else {
            unreachable!("found above")
        };
        let updates = self
            .kept
            .range(full + 1..=at)
            .map(|(_, kept)| match kept {
                Kept::Reached(update) => update.clone(),
                Kept::Full(_) => unreachable!("the nearest full version is the last one"),
            })
            .collect();
        Some(KeptVersion {
            full: base.clone(),
            updates,
        })
    }

    /// Versions kept in full (the rest as updates).
    #[cfg(test)]
    fn full_versions(&self) -> usize {
        self.kept
            .iter()
            .filter(|(_, k)| matches!(k, Kept::Full(_)))
            .count()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.len()
    }
}

/// `values` + Q(update), tensor by tensor, exactly as learners and the syncer applied it.
fn replay(values: &[Vec<f32>], update: &EncodedUpdate) -> Vec<Vec<f32>> {
    values
        .iter()
        .zip(update.tensors.iter())
        .map(|(old, bytes)| {
            let mut q = vec![0.0f32; old.len()];
            // The syncer decoded these very bytes when it applied them.
            atoll_wire::decode(update.codec, bytes, atoll_wire::DEFAULT_BLOCK, &mut q)
                .expect("a kept update decodes");
            let mut new = vec![0.0f32; old.len()];
            apply_update(old, &q, &mut new);
            new
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_wire::Codec;

    /// Versions 0..=n of a two-tensor fragment, each reached from the last by a quantised
    /// update (or, at `exact`, by an exact step), with the updates.
    fn versions(n: u64, exact: Option<u64>) -> Vec<(FragmentValues, Option<EncodedUpdate>)> {
        let mut theta = vec![vec![0.5f32; 300], vec![-0.25f32; 7]];
        let mut out = vec![(Arc::new(theta.clone()), None)];
        for v in 1..=n {
            let steps: Vec<Vec<f32>> = theta
                .iter()
                .enumerate()
                .map(|(t, x)| {
                    (0..x.len())
                        .map(|i| ((i as f32 + v as f32 * 0.37 + t as f32).sin()) * 1e-3)
                        .collect()
                })
                .collect();
            if exact == Some(v) {
                for (x, s) in theta.iter_mut().zip(&steps) {
                    x.iter_mut().zip(s).for_each(|(x, s)| *x -= s);
                }
                out.push((Arc::new(theta.clone()), None));
                continue;
            }
            let mut tensors = Vec::new();
            for (x, s) in theta.iter_mut().zip(&steps) {
                let mut bytes = Vec::new();
                atoll_wire::encode(Codec::E3M0, s, atoll_wire::DEFAULT_BLOCK, &mut bytes).unwrap();
                let mut q = vec![0.0f32; s.len()];
                atoll_wire::decode(Codec::E3M0, &bytes, atoll_wire::DEFAULT_BLOCK, &mut q).unwrap();
                let old = x.clone();
                apply_update(&old, &q, x);
                tensors.push(bytes);
            }
            let update = EncodedUpdate {
                base_version: v - 1,
                codec: Codec::E3M0,
                tensors: Arc::new(tensors),
            };
            out.push((Arc::new(theta.clone()), Some(update)));
        }
        out
    }

    #[test]
    fn kept_versions_come_back_bit_for_bit_from_one_full_copy_and_updates() {
        for exact in [None, Some(5)] {
            let all = versions(9, exact);
            let mut history = VersionHistory::new(4);
            for (v, (theta, reached_by)) in all.iter().enumerate() {
                // The rebuild a push needs, done ahead (as a merge job does), is exactly the
                // version it rebuilds.
                let promoted = history
                    .promotion(v as u64, reached_by.as_ref())
                    .map(|(p, kept)| (p, kept.values()));
                if let Some((p, values)) = &promoted {
                    assert!(**values == *all[*p as usize].0, "version {p} rebuilt ahead");
                }
                history.push(v as u64, theta.clone(), reached_by.as_ref(), promoted);
                assert!(history.len() <= 4);
                let first_kept = (v + 1).saturating_sub(4);
                for (k, (expected, _)) in all.iter().enumerate().take(v + 1) {
                    let got = history.get(k as u64);
                    if k < first_kept {
                        assert!(got.is_none(), "version {k} should be gone after {v}");
                    } else {
                        assert!(got.as_deref() == Some(&**expected), "version {k} after {v}");
                    }
                }
            }
            let full = history.full_versions();
            // Versions 6..=9 kept: the oldest in full, the rest as updates.
            assert_eq!(full, 1, "exact step {exact:?}");
        }
        // With the exact step among the kept versions, it starts a new full copy.
        let all = versions(6, Some(5));
        let mut history = VersionHistory::new(4);
        for (v, (theta, reached_by)) in all.iter().enumerate() {
            history.push(v as u64, theta.clone(), reached_by.as_ref(), None);
        }
        assert_eq!(history.full_versions(), 2);
        assert!(history.get(4).as_deref() == Some(&*all[4].0));
        assert!(history.get(6).as_deref() == Some(&*all[6].0));
    }

    #[test]
    fn a_gap_in_the_versions_restarts_the_history() {
        let all = versions(3, None);
        let mut history = VersionHistory::new(4);
        history.push(0, all[0].0.clone(), None, None);
        history.push(2, all[2].0.clone(), all[2].1.as_ref(), None);
        assert_eq!((history.len(), history.full_versions()), (1, 1));
        assert!(history.get(0).is_none());
        assert!(history.get(2).as_deref() == Some(&*all[2].0));
        assert!(VersionHistory::new(0).get(0).is_none());
    }

    /// At capacity 1 every push replaces the one kept version, which is then the pushed one in
    /// full; a push takes the values it is given for that instead of rebuilding them.
    #[test]
    fn a_push_uses_the_promoted_values_it_is_handed() {
        let all = versions(3, None);
        let mut history = VersionHistory::new(1);
        history.push(0, all[0].0.clone(), None, None);
        let (p, kept) = history.promotion(1, all[1].1.as_ref()).expect("due");
        assert_eq!(p, 1);
        assert!(*kept.values() == *all[1].0);
        let marker: FragmentValues = Arc::new(vec![vec![7.0; 300], vec![7.0; 7]]);
        history.push(
            1,
            all[1].0.clone(),
            all[1].1.as_ref(),
            Some((1, marker.clone())),
        );
        assert_eq!(history.get(1), Some(marker));
        // Not at capacity, or a gap: nothing to rebuild.
        assert!(VersionHistory::new(4).promotion(0, None).is_none());
        assert!(history.promotion(3, all[3].1.as_ref()).is_none());
    }
}
