//! Sharded checkpoints: each rank writes its own shards and AdamW moments
//! (`rank-<r>-of-<R>.safetensors`), rank 0 writes `config.json` and, once every rank has
//! written, the manifest (`sharded.json`: world size, optimizer steps, the unit plan), so a
//! directory with a manifest is complete. [`ShardedModel::load`] resumes it on the same world
//! size; [`reassemble`] turns it into the whole model, and [`write_whole_checkpoint`] into a
//! Hugging Face checkpoint, without any rank running.

use super::{plan_units, GroupPlan, ShardedModel};
use crate::checkpoint::{
    read_tensors, save_model, write_json_atomic, write_tensors, DEFAULT_MAX_SHARD_BYTES,
};
use crate::config::GemmaConfig;
use crate::models::GemmaModel;
use anyhow::{anyhow, bail, Context, Result};
use atoll_collective::Collective;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The manifest's file name.
pub const MANIFEST: &str = "sharded.json";
const FORMAT: u32 = 1;
const BUFFERS: &str = "buffers.safetensors";

/// Names of the model's non-trainable tensors (buffers every rank holds whole).
fn buffer_names(config: &GemmaConfig) -> Vec<String> {
    config
        .tensor_specs()
        .into_iter()
        .filter(|s| !s.trainable)
        .map(|s| s.name)
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    world: usize,
    optimizer_steps: u64,
    /// Every group of every unit, in plan order: names, shapes and padded length.
    groups: Vec<ManifestGroup>,
    files: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ManifestGroup {
    names: Vec<String>,
    shapes: Vec<Vec<i64>>,
    padded: i64,
}

impl From<&GroupPlan> for ManifestGroup {
    fn from(g: &GroupPlan) -> Self {
        ManifestGroup {
            names: g.names.clone(),
            shapes: g.shapes.clone(),
            padded: g.padded,
        }
    }
}

fn rank_file(rank: usize, world: usize) -> String {
    format!("rank-{rank}-of-{world}.safetensors")
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no {MANIFEST}: not a sharded checkpoint, or one whose ranks did not all finish \
             writing",
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid manifest", path.display()))?;
    if manifest.format != FORMAT {
        bail!(
            "{}: format {} (this build reads {FORMAT})",
            path.display(),
            manifest.format
        );
    }
    if manifest.files.len() != manifest.world {
        bail!(
            "{}: {} rank files listed for {} ranks",
            path.display(),
            manifest.files.len(),
            manifest.world
        );
    }
    Ok(manifest)
}

fn take(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    name: &str,
    file: &Path,
) -> Result<Tensor> {
    tensors
        .remove(name)
        .ok_or_else(|| anyhow!("{} lacks tensor {name}", file.display()))
}

impl ShardedModel {
    /// Writes this rank's shards and moments under `dir`; rank 0 also writes `config.json` and,
    /// after every rank has written, the manifest. Every rank must call it; it returns once the
    /// checkpoint is complete.
    pub fn save(&mut self, collective: &mut dyn Collective, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let groups: Vec<_> = self.units.iter().flatten().collect();
        let shard_names: Vec<String> = (0..groups.len()).map(|k| format!("shard.{k}")).collect();
        let state = self.optimizer.state_tensors();
        let mut named: Vec<(&str, &Tensor)> = shard_names
            .iter()
            .zip(&groups)
            .map(|(n, g)| (n.as_str(), &g.shard))
            .collect();
        named.extend(state.iter().map(|(n, t)| (n.as_str(), t)));
        let file = rank_file(self.rank, self.world);
        let tmp = dir.join(format!(".{file}.tmp"));
        write_tensors(&tmp, &named)?;
        std::fs::rename(&tmp, dir.join(&file))
            .with_context(|| format!("cannot write {}", dir.join(&file).display()))?;
        collective
            .barrier()
            .with_context(|| format!("rank {}: waiting for the other ranks' shards", self.rank))?;
        if self.rank == 0 {
            write_json_atomic(&dir.join("config.json"), &self.model.config.to_hf_json())?;
            let vars = self.model.vs.variables();
            let buffers = buffer_names(&self.model.config)
                .into_iter()
                .map(|n| {
                    let t = vars
                        .get(&n)
                        .ok_or_else(|| anyhow!("the model has no buffer {n}"))?;
                    Ok((n, t.shallow_clone()))
                })
                .collect::<Result<Vec<_>>>()?;
            if !buffers.is_empty() {
                let named: Vec<(&str, &Tensor)> =
                    buffers.iter().map(|(n, t)| (n.as_str(), t)).collect();
                write_tensors(&dir.join(BUFFERS), &named)?;
            }
            let manifest = Manifest {
                format: FORMAT,
                world: self.world,
                optimizer_steps: self.optimizer.steps_taken(),
                groups: groups
                    .iter()
                    .map(|g| ManifestGroup::from(&g.plan))
                    .collect(),
                files: (0..self.world).map(|r| rank_file(r, self.world)).collect(),
            };
            write_json_atomic(&dir.join(MANIFEST), &serde_json::to_value(&manifest)?)?;
        }
        collective
            .barrier()
            .with_context(|| format!("rank {}: waiting for the manifest", self.rank))?;
        Ok(())
    }

    /// Restores the shards and AdamW state that [`Self::save`] wrote, on the same world size
    /// and model.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let manifest = read_manifest(dir)?;
        if manifest.world != self.world {
            bail!(
                "{} was written by {} ranks, this run has {}: reassemble it \
                 (`reassemble`) to change the world size",
                dir.display(),
                manifest.world,
                self.world
            );
        }
        let expected: Vec<ManifestGroup> = self
            .units
            .iter()
            .flatten()
            .map(|g| ManifestGroup::from(&g.plan))
            .collect();
        if manifest.groups != expected {
            bail!(
                "{}: its tensors differ from this model's (another model config)",
                dir.display()
            );
        }
        let path = dir.join(&manifest.files[self.rank]);
        let mut tensors: std::collections::HashMap<String, Tensor> =
            read_tensors(&path)?.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (k, group) in self.units.iter_mut().flatten().enumerate() {
            let t = take(&mut tensors, &format!("shard.{k}"), &path)?;
            if t.size() != group.shard.size() {
                bail!(
                    "{}: shard.{k} has shape {:?}, expected {:?}",
                    path.display(),
                    t.size(),
                    group.shard.size()
                );
            }
            group.shard.copy_(&t);
        }
        self.optimizer
            .load_state(manifest.optimizer_steps, tensors.into_iter().collect())
            .with_context(|| format!("{}: optimizer state", path.display()))
    }
}

