//! Checkpoints in object storage.
//!
//! A checkpoint location is a URL: a local directory (a plain path or `file://`), `s3://bucket/prefix`,
//! `gs://bucket/prefix` or `az://container/prefix`. Every checkpoint is a folder `step-<N>/` of
//! files plus a `manifest.json` listing each file's size and sha256. The manifest is written last
//! and is the commit point: a folder without one (a crash mid-upload) is not a checkpoint, and a
//! file whose size or digest differs from its manifest entry makes the checkpoint corrupt.
//!
//! The store knows nothing about tensors: trainers hand it a [`Snapshot`] of file bytes already
//! copied to host memory, and [`BackgroundWriter`] uploads it on its own thread so training goes
//! on. Large files go up as multipart uploads with bounded concurrency.

mod url;
mod writer;

pub use writer::{BackgroundWriter, WriteOutcome};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "atoll-checkpoint/1";

/// How uploads are cut and retried.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Files above this size go up as multipart uploads in parts of this size (S3's minimum part
    /// is 5 MiB).
    pub part_size: usize,
    /// Parts and files in flight at once.
    pub concurrency: usize,
    /// Retries of a failed request (remote stores only).
    pub max_retries: usize,
    /// Give up on a request after this long, retries included (remote stores only).
    pub retry_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            part_size: 16 << 20,
            concurrency: 8,
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
        }
    }
}

/// One file of a checkpoint, as listed in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    /// Who wrote it: `trainer`, `learner`, `coordinator`.
    pub kind: String,
    pub created_unix_s: u64,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Builds files from data already copied to host memory (serialisation left to the writer).
pub type DeferredFiles = Box<dyn FnOnce() -> Result<Vec<(String, Vec<u8>)>> + Send>;

/// Files copied to host memory at a step boundary, ready to upload. `deferred` builders run on
/// the writer's thread, so a trainer only pays for the copy, and one at a time, each one's files
/// uploaded before the next is built, so that a snapshot of a large model is never all in
/// memory in serialised form at once: give a large snapshot one builder per file.
#[derive(Default)]
pub struct Snapshot {
    pub step: u64,
    pub kind: String,
    pub files: Vec<(String, Bytes)>,
    pub deferred: Vec<DeferredFiles>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("step", &self.step)
            .field("kind", &self.kind)
            .field(
                "files",
                &self.files.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("deferred", &self.deferred.len())
            .finish()
    }
}

impl Snapshot {
    pub fn new(step: u64, kind: &str) -> Self {
        Snapshot {
            step,
            kind: kind.to_string(),
            files: Vec::new(),
            deferred: Vec::new(),
        }
    }

    pub fn defer(
        &mut self,
        build: impl FnOnce() -> Result<Vec<(String, Vec<u8>)>> + Send + 'static,
    ) {
        self.deferred.push(Box::new(build));
    }

    pub fn add(&mut self, path: &str, bytes: impl Into<Bytes>) {
        self.files.push((path.to_string(), bytes.into()));
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// A `step-<N>` folder found in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub step: u64,
    /// None when the folder has no readable manifest: not committed.
    pub manifest: Option<Manifest>,
}

/// A problem found by [`CheckpointStore::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.what)
    }
}

/// Which checkpoint to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest intact checkpoint (corrupt newer ones are skipped with a warning).
    Latest,
    Step(u64),
}

impl std::str::FromStr for ResumeFrom {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "latest" {
            return Ok(ResumeFrom::Latest);
        }
        let digits = s.strip_prefix("step-").unwrap_or(s);
        digits
            .parse()
            .map(ResumeFrom::Step)
            .map_err(|_| anyhow!("--resume {s:?}: expected `latest` or `step-N`"))
    }
}

/// Splits `LOCATION/step-N` or `LOCATION/latest` into the location and the checkpoint; a bare
/// location gives None.
pub fn split_checkpoint_url(url: &str) -> Result<(&str, Option<ResumeFrom>)> {
    let trimmed = url.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((base, last)) if last.starts_with("step-") || last == "latest" => {
            let which = last
                .parse::<ResumeFrom>()
                .map_err(|_| anyhow!("{url}: {last:?} is not step-N"))?;
            Ok((base, Some(which)))
        }
        _ => Ok((trimmed, None)),
    }
}

/// A verified checkpoint read back into memory.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub manifest: Manifest,
    pub files: BTreeMap<String, Bytes>,
}

impl Loaded {
    pub fn file(&self, path: &str) -> Result<&Bytes> {
        self.files
            .get(path)
            .ok_or_else(|| anyhow!("checkpoint step-{} has no {path}", self.manifest.step))
    }

