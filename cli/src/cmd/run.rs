//! `atoll run`: a whole multi-region job on this machine, a coordinator and one learner process
//! per region.

use super::runtime;
use anyhow::{Context, Result};
use atoll_store::ResumeFrom;
use atoll_trainer::recipe::Recipe;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RunArgs {
    recipe: PathBuf,
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
    /// Continue the job in `run.dir` (default runs/<name>): the coordinator starts from its
    /// checkpoint (`latest` or `step-N`); learners rejoin and receive the global model.
    #[arg(long, value_name = "latest|step-N")]
    resume: Option<ResumeFrom>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let RunArgs {
        recipe: path,
        overrides,
        resume,
    } = args;
    let recipe = Recipe::from_file(&path, &overrides)?;
    let run_dir = super::run_dir(&recipe, resume)?;
    std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;
    let exe = std::env::current_exe().context("locating the atoll executable")?;
    let summary = runtime()?.block_on(atoll_node::launcher::run(
        atoll_node::launcher::LaunchOptions {
            recipe_path: std::fs::canonicalize(&path)?,
            overrides,
            recipe,
            run_dir,
            exe,
            resume: resume.map(|r| match r {
                ResumeFrom::Latest => "latest".to_string(),
                ResumeFrom::Step(n) => format!("step-{n}"),
            }),
        },
    ))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
