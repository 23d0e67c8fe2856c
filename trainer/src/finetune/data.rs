//! Fine-tuning data: JSONL records (`{"messages": [...]}` chat or `{"text": ...}`), rendered with
//! Gemma's chat template, tokenised with the checkpoint's own tokenizer, with a per-token loss
//! mask (assistant turns only for chat), packed into fixed-length rows whose examples keep their
//! own positions and attention, and split into train and held-out sets.

use crate::models::recompute::{TokenBatch, IGNORE_LABEL};
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Tensor};
use tokenizers::Tokenizer;

/// Gemma's turn markers (single special tokens in the Gemma 3 / 4 tokenizers; plain text in a
/// tokenizer that lacks them).
pub const START_OF_TURN: &str = "<start_of_turn>";
pub const END_OF_TURN: &str = "<end_of_turn>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Chat(Vec<(Role, String)>),
    Text(String),
}

/// Parses one JSONL line; errors say what is wrong (the caller adds file and line).
pub fn parse_record(line: &str) -> Result<Record> {
    let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("not valid JSON ({e})"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| anyhow!("expected a JSON object with `messages` or `text`"))?;
    if let Some(messages) = obj.get("messages") {
        let turns = messages
            .as_array()
            .ok_or_else(|| anyhow!("`messages` must be a list of {{role, content}} objects"))?;
        if turns.is_empty() {
            bail!("`messages` is empty");
        }
        let mut out = Vec::with_capacity(turns.len());
        for (i, turn) in turns.iter().enumerate() {
            let role = turn
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("message {i} has no string `role`"))?;
            let role = match role {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" | "model" => Role::Assistant,
                other => bail!(
                    "message {i} has unknown role `{other}` (expected user, assistant, model or system)"
                ),
            };
            let content = turn
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("message {i} has no string `content`"))?;
            out.push((role, content.to_string()));
        }
        if !out.iter().any(|(r, _)| *r == Role::Assistant) {
            bail!("no assistant message: a chat example needs at least one turn to learn");
        }
        return Ok(Record::Chat(out));
    }
    if let Some(text) = obj.get("text") {
        let text = text
            .as_str()
            .ok_or_else(|| anyhow!("`text` must be a string"))?;
        if text.is_empty() {
            bail!("`text` is empty");
        }
        return Ok(Record::Text(text.to_string()));
    }
    bail!("expected a `messages` (chat) or `text` field")
}

/// Reads every record of a JSONL file; blank lines are skipped. Errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("finetune.data: cannot read {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record =
            parse_record(line).map_err(|e| anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        records.push(record);
    }
    if records.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(records)
}

/// The pieces of Gemma's chat template in order, each flagged when the model should learn it:
/// `<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n{content}<end_of_turn>\n`.
/// A system message is prepended to the next user turn (`{system}\n\n{user}`), as Gemma's
/// template does; the loss covers the assistant's content and its `<end_of_turn>`.
pub fn chat_pieces(turns: &[(Role, String)]) -> Result<Vec<(String, bool)>> {
    let mut pieces = Vec::new();
    let mut system: Option<&str> = None;
    for (i, (role, content)) in turns.iter().enumerate() {
        match role {
            Role::System => {
                if system.is_some() || turns.get(i + 1).map(|t| t.0) != Some(Role::User) {
                    bail!("message {i}: a system message must be followed by a user message");
                }
                system = Some(content);
            }
            Role::User => {
                let text = match system.take() {
                    Some(s) => format!("{s}\n\n{content}"),
                    None => content.clone(),
                };
                pieces.push((format!("{START_OF_TURN}user\n{text}{END_OF_TURN}\n"), false));
            }
            Role::Assistant => {
                pieces.push((format!("{START_OF_TURN}model\n"), false));
                pieces.push((format!("{content}{END_OF_TURN}"), true));
                pieces.push(("\n".to_string(), false));
            }
        }
    }
    Ok(pieces)
}

/// One tokenised example: `tokens[0]` is `<bos>`; `learn[i]` says whether token i is a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<i64>,
    pub learn: Vec<bool>,
}

fn encode_piece(tokenizer: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow!("tokenization failed: {e}"))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

/// Renders and tokenises a record: chat through the template (targets: assistant pieces),
/// text as `<bos> text <eos>` (targets: everything after `<bos>`).
pub fn encode_record(
    tokenizer: &Tokenizer,
    record: &Record,
    bos: i64,
    eos: i64,
) -> Result<Example> {
    let mut tokens = vec![bos];
    let mut learn = vec![false];
    match record {
        Record::Text(text) => {
            let ids = encode_piece(tokenizer, text)?;
            learn.extend(std::iter::repeat_n(true, ids.len() + 1));
            tokens.extend(ids);
            tokens.push(eos);
        }
        Record::Chat(turns) => {
            for (text, trained) in chat_pieces(turns)? {
                let ids = encode_piece(tokenizer, &text)?;
                learn.extend(std::iter::repeat_n(trained, ids.len()));
                tokens.extend(ids);
            }
        }
    }
    Ok(Example { tokens, learn })
}

