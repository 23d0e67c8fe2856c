//! Training data: a real English corpus, a byte-level BPE tokenizer (trained on the corpus or
//! loaded from `tokenizer.json`), packed fixed-length sequences with document boundaries
//! (`<bos> doc <eos>` back to back), a seeded shuffled batcher and a held-out eval split.

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const BUILTIN_PREFIX: &str = "builtin:";
const TINY_SHAKESPEARE: &str = include_str!("../../data/tinyshakespeare.txt");

/// Special tokens in Gemma's id order, so a trained tokenizer uses pad 0, eos 1, bos 2.
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<eos>", "<bos>", "<unk>"];
pub const PAD_ID: i64 = 0;
pub const EOS_ID: i64 = 1;
pub const BOS_ID: i64 = 2;

/// Reads a corpus: `builtin:tinyshakespeare` or a UTF-8 text file path.
pub fn load_corpus(spec: &str) -> Result<String> {
    if let Some(name) = spec.strip_prefix(BUILTIN_PREFIX) {
        return match name {
            "tinyshakespeare" => Ok(TINY_SHAKESPEARE.to_string()),
            other => bail!("data.corpus: unknown built-in corpus `{other}` (available: builtin:tinyshakespeare)"),
        };
    }
    let path = Path::new(spec);
    let bytes = std::fs::read(path)
        .with_context(|| format!("data.corpus: cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "data.corpus: {} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        bail!("data.corpus: {} is empty", path.display());
    }
    Ok(text)
}

/// Documents are blank-line-separated blocks of text.
pub fn split_documents(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect()
}

/// Holds out the last `eval_fraction` of the documents (a contiguous tail, so no eval text sits
/// between training documents).
pub fn train_eval_split<'a>(
    docs: &[&'a str],
    eval_fraction: f64,
) -> Result<(Vec<&'a str>, Vec<&'a str>)> {
    let n_eval = ((docs.len() as f64) * eval_fraction).ceil() as usize;
    if docs.len() < 2 || n_eval == 0 || n_eval >= docs.len() {
        bail!(
            "data: the corpus has {} documents, too few to hold out {:.1}% for evaluation",
            docs.len(),
            eval_fraction * 100.0
        );
    }
    let split = docs.len() - n_eval;
    Ok((docs[..split].to_vec(), docs[split..].to_vec()))
}

/// Trains a byte-level BPE tokenizer of `vocab_size` entries (specials included) on `docs`.
pub fn train_tokenizer(docs: &[&str], vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        bail!(
            "data.tokenizer.vocab_size: must be at least {} for a byte-level BPE, got {vocab_size}",
            256 + SPECIAL_TOKENS.len()
        );
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .train(&mut trainer, docs.iter())
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    for (expected, token) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(expected as u32) {
            bail!("internal: special token {token} did not get id {expected}");
        }
    }
    Ok(tokenizer)
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| anyhow!("data.tokenizer.path: cannot load {}: {e}", path.display()))
}

/// Concatenates `<bos> doc <eos>` for every document.
pub fn pack_documents(
    tokenizer: &Tokenizer,
    docs: &[&str],
    bos: i64,
    eos: i64,
) -> Result<Vec<i64>> {
    let encodings = tokenizer
        .encode_batch(docs.to_vec(), false)
        .map_err(|e| anyhow!("tokenization failed: {e}"))?;
    let mut stream = Vec::with_capacity(encodings.iter().map(|e| e.len() + 2).sum());
    for enc in encodings {
        stream.push(bos);
        stream.extend(enc.get_ids().iter().map(|&id| id as i64));
        stream.push(eos);
    }
    Ok(stream)
}

/// Fixed-length windows over a packed token stream. Window i covers tokens
/// [i·T, i·T + T] (T + 1 tokens: inputs and shifted targets).
pub struct PackedSequences {
    tokens: Vec<i64>,
    seq_len: usize,
}

impl PackedSequences {
    pub fn new(tokens: Vec<i64>, seq_len: usize, what: &str) -> Result<Self> {
        if tokens.len() < seq_len + 1 {
            bail!(
                "data: the {what} split has {} tokens, fewer than one sequence of data.seq_len + 1 = {}",
                tokens.len(),
                seq_len + 1
            );
        }
        Ok(PackedSequences { tokens, seq_len })
    }

    pub fn len(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// (inputs, targets), each [B, T] int64, for the given window indices.
    pub fn batch(&self, windows: &[usize], device: Device) -> (Tensor, Tensor) {
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(windows.len() * t);
        let mut targets = Vec::with_capacity(windows.len() * t);
        for &w in windows {
            let start = w * t;
            inputs.extend_from_slice(&self.tokens[start..start + t]);
            targets.extend_from_slice(&self.tokens[start + 1..start + t + 1]);
        }
        let shape = [windows.len() as i64, t as i64];
        (
            Tensor::from_slice(&inputs)
                .view(shape)
                .to_kind(Kind::Int64)
                .to_device(device),
            Tensor::from_slice(&targets)
                .view(shape)
                .to_kind(Kind::Int64)
                .to_device(device),
        )
    }
}

/// The training windows learner `index` of `count` draws from.
pub fn learner_windows(
    windows: usize,
    index: usize,
    count: usize,
    sharding: crate::recipe::Sharding,
) -> Result<Vec<usize>> {
    let shard: Vec<usize> = match sharding {
        crate::recipe::Sharding::Disjoint => (0..windows).filter(|w| w % count == index).collect(),
        crate::recipe::Sharding::Shared => (0..windows).collect(),
    };
    if shard.is_empty() {
        bail!("data: {windows} training sequences cannot feed {count} learners");
    }
    Ok(shard)
}

/// Where the batcher stands: enough to resume the exact same batch sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: usize,
}

