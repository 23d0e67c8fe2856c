//! `atoll train`: one learner from a recipe.

use anyhow::{Context, Result};
use atoll_store::ResumeFrom;
use atoll_trainer::recipe::Recipe;
use atoll_trainer::{logging, train};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// Recipe YAML file (see recipes/).
    recipe: PathBuf,
    /// Override a recipe field, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
    /// Continue the run in `run.dir` (default runs/<name>) from a checkpoint of
    /// `checkpoint.url`: `latest` (newest intact) or `step-N`.
    #[arg(long, value_name = "latest|step-N")]
    resume: Option<ResumeFrom>,
    /// Serve Prometheus metrics (loss, tokens, checkpoint stalls) on this address while
    /// training, e.g. 127.0.0.1:9464 (port 0 picks a free one, named in the log).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = Recipe::from_file(&args.recipe, &args.overrides)?;
    let run_dir = super::run_dir(&recipe, args.resume)?;
    logging::log_to_file(&run_dir.join("train.log"))
        .with_context(|| format!("cannot write {}", run_dir.join("train.log").display()))?;
    tracing::info!("run directory {}", run_dir.display());
    let _metrics = super::metrics_endpoint(args.metrics)?;
    let summary = train::train_resumable(&recipe, &run_dir, args.resume)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