/// Checks that a tokenizer belongs to a checkpoint: its ids fit the embedding and its `<bos>` /
/// `<eos>` are the checkpoint's.
pub fn check_tokenizer(tokenizer: &Tokenizer, vocab_size: usize, bos: i64, eos: i64) -> Result<()> {
    let n = tokenizer.get_vocab_size(true);
    if n > vocab_size {
        bail!(
            "the tokenizer has {n} tokens but the checkpoint's vocabulary has {vocab_size}: it is not this checkpoint's tokenizer"
        );
    }
    for (name, id) in [("<bos>", bos), ("<eos>", eos)] {
        match tokenizer.token_to_id(name) {
            Some(t) if t as i64 == id => {}
            Some(t) => bail!(
                "the tokenizer's {name} is token {t} but the checkpoint's config.json says {id}: it is not this checkpoint's tokenizer"
            ),
            None => bail!(
                "the tokenizer has no {name} token (the checkpoint's is {id}): it is not this checkpoint's tokenizer"
            ),
        }
    }
    Ok(())
}

/// Fixed-length rows of packed examples: ids, labels (next token or IGNORE), positions restarting
/// at 0 per example, and segment ids (one per example; padding has its own).
pub struct PackedRows {
    seq_len: usize,
    ids: Vec<i64>,
    labels: Vec<i64>,
    positions: Vec<i64>,
    segments: Vec<i64>,
    /// Labelled positions per row.
    pub targets_per_row: Vec<i64>,
    /// Examples cut to fit seq_len.
    pub truncated: usize,
}

impl PackedRows {
    /// Packs examples in the given order, first fit into the current row, a new row when the
    /// next example does not fit. An example longer than `seq_len` + 1 tokens is truncated.
    pub fn pack(examples: &[Example], seq_len: usize, pad: i64) -> Result<PackedRows> {
        let mut rows = PackedRows {
            seq_len,
            ids: Vec::new(),
            labels: Vec::new(),
            positions: Vec::new(),
            segments: Vec::new(),
            targets_per_row: Vec::new(),
            truncated: 0,
        };
        let mut used = seq_len; // forces a new row for the first example
        let mut segment = 0i64;
        for ex in examples {
            // An example of n tokens gives n - 1 (input, target) pairs.
            let mut pairs = ex.tokens.len().saturating_sub(1);
            if pairs == 0 {
                continue;
            }
            if pairs > seq_len {
                pairs = seq_len;
                rows.truncated += 1;
            }
            if used + pairs > seq_len {
                rows.pad_row(used, pad, segment);
                rows.targets_per_row.push(0);
                used = 0;
                segment = 0;
            }
            let mut targets = 0;
            for i in 0..pairs {
                rows.ids.push(ex.tokens[i]);
                let label = if ex.learn[i + 1] {
                    targets += 1;
                    ex.tokens[i + 1]
                } else {
                    IGNORE_LABEL
                };
                rows.labels.push(label);
                rows.positions.push(i as i64);
                rows.segments.push(segment);
            }
            *rows.targets_per_row.last_mut().expect("a row is open") += targets;
            used += pairs;
            segment += 1;
        }
        rows.pad_row(used, pad, segment);
        if rows.targets_per_row.is_empty() {
            bail!("no example has two or more tokens");
        }
        Ok(rows)
    }

    fn pad_row(&mut self, used: usize, pad: i64, segment: i64) {
        if used >= self.seq_len {
            return;
        }
        for i in 0..self.seq_len - used {
            self.ids.push(pad);
            self.labels.push(IGNORE_LABEL);
            self.positions.push(i as i64);
            self.segments.push(segment);
        }
    }

    pub fn len(&self) -> usize {
        self.targets_per_row.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Labelled positions in the given rows.
    pub fn target_count(&self, rows: &[usize]) -> i64 {
        rows.iter().map(|&r| self.targets_per_row[r]).sum()
    }

    /// The given rows as one batch on `device`.
    pub fn batch(&self, rows: &[usize], device: Device) -> TokenBatch {
        let t = self.seq_len;
        let take = |v: &Vec<i64>| {
            let mut out = Vec::with_capacity(rows.len() * t);
            for &r in rows {
                out.extend_from_slice(&v[r * t..(r + 1) * t]);
            }
            Tensor::from_slice(&out)
                .view([rows.len() as i64, t as i64])
                .to_device(device)
        };
        TokenBatch {
            ids: take(&self.ids),
            labels: take(&self.labels),
            positions: take(&self.positions),
            segments: take(&self.segments),
        }
    }
}

/// Shuffles examples with `seed` and holds out `eval_fraction` of them (at least one; at least one
/// left to train on).
pub fn split_examples(
    mut examples: Vec<Example>,
    eval_fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if examples.len() < 2 {
        bail!(
            "finetune.data: {} example(s); need at least 2 (one to train on, one held out)",
            examples.len()
        );
    }
    examples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let held =
        ((examples.len() as f64 * eval_fraction).round() as usize).clamp(1, examples.len() - 1);
    let eval = examples.split_off(examples.len() - held);
    Ok((examples, eval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// A word-level tokenizer with Gemma's special tokens, so token boundaries are predictable.
    fn tokenizer() -> Tokenizer {
        let words = [
            "<pad>", "<eos>", "<bos>", "<unk>", "user", "model", "hi", "there", "how", "are",
            "you", "fine", "be", "brief", ".", "\n",
        ];
        let vocab: serde_json::Map<String, Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), Value::from(i)))
            .collect();
        let added: Vec<Value> = [START_OF_TURN, END_OF_TURN]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"id": words.len() + i, "content": t, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        Tokenizer::from_str(&json.to_string()).unwrap()
    }

