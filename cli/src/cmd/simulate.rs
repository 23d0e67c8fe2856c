//! `atoll simulate`: a multi-learner run in one process on a virtual clock.

use anyhow::{Context, Result};
use atoll_trainer::recipe::Recipe;
use atoll_trainer::{logging, train};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SimulateArgs {
    /// Recipe YAML file with a `sync` section.
    recipe: PathBuf,
    /// Override a recipe field, e.g. --set sync.learners=2 (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let SimulateArgs { recipe, overrides } = args;
    let recipe = Recipe::from_file(&recipe, &overrides)?;
    let run_dir = train::fresh_run_dir(&recipe)?;
    logging::log_to_file(&run_dir.join("simulate.log"))
        .with_context(|| format!("cannot write {}", run_dir.join("simulate.log").display()))?;
    tracing::info!("run directory {}", run_dir.display());
    let summary = atoll_trainer::simulate::simulate(&recipe, &run_dir)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
