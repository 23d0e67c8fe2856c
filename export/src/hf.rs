//! Hugging Face exports.
//!
//! - Full (default): the checkpoint's weight files copied byte for byte (vision tower, projector,
//!   vision/audio embedders and any assistant included, since Atoll's saves keep them), with its
//!   `config.json`, generation and processor configs, and the tokenizer plus a
//!   `tokenizer_config.json`; Atoll's training state (optimizer, trainer state, manifest) is left
//!   out. Loads as the original class (`Gemma3ForConditionalGeneration`,
//!   `Gemma4UnifiedForConditionalGeneration`, or the text-only class for a text-only checkpoint).
//! - Text-only (`--text-only`): the text stack alone renamed to `model.…`, with a text config, for
//!   `Gemma3ForCausalLM` / `Gemma4UnifiedForCausalLM`; tensors streamed one at a time.

use crate::source::{Checkpoint, TensorEntry, WeightSource};
use crate::{progress, ExportSummary, PendingOutput};
use anyhow::{anyhow, bail, Context, Result};
use atoll_trainer::checkpoint::{TextLayout, INDEX_FILE, SIDE_FILES, SINGLE_FILE};
use atoll_trainer::config::GemmaConfig;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

/// Tokenizer files copied when the checkpoint has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
];

fn copy_with_progress(from: &Path, to: &Path, bar: &indicatif::ProgressBar) -> Result<u64> {
    let mut src =
        std::fs::File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let mut dst = BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(to).with_context(|| format!("cannot create {}", to.display()))?,
    );
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = src
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", from.display()))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", to.display()))?;
        total += n as u64;
        bar.inc(n as u64);
    }
    dst.flush()?;
    Ok(total)
}

/// A `tokenizer_config.json` for a bare `tokenizer.json`, naming its special tokens by the ids
/// in the model config, so `AutoTokenizer.from_pretrained` loads it.
fn tokenizer_config(tokenizer_json: &Path, config: &GemmaConfig) -> Result<Value> {
    let text = std::fs::read_to_string(tokenizer_json)
        .with_context(|| format!("cannot read {}", tokenizer_json.display()))?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", tokenizer_json.display()))?;
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    if let Some(vocab) = json.pointer("/model/vocab").and_then(Value::as_object) {
        for (token, id) in vocab {
            if let Some(id) = id.as_u64() {
                by_id.insert(id, token.clone());
            }
        }
    }
    for added in json
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(id), Some(content)) = (
            added.get("id").and_then(Value::as_u64),
            added.get("content").and_then(Value::as_str),
        ) {
            by_id.insert(id, content.to_string());
        }
    }
    let mut out = Map::new();
    out.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, id) in [
        ("bos_token", config.bos_token_id),
        ("eos_token", config.eos_token_id),
        ("pad_token", config.pad_token_id),
    ] {
        if let Some(token) = u64::try_from(id).ok().and_then(|id| by_id.get(&id)) {
            out.insert(key.into(), json!(token));
        }
    }
    if by_id.values().any(|t| t == "<unk>") {
        out.insert("unk_token".into(), json!("<unk>"));
    }
    out.insert("add_bos_token".into(), json!(true));
    out.insert("add_eos_token".into(), json!(false));
    Ok(Value::Object(out))
}

