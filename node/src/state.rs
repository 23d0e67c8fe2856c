//! The coordinator's persisted state, written at every fragment boundary (after a merge, before
//! its broadcast leaves, so no learner ever holds a version the saved state lacks):
//! `<run dir>/state/fragment-<p>.safetensors` (Θ_p, its outer momentum and, with down-link error
//! feedback, the broadcast residual; version and next round in the metadata) and
//! `<run dir>/state/coordinator.json` (regions, learners' clocks and steps, counters). Every file
//! is written to a temporary name and renamed.

use anyhow::{anyhow, Context, Result};
use atoll_coordinator::{FragmentSnapshot, LearnerSnapshot, SyncerStats};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CoordinatorState {
    pub plan_fingerprint: u64,
    pub regions: BTreeMap<String, u32>,
    pub learners: Vec<LearnerSnapshot>,
    pub stats: SyncerStats,
    pub tokens_merged: u64,
    pub done: bool,
}

#[derive(Clone)]
pub struct StateStore {
    dir: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A fragment's state file: Θ_p, its outer momentum and broadcast residual (f32), its version
/// and next round.
pub fn fragment_file(f: &FragmentSnapshot) -> Result<Vec<u8>> {
    let theta: Vec<Vec<u8>> = f.theta.iter().map(|v| f32_bytes(v)).collect();
    let momentum: Vec<Vec<u8>> = f.momentum.iter().map(|v| f32_bytes(v)).collect();
    let residual: Vec<Vec<u8>> = f.residual.iter().map(|v| f32_bytes(v)).collect();
    let mut views = Vec::new();
    for (k, r) in residual.iter().enumerate() {
        views.push((
            format!("residual.{k}"),
            TensorView::new(Dtype::F32, vec![r.len() / 4], r)?,
        ));
    }
    for (k, (t, m)) in theta.iter().zip(&momentum).enumerate() {
        let n = t.len() / 4;
        views.push((
            format!("theta.{k}"),
            TensorView::new(Dtype::F32, vec![n], t)?,
        ));
        views.push((
            format!("momentum.{k}"),
            TensorView::new(Dtype::F32, vec![n], m)?,
        ));
    }
    let metadata = BTreeMap::from([
        ("version".to_string(), f.version.to_string()),
        ("next_round".to_string(), f.next_round.to_string()),
    ]);
    Ok(safetensors::serialize(
        views,
        Some(metadata.into_iter().collect()),
    )?)
}

impl StateStore {
    pub fn new(run_dir: &Path) -> Result<Self> {
        let dir = run_dir.join("state");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(StateStore { dir })
    }

    fn fragment_path(&self, p: usize) -> PathBuf {
        self.dir.join(format!("fragment-{p}.safetensors"))
    }

    pub fn save_fragment(&self, p: usize, f: &FragmentSnapshot) -> Result<()> {
        write_atomic(&self.fragment_path(p), &fragment_file(f)?)
    }

    pub fn save(&self, state: &CoordinatorState) -> Result<()> {
        write_atomic(
            &self.dir.join("coordinator.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )
    }

    /// The saved state, if any: (coordinator state, one snapshot per fragment).
    pub fn load(
        &self,
        fragments: usize,
    ) -> Result<Option<(CoordinatorState, Vec<FragmentSnapshot>)>> {
        let path = self.dir.join("coordinator.json");
        if !path.exists() {
            return Ok(None);
        }
        let state: CoordinatorState = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{} is not a coordinator state", path.display()))?;
        let mut snaps = Vec::with_capacity(fragments);
        for p in 0..fragments {
            let path = self.fragment_path(p);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("the saved state lacks {}", path.display()))?;
            let (_, meta) = SafeTensors::read_metadata(&bytes)?;
            let st = SafeTensors::deserialize(&bytes)?;
            let field = |k: &str| -> Result<u64> {
                meta.metadata()
                    .as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("{}: metadata {k} missing", path.display()))
            };
            let read = |name: String| -> Result<Vec<f32>> {
                let t = st.tensor(&name)?;
                Ok(t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let count = st
                .names()
                .iter()
                .filter(|n| n.starts_with("theta."))
                .count();
            let theta = (0..count)
                .map(|k| read(format!("theta.{k}")))
                .collect::<Result<Vec<_>>>()?;
            let momentum = (0..count)
                .map(|k| read(format!("momentum.{k}")))
                .collect::<Result<Vec<_>>>()?;
            let has_residual = st.names().iter().any(|n| n.starts_with("residual."));
            let residual = if has_residual {
                (0..count)
                    .map(|k| read(format!("residual.{k}")))
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            snaps.push(FragmentSnapshot {
                version: field("version")?,
                next_round: field("next_round")?,
                theta: Arc::new(theta),
                momentum: Arc::new(momentum),
                residual: Arc::new(residual),
            });
        }
        Ok(Some((state, snaps)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(residual: Vec<Vec<f32>>) -> FragmentSnapshot {
        FragmentSnapshot {
            version: 7,
            next_round: 9,
            theta: Arc::new(vec![vec![1.0, -2.5], vec![0.25]]),
            momentum: Arc::new(vec![vec![0.5, 0.0], vec![-1.0]]),
            residual: Arc::new(residual),
        }
    }

    #[test]
    fn fragments_round_trip_with_and_without_a_residual() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path()).unwrap();
        store.save(&CoordinatorState::default()).unwrap();
        let with = snapshot(vec![vec![0.125, -0.0625], vec![3.0e-5]]);
        let without = snapshot(Vec::new());
        store.save_fragment(0, &with).unwrap();
        store.save_fragment(1, &without).unwrap();
        let (_, loaded) = store.load(2).unwrap().unwrap();
        assert_eq!(loaded, vec![with, without]);
    }
}
