//! Data-parallel fine-tuning on the CPU: two ranks (threads, the TCP collective over loopback)
//! with batch b end with the adapter one rank gets with batch 2b.

use atoll_trainer::finetune::finetune;
use atoll_trainer::recipe::Recipe;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn recipe(run: &Path, batch: usize, devices: &str) -> Recipe {
    let text = format!(
        r#"name: dp
seed: 5
model:
  init_from: {base}
data:
  seq_len: 64
  tokenizer:
    path: {tokenizer}
finetune:
  data: {data}
  eval_fraction: 0.02
lora:
  r: 4
  alpha: 8
train:
  max_steps: 4
  batch_size: {batch}
  grad_accum: 2
  lr: 1.0e-2
  warmup_steps: 1
  eval_every: 0
  eval_batches: 1
  device: cpu
  threads: 1
  {devices}
run:
  dir: {run}
"#,
        base = repo().join("tests/fixtures/gemma3-tiny").display(),
        tokenizer = repo().join("tests/fixtures/lora/tokenizer.json").display(),
        data = repo().join("data/shakespeare-instruct.jsonl").display(),
        run = run.display(),
    );
    Recipe::from_yaml(&text, "dp.yaml", &[]).unwrap()
}

fn adapter(run: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("adapter/adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn two_cpu_ranks_match_one_rank_with_the_doubled_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let single = finetune(&recipe(&one, 4, ""), &one, None, false).unwrap();
    let double = finetune(&recipe(&two, 2, "devices: [0, 1]"), &two, None, false).unwrap();
    assert_eq!(double.ranks, 2);
    assert!((single.final_loss - double.final_loss).abs() < 1e-5 * single.final_loss.abs());
    let (a, b) = (adapter(&one), adapter(&two));
    assert_eq!(a.len(), b.len());
    // AdamW's first steps move each element by about ±lr whatever its gradient's size, so an
    // element whose gradient is rounding noise can go either way: the two-rank sums round
    // differently and a few such elements differ by up to ~lr/20 (with lr 0.9e-2 instead of 1e-2,
    // 8 of 29,184 by up to 5e-4, before the fused loss too). So the check is on the whole: the
    // relative difference, and how many elements are off by more than 1e-5.
    let (mut diff2, mut norm2, mut off) = (0f64, 0f64, 0i64);
    for (name, t) in &a {
        let d = (t - &b[name]).abs();
        diff2 += d.square().sum(tch::Kind::Double).double_value(&[]);
        norm2 += t.square().sum(tch::Kind::Double).double_value(&[]);
        off += d.gt(1e-5).sum(tch::Kind::Int64).int64_value(&[]);
    }
    let elements: i64 = a.values().map(|t| t.numel() as i64).sum();
    let relative = (diff2 / norm2).sqrt();
    assert!(relative < 1e-4, "adapters differ by {relative} relative");
    assert!(
        off * 1000 <= elements,
        "{off} of {elements} adapter elements differ by more than 1e-5"
    );
    // The adapters moved: the comparison is not between two untouched initialisations.
    let b_norm: f64 = a
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(b_norm > 1e-3);
}