    /// Writes every file under `dir` (for loaders that read directories).
    pub fn write_to(&self, dir: &std::path::Path) -> Result<()> {
        for (path, bytes) in &self.files {
            let target = dir.join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::write(&target, bytes)
                .with_context(|| format!("cannot write {}", target.display()))?;
        }
        Ok(())
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn step_folder(step: u64) -> String {
    format!("step-{step}")
}

fn parse_step_folder(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// A checkpoint location.
#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: ObjPath,
    url: String,
    options: StoreOptions,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckpointStore({})", self.url)
    }
}

impl CheckpointStore {
    /// Opens a location (see the crate docs for URL forms). Remote credentials come from the
    /// standard environment variables of each provider.
    pub fn open(url: &str, options: StoreOptions) -> Result<Self> {
        if options.part_size < 5 << 20 {
            bail!(
                "checkpoint part size {} B is below S3's 5 MiB minimum part",
                options.part_size
            );
        }
        let (store, root) = url::open(url, &options)?;
        Ok(CheckpointStore {
            store,
            root,
            url: url.trim_end_matches('/').to_string(),
            options,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, step: u64, file: &str) -> ObjPath {
        let mut p = self.root.clone().join(step_folder(step));
        for part in file.split('/') {
            p = p.join(part);
        }
        p
    }

    /// Uploads every file of `snapshot`, then its manifest. An existing checkpoint of the same
    /// step is uncommitted first (its manifest deleted) so a reader never sees new files under
    /// an old manifest.
    pub async fn write(&self, snapshot: Snapshot) -> Result<Manifest> {
        let Snapshot {
            step,
            kind,
            files,
            deferred,
        } = snapshot;
        let manifest_path = self.path(step, MANIFEST);
        match self.store.delete(&manifest_path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e).context(format!("{}: uncommitting step-{step}", self.url)),
        }
        let mut entries = self.upload_files(step, files).await?;
        for build in deferred {
            let built = tokio::task::spawn_blocking(build).await??;
            let built = built
                .into_iter()
                .map(|(name, bytes)| (name, Bytes::from(bytes)))
                .collect();
            entries.extend(self.upload_files(step, built).await?);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            step,
            kind,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            files: entries,
        };
        let json = serde_json::to_vec_pretty(&manifest)?;
        self.store
            .put(&manifest_path, PutPayload::from(json))
            .await
            .with_context(|| format!("{}: committing step-{step} (manifest)", self.url))?;
        Ok(manifest)
    }

    /// Uploads files of checkpoint `step` (a few at a time) with their manifest entries.
    async fn upload_files(&self, step: u64, files: Vec<(String, Bytes)>) -> Result<Vec<FileEntry>> {
        let uploads = files.iter().map(|(name, bytes)| async move {
            let sha = {
                let bytes = bytes.clone();
                tokio::task::spawn_blocking(move || sha256_hex(&bytes)).await?
            };
            self.upload(&self.path(step, name), bytes.clone())
                .await
                .with_context(|| format!("{}: uploading step-{step}/{name}", self.url))?;
            Ok::<_, anyhow::Error>(FileEntry {
                path: name.clone(),
                size: bytes.len() as u64,
                sha256: sha,
            })
        });
        futures::stream::iter(uploads)
            .buffered(self.options.concurrency.max(1))
            .try_collect()
            .await
    }

    async fn upload(&self, path: &ObjPath, bytes: Bytes) -> Result<()> {
        if bytes.len() <= self.options.part_size {
            self.store.put(path, PutPayload::from(bytes)).await?;
            return Ok(());
        }
        let upload = self.store.put_multipart(path).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.options.part_size);
        for chunk in bytes.chunks(self.options.part_size) {
            if let Err(e) = writer
                .wait_for_capacity(self.options.concurrency.max(1))
                .await
            {
                let _ = writer.abort().await;
                return Err(e.into());
            }
            writer.put(bytes.slice_ref(chunk));
        }
        writer.finish().await?;
        Ok(())
    }

