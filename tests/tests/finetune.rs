//! `atoll finetune` end to end on the tiny transformers fixture: the adapter it writes loads in
//! PEFT with the same logits, `--merge` writes an equivalent checkpoint, `--resume` continues
//! exactly, and bad inputs are clear errors.

use atoll_system_tests::{
    assert_clean_error, atoll, repo_root, run_reference_python, stderr, stdout,
};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// A small fine-tuning recipe on the gemma3-tiny fixture and the shipped instruction data.
fn recipe(dir: &Path, base: &Path, data: &Path) -> PathBuf {
    let text = format!(
        r#"name: lora-test
seed: 7
model:
  init_from: {base}
data:
  seq_len: 96
  tokenizer:
    path: {tokenizer}
finetune:
  data: {data}
  eval_fraction: 0.05
lora:
  r: 4
  alpha: 8
  targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
train:
  max_steps: 6
  batch_size: 4
  lr: 1.0e-2
  warmup_steps: 1
  eval_every: 3
  eval_batches: 2
  device: cpu
  threads: 2
run:
  dir: {run}
checkpoint:
  every: 3
"#,
        base = base.display(),
        tokenizer = fixtures().join("lora/tokenizer.json").display(),
        data = data.display(),
        run = dir.join("run").display(),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn instruct_data() -> PathBuf {
    repo_root().join("data/shakespeare-instruct.jsonl")
}

#[test]
fn finetuned_adapter_loads_in_peft_and_merges_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("gemma3-tiny");
    let r = recipe(tmp.path(), &base, &instruct_data());
    let out = atoll(&["finetune", r.to_str().unwrap(), "--merge"], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(summary["steps"], 6);
    assert_eq!(summary["checkpoints"], 2);
    let run = tmp.path().join("run");
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "merged/config.json",
        "merged/model.safetensors",
        "metrics.jsonl",
        "summary.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // PEFT on transformers gives Atoll's logits for base + adapter, and for the merged model.
    let ids = "2,17,45,200,9,33,81,120,7,64,250,3,99,18,150,42,77,5,230,11,60";
    let adapted = tmp.path().join("adapted.safetensors");
    let merged = tmp.path().join("merged.safetensors");
    let o = atoll(
        &[
            "logits",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            run.join("adapter").to_str().unwrap(),
            "--ids",
            ids,
            "--out",
            adapted.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = atoll(
        &[
            "logits",
            "--model",
            run.join("merged").to_str().unwrap(),
            "--ids",
            ids,
            "--out",
            merged.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = run_reference_python(
        &repo_root().join("tests/scripts/check_peft_adapter.py"),
        &[
            base.as_os_str(),
            run.join("adapter").as_os_str(),
            adapted.as_os_str(),
            merged.as_os_str(),
        ],
    );
    assert!(report.contains("max |peft - atoll|"), "{report}");

    // Resuming from step 3 reproduces the adapter of the uninterrupted run bit for bit.
    let finished = std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    let o = atoll(
        &["finetune", r.to_str().unwrap(), "--resume", "step-3"],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(summary["resumed_from"], 3);
    let resumed = std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        finished == resumed,
        "the resumed run ended with another adapter"
    );
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
}

#[test]
fn bad_fine_tuning_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("gemma3-tiny");
    let run = |recipe: &Path, sets: &[&str]| {
        let mut args = vec!["finetune".to_string(), recipe.display().to_string()];
        for s in sets {
            args.push("--set".into());
            args.push(s.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        atoll(&args, tmp.path())
    };
    let good = recipe(tmp.path(), &base, &instruct_data());

    let o = run(&good, &["lora.targets=[q_proj, qkv_proj]"]);
    assert_clean_error(&o, "lora target `qkv_proj` matches no linear layer");
    let o = run(&good, &["lora.r=0"]);
    assert_clean_error(&o, "lora.r: expected a positive integer, got 0");

    let bad_json = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad_json,
        "{\"text\": \"To be, or not to be\"}\n{\"messages\": [oops]}\n",
    )
    .unwrap();
    let o = run(&recipe(tmp.path(), &base, &bad_json), &[]);
    assert_clean_error(&o, "bad.jsonl:2: not valid JSON");

    std::fs::write(&bad_json, "{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let o = run(&recipe(tmp.path(), &base, &bad_json), &[]);
    assert_clean_error(
        &o,
        "bad.jsonl:2: expected a `messages` (chat) or `text` field",
    );

    std::fs::write(
        &bad_json,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"narrator\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let o = run(&recipe(tmp.path(), &base, &bad_json), &[]);
    assert_clean_error(&o, "bad.jsonl:1: message 1 has unknown role `narrator`");

    // A checkpoint whose vocabulary is smaller than the tokenizer's.
    let small = tmp.path().join("small-vocab");
    std::fs::create_dir_all(&small).unwrap();
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(base.join(f), small.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(base.join("config.json"))
        .unwrap()
        .replace("\"vocab_size\": 256", "\"vocab_size\": 200");
    std::fs::write(small.join("config.json"), config).unwrap();
    let o = run(&recipe(tmp.path(), &small, &instruct_data()), &[]);
    assert_clean_error(
        &o,
        "the tokenizer has 256 tokens but the checkpoint's vocabulary has 200",
    );
}
