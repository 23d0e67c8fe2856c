//! The checkpoint an export reads: resolving `CHECKPOINT` (a Hugging Face directory, a run
//! directory, a `step-N` folder, or a store location with `/step-N` or `/latest`) with the store's
//! manifest verification, and reading its tensors one at a time straight from the safetensors
//! files (header parsed once, each tensor's bytes read on demand), so an export never holds more
//! than one tensor of the model in memory.

use anyhow::{anyhow, bail, Context, Result};
use atoll_store::{CheckpointStore, ResumeFrom, StoreOptions, MANIFEST};
use atoll_trainer::checkpoint::weight_files;
use serde_json::Value;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A checkpoint directory ready to export, and where its tokenizer is.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// A download of a remote checkpoint, removed when the export ends.
    _scratch: Option<Scratch>,
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_remote(location: &str) -> bool {
    [
        "s3://", "gs://", "az://", "azure://", "abfs://", "https://", "http://",
    ]
    .iter()
    .any(|p| location.starts_with(p))
}

fn local_path(location: &str) -> PathBuf {
    PathBuf::from(location.strip_prefix("file://").unwrap_or(location))
}

/// Checks `step` of the store at `location` against its manifest; the error lists every problem.
fn verify(location: &str, step: u64) -> Result<()> {
    let store = CheckpointStore::open(location, StoreOptions::default())?;
    let problems = atoll_store::block_on(store.verify(step))??;
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "{location}/step-{step} fails verification against its manifest: {}",
            list.join("; ")
        );
    }
    Ok(())
}

/// Resolves `reference` to a verified checkpoint directory. `scratch_parent` receives the
/// download of a remote checkpoint.
pub fn resolve(reference: &str, scratch_parent: &Path) -> Result<Checkpoint> {
    let path = local_path(reference);
    if path.is_dir() {
        if path.join(MANIFEST).exists() {
            // A step-N folder of a local store: verify in place.
            let step = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| {
                    anyhow!(
                        "{}: has a {MANIFEST} but is not a step-N folder",
                        path.display()
                    )
                })?;
            let location = path.parent().unwrap_or(Path::new("."));
            verify(&location.display().to_string(), step)?;
            return Ok(local(path));
        }
        if path.join("config.json").exists() {
            return Ok(local(path));
        }
        if path.join("final").join("config.json").exists() {
            // A run directory: its final checkpoint, with the run's tokenizer.
            let mut ck = local(path.join("final"));
            if ck.tokenizer.is_none() && path.join("tokenizer.json").exists() {
                ck.tokenizer = Some(path.join("tokenizer.json"));
            }
            return Ok(ck);
        }
    }
    let (location, which) = atoll_store::split_checkpoint_url(reference)?;
    let Some(which) = which else {
        bail!(
            "{reference}: not a checkpoint directory (no config.json), run directory (no final/) or LOCATION/step-N | LOCATION/latest"
        );
    };
    if is_remote(location) {
        let store = CheckpointStore::open(location, StoreOptions::default())?;
        let loaded = atoll_store::block_on(store.load_resume(which))??
            .ok_or_else(|| anyhow!("no intact checkpoint in {location}"))?;
        let dir = scratch_parent.join(format!(
            ".atoll-export-step-{}-{}",
            loaded.manifest.step,
            std::process::id()
        ));
        let scratch = Scratch(dir.clone());
        loaded.write_to(&dir)?;
        let mut ck = local(dir);
        ck._scratch = Some(scratch);
        return Ok(ck);
    }
    let root = local_path(location);
    if !root.is_dir() {
        bail!("{location}: no such checkpoint location");
    }
    let step = match which {
        ResumeFrom::Step(step) => {
            verify(location, step)?;
            step
        }
        ResumeFrom::Latest => {
            let store = CheckpointStore::open(location, StoreOptions::default())?;
            let committed = atoll_store::block_on(store.committed())??;
            let mut found = None;
            for step in committed.into_iter().rev() {
                match verify(location, step) {
                    Ok(()) => {
                        found = Some(step);
                        break;
                    }
                    Err(e) => tracing::warn!("skipping: {e:#}"),
                }
            }
            found.ok_or_else(|| anyhow!("no intact checkpoint in {location}"))?
        }
    };
    Ok(local(root.join(atoll_store::step_folder(step))))
}

