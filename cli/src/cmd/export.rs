//! `atoll export CHECKPOINT --format hf|gguf|drafter|drafter-gguf --out PATH`: a checkpoint, or
//! its MTP drafter, for local runtimes (transformers, llama.cpp, Ollama). See docs/export.md.

use anyhow::{anyhow, bail, Result};
use atoll_export::{
    gguf_export, hf, parse_quant, resolve, Checkpoint, ExportSummary, GgmlType, PendingOutput,
};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint directory, a run directory (its final/), a step-N folder, or
    /// LOCATION/step-N | LOCATION/latest (a directory, s3://, gs://, az://); manifests are verified.
    /// For the drafter formats also a drafter run or a drafter directory.
    pub checkpoint: String,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output directory (hf, drafter) or file (gguf, drafter-gguf); must not exist yet.
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
    /// A trained Gemma 4 MTP drafter as one GGUF file (llama.cpp's gemma4-assistant), its
    /// target's tokenizer embedded.
    DrafterGguf,
}

impl ExportFormat {
    fn is_gguf(self) -> bool {
        matches!(self, ExportFormat::Gguf | ExportFormat::DrafterGguf)
    }
}

pub fn run(args: ExportArgs) -> Result<()> {
    // Bad arguments fail before anything is read or written.
    let quant = match (&args.quant, args.format.is_gguf()) {
        (Some(q), true) => parse_quant(q)?,
        (Some(_), false) => bail!("--quant applies to --format gguf and drafter-gguf only"),
        (None, _) => parse_quant("f16")?,
    };
    if args.text_only && args.format != ExportFormat::Hf {
        bail!("--text-only applies to --format hf only");
    }
    match args.format {
        ExportFormat::Drafter => export_drafter(&args),
        ExportFormat::DrafterGguf => export_drafter_gguf(&args, quant),
        ExportFormat::Hf | ExportFormat::Gguf => export_weights(&args, quant),
    }
}

/// Resolves `CHECKPOINT` to a local directory the drafter is found from: a local path as it is
/// (a run, checkpoint or drafter directory), a store location downloaded and verified. An
/// existing output is refused first, before anything is read or downloaded.
fn drafter_source(args: &ExportArgs) -> Result<(PathBuf, Option<Checkpoint>)> {
    let scratch_parent = PendingOutput::new(&args.out)?.parent().to_path_buf();
    let local = Path::new(&args.checkpoint);
    if local.exists() {
        return Ok((local.to_path_buf(), None));
    }
    let checkpoint = resolve(&args.checkpoint, &scratch_parent)?;
    Ok((checkpoint.dir.clone(), Some(checkpoint)))
}

fn export_drafter_gguf(args: &ExportArgs, quant: GgmlType) -> Result<()> {
    // A remote checkpoint's download lives as long as `_checkpoint`.
    let (source, _checkpoint) = drafter_source(args)?;
    let dir = atoll_trainer::drafter::export::find_drafter(&source)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .or_else(|| atoll_trainer::drafter::drafter_tokenizer(&dir))
        .ok_or_else(|| {
            anyhow!(
                "{}: no tokenizer.json with the drafter or its run; pass --tokenizer FILE (the target model's)",
                dir.display()
            )
        })?;
    let summary = gguf_export::export_drafter_gguf(&dir, &args.out, quant, &tokenizer)?;
    println!(
        "wrote {} (drafter, {} tensors, {} bytes; tokenizer {})",
        summary.path.display(),
        summary.tensors,
        summary.bytes,
        tokenizer.display()
    );
    Ok(())
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
        bail!("--tokenizer applies to --format hf, gguf and drafter-gguf only");
    }
    let (source, _checkpoint) = drafter_source(args)?;
    let exported = atoll_trainer::drafter::export_drafter(&source, &args.out)?;
    println!(
        "wrote {} (drafter, {} parameters, {} draft tokens per call)",
        exported.out_dir.display(),
        exported.parameters,
        exported.num_assistant_tokens
    );
    Ok(())
}
