//! What survives the coordinator: the state store in the run directory (fragments with outer
//! momentum, clocks, merge log), checkpoints handed to the background writer, and the restore
//! paths (`--resume` from a checkpoint, or the run directory's own state).

use super::{Core, COORDINATOR_JSON, MERGES_LOG};
use crate::state::{fragment_file, CoordinatorState, StateStore};
use anyhow::{anyhow, Context, Result};
use atoll_coordinator::{FragmentPlan, Syncer, SyncerConfig};
use atoll_recipe::Recipe;
use atoll_store::{CheckpointStore, ResumeFrom, Snapshot};
use atoll_trainer::checkpoint::{HostModel, SharedTensor, DEFAULT_MAX_SHARD_BYTES};
use atoll_trainer::worker::Worker;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

impl Core {
    /// Sets the coordinator's model to Θ, a fragment at a time (no assembled copy of the whole
    /// model on the way: at 12B that would be 48 GB more).
    pub(super) fn load_global_model(&mut self) {
        for (p, f) in self.plan.fragments.iter().enumerate() {
            self.worker
                .overwrite(&f.tensors, &self.syncer.fragment_values(p));
        }
    }

    /// Hands a checkpoint to the background writer when the furthest learner has crossed a
    /// multiple of `checkpoint.every` steps since the last one (or `force`, at the end). It holds
    /// the persisted state just written (fragments with outer momentum, clocks, merge log) and
    /// the global model as a Hugging Face checkpoint.
    pub(super) fn maybe_checkpoint(&mut self, force: bool) -> Result<()> {
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
        // Once the learners are at train.max_steps the job's last rounds are still to come: a
        // regular checkpoint then would take the step's name from the one at the job's end, which
        // holds them (it is skipped for a step already checkpointed).
        let at_end = step >= self.recipe.train.max_steps.0 as u64;
        let due = !at_end && step / every > self.last_checkpoint_step / every;
        if !(due || (force && step > self.last_checkpoint_step)) {
            return Ok(());
        }
        self.merges_log.flush()?;
        let mut snap = Snapshot::new(step, "coordinator");
        for f in [COORDINATOR_JSON, MERGES_LOG] {
            let bytes = std::fs::read(self.run_dir.join(f))
                .with_context(|| format!("reading {f} for the checkpoint"))?;
            snap.add(f, bytes);
        }
        // The fragments as the syncer holds them (shared, not copied), not their files: a merge
        // still out may have written its fragment's next version already, which the merge log
        // above does not hold. Each is serialised by the writer just before its upload.
        for p in 0..self.plan.len() {
            let fragment = self.syncer.fragment_snapshot(p);
            snap.defer(move || {
                let file = fragment_file(&fragment)?;
                Ok(vec![(format!("state/fragment-{p}.safetensors"), file)])
            });
        }
        // The weights are Θ as the syncer holds it, shared too: neither a copy of the model nor
        // a pass over it on this thread (at 12B each would be 48 GB).
        let mut theta: HashMap<&str, SharedTensor> = HashMap::new();
        for (p, f) in self.plan.fragments.iter().enumerate() {
            let values = self.syncer.fragment_values(p);
            for (k, &t) in f.tensors.iter().enumerate() {
                theta.insert(self.plan.tensors[t].name.as_str(), (values.clone(), k));
            }
        }
        let model = self.worker.model();
        let weights = HostModel::sharing(model, model.kind(), DEFAULT_MAX_SHARD_BYTES, &|name| {
            theta.get(name).cloned()
        })?;
        for build in weights.into_builders() {
            snap.defer(build);
        }
        if let Some(writer) = self.checkpoints.as_mut() {
            tokio::task::block_in_place(|| writer.submit(snap))?;
        }
        self.last_checkpoint_step = step;
        Ok(())
    }

    pub(super) fn persist(&mut self) -> Result<()> {
        self.state.learners = self.syncer.learner_snapshots();
        self.state.stats = self.syncer.stats().clone();
        self.store.save(&self.state)
    }
}

/// `--resume`: the checkpoint's files replace the run directory's state, which the usual restore
/// path (`load_or_init`) then reads. Returns the checkpoint's step.
pub(super) async fn restore_checkpoint(
    ckpt_store: &CheckpointStore,
    from: ResumeFrom,
    run_dir: &Path,
) -> Result<u64> {
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
    let state_dir = run_dir.join("state");
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir)?;
    }
    for (path, bytes) in &loaded.files {
        if path.starts_with("state/") || path == MERGES_LOG {
            let target = run_dir.join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, bytes)
                .with_context(|| format!("writing {}", target.display()))?;
        }
    }
    tracing::info!(
        "resuming from checkpoint {}/step-{}",
        ckpt_store.url(),
        loaded.manifest.step
    );
    Ok(loaded.manifest.step)
}

/// The syncer and the job state from the run directory's state store, or fresh ones (Θ from the
/// worker's initial model) saved there.
pub(super) fn load_or_init(
    store: &StateStore,
    config: SyncerConfig,
    plan: &FragmentPlan,
    worker: &Worker,
    recipe: &Recipe,
    run_dir: &Path,
) -> Result<(Syncer, CoordinatorState)> {
    Ok(match store.load(plan.len())? {
        Some((state, fragments)) => {
            if state.plan_fingerprint != plan.fingerprint() {
                return Err(anyhow!(
                    "{} holds the state of another model or fragment plan; use a fresh --run-dir",
                    run_dir.display()
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
    })
}