    #[test]
    fn chat_loss_covers_assistant_content_and_end_of_turn_only() {
        let tok = tokenizer();
        let sot = tok.token_to_id(START_OF_TURN).unwrap() as i64;
        let eot = tok.token_to_id(END_OF_TURN).unwrap() as i64;
        let rec = parse_record(
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi there"},{"role":"assistant","content":"how are you"},{"role":"user","content":"fine"},{"role":"assistant","content":"fine ."}]}"#,
        )
        .unwrap();
        let ex = encode_record(&tok, &rec, 2, 1).unwrap();
        let id = |w: &str| tok.token_to_id(w).unwrap() as i64;
        // Whitespace pre-tokenisation drops the newlines: the template's structure stays.
        let expected: Vec<(i64, bool)> = vec![
            (2, false),
            (sot, false),
            (id("user"), false),
            (id("be"), false),
            (id("brief"), false),
            (id("hi"), false),
            (id("there"), false),
            (eot, false),
            (sot, false),
            (id("model"), false),
            (id("how"), true),
            (id("are"), true),
            (id("you"), true),
            (eot, true),
            (sot, false),
            (id("user"), false),
            (id("fine"), false),
            (eot, false),
            (sot, false),
            (id("model"), false),
            (id("fine"), true),
            (id("."), true),
            (eot, true),
        ];
        let got: Vec<(i64, bool)> = ex.tokens.iter().copied().zip(ex.learn.clone()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn template_text_matches_gemma() {
        let pieces = chat_pieces(&[
            (Role::System, "S".into()),
            (Role::User, "U".into()),
            (Role::Assistant, "A".into()),
        ])
        .unwrap();
        let text: String = pieces.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            text,
            "<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let cases = [
            ("{\"text\": \"ok\"}\n{oops\n", ":2: not valid JSON"),
            (
                "{\"text\": \"ok\"}\n\n{\"prompt\": \"x\"}\n",
                ":3: expected a `messages`",
            ),
            (
                "{\"messages\": [{\"role\": \"narrator\", \"content\": \"x\"}]}\n",
                ":1: message 0 has unknown role `narrator`",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
                ":1: no assistant message",
            ),
        ];
        for (text, needle) in cases {
            std::fs::write(&path, text).unwrap();
            let err = read_jsonl(&path).unwrap_err().to_string();
            assert!(err.contains("d.jsonl") && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn packing_keeps_examples_apart_and_labels_shifted() {
        let a = Example {
            tokens: vec![2, 10, 11, 12],
            learn: vec![false, false, true, true],
        };
        let b = Example {
            tokens: vec![2, 20, 21],
            learn: vec![false, true, true],
        };
        let c = Example {
            tokens: vec![2, 30, 31, 32, 33, 34],
            learn: vec![false; 6],
        };
        let rows = PackedRows::pack(&[a, b, c], 6, 0).unwrap();
        assert_eq!(rows.len(), 2);
        let batch = rows.batch(&[0, 1], Device::Cpu);
        let v = |t: &Tensor| Vec::<i64>::try_from(t.view([-1])).unwrap();
        assert_eq!(
            v(&batch.ids),
            vec![2, 10, 11, 2, 20, 0, 2, 30, 31, 32, 33, 0]
        );
        assert_eq!(
            v(&batch.labels),
            vec![-100, 11, 12, 20, 21, -100, -100, -100, -100, -100, -100, -100]
        );
        assert_eq!(
            v(&batch.positions),
            vec![0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4, 0]
        );
        assert_eq!(v(&batch.segments), vec![0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 0, 1]);
        assert_eq!(rows.targets_per_row, vec![4, 0]);
        assert_eq!(batch.target_count(), 4);
    }

    #[test]
    fn tokenizer_of_another_checkpoint_is_refused() {
        let tok = tokenizer();
        assert!(check_tokenizer(&tok, 18, 2, 1).is_ok());
        let err = check_tokenizer(&tok, 10, 2, 1).unwrap_err().to_string();
        assert!(err.contains("has 18 tokens"), "{err}");
        let err = check_tokenizer(&tok, 18, 5, 1).unwrap_err().to_string();
        assert!(err.contains("<bos> is token 2"), "{err}");
    }
}
