//! Drafter export: the directory transformers loads with
//! `Gemma4UnifiedAssistantForCausalLM.from_pretrained` and uses as `assistant_model`.

use crate::models::gemma4_assistant::{self, Gemma4Assistant, MODEL_TYPE};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Tokens per round written to `generation_config.json` when the source has none.
const DEFAULT_NUM_ASSISTANT_TOKENS: usize = 4;

/// Whether `dir` holds a drafter checkpoint (its config.json's `model_type` is the assistant's).
pub fn is_drafter_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["model_type"] == MODEL_TYPE)
}

/// The drafter directory of `source`: a drafter checkpoint itself, a checkpoint with a
/// `drafter/` directory, or a drafter run (`final/drafter/`).
pub fn find_drafter(source: &Path) -> Result<PathBuf> {
    if !source.exists() {
        bail!("{}: no such file or directory", source.display());
    }
    let candidates = [
        source.to_path_buf(),
        source.join("drafter"),
        super::run_drafter_dir(source),
    ];
    candidates
        .into_iter()
        .find(|dir| is_drafter_dir(dir))
        .ok_or_else(|| {
            anyhow!(
                "{}: this checkpoint has no drafter (no {MODEL_TYPE} config.json here, in drafter/ or in final/drafter/); train one with a recipe's model.drafter section",
                source.display()
            )
        })
}

/// The `tokenizer.json` that goes with the drafter in `dir`: its own, that of the checkpoint
/// holding it as `drafter/`, or that of the run whose `final/` that checkpoint is (drafter
/// training writes the tokenizer it trained with, the base model's unless the recipe names
/// another, into the run).
pub fn drafter_tokenizer(dir: &Path) -> Option<PathBuf> {
    // `.` or a symlink would hide the run's layout from the names below.
    let dir = dir.canonicalize().ok()?;
    let holder = dir.parent().filter(|_| dir.ends_with("drafter"));
    let run = holder
        .filter(|p| p.ends_with("final"))
        .and_then(Path::parent);
    let found = [Some(dir.as_path()), holder, run]
        .into_iter()
        .flatten()
        .map(|d| d.join("tokenizer.json"))
        .find(|p| p.is_file());
    found
}

/// What [`export_drafter`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedDrafter {
    pub source: PathBuf,
    pub out_dir: PathBuf,
    pub parameters: u64,
    pub num_assistant_tokens: usize,
    pub dtype: String,
}

/// The dtype named by a checkpoint's `config.json` (`dtype` or the older `torch_dtype`).
fn stored_kind(dir: &Path) -> Kind {
    let value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let name = value.as_ref().and_then(|v| {
        v.get("dtype")
            .or_else(|| v.get("torch_dtype"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    });
    match name.as_deref() {
        Some("bfloat16") => Kind::BFloat16,
        Some("float16") => Kind::Half,
        _ => Kind::Float,
    }
}

/// Writes `model` into `out_dir` in the Hugging Face assistant layout (`config.json`,
/// `model.safetensors`, `generation_config.json`, and a copy of `tokenizer` when given), all or
/// nothing: the files go to a temporary directory next to `out_dir`, renamed to `out_dir` at
/// the end. `out_dir` must not exist (or be an empty directory).
pub fn write_drafter_dir(
    model: &Gemma4Assistant,
    out_dir: &Path,
    kind: Kind,
    num_assistant_tokens: usize,
    tokenizer: Option<&Path>,
) -> Result<()> {
    if out_dir.exists() {
        let empty_dir = out_dir
            .read_dir()
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty_dir {
            bail!(
                "{}: already exists; choose a new output path or remove it",
                out_dir.display()
            );
        }
    }
    let mut files = gemma4_assistant::files(model, kind, num_assistant_tokens)?;
    if let Some(path) = tokenizer {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        files.push(("tokenizer.json".to_string(), bytes));
    }
    let name = out_dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a directory path", out_dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        for (file, bytes) in &files {
            std::fs::write(tmp.join(file), bytes)
                .with_context(|| format!("cannot write {}", tmp.join(file).display()))?;
        }
        if out_dir.exists() {
            std::fs::remove_dir(out_dir)
                .with_context(|| format!("cannot replace {}", out_dir.display()))?;
        }
        std::fs::rename(&tmp, out_dir)
            .with_context(|| format!("cannot write {}", out_dir.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Exports the drafter of `source` (a drafter checkpoint, a checkpoint with `drafter/`, or a
/// drafter run directory) to `out_dir` in the layout transformers 5.23 loads as
/// `Gemma4UnifiedAssistantForCausalLM`, in the dtype the source stores. The drafter is loaded
/// and checked first; nothing is left at `out_dir` on failure. Errors when `source` has no
/// drafter.
pub fn export_drafter(source: &Path, out_dir: &Path) -> Result<ExportedDrafter> {
    let dir = find_drafter(source)?;
    let model = gemma4_assistant::load(&dir, Device::Cpu)?;
    let kind = stored_kind(&dir);
    let k = gemma4_assistant::num_assistant_tokens(&dir).unwrap_or(DEFAULT_NUM_ASSISTANT_TOKENS);
    // The target's tokenizer travels with the drafter, so the export is complete for a GGUF
    // conversion (`atoll export --format drafter-gguf`) as it is.
    write_drafter_dir(&model, out_dir, kind, k, drafter_tokenizer(&dir).as_deref())?;
    Ok(ExportedDrafter {
        source: dir,
        out_dir: out_dir.to_path_buf(),
        parameters: model.config.num_parameters(),
        num_assistant_tokens: k,
        dtype: crate::train::dtype_name(kind).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_without_a_drafter_is_one_clear_error_and_leaves_nothing() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("exported");
        let err = export_drafter(&fixtures.join("gemma4-tiny"), &target).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("has no drafter"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn export_round_trips_the_fixture_and_refuses_to_overwrite() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("exported");
        let done = export_drafter(&fixtures.join("gemma4-assistant-tiny"), &target).unwrap();
        assert_eq!(done.dtype, "f32");
        let original = crate::checkpoint::read_tensors(
            &fixtures.join("gemma4-assistant-tiny/model.safetensors"),
        )
        .unwrap();
        let exported = crate::checkpoint::read_tensors(&target.join("model.safetensors")).unwrap();
        assert_eq!(original.len(), exported.len());
        for (name, t) in &original {
            let (_, e) = exported.iter().find(|(n, _)| n == name).expect(name);
            assert!(t.equal(e), "{name} differs");
        }
        let again = export_drafter(&fixtures.join("gemma4-assistant-tiny"), &target).unwrap_err();
        assert!(format!("{again:#}").contains("already exists"));
        // Only the export itself is left: no temporary directory.
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
    }
}