/// Gemma expects `<bos>` first: a tokenizer without a post-processor (what Atoll trains) gets one
/// that prepends it, as the GGUF export's `add_bos_token` does for llama.cpp.
fn add_bos_post_processor(json: &mut Value, path: &Path, config: &GemmaConfig) -> Result<()> {
    if json.get("post_processor").is_some_and(|p| !p.is_null()) {
        return Ok(());
    }
    let bos = config.bos_token_id;
    let token = json
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|t| t.get("id").and_then(Value::as_i64) == Some(bos))
        })
        .and_then(|t| t.get("content").and_then(Value::as_str))
        .map(str::to_string);
    let Some(token) = token else {
        tracing::warn!(
            "{}: no added token with the bos id {bos}; <bos> is not prepended",
            path.display()
        );
        return Ok(());
    };
    let obj = json
        .as_object_mut()
        .ok_or_else(|| anyhow!("{}: not a JSON object", path.display()))?;
    obj.insert(
        "post_processor".into(),
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {token.clone(): {"id": token, "ids": [bos], "tokens": [token]}},
        }),
    );
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Copies the tokenizer (and writes a tokenizer config when the checkpoint has none).
fn export_tokenizer(
    ck: &Checkpoint,
    tokenizer: Option<&Path>,
    dir: &Path,
    config: &GemmaConfig,
) -> Result<()> {
    for name in TOKENIZER_FILES {
        let path = ck.dir.join(name);
        if path.exists() {
            std::fs::copy(&path, dir.join(name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    let Some(tok) = tokenizer
        .map(Path::to_path_buf)
        .or_else(|| ck.tokenizer.clone())
    else {
        tracing::warn!(
            "{}: no tokenizer.json to export alongside the weights",
            ck.dir.display()
        );
        return Ok(());
    };
    let mut tokenizer_json: Value = serde_json::from_str(
        &std::fs::read_to_string(&tok).with_context(|| format!("cannot read {}", tok.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", tok.display()))?;
    add_bos_post_processor(&mut tokenizer_json, &tok, config)?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json)?;
    if !dir.join("tokenizer_config.json").exists() {
        write_json(
            &dir.join("tokenizer_config.json"),
            &tokenizer_config(&tok, config)?,
        )?;
    }
    Ok(())
}

/// Writes checkpoint `ck` as a Hugging Face directory at `out`.
pub fn export_hf(
    ck: &Checkpoint,
    out: &Path,
    tokenizer: Option<&Path>,
    text_only: bool,
) -> Result<ExportSummary> {
    let config = GemmaConfig::from_file(&ck.dir.join("config.json"))?;
    let pending = PendingOutput::new(out)?;
    std::fs::create_dir(&pending.temp)
        .with_context(|| format!("cannot create {}", pending.temp.display()))?;
    let source = WeightSource::open(&ck.dir)?;
    let (tensors, bytes) = if text_only {
        write_text_only(&source, &config, &pending.temp)?
    } else {
        let total: u64 = source
            .files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let bar = progress(total, &format!("writing {}", out.display()));
        let mut bytes = 0;
        for file in &source.files {
            let name = file
                .file_name()
                .ok_or_else(|| anyhow!("{}: no file name", file.display()))?;
            bytes += copy_with_progress(file, &pending.temp.join(name), &bar)?;
        }
        bar.finish_and_clear();
        if ck.dir.join(INDEX_FILE).exists() {
            std::fs::copy(ck.dir.join(INDEX_FILE), pending.temp.join(INDEX_FILE))?;
        }
        std::fs::copy(ck.dir.join("config.json"), pending.temp.join("config.json"))?;
        for name in SIDE_FILES {
            if ck.dir.join(name).exists() {
                std::fs::copy(ck.dir.join(name), pending.temp.join(name))?;
            }
        }
        (source.tensors.len(), bytes)
    };
    export_tokenizer(ck, tokenizer, &pending.temp, &config)?;
    let path = pending.commit()?;
    Ok(ExportSummary {
        path,
        tensors,
        bytes,
    })
}

/// The text stack of `source` under text-only names, one output file per source file that holds
/// text tensors, streamed a tensor at a time.
fn write_text_only(
    source: &WeightSource,
    config: &GemmaConfig,
    dir: &Path,
) -> Result<(usize, u64)> {
    let layout = TextLayout::detect(source.tensors.iter().map(|t| t.name.as_str()));
    let mut by_file: BTreeMap<usize, Vec<(String, &TensorEntry)>> = BTreeMap::new();
    let mut dtype = None;
    for spec in config.tensor_specs() {
        let stored = layout.stored_name(&spec.name);
        let entry = source
            .get(&stored)
            .ok_or_else(|| anyhow!("tensor {stored} is missing from the checkpoint"))?;
        dtype.get_or_insert(entry.dtype.clone());
        by_file
            .entry(entry.file)
            .or_default()
            .push((spec.name, entry));
    }
    let total: u64 = by_file.values().flatten().map(|(_, e)| e.len).sum();
    let bar = progress(total, "writing the text stack");
    let count = by_file.len();
    let mut weight_map = BTreeMap::new();
    let mut written = 0u64;
    let mut tensors = 0usize;
    for (i, entries) in by_file.values().enumerate() {
        let name = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let mut header = Map::new();
        let mut offset = 0u64;
        for (canonical, entry) in entries {
            header.insert(
                canonical.clone(),
                json!({"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.len]}),
            );
            offset += entry.len;
            weight_map.insert(canonical.clone(), name.clone());
        }
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut header_bytes = serde_json::to_vec(&Value::Object(header))?;
        header_bytes.resize(header_bytes.len().div_ceil(8) * 8, b' ');
        let path = dir.join(&name);
        let mut out = BufWriter::with_capacity(
            8 << 20,
            std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        out.write_all(&header_bytes)?;
        for (_, entry) in entries {
            let mut pos = 0;
            while pos < entry.len {
                let chunk = source.read_range(entry, pos, 32 << 20)?;
                out.write_all(&chunk)?;
                pos += chunk.len() as u64;
                bar.inc(chunk.len() as u64);
            }
            tensors += 1;
        }
        out.flush()?;
        written += offset;
    }
    bar.finish_and_clear();
    if count > 1 {
        write_json(
            &dir.join(INDEX_FILE),
            &json!({"metadata": {"total_size": written, "total_parameters": config.num_parameters()}, "weight_map": weight_map}),
        )?;
    }
    let mut text_config = config.to_hf_json();
    let dtype_name = match dtype.as_deref() {
        Some("BF16") => "bfloat16",
        Some("F16") => "float16",
        _ => "float32",
    };
    text_config["dtype"] = json!(dtype_name);
    if tensors == 0 {
        bail!("internal: no text tensors written");
    }
    write_json(&dir.join("config.json"), &text_config)?;
    Ok((tensors, written))
}
