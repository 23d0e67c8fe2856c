//! `atoll checkpoints`: list, verify and fetch the checkpoints of a location (see
//! docs/checkpoint.md).

use anyhow::{anyhow, bail, Result};
use atoll_store::{CheckpointStore, ResumeFrom, StoreOptions};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum CheckpointsCommand {
    /// Every checkpoint folder with its state, file count and size.
    List {
        /// A directory, file://, s3://bucket/prefix, gs://… or az://…
        url: String,
    },
    /// Check every file of every committed checkpoint (or of URL/step-N) against its manifest's
    /// size and sha256; exits non-zero when anything is missing or corrupt.
    Verify {
        /// A checkpoint location, or one checkpoint in it: URL/step-N.
        url: String,
    },
    /// Download one checkpoint (URL/step-N, or URL/latest for the newest intact one) into a
    /// local directory, verifying every file: a Hugging Face model directory plus Atoll's state.
    Fetch { url: String, dir: PathBuf },
}

pub fn run(command: CheckpointsCommand) -> Result<()> {
    match command {
        CheckpointsCommand::List { url } => checkpoints_list(&url),
        CheckpointsCommand::Verify { url } => checkpoints_verify(&url),
        CheckpointsCommand::Fetch { url, dir } => checkpoints_fetch(&url, &dir),
    }
}

fn checkpoints_list(url: &str) -> Result<()> {
    let store = CheckpointStore::open(url, StoreOptions::default())?;
    let listed = atoll_store::block_on(store.list())??;
    if listed.is_empty() {
        println!("no checkpoints in {url}");
        return Ok(());
    }
    println!(
        "{:<14} {:<11} {:>6} {:>12}  kind",
        "checkpoint", "state", "files", "bytes"
    );
    for l in listed {
        match l.manifest {
            Some(m) => println!(
                "{:<14} {:<11} {:>6} {:>12}  {}",
                atoll_store::step_folder(l.step),
                "committed",
                m.files.len(),
                m.total_bytes(),
                m.kind
            ),
            None => println!(
                "{:<14} {:<11} {:>6} {:>12}  (no manifest: never used by --resume)",
                atoll_store::step_folder(l.step),
                "incomplete",
                "-",
                "-"
            ),
        }
    }
    Ok(())
}

fn checkpoints_fetch(url: &str, dir: &Path) -> Result<()> {
    let (location, which) = atoll_store::split_checkpoint_url(url)?;
    let which =
        which.ok_or_else(|| anyhow!("{url}: name a checkpoint, URL/step-N or URL/latest"))?;
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty; fetch into a new directory",
            dir.display()
        );
    }
    let store = CheckpointStore::open(location, StoreOptions::default())?;
    let loaded = atoll_store::block_on(store.load_resume(which))??
        .ok_or_else(|| anyhow!("no intact checkpoint in {location}"))?;
    loaded.write_to(dir)?;
    println!(
        "step-{}: {} files, {} bytes verified and written to {}",
        loaded.manifest.step,
        loaded.files.len(),
        loaded.manifest.total_bytes(),
        dir.display()
    );
    Ok(())
}

fn checkpoints_verify(url: &str) -> Result<()> {
    let (location, only) = atoll_store::split_checkpoint_url(url)?;
    let store = CheckpointStore::open(location, StoreOptions::default())?;
    let steps = match only {
        Some(ResumeFrom::Step(step)) => vec![step],
        Some(ResumeFrom::Latest) => bail!("{url}: verify takes a location or URL/step-N"),
        None => {
            let listed = atoll_store::block_on(store.list())??;
            for l in listed.iter().filter(|l| l.manifest.is_none()) {
                println!(
                    "step-{}: incomplete (no manifest), ignored by --resume",
                    l.step
                );
            }
            let committed: Vec<u64> = listed
                .iter()
                .filter(|l| l.manifest.is_some())
                .map(|l| l.step)
                .collect();
            if committed.is_empty() {
                bail!("no committed checkpoint in {location}");
            }
            committed
        }
    };
    let mut bad = 0;
    for step in steps {
        let problems = atoll_store::block_on(store.verify(step))??;
        if problems.is_empty() {
            println!("step-{step}: ok");
        } else {
            bad += 1;
            for p in problems {
                println!("step-{step}: {p}");
            }
        }
    }
    if bad > 0 {
        bail!("{bad} checkpoint(s) in {location} are missing files or corrupt");
    }
    Ok(())
}