fn local(dir: PathBuf) -> Checkpoint {
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.exists());
    Checkpoint {
        dir,
        tokenizer,
        _scratch: None,
    }
}

/// One tensor of a safetensors file, located but not read.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// safetensors dtype name: `F32`, `BF16`, `F16`, …
    pub dtype: String,
    pub shape: Vec<usize>,
    pub file: usize,
    /// Absolute byte range in the file.
    pub start: u64,
    pub len: u64,
}

/// The tensors of a checkpoint directory's weight files, read one at a time.
pub struct WeightSource {
    pub files: Vec<PathBuf>,
    handles: Vec<File>,
    pub tensors: Vec<TensorEntry>,
}

impl WeightSource {
    pub fn open(dir: &Path) -> Result<WeightSource> {
        let files = weight_files(dir)?;
        let mut handles = Vec::new();
        let mut tensors = Vec::new();
        for (i, path) in files.iter().enumerate() {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            tensors.extend(read_header(&file, path, i)?);
            handles.push(file);
        }
        Ok(WeightSource {
            files,
            handles,
            tensors,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of one tensor.
    pub fn read(&self, entry: &TensorEntry) -> Result<Vec<u8>> {
        self.read_range(entry, 0, entry.len)
    }

    /// `len` bytes of a tensor from byte `offset` of its data.
    pub fn read_range(&self, entry: &TensorEntry, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_range_into(entry, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// [`read_range`](Self::read_range) into a buffer the caller reuses: a streaming loop then
    /// touches the same pages every step instead of faulting in fresh ones.
    pub fn read_range_into(
        &self,
        entry: &TensorEntry,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        buf.resize(len.min(entry.len.saturating_sub(offset)) as usize, 0);
        self.handles[entry.file]
            .read_exact_at(buf, entry.start + offset)
            .with_context(|| {
                format!(
                    "{}: cannot read tensor {} (is the file truncated?)",
                    self.files[entry.file].display(),
                    entry.name
                )
            })
    }
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Parses a safetensors header: u64 LE length, then JSON `{name: {dtype, shape, data_offsets}}`
/// with offsets relative to the end of the header.
fn read_header(file: &File, path: &Path, index: usize) -> Result<Vec<TensorEntry>> {
    let bad = |what: &str| anyhow!("{}: not a valid safetensors file ({what})", path.display());
    let file_len = file.metadata()?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|_| bad("shorter than its header length"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(bad("header length past the end of the file"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)?;
    let value: Value = serde_json::from_slice(&header).map_err(|_| bad("header is not JSON"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("header is not an object"))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"]
            .as_str()
            .ok_or_else(|| bad(&format!("{name}: no dtype")))?
            .to_string();
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad(&format!("{name}: no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(&format!("{name}: shape is not a list of sizes")))?;
        let offsets = info["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad(&format!("{name}: data_offsets")))?;
        let (begin, end) = offsets;
        let expected = shape.iter().product::<usize>() as u64
            * dtype_size(&dtype).ok_or_else(|| bad(&format!("{name}: dtype {dtype}")))?;
        if end < begin || end - begin != expected || data_start + end > file_len {
            return Err(bad(&format!(
                "{name}: byte range does not match its shape or the file size"
            )));
        }
        out.push(TensorEntry {
            name: name.clone(),
            dtype,
            shape,
            file: index,
            start: data_start + begin,
            len: end - begin,
        });
    }
    out.sort_by_key(|t| t.start);
    Ok(out)
}
