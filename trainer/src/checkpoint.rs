//! Hugging Face checkpoint directories: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Reads the `model.` (text-only) and `model.language_model.` /
//! `language_model.model.` (multimodal) name prefixes, f32/bf16/f16.
//!
//! Nothing is silently lost: a model loaded from a checkpoint keeps a [`Passthrough`] of what Atoll
//! does not train (vision tower, projector, vision/audio embedders, an assistant/drafter, the
//! original `config.json` and `generation_config.json`), and every save writes it back bit for
//! bit, with the text stack under the source's own name prefix, so a multimodal checkpoint stays
//! loadable as its original class. Models built from a preset save the text-only layout.

use crate::config::GemmaConfig;
use crate::models::GemmaModel;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Shard size when saving, as transformers' default `max_shard_size` of 5 GB.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Maps a checkpoint tensor name to Atoll's text-stack name, or None for tensors outside the text
/// stack (vision tower, audio/vision embedders, projectors).
fn canonical_name(name: &str, multimodal: bool) -> Option<String> {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return Some(format!("model.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return Some(format!("model.{rest}"));
    }
    if name == "language_model.lm_head.weight" || name == "lm_head.weight" {
        return Some("lm_head.weight".to_string());
    }
    if !multimodal && name.starts_with("model.") {
        return Some(name.to_string());
    }
    None
}

/// How a checkpoint names its text stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// `model.layers.…`, `lm_head.weight` (`Gemma3ForCausalLM`, `Gemma4UnifiedForCausalLM`).
    TextOnly,
    /// `model.language_model.layers.…`, `lm_head.weight` (transformers v5 in memory, Gemma 4 files).
    Multimodal,
    /// `language_model.model.layers.…`, `language_model.lm_head.weight` (released Gemma 3 files;
    /// what transformers 5 writes for `Gemma3ForConditionalGeneration`).
    LegacyMultimodal,
}

impl TextLayout {
    /// The layout of a checkpoint holding these tensor names.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> TextLayout {
        let mut layout = TextLayout::TextOnly;
        for n in names {
            if n.starts_with("model.language_model.") {
                return TextLayout::Multimodal;
            }
            if n.starts_with("language_model.model.") {
                layout = TextLayout::LegacyMultimodal;
            }
        }
        layout
    }

    /// Atoll's name (`model.…`, `lm_head.weight`) of a checkpoint tensor, or None outside the
    /// text stack.
    pub fn canonical(self, name: &str) -> Option<String> {
        canonical_name(name, self != TextLayout::TextOnly)
    }

    /// The checkpoint name of an Atoll text-stack tensor in this layout.
    pub fn stored_name(self, canonical: &str) -> String {
        if canonical == "lm_head.weight" {
            let name = match self {
                TextLayout::LegacyMultimodal => "language_model.lm_head.weight",
                _ => "lm_head.weight",
            };
            return name.to_string();
        }
        match (self, canonical.strip_prefix("model.")) {
            (TextLayout::Multimodal, Some(rest)) => format!("model.language_model.{rest}"),
            (TextLayout::LegacyMultimodal, Some(rest)) => format!("language_model.model.{rest}"),
            _ => canonical.to_string(),
        }
    }
}

