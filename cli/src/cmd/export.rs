//! `atoll export CHECKPOINT --format hf|gguf --out PATH`: a checkpoint for local runtimes
//! (transformers, llama.cpp, Ollama). See docs/export.md.

use anyhow::{bail, Result};
use atoll_export::{gguf_export, hf, parse_quant, resolve, ExportSummary, GgmlType, PendingOutput};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint directory, a run directory (its final/), a step-N folder, or
    /// LOCATION/step-N | LOCATION/latest (a directory, s3://, gs://, az://); manifests are verified.
    pub checkpoint: String,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output directory (hf) or file (gguf); must not exist yet.
    #[arg(long)]
    pub out: PathBuf,
    /// GGUF weight type: f32, f16, bf16, q8_0, q4_0 (norms stay f32). Default f16.
    #[arg(long)]
    pub quant: Option<String>,
    /// tokenizer.json to embed or copy, when the checkpoint has none or another is wanted.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// hf: only the text stack, as the text-only class (Gemma3ForCausalLM, Gemma4UnifiedForCausalLM).
    #[arg(long)]
    pub text_only: bool,
}

/// Adding a format is one variant here and one arm in [`run`].
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face directory (transformers, vLLM, SGLang); multimodal parts kept.
    Hf,
    /// One GGUF file (llama.cpp, Ollama, LM Studio): Gemma 3 or 4 text stack plus tokenizer.
    Gguf,
    /// A trained Gemma 4 MTP drafter as transformers' assistant model (docs/drafter.md).
    Drafter,
}

pub fn run(args: ExportArgs) -> Result<()> {
    // Bad arguments fail before anything is read or written.
    let quant = match (&args.quant, args.format) {
        (Some(q), ExportFormat::Gguf) => parse_quant(q)?,
        (None, ExportFormat::Gguf) => parse_quant("f16")?,
        (Some(_), _) => bail!("--quant applies to --format gguf only"),
        (None, _) => parse_quant("f16")?,
    };
    if args.text_only && args.format != ExportFormat::Hf {
        bail!("--text-only applies to --format hf only");
    }
    match args.format {
        ExportFormat::Drafter => export_drafter(&args),
        ExportFormat::Hf | ExportFormat::Gguf => export_weights(&args, quant),
    }
}

/// The HF and GGUF formats, from a resolved (and verified) checkpoint.
fn export_weights(args: &ExportArgs, quant: GgmlType) -> Result<()> {
    // Checks the output path before a remote checkpoint is downloaded.
    let scratch_parent = PendingOutput::new(&args.out)?.parent().to_path_buf();
    let checkpoint = resolve(&args.checkpoint, &scratch_parent)?;
    let tokenizer = args.tokenizer.as_deref();
    let summary: ExportSummary = if args.format == ExportFormat::Hf {
        hf::export_hf(&checkpoint, &args.out, tokenizer, args.text_only)?
    } else {
        gguf_export::export_gguf(&checkpoint, &args.out, quant, tokenizer)?
    };
    println!(
        "wrote {} ({} tensors, {} bytes)",
        summary.path.display(),
        summary.tensors,
        summary.bytes
    );
    Ok(())
}

/// A drafter run keeps its drafter under final/drafter/, which `export_drafter` finds from the
/// run, checkpoint or drafter directory itself, so a local path is passed as it is.
fn export_drafter(args: &ExportArgs) -> Result<()> {
    if args.tokenizer.is_some() {
        bail!("--tokenizer applies to --format hf and gguf only");
    }
    // A drafter run keeps its drafter under final/drafter/, which export_drafter finds
    // from the run, checkpoint or drafter directory itself.
    let local = Path::new(&args.checkpoint);
    let exported = if local.exists() {
        atoll_trainer::drafter::export_drafter(local, &args.out)?
    } else {
        let scratch_parent = PendingOutput::new(&args.out)?.parent().to_path_buf();
        let checkpoint = resolve(&args.checkpoint, &scratch_parent)?;
        atoll_trainer::drafter::export_drafter(&checkpoint.dir, &args.out)?
    };
    println!(
        "wrote {} (drafter, {} parameters, {} draft tokens per call)",
        exported.out_dir.display(),
        exported.parameters,
        exported.num_assistant_tokens
    );
    Ok(())
}