/// The whole model of a sharded checkpoint: its config and every tensor (trainable ones in f32,
/// and the buffers), by name in checkpoint layout order.
pub fn reassemble(dir: &Path) -> Result<(GemmaConfig, Vec<(String, Tensor)>)> {
    let manifest = read_manifest(dir)?;
    let config = GemmaConfig::from_file(&dir.join("config.json"))?;
    let plan: Vec<ManifestGroup> = plan_units(&config, manifest.world)?
        .iter()
        .flat_map(|u| u.groups.iter().map(ManifestGroup::from))
        .collect();
    if plan != manifest.groups {
        bail!(
            "{}: the manifest's tensors do not match config.json's model",
            dir.display()
        );
    }
    let files: Vec<PathBuf> = manifest.files.iter().map(|f| dir.join(f)).collect();
    let mut per_rank = files
        .iter()
        .map(|p| {
            read_tensors(p).map(|t| t.into_iter().collect::<std::collections::HashMap<_, _>>())
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (k, group) in manifest.groups.iter().enumerate() {
        let name = format!("shard.{k}");
        let parts = per_rank
            .iter_mut()
            .zip(&files)
            .map(|(tensors, file)| take(tensors, &name, file))
            .collect::<Result<Vec<_>>>()?;
        let flat = Tensor::cat(&parts, 0);
        if flat.size() != [group.padded] {
            bail!(
                "{}: {name} of the ranks together has {} elements, expected {}",
                dir.display(),
                flat.size()[0],
                group.padded
            );
        }
        let mut offset = 0;
        for (name, shape) in group.names.iter().zip(&group.shapes) {
            let n: i64 = shape.iter().product();
            out.push((
                name.clone(),
                flat.narrow(0, offset, n).view(shape.as_slice()).copy(),
            ));
            offset += n;
        }
    }
    let buffers = buffer_names(&config);
    if !buffers.is_empty() {
        let path = dir.join(BUFFERS);
        let mut stored: std::collections::HashMap<String, Tensor> =
            read_tensors(&path)?.into_iter().collect();
        for name in buffers {
            let t = take(&mut stored, &name, &path)?;
            out.push((name, t));
        }
    }
    super::sort_in_checkpoint_order(&config, &mut out);
    Ok((config, out))
}

/// Writes the whole model of the sharded checkpoint `dir` as a Hugging Face checkpoint in
/// `out`, with weights in `kind`.
pub fn write_whole_checkpoint(dir: &Path, out: &Path, kind: Kind) -> Result<()> {
    let (config, tensors) = reassemble(dir)?;
    let model = GemmaModel::new_for_loading(config, Device::Cpu, Kind::Float)?;
    let vars = model.vs.variables();
    let _guard = tch::no_grad_guard();
    for (name, t) in &tensors {
        let mut v = vars
            .get(name)
            .ok_or_else(|| anyhow!("the model has no variable {name}"))?
            .shallow_clone();
        if v.size() != t.size() {
            bail!(
                "{}: {name} has shape {:?}, the model needs {:?}",
                dir.display(),
                t.size(),
                v.size()
            );
        }
        v.copy_(t);
    }
    save_model(&model, out, kind, DEFAULT_MAX_SHARD_BYTES)
}