/// Small side files of a checkpoint directory carried through saves unchanged.
pub const SIDE_FILES: [&str; 3] = [
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// What a loaded checkpoint holds besides the tensors Atoll trains, written back by every save.
pub struct Passthrough {
    /// The source `config.json`, written back with every field (only `dtype` follows the saved
    /// text weights).
    pub config: Value,
    pub layout: TextLayout,
    /// Tensors outside the text stack, bit for bit, in source order.
    pub tensors: Vec<HostTensor>,
    /// [`SIDE_FILES`] present in the source directory.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Passthrough {
    /// Reads the untrained part of checkpoint directory `dir`.
    pub fn read(dir: &Path) -> Result<Passthrough> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let mut tensors = Vec::new();
        let maps = weight_files(dir)?
            .into_iter()
            .map(|p| map_file(&p).map(|m| (p, m)))
            .collect::<Result<Vec<_>>>()?;
        let mut parsed = Vec::with_capacity(maps.len());
        for (path, map) in &maps {
            let st = SafeTensors::deserialize(map)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
            parsed.push(st);
        }
        let names: Vec<String> = parsed
            .iter()
            .flat_map(|st| st.names().into_iter().map(str::to_string))
            .collect();
        let layout = TextLayout::detect(names.iter().map(String::as_str));
        for st in &parsed {
            let mut views = st.tensors();
            views.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, view) in views {
                if layout.canonical(&name).is_some() {
                    continue;
                }
                tensors.push(HostTensor {
                    name,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                });
            }
        }
        let mut files = Vec::new();
        for name in SIDE_FILES {
            let path = dir.join(name);
            if path.exists() {
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                files.push((name.to_string(), bytes));
            }
        }
        Ok(Passthrough {
            config,
            layout,
            tensors,
            files,
        })
    }

    /// The `config.json` to write with a model of `config` saved in `kind`: the source's, unless
    /// the model no longer matches it (then Atoll's own, nested as the source nests it).
    fn config_for(&self, config: &GemmaConfig, kind: Kind) -> Value {
        let mut out = self.config.clone();
        let matches = GemmaConfig::from_hf_json(&self.config).is_ok_and(|c| &c == config);
        if !matches {
            tracing::warn!(
                "the model's config differs from its source config.json; writing Atoll's text config"
            );
            let mut text = config.to_hf_json();
            match out.get_mut("text_config") {
                Some(slot) => {
                    if let Some(obj) = text.as_object_mut() {
                        obj.remove("architectures");
                    }
                    *slot = text;
                }
                None => out = text,
            }
        }
        if let Some(obj) = out.as_object_mut() {
            obj.remove("torch_dtype");
            obj.insert("dtype".into(), json!(hf_dtype_name(kind)));
        }
        out
    }
}

pub fn kind_from_dtype(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

pub fn dtype_from_kind(kind: Kind) -> Result<Dtype> {
    match kind {
        Kind::Float => Ok(Dtype::F32),
        Kind::BFloat16 => Ok(Dtype::BF16),
        Kind::Half => Ok(Dtype::F16),
        Kind::Double => Ok(Dtype::F64),
        other => bail!("cannot store dtype {other:?} in safetensors here"),
    }
}

fn hf_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// The weight files of a checkpoint directory, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?;
        let index: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: missing `weight_map` object", index_path.display()))?;
        let mut files: Vec<String> = map
            .values()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map values must be file names",
                        index_path.display()
                    )
                })
            })
            .collect::<Result<HashSet<_>>>()?
            .into_iter()
            .collect();
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                bail!(
                    "shard {} listed in {} is missing",
                    p.display(),
                    index_path.display()
                );
            }
        }
        return Ok(paths);
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no {SINGLE_FILE} or {INDEX_FILE} found (is this a Hugging Face checkpoint directory?)",
        dir.display()
    )
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is read-only and lives only while this load runs; a concurrent writer
    // truncating the file is the same hazard every safetensors reader accepts.
    unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
}

/// Loads a Hugging Face checkpoint directory into a new model on `device` with parameters of `kind`.
/// The model keeps the checkpoint's untrained tensors and config ([`Passthrough`]) for its saves.
pub fn load_model(dir: &Path, device: Device, kind: Kind) -> Result<GemmaModel> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let config = GemmaConfig::from_file(&dir.join("config.json"))?;
    let mut model = GemmaModel::new(config, device, kind)?;
    load_weights_into(&model, dir)?;
    model.passthrough = Some(Arc::new(Passthrough::read(dir)?));
    Ok(model)
}