    /// Every `step-<N>` folder, oldest first, with its manifest when it has a valid one.
    pub async fn list(&self) -> Result<Vec<Listed>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.root))
            .await
            .with_context(|| format!("cannot list {}", self.url))?;
        let mut steps: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(parse_step_folder))
            .collect();
        steps.sort_unstable();
        let mut out = Vec::with_capacity(steps.len());
        for step in steps {
            let manifest = self.manifest(step).await?;
            out.push(Listed { step, manifest });
        }
        Ok(out)
    }

    /// The manifest of `step`, or None when it has none (not committed) or it is unreadable.
    pub async fn manifest(&self, step: u64) -> Result<Option<Manifest>> {
        let bytes = match self.store.get(&self.path(step, MANIFEST)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e).context(format!("{}: reading step-{step}", self.url)),
        };
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) if m.format == FORMAT && m.step == step => Ok(Some(m)),
            Ok(m) => {
                tracing::warn!(
                    "{}/step-{step}/{MANIFEST}: format {:?} step {} does not match; ignoring",
                    self.url,
                    m.format,
                    m.step
                );
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(
                    "{}/step-{step}/{MANIFEST}: unreadable ({e}); ignoring",
                    self.url
                );
                Ok(None)
            }
        }
    }

    /// Committed steps, oldest first.
    pub async fn committed(&self) -> Result<Vec<u64>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|l| l.manifest.is_some())
            .map(|l| l.step)
            .collect())
    }

    /// Reads every file of `step` and checks it against the manifest; the error names the first
    /// missing or corrupt file.
    pub async fn load(&self, step: u64) -> Result<Loaded> {
        let manifest = self.manifest(step).await?.ok_or_else(|| {
            anyhow!(
                "{}/step-{step} is not a committed checkpoint (no valid {MANIFEST})",
                self.url
            )
        })?;
        let reads = manifest.files.iter().map(|entry| async move {
            let path = self.path(step, &entry.path);
            let bytes = match self.store.get(&path).await {
                Ok(r) => r.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => {
                    bail!("{}/step-{step}/{}: missing", self.url, entry.path)
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(what) = mismatch(entry, &bytes).await? {
                bail!("{}/step-{step}/{}: {what}", self.url, entry.path);
            }
            Ok((entry.path.clone(), bytes))
        });
        let files = futures::stream::iter(reads)
            .buffered(self.options.concurrency.max(1))
            .try_collect()
            .await?;
        Ok(Loaded { manifest, files })
    }

    /// Loads the requested checkpoint. `Latest` walks back from the newest committed step past
    /// corrupt ones, warning with the bad file; None when there is no checkpoint at all.
    pub async fn load_resume(&self, from: ResumeFrom) -> Result<Option<Loaded>> {
        match from {
            ResumeFrom::Step(step) => self.load(step).await.map(Some),
            ResumeFrom::Latest => {
                for step in self.committed().await?.into_iter().rev() {
                    match self.load(step).await {
                        Ok(loaded) => return Ok(Some(loaded)),
                        Err(e) => tracing::warn!(
                            "skipping checkpoint step-{step}: {e:#}; falling back to an older one"
                        ),
                    }
                }
                Ok(None)
            }
        }
    }

    /// Every problem with `step`: no manifest, missing files, wrong sizes or digests.
    pub async fn verify(&self, step: u64) -> Result<Vec<Problem>> {
        let Some(manifest) = self.manifest(step).await? else {
            return Ok(vec![Problem {
                file: MANIFEST.into(),
                what: "missing or invalid: the checkpoint was never committed".into(),
            }]);
        };
        let mut problems = Vec::new();
        for entry in &manifest.files {
            match self.store.get(&self.path(step, &entry.path)).await {
                Ok(r) => {
                    let bytes = r.bytes().await?;
                    if let Some(what) = mismatch(entry, &bytes).await? {
                        problems.push(Problem {
                            file: entry.path.clone(),
                            what,
                        });
                    }
                }
                Err(object_store::Error::NotFound { .. }) => problems.push(Problem {
                    file: entry.path.clone(),
                    what: "missing".into(),
                }),
                Err(e) => return Err(e).context(format!("{}: reading step-{step}", self.url)),
            }
        }
        Ok(problems)
    }

    /// Deletes what retention no longer keeps: committed checkpoints other than the newest
    /// `keep_last` and those whose step is a multiple of `keep_every`, and uncommitted folders
    /// older than the newest committed one (left by crashes). Returns the deleted steps.
    pub async fn apply_retention(
        &self,
        keep_last: usize,
        keep_every: Option<u64>,
    ) -> Result<Vec<u64>> {
        let listed = self.list().await?;
        let committed: Vec<u64> = listed
            .iter()
            .filter(|l| l.manifest.is_some())
            .map(|l| l.step)
            .collect();
        let Some(&newest) = committed.last() else {
            return Ok(Vec::new());
        };
        let recent: Vec<u64> = committed
            .iter()
            .rev()
            .take(keep_last.max(1))
            .copied()
            .collect();
        let keep = |step: u64| {
            recent.contains(&step) || keep_every.is_some_and(|k| k > 0 && step.is_multiple_of(k))
        };
        let mut deleted = Vec::new();
        for l in &listed {
            let stale_partial = l.manifest.is_none() && l.step < newest;
            let retired = l.manifest.is_some() && !keep(l.step);
            if stale_partial || retired {
                self.delete(l.step).await?;
                deleted.push(l.step);
            }
        }
        Ok(deleted)
    }

    /// Removes a checkpoint, manifest first so it stops existing before its files go.
    pub async fn delete(&self, step: u64) -> Result<()> {
        match self.store.delete(&self.path(step, MANIFEST)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e).context(format!("{}: deleting step-{step}", self.url)),
        }
        let folder = self.root.clone().join(step_folder(step));
        let files: Vec<ObjPath> = self
            .store
            .list(Some(&folder))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for file in files {
            match self.store.delete(&file).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e).context(format!("{}: deleting {file}", self.url)),
            }
        }
        Ok(())
    }
}

async fn mismatch(entry: &FileEntry, bytes: &Bytes) -> Result<Option<String>> {
    if bytes.len() as u64 != entry.size {
        return Ok(Some(format!(
            "size {} B, the manifest says {} B",
            bytes.len(),
            entry.size
        )));
    }
    let bytes = bytes.clone();
    let sha = tokio::task::spawn_blocking(move || sha256_hex(&bytes)).await?;
    Ok((sha != entry.sha256).then(|| format!("sha256 {sha}, the manifest says {}", entry.sha256)))
}

/// Runs one store operation to completion from synchronous code (the CLI, the trainer's
/// resume): a small runtime of its own, since callers are not inside tokio.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the storage runtime")?;
    Ok(rt.block_on(f))
}
