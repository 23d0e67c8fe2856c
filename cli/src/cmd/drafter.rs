//! `atoll drafter`: Gemma 4 MTP drafters outside training (export, numerics probe).
//! Training is `atoll train` with a `model.drafter` recipe section; evaluation `atoll eval drafter`.

use anyhow::{anyhow, bail, Context, Result};
use atoll_trainer::checkpoint::{load_model, write_tensors};
use atoll_trainer::drafter::export_drafter;
use atoll_trainer::models::gemma4_assistant;
use clap::Subcommand;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum DrafterCommand {
    /// Write the drafter of a checkpoint or drafter run in the layout transformers loads as the
    /// assistant model (`Gemma4UnifiedAssistantForCausalLM`); OUT must not exist.
    Export {
        /// A drafter run directory, a checkpoint with a drafter/ directory, or a drafter checkpoint.
        source: PathBuf,
        /// Output directory (written under a temporary name, renamed when complete).
        out: PathBuf,
    },
    /// Numerics probe: the drafter's greedy chain after token ids (the base sees all but the last
    /// id; the last is the newest token), written as f32 `logits` [steps, vocab], `projected`
    /// [steps, backbone] and int64 `tokens` [steps].
    Draft {
        /// The Gemma 4 base (target) checkpoint directory.
        #[arg(long)]
        base: PathBuf,
        /// The drafter checkpoint directory.
        #[arg(long)]
        drafter: PathBuf,
        /// Comma-separated token ids, at least two, e.g. 2,651,1234.
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        ids: Vec<i64>,
        /// Tokens to draft.
        #[arg(long, default_value_t = 4)]
        steps: usize,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(command: DrafterCommand) -> Result<()> {
    match command {
        DrafterCommand::Export { source, out } => {
            let done = export_drafter(&source, &out)?;
            println!("{}", serde_json::to_string_pretty(&done)?);
            Ok(())
        }
        DrafterCommand::Draft {
            base,
            drafter,
            ids,
            steps,
            out,
        } => draft(&base, &drafter, &ids, steps, &out),
    }
}

fn draft(
    base_dir: &std::path::Path,
    drafter_dir: &std::path::Path,
    ids: &[i64],
    steps: usize,
    out: &std::path::Path,
) -> Result<()> {
    if ids.len() < 2 {
        bail!("--ids: give at least two token ids (the base reads all but the last)");
    }
    if steps == 0 {
        bail!("--steps: expected a positive number of tokens to draft");
    }
    let base = load_model(base_dir, Device::Cpu, Kind::Float)
        .with_context(|| format!("--base {}", base_dir.display()))?;
    base.check_ids(ids).map_err(|e| anyhow!("--ids: {e}"))?;
    let drafter = gemma4_assistant::load(drafter_dir, Device::Cpu)
        .with_context(|| format!("--drafter {}", drafter_dir.display()))?;
    drafter.config.check_target(&base.config)?;
    let context = ids.len() as i64 - 1;
    let tokens = Tensor::from_slice(ids).unsqueeze(0);
    let draft = tch::no_grad(|| -> Result<_> {
        let (hidden, kv) = base.hidden_states_and_shared_kv(&tokens.narrow(1, 0, context))?;
        Ok(drafter.draft(
            &base,
            &tokens.narrow(1, context, 1),
            &hidden.narrow(1, context - 1, 1),
            context,
            &kv,
            steps,
        ))
    })?;
    let (logits, projected, drafted) = (
        draft.logits.squeeze_dim(0),
        draft.projected.squeeze_dim(0),
        draft.tokens.squeeze_dim(0),
    );
    write_tensors(
        out,
        &[
            ("logits", &logits),
            ("projected", &projected),
            ("tokens", &drafted),
        ],
    )?;
    println!(
        "drafted {:?} at position {context}; wrote {}",
        Vec::<i64>::try_from(&drafted)?,
        out.display()
    );
    Ok(())
}
