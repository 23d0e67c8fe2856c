//! Writing checkpoints for local runtimes (`atoll export`): full Hugging Face directories
//! ([`hf`]) and GGUF files for llama.cpp / Ollama ([`gguf_export`]), streamed tensor by tensor
//! from the checkpoint's safetensors files. Every export writes under a temporary name next to
//! the output and renames it at the end, so a failed export leaves nothing at the output path.
//! See docs/export.md.

mod direct_file;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_gemma4;
pub mod hf;
pub mod quant;
pub mod source;
pub mod tokenizer;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

pub use quant::GgmlType;
pub use source::{resolve, Checkpoint};

/// The `--quant` types of a GGUF export.
pub const QUANT_NAMES: [&str; 5] = ["f32", "f16", "bf16", "q8_0", "q4_0"];

/// Parses a `--quant` name.
pub fn parse_quant(name: &str) -> Result<GgmlType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "bf16" => GgmlType::Bf16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        _ => bail!(
            "unknown --quant {name:?} (supported: {})",
            QUANT_NAMES.join(", ")
        ),
    })
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
}

/// An output written under a temporary sibling name and renamed into place by [`commit`];
/// dropped uncommitted (an error, a panic), it removes the temporary file or directory.
///
/// [`commit`]: PendingOutput::commit
pub struct PendingOutput {
    pub temp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl PendingOutput {
    /// Refuses an existing non-empty target; the temporary name is `.NAME.partial-PID`.
    pub fn new(target: &Path) -> Result<PendingOutput> {
        if target.is_file() {
            bail!("{} already exists; export to a new path", target.display());
        }
        if target.is_dir()
            && target
                .read_dir()
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "{} exists and is not empty; export to a new path",
                target.display()
            );
        }
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a file or directory name", target.display()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        Ok(PendingOutput {
            temp: parent.join(format!(".{name}.partial-{}", std::process::id())),
            target: target.to_path_buf(),
            done: false,
        })
    }

    pub fn parent(&self) -> &Path {
        self.temp.parent().unwrap_or(Path::new("."))
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.is_dir() {
            // An empty directory the user created: replace it.
            std::fs::remove_dir(&self.target)
                .with_context(|| format!("cannot replace {}", self.target.display()))?;
        }
        std::fs::rename(&self.temp, &self.target)
            .with_context(|| format!("cannot move the export to {}", self.target.display()))?;
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.done {
            let _ = if self.temp.is_dir() {
                std::fs::remove_dir_all(&self.temp)
            } else {
                std::fs::remove_file(&self.temp)
            };
        }
    }
}

/// A byte-count progress bar on a terminal; hidden otherwise (logs and tests).
pub fn progress(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg} ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}