/// Overwrites every variable of `model` with the tensors stored in `dir`.
pub fn load_weights_into(model: &GemmaModel, dir: &Path) -> Result<()> {
    let files = weight_files(dir)?;
    let mut vars: HashMap<String, Tensor> = model.vs.variables().into_iter().collect();
    let tied = model.config.tie_word_embeddings;
    let mut filled: HashSet<String> = HashSet::new();
    let mut skipped_non_text = 0usize;

    let maps = files
        .iter()
        .map(|p| map_file(p).map(|m| (p, m)))
        .collect::<Result<Vec<_>>>()?;
    let parsed = maps
        .iter()
        .map(|(p, m)| {
            SafeTensors::deserialize(m).map(|st| (p, st)).map_err(|e| {
                anyhow!(
                    "{}: not a valid safetensors file ({e}); is it truncated?",
                    p.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let multimodal = parsed.iter().any(|(_, st)| {
        st.names().iter().any(|n| {
            n.starts_with("model.language_model.") || n.starts_with("language_model.model.")
        })
    });

    let _guard = tch::no_grad_guard();
    for (path, st) in &parsed {
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0)); // deterministic error messages
        for (name, view) in tensors {
            let Some(canonical) = canonical_name(&name, multimodal) else {
                skipped_non_text += 1;
                continue;
            };
            if canonical == "lm_head.weight" && tied {
                continue; // some writers store the tied head anyway; the embedding is the source of truth
            }
            let Some(var) = vars.get_mut(&canonical) else {
                bail!(
                    "{}: unexpected tensor `{name}`: not part of a {} model with this config.json",
                    path.display(),
                    model.config.architecture.name()
                );
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                bail!(
                    "{}: tensor `{name}` has shape {:?} but config.json implies {:?}",
                    path.display(),
                    shape,
                    var.size()
                );
            }
            let src_kind = kind_from_dtype(view.dtype()).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}` has unsupported dtype {:?}",
                    path.display(),
                    view.dtype()
                )
            })?;
            let src = Tensor::from_data_size(view.data(), &shape, src_kind);
            var.copy_(&src.to_device(var.device()).to_kind(var.kind()));
            filled.insert(canonical);
        }
    }
    let mut missing: Vec<&String> = vars.keys().filter(|k| !filled.contains(*k)).collect();
    if !missing.is_empty() {
        missing.sort();
        let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{}: {} tensor(s) missing from the checkpoint, e.g. {}",
            dir.display(),
            missing.len(),
            shown.join(", ")
        );
    }
    if skipped_non_text > 0 {
        tracing::info!(
            "{}: {skipped_non_text} tensors outside the text stack (vision/audio front ends) are kept as they are",
            dir.display()
        );
    }
    Ok(())
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, numel);
    buf
}

/// Writes `model` as a Hugging Face checkpoint directory with weights in `kind`: one
/// `model.safetensors`, or shards plus an index when larger than `max_shard_bytes`.
/// Files are written under temporary names and renamed, so a crash never leaves a half file
/// under a real name.
pub fn save_model(model: &GemmaModel, dir: &Path, kind: Kind, max_shard_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = model_files(model, kind, max_shard_bytes)?;
    for (name, bytes) in &files {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    }
    if !files.iter().any(|(name, _)| name == INDEX_FILE) && dir.join(INDEX_FILE).exists() {
        std::fs::remove_file(dir.join(INDEX_FILE))?;
    }
    Ok(())
}

/// A tensor copied to host memory, ready to serialise.
pub struct HostTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    pub fn copy_of(name: &str, t: &Tensor) -> Result<HostTensor> {
        let dtype = match t.kind() {
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            k => dtype_from_kind(k)?,
        };
        Ok(HostTensor {
            name: name.to_string(),
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            bytes: tensor_bytes(t),
        })
    }
}

/// Serialises host tensors as one safetensors file.
pub fn serialize_host(
    tensors: &[HostTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    serialize_host_refs(&tensors.iter().collect::<Vec<_>>(), metadata)
}

fn serialize_host_refs(
    tensors: &[&HostTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|t| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| anyhow!("cannot serialise {}: {e}", t.name))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata).map_err(|e| anyhow!("cannot serialise tensors: {e}"))
}

/// One of a tensor's values held elsewhere and shared: `values[index]`, in f32 (a fragment of
/// the coordinator's Θ, say).
pub type SharedTensor = (atoll_coordinator::FragmentValues, usize);

/// A text-stack tensor of a [`HostModel`]: bytes copied from the model, or shared f32 values
/// converted to the checkpoint's dtype (`kind`) only when their shard is built.
enum HostData {
    Copied(Vec<u8>),
    Shared { values: SharedTensor, kind: Kind },
}

/// [`HostTensor`] whose bytes may still be shared values.
struct HostSource {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: HostData,
}

impl HostSource {
    fn into_host_tensor(self) -> Result<HostTensor> {
        let HostSource {
            name,
            dtype,
            shape,
            data,
        } = self;
        let bytes = match data {
            HostData::Copied(bytes) => bytes,
            HostData::Shared {
                values: (values, index),
                kind,
            } => {
                let v = values
                    .get(index)
                    .ok_or_else(|| anyhow!("internal: no shared values for {name}"))?;
                if v.len() != shape.iter().product::<usize>() {
                    bail!(
                        "internal: {name} has {} shared values for shape {shape:?}",
                        v.len()
                    );
                }
                // The same conversion as the model's own tensors take (tch's round to nearest
                // even), so a checkpoint of shared values equals one of a model holding them.
                match kind {
                    Kind::Float => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    _ => tensor_bytes(&Tensor::from_slice(v).to_kind(kind)),
                }
            }
        };
        Ok(HostTensor {
            name,
            dtype,
            shape,
            bytes,
        })
    }
}

/// A Hugging Face checkpoint of a model copied to host memory, not yet serialised: taking it
/// is the only part of a checkpoint the training loop waits for.
pub struct HostModel {
    /// Per shard: the text-stack tensors (copied from the model, or shared), then indices into
    /// the passthrough's tensors (shared, not copied).
    shards: Vec<(String, Vec<HostSource>, Vec<usize>)>,
    index: Option<Value>,
    config: Value,
    passthrough: Option<Arc<Passthrough>>,
}

impl HostModel {
    /// Copies `model`'s weights (in `kind`, sharded above `max_shard_bytes`) and config.
    pub fn copy_of(model: &GemmaModel, kind: Kind, max_shard_bytes: u64) -> Result<HostModel> {
        Self::sharing(model, kind, max_shard_bytes, &|_| None)
    }

    /// [`HostModel::copy_of`], except that a tensor for which `shared` has values (f32, by the
    /// model's tensor name) takes them instead of the model's, without a copy until its shard is
    /// built. The coordinator checkpoints Θ this way: its fragments are already shared with the
    /// syncer, so a checkpoint holds no second copy of the model.
    pub fn sharing(
        model: &GemmaModel,
        kind: Kind,
        max_shard_bytes: u64,
        shared: &dyn Fn(&str) -> Option<SharedTensor>,
    ) -> Result<HostModel> {
        let dtype = dtype_from_kind(kind)?;
        let vars: HashMap<String, Tensor> = model.vs.variables().into_iter().collect();
        let passthrough = model.passthrough.clone();
        let layout = passthrough
            .as_ref()
            .map_or(TextLayout::TextOnly, |p| p.layout);
        let mut shards: Vec<(Vec<HostSource>, Vec<usize>)> = vec![(Vec::new(), Vec::new())];
        let (mut shard_bytes, mut total_bytes) = (0u64, 0u64);
        let mut place = |n: u64, shards: &mut Vec<(Vec<HostSource>, Vec<usize>)>| {
            if shard_bytes > 0 && shard_bytes + n > max_shard_bytes {
                shards.push((Vec::new(), Vec::new()));
                shard_bytes = 0;
            }
            shard_bytes += n;
            total_bytes += n;
        };
        for spec in model.config.tensor_specs() {
            let name = layout.stored_name(&spec.name);
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            let data = match shared(&spec.name) {
                Some(values) => HostData::Shared { values, kind },
                None => {
                    let var = vars
                        .get(&spec.name)
                        .ok_or_else(|| anyhow!("internal: model lacks variable {}", spec.name))?;
                    HostData::Copied(tensor_bytes(&var.to_kind(kind)))
                }
            };
            let source = HostSource {
                name,
                dtype,
                shape,
                data,
            };
            let numel: u64 = spec.shape.iter().map(|&d| d as u64).product();
            place(numel * kind.elt_size_in_bytes() as u64, &mut shards);
            shards
                .last_mut()
                .expect("at least one shard")
                .0
                .push(source);
        }
        if let Some(p) = &passthrough {
            for (i, t) in p.tensors.iter().enumerate() {
                place(t.bytes.len() as u64, &mut shards);
                shards.last_mut().expect("at least one shard").1.push(i);
            }
        }
        let count = shards.len();
        let shards: Vec<(String, Vec<HostSource>, Vec<usize>)> = shards
            .into_iter()
            .enumerate()
            .map(|(i, (own, kept))| {
                let name = if count == 1 {
                    SINGLE_FILE.to_string()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
                };
                (name, own, kept)
            })
            .collect();
        let index = (count > 1).then(|| {
            let mut weight_map: BTreeMap<&str, &str> = BTreeMap::new();
            for (file, own, kept) in &shards {
                for t in own {
                    weight_map.insert(t.name.as_str(), file.as_str());
                }
                if let Some(p) = &passthrough {
                    for &i in kept {
                        weight_map.insert(p.tensors[i].name.as_str(), file.as_str());
                    }
                }
            }
            let kept_parameters: u64 = passthrough.as_ref().map_or(0, |p| {
                p.tensors
                    .iter()
                    .map(|t| t.shape.iter().product::<usize>() as u64)
                    .sum()
            });
            json!({
                "metadata": {
                    "total_size": total_bytes,
                    "total_parameters": model.config.num_parameters() + kept_parameters,
                },
                "weight_map": weight_map,
            })
        });
        let config = match &passthrough {
            Some(p) => p.config_for(&model.config, kind),
            None => {
                let mut config = model.config.to_hf_json();
                config["dtype"] = json!(hf_dtype_name(kind));
                config
            }
        };
        Ok(HostModel {
            shards,
            index,
            config,
            passthrough,
        })
    }

    /// The checkpoint's files: weight shards, the index when sharded, `config.json`.
    pub fn into_files(self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for build in self.into_builders() {
            files.extend(build()?);
        }
        Ok(files)
    }

    /// [`HostModel::into_files`] as one builder per weight shard and one for the small files, in
    /// that order: a checkpoint writer that uploads each builder's files before it runs the next
    /// holds one serialised shard at a time, and each shard's host copy only until it is built.
    pub fn into_builders(self) -> Vec<atoll_store::DeferredFiles> {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let HostModel {
            shards,
            index,
            config,
            passthrough,
        } = self;
        let mut builders: Vec<atoll_store::DeferredFiles> = Vec::with_capacity(shards.len() + 1);
        for (name, own, kept) in shards {
            let (passthrough, metadata) = (passthrough.clone(), metadata.clone());
            builders.push(Box::new(move || {
                let own = own
                    .into_iter()
                    .map(HostSource::into_host_tensor)
                    .collect::<Result<Vec<_>>>()?;
                let kept: Vec<&HostTensor> = match &passthrough {
                    Some(p) => kept.iter().map(|&i| &p.tensors[i]).collect(),
                    None => Vec::new(),
                };
                let all: Vec<&HostTensor> = own.iter().chain(kept).collect();
                Ok(vec![(name, serialize_host_refs(&all, Some(metadata))?)])
            }));
        }
        builders.push(Box::new(move || {
            let mut files = Vec::new();
            if let Some(index) = &index {
                files.push((INDEX_FILE.to_string(), pretty_json(index)?));
            }
            files.push(("config.json".to_string(), pretty_json(&config)?));
            if let Some(p) = &passthrough {
                files.extend(p.files.iter().cloned());
            }
            Ok(files)
        }));
        builders
    }
}

/// The files of a Hugging Face checkpoint of `model`, serialised in memory.
pub fn model_files(
    model: &GemmaModel,
    kind: Kind,
    max_shard_bytes: u64,
) -> Result<Vec<(String, Vec<u8>)>> {
    HostModel::copy_of(model, kind, max_shard_bytes)?.into_files()
}

fn pretty_json(value: &Value) -> Result<Vec<u8>> {
    Ok((serde_json::to_string_pretty(value)? + "\n").into_bytes())
}

pub fn write_json_atomic(path: &Path, value: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, pretty_json(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Writes named tensors to a safetensors file (used by `atoll logits`).
pub fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let bytes = tensors_to_bytes(tensors)?;
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Serialises named tensors (any device, f32/bf16/f16/f64/i64/i32) as a safetensors file in
/// memory.
pub fn tensors_to_bytes(tensors: &[(&str, &Tensor)]) -> Result<Vec<u8>> {
    let host = tensors
        .iter()
        .map(|(name, t)| HostTensor::copy_of(name, t))
        .collect::<Result<Vec<_>>>()?;
    serialize_host(&host, None)
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let map = map_file(path)?;
    tensors_from_bytes(&map, &path.display().to_string())
}

/// Parses a safetensors file held in memory; `what` names it in errors.
pub fn tensors_from_bytes(bytes: &[u8], what: &str) -> Result<Vec<(String, Tensor)>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{what}: not a valid safetensors file ({e})"))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let kind = match view.dtype() {
                Dtype::I64 => Kind::Int64,
                Dtype::I32 => Kind::Int,
                d => {
                    kind_from_dtype(d).ok_or_else(|| anyhow!("{what}: unsupported dtype {d:?}"))?
                }
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            Ok((name, Tensor::from_data_size(view.data(), &shape, kind)))
        })
        .collect()
}
