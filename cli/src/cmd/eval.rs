//! `atoll eval`: measurements of trained models on held-out text.

use anyhow::{anyhow, bail, Context, Result};
use atoll_trainer::checkpoint::{load_model, write_json_atomic};
use atoll_trainer::drafter::eval::{measure_acceptance, AcceptanceStats};
use atoll_trainer::drafter::train::with_base_tokenizer;
use atoll_trainer::drafter::{drafter_recipe, initial_drafter, run_drafter_dir};
use atoll_trainer::models::gemma4_assistant::{self, Gemma4Assistant};
use atoll_trainer::recipe::Recipe;
use atoll_trainer::train::{existing_run_dir, prepare_data, resolve_device};
use atoll_trainer::GemmaModel;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Acceptance rate of an MTP drafter under greedy speculative verification on held-out text,
    /// before training (the run's initial drafter) and after (its final drafter).
    Drafter(DrafterEvalArgs),
}

#[derive(Args)]
pub struct DrafterEvalArgs {
    /// A drafter recipe (its run is run.dir or runs/<name>) or a drafter run directory.
    target: PathBuf,
    /// Override a recipe field (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
    /// Tokens drafted per round (default: model.drafter.num_assistant_tokens).
    #[arg(long)]
    k: Option<usize>,
    /// Held-out windows to take prompts from (the first N of the eval split).
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated after each prompt.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
}

pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Drafter(args) => eval_drafter(&args),
    }
}

fn stats_json(s: &AcceptanceStats) -> serde_json::Value {
    json!({
        "acceptance_rate": s.acceptance_rate(),
        "mean_accepted_per_round": s.mean_accepted_per_round(),
        "drafted": s.drafted,
        "accepted": s.accepted,
        "rounds": s.rounds,
    })
}

fn eval_drafter(args: &DrafterEvalArgs) -> Result<()> {
    if args.prompts == 0 || args.prompt_len == 0 || args.new_tokens == 0 {
        bail!("--prompts, --prompt-len and --new-tokens must be positive");
    }
    let (recipe, run_dir) = if args.target.is_dir() {
        let recipe = Recipe::from_file(&args.target.join("recipe.yaml"), &args.overrides)
            .with_context(|| format!("{}: not a drafter run directory", args.target.display()))?;
        (recipe, args.target.clone())
    } else {
        let recipe = Recipe::from_file(&args.target, &args.overrides)?;
        let dir = existing_run_dir(&recipe).map_err(|_| {
            anyhow!(
                "no run of this recipe yet: train it first with `atoll train {}`",
                args.target.display()
            )
        })?;
        (recipe, dir)
    };
    let (section, base_dir) = drafter_recipe(&recipe)?;
    let k = args.k.unwrap_or(section.num_assistant_tokens.0);
    if k == 0 {
        bail!("--k: expected a positive number of drafted tokens");
    }
    if args.prompt_len > recipe.data.seq_len.0 {
        bail!(
            "--prompt-len {}: longer than the recipe's data.seq_len ({})",
            args.prompt_len,
            recipe.data.seq_len.0
        );
    }
    let device = resolve_device(recipe.train.device)?;
    let base = load_model(base_dir, device, Kind::Float)
        .with_context(|| format!("model.init_from: {}", base_dir.display()))?;
    let mut data_recipe = recipe.clone();
    let run_tokenizer = run_dir.join("tokenizer.json");
    if run_tokenizer.exists() {
        data_recipe.data.tokenizer.path = Some(run_tokenizer);
    }
    let data_recipe = with_base_tokenizer(&data_recipe, base_dir)?;
    let prepared = prepare_data(
        &data_recipe,
        base.config.bos_token_id,
        base.config.eos_token_id,
    )?;
    let count = args.prompts.min(prepared.eval.len());
    let prompts: Vec<Vec<i64>> = (0..count)
        .map(|w| {
            let (x, _) = prepared.eval.batch(&[w], Device::Cpu);
            let row = Vec::<i64>::try_from(x.view([-1]))?;
            Ok(row[..args.prompt_len].to_vec())
        })
        .collect::<Result<_>>()?;

    let trained_dir = run_drafter_dir(&run_dir);
    if !trained_dir.is_dir() {
        bail!(
            "{}: no trained drafter (expected {}); train it with `atoll train` first",
            run_dir.display(),
            trained_dir.display()
        );
    }
    let trained = gemma4_assistant::load(&trained_dir, device)?;
    trained.config.check_target(&base.config)?;
    let fresh = initial_drafter(&recipe, section, &base, device)?;

    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(2 * count as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} prompt {pos}/{len} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let measure = |name: &str, drafter: &Gemma4Assistant, base: &GemmaModel| {
        if let Some(b) = &bar {
            b.set_message(name.to_string());
        }
        measure_acceptance(base, drafter, &prompts, args.new_tokens, k, || {
            if let Some(b) = &bar {
                b.inc(1);
            }
        })
    };
    let before = measure("before training", &fresh, &base)?;
    let after = measure("after training", &trained, &base)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = json!({
        "run": run_dir,
        "base": base_dir,
        "k": k,
        "prompts": count,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "before": stats_json(&before),
        "after": stats_json(&after),
    });
    write_json_atomic(&run_dir.join("drafter_eval.json"), &report)?;
    tracing::info!(
        "acceptance rate {:.3} before training, {:.3} after (k = {k}, {count} held-out prompts); {}",
        before.acceptance_rate(),
        after.acceptance_rate(),
        Path::new(&run_dir).join("drafter_eval.json").display()
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