/// Visits every window once per epoch in an order shuffled by (seed, epoch).
pub struct Batcher {
    seed: u64,
    order: Vec<usize>,
    cursor: DataCursor,
}

impl Batcher {
    pub fn new(num_windows: usize, seed: u64) -> Self {
        let mut b = Batcher {
            seed,
            order: (0..num_windows).collect(),
            cursor: DataCursor {
                epoch: 0,
                position: 0,
            },
        };
        b.shuffle();
        b
    }

    fn shuffle(&mut self) {
        self.order.sort_unstable();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ self.cursor.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        self.order.shuffle(&mut rng);
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Continues from a saved cursor: the same batches as the run that saved it.
    pub fn restore(&mut self, cursor: DataCursor) {
        self.cursor = cursor;
        self.shuffle();
    }

    pub fn next_windows(&mut self, batch_size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch_size);
        while out.len() < batch_size {
            if self.cursor.position == self.order.len() {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    position: 0,
                };
                self.shuffle();
            }
            out.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_on_blank_lines() {
        let docs = split_documents("First:\nHello.\n\n\nSecond:\nBye.\n\n");
        assert_eq!(docs, vec!["First:\nHello.", "Second:\nBye."]);
    }

    #[test]
    fn batcher_visits_every_window_once_per_epoch_and_is_seeded() {
        let mut a = Batcher::new(10, 7);
        let mut b = Batcher::new(10, 7);
        let mut seen: Vec<usize> = (0..5).flat_map(|_| a.next_windows(2)).collect();
        assert_eq!(
            seen,
            (0..5).flat_map(|_| b.next_windows(2)).collect::<Vec<_>>()
        );
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(
            a.cursor(),
            DataCursor {
                epoch: 0,
                position: 10
            }
        );
        a.next_windows(1);
        assert_eq!(a.cursor().epoch, 1);
        assert_ne!(
            Batcher::new(10, 8).next_windows(10),
            Batcher::new(10, 7).next_windows(10)
        );
    }

    #[test]
    fn disjoint_shards_partition_the_windows_and_shared_ones_hold_them_all() {
        use crate::recipe::Sharding;
        let mut all: Vec<usize> = (0..3)
            .flat_map(|i| learner_windows(10, i, 3, Sharding::Disjoint).unwrap())
            .collect();
        assert_eq!(
            learner_windows(10, 1, 3, Sharding::Disjoint).unwrap(),
            vec![1, 4, 7]
        );
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        for i in 0..3 {
            assert_eq!(
                learner_windows(10, i, 3, Sharding::Shared).unwrap(),
                (0..10).collect::<Vec<_>>()
            );
        }
        let err = learner_windows(2, 2, 3, Sharding::Disjoint).unwrap_err();
        assert!(err.to_string().contains("cannot feed 3 learners"), "{err}");
        assert!(learner_windows(2, 2, 3, Sharding::Shared).is_ok());
    }

    #[test]
    fn packed_windows_shift_targets_by_one() {
        let p = PackedSequences::new((0..11).collect(), 5, "train").unwrap();
        assert_eq!(p.len(), 2);
        let (x, y) = p.batch(&[1], Device::Cpu);
        assert_eq!(
            Vec::<i64>::try_from(x.view([-1])).unwrap(),
            vec![5, 6, 7, 8, 9]
        );
        assert_eq!(
            Vec::<i64>::try_from(y.view([-1])).unwrap(),
            vec![6, 7, 8, 9, 10]
        );
    }

    #[test]
    fn trained_tokenizer_round_trips_text_with_gemma_special_ids() {
        let text = load_corpus("builtin:tinyshakespeare").unwrap();
        let docs = split_documents(&text);
        let tok = train_tokenizer(&docs[..2000], 600).unwrap();
        assert_eq!(tok.get_vocab_size(true), 600);
        assert_eq!(tok.token_to_id("<bos>"), Some(BOS_ID as u32));
        let enc = tok
            .encode("To be, or not to be: that is the question.", false)
            .unwrap();
        let decoded = tok.decode(enc.get_ids(), true).unwrap();
        assert_eq!(decoded.trim(), "To be, or not to be: that is the question.");
    }

    #[test]
    fn unreadable_corpus_is_a_clear_error() {
        let err = load_corpus("/nonexistent/corpus.txt").unwrap_err();
        assert!(format!("{err:#}").contains("data.corpus: cannot read /nonexistent/corpus.txt"));
        assert!(load_corpus("builtin:nope").is_err());
    }
}
