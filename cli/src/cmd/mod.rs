//! One file per `atoll` subcommand family: its arguments and what it does. `main.rs` holds only
//! the command tree and the dispatch.

pub mod bench;
pub mod checkpoints;
pub mod coordinator;
pub mod deploy;
pub mod drafter;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod learner;
pub mod link_emulator;
pub mod logits;
pub mod model;
pub mod plan;
pub mod run;
pub mod simulate;
pub mod status;
pub mod train;

use anyhow::{Context, Result};
use atoll_store::ResumeFrom;
use atoll_trainer::logging;
use atoll_trainer::recipe::Recipe;
use atoll_trainer::train::{existing_run_dir, fresh_run_dir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The async runtime of the commands that talk to the network.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `--metrics ADDR` of `train` and `finetune`: serves the Prometheus metrics (loss, tokens,
/// checkpoint stalls) on ADDR while the returned runtime lives; port 0 picks a free one, which
/// the log names.
pub fn metrics_endpoint(addr: Option<SocketAddr>) -> Result<Option<tokio::runtime::Runtime>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("atoll-metrics")
        .enable_io()
        .build()?;
    let bound = runtime.block_on(atoll_node::metrics_endpoint::serve(addr, &[]))?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(Some(runtime))
}

/// What the coordinator and learner commands share: the recipe, the job secret, the run
/// directory and its log file.
pub fn node_process(
    recipe: &Path,
    overrides: &[String],
    secret_file: Option<&Path>,
    run_dir: &Path,
    log: Option<&str>,
) -> Result<(Recipe, String)> {
    let recipe = Recipe::from_file(recipe, overrides)?;
    let secret = atoll_node::resolve_secret(recipe.sync.secret.as_deref(), secret_file)?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    if let Some(log) = log {
        logging::log_to_file(&run_dir.join(log))?;
    }
    Ok((recipe, secret))
}

/// The run directory of `train` and `run`: the recipe's existing one to continue under
/// `--resume`, else a fresh one.
pub fn run_dir(recipe: &Recipe, resume: Option<ResumeFrom>) -> Result<PathBuf> {
    match resume {
        Some(_) => existing_run_dir(recipe),
        None => fresh_run_dir(recipe),
    }
}
