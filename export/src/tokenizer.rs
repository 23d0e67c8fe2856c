//! A Hugging Face `tokenizer.json` as GGUF vocabulary metadata. A byte-level BPE (what Atoll
//! trains, and GPT-2-style tokenizers) goes in as llama.cpp's `gpt2` tokenizer model: tokens by
//! id, token types (control for special added tokens), merges as `"a b"` strings, and the special
//! token ids. Slots past the tokenizer up to the model's vocabulary are `[PAD{id}]` tokens of type
//! unused, as llama.cpp's converter pads them, so the embedding keeps every row.

use crate::gguf::MetaValue;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Special token ids from the model config.
pub struct SpecialIds {
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
}

fn is_byte_level(pre: &Value) -> bool {
    match pre.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => true,
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|items| items.iter().any(is_byte_level)),
        _ => false,
    }
}

/// The `tokenizer.ggml.*` keys for `path`, padded to `vocab_size` tokens.
pub fn gguf_metadata(
    path: &Path,
    vocab_size: usize,
    ids: &SpecialIds,
) -> Result<Vec<(String, MetaValue)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let what = path.display();
    let model = json
        .get("model")
        .ok_or_else(|| anyhow!("{what}: no `model` section"))?;
    let kind = model.get("type").and_then(Value::as_str).unwrap_or("?");
    let byte_level = json.get("pre_tokenizer").is_some_and(is_byte_level);
    if kind != "BPE" || !byte_level {
        bail!(
            "{what}: a {kind} tokenizer{} cannot be embedded; GGUF export embeds byte-level BPE tokenizers (what Atoll trains)",
            if byte_level { "" } else { " without a ByteLevel pre-tokenizer" }
        );
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{what}: model.vocab is not an object"))?;
    let mut tokens: Vec<Option<(String, i32)>> = Vec::new();
    let mut place = |id: u64, token: &str, ty: i32| -> Result<()> {
        let id = id as usize;
        if id >= vocab_size {
            bail!("{what}: token {token:?} has id {id}, outside the model's vocabulary of {vocab_size}");
        }
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some((token.to_string(), ty));
        Ok(())
    };
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| anyhow!("{what}: id of {token:?} is not a number"))?;
        place(id, token, NORMAL)?;
    }
    for added in json
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            added.get("id").and_then(Value::as_u64),
            added.get("content").and_then(Value::as_str),
        ) else {
            bail!("{what}: an added_tokens entry lacks id or content");
        };
        let special = added
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        place(id, content, if special { CONTROL } else { USER_DEFINED })?;
    }
    let (mut list, mut types) = (Vec::with_capacity(vocab_size), Vec::new());
    for id in 0..vocab_size {
        match tokens.get(id).cloned().flatten() {
            Some((token, ty)) => {
                list.push(token);
                types.push(ty);
            }
            None => {
                list.push(format!("[PAD{id}]"));
                types.push(UNUSED);
            }
        }
    }
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{what}: model.merges is not a list"))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => Err(anyhow!("{what}: a merge is not two strings")),
            },
            _ => Err(anyhow!("{what}: a merge is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<Vec<_>>>()?;
    let id = |v: i64| MetaValue::U32(v.max(0) as u32);
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::Str("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            MetaValue::Str("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::StrArray(list),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::I32Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            MetaValue::StrArray(merges),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), id(ids.bos)),
        ("tokenizer.ggml.eos_token_id".to_string(), id(ids.eos)),
        ("tokenizer.ggml.padding_token_id".to_string(), id(ids.pad)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            MetaValue::Bool(true),
        ),
        (
            "tokenizer.ggml.add_eos_token".to_string(),
            MetaValue::Bool(false),
        ),
    ];
    if let Some(unk) = vocab
        .get("<unk>")
        .or_else(|| {
            model
                .get("unk_token")
                .and_then(|t| t.as_str())
                .and_then(|t| vocab.get(t))
        })
        .and_then(Value::as_u64)
    {
        out.push((
            "tokenizer.ggml.unknown_token_id".to_string(),
            MetaValue::U32(unk as u32),
        ));
    }
    Ok(out)
}
