//! `atoll` as a user runs it: training, model info, the logits probe and bad input.

use atoll_system_tests::{
    assert_clean_error, atoll, atoll_bin, exposes, free_port, repo_root, scrape, stderr, stdout,
    wait_until, Processes,
};
use std::path::Path;
use std::time::Duration;

fn fixture(name: &str) -> String {
    repo_root()
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn model_info_prints_the_real_12b_parameter_counts() {
    let dir = tempfile::tempdir().unwrap();
    for (preset, count, parts) in [
        ("gemma3-12b", "12187325040", 16),
        ("gemma4-12b", "11959730224", 15),
    ] {
        let o = atoll(&["model", "info", preset], dir.path());
        assert!(o.status.success());
        let out = stdout(&o);
        assert!(
            out.lines().any(|l| l == format!("parameters: {count}")),
            "{out}"
        );
        assert!(
            out.contains("memory, bf16 weights:") && out.contains("AdamW state"),
            "{out}"
        );
        // The 12B embedding (1.007 billion values; 262,208 rows in Gemma 3, 262,144 in Gemma
        // 4) travels in runs of 64 Mi values.
        assert!(
            out.contains(&format!(
                "data plane: the largest tensor (model.embed_tokens.weight, 4.03 GB as f32) travels as {parts} parts of up to 268.4 MB"
            )),
            "{out}"
        );
    }
    let o = atoll(&["model", "info", &fixture("gemma4-tiny")], dir.path());
    assert!(stdout(&o).contains("K=V true"));
    // Gemma 3 27B's embedding (262,208 x 5,376, 5.64 GB as f32) is past a part's 32-bit frame
    // length as one piece: it travels as 22 parts.
    let o = atoll(&["model", "info", "gemma3-27b"], dir.path());
    assert!(o.status.success(), "{}", atoll_system_tests::stderr(&o));
    let out = stdout(&o);
    assert!(out.lines().any(|l| l == "parameters: 27432406640"), "{out}");
    assert!(
        out.contains(
            "data plane: the largest tensor (model.embed_tokens.weight, 5.64 GB as f32) travels as 22 parts"
        ),
        "{out}"
    );
}

#[test]
fn logits_probe_writes_t_by_vocab_f32_matching_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let o = atoll(
        &[
            "logits",
            "--model",
            &fixture("gemma4-tiny"),
            "--ids",
            "2,65,123",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", atoll_system_tests::stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["logits"]["dtype"], "F32");
    assert_eq!(header["logits"]["shape"], serde_json::json!([3, 256]));
    assert_eq!(
        header.as_object().unwrap().len(),
        1 + header.get("__metadata__").is_some() as usize
    );
}

#[test]
fn train_writes_a_complete_run_directory_and_never_overwrites_one() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = repo_root().join("recipes/tiny-shakespeare.yaml");
    let args = [
        "train",
        recipe.to_str().unwrap(),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.batch_size=4",
        "--set",
        "data.tokenizer.vocab_size=400",
        "--set",
        "train.device=cpu",
    ];
    let o = atoll(&args, dir.path());
    assert!(o.status.success(), "{}", atoll_system_tests::stderr(&o));
    let run = dir.path().join("runs/tiny-shakespeare");
    for f in [
        "recipe.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "summary.json",
        "train.log",
        "final/config.json",
        "final/model.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 6);
    assert_eq!(summary["tokens"], 6 * 4 * 128);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[2]["eval_loss"].is_number() && lines[1].get("eval_loss").is_none());
    // Not a terminal: plain log lines, no progress bar escapes.
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("step 6/6 loss"), "{log}");

    // A second run of the same recipe goes to a new directory.
    let o = atoll(&args, dir.path());
    assert!(o.status.success());
    assert!(dir
        .path()
        .join("runs/tiny-shakespeare-2/summary.json")
        .exists());
    assert!(run.join("summary.json").exists());

    // A given tokenizer.json is used as is, and fine-tuning starts from the final checkpoint.
    let tokenizer = run.join("tokenizer.json");
    let init = run.join("final");
    let o = atoll(
        &[
            "train",
            recipe.to_str().unwrap(),
            "--set",
            "model.preset=null",
            "--set",
            &format!("model.init_from={}", init.display()),
            "--set",
            &format!("data.tokenizer.path={}", tokenizer.display()),
            "--set",
            "train.max_steps=2",
            "--set",
            "train.batch_size=2",
            "--set",
            "run.dir=finetune",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", atoll_system_tests::stderr(&o));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("finetune/tokenizer.json")).unwrap(),
        std::fs::read_to_string(&tokenizer).unwrap()
    );

    // The final checkpoint is a model `atoll logits` reads.
    let o = atoll(
        &[
            "logits",
            "--model",
            run.join("final").to_str().unwrap(),
            "--ids",
            "2,10,11",
            "--out",
            "l.safetensors",
        ],
        dir.path(),
    );
    assert!(o.status.success());
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// `atoll train --metrics ADDR` serves what the trainer records (it used to record it with no
/// exporter installed, so nothing could read it). Stopped by id once the loss is scraped.
#[test]
fn train_serves_its_metrics_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let recipe = repo_root().join("recipes/tiny-shakespeare.yaml");
    let args: Vec<String> = [
        "train",
        recipe.to_str().unwrap(),
        "--set",
        &format!("run.dir={}", dir.path().join("run").display()),
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.threads=1",
        "--metrics",
        &address,
    ]
    .map(String::from)
    .to_vec();
    let mut processes = Processes::default();
    processes.start("train", &args, "unused", &dir.path().join("train.out"));
    let mut text = String::new();
    wait_until(
        "the training loss on the metrics endpoint",
        Duration::from_secs(120),
        || {
            text = scrape(&address);
            exposes(&text, "atoll_train_loss") && exposes(&text, "atoll_train_tokens_total")
        },
    );
    processes.kill("train");
    let loss: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("atoll_train_loss "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(loss.is_finite() && loss > 0.0 && loss < 10.0, "{text}");
}

#[test]
fn bad_recipes_get_one_clear_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bad_type = write(
        d,
        "a.yaml",
        "model: {preset: gemma3-tiny}\ntrain: {lr: fast}\n",
    );
    assert_clean_error(
        &atoll(&["train", &bad_type], d),
        "train.lr: expected a positive number, got \"fast\"",
    );
    let unknown = write(
        d,
        "b.yaml",
        "model: {preset: gemma3-tiny}\ntrain: {learning_rate: 0.1}\n",
    );
    assert_clean_error(
        &atoll(&["train", &unknown], d),
        "train.learning_rate: unknown field `learning_rate`",
    );
    let malformed = write(d, "c.yaml", "model: {preset: gemma3-tiny\ntrain: [\n");
    assert_clean_error(&atoll(&["train", &malformed], d), "invalid YAML");
    let ok = write(d, "d.yaml", "model: {preset: gemma3-tiny}\n");
    assert_clean_error(
        &atoll(&["train", &ok, "--set", "train.max_steps=-5"], d),
        "train.max_steps: expected a positive integer, got -5",
    );
    assert_clean_error(
        &atoll(&["train", "missing.yaml"], d),
        "cannot read recipe missing.yaml",
    );
    let corpus = write(
        d,
        "e.yaml",
        "model: {preset: gemma3-tiny}\ndata: {corpus: /no/such/corpus.txt}\n",
    );
    assert_clean_error(
        &atoll(&["train", &corpus], d),
        "data.corpus: cannot read /no/such/corpus.txt",
    );
    let sync = write(
        d,
        "f.yaml",
        "model: {preset: gemma3-tiny}\nsync: {learners: 2, quorum: 3}\n",
    );
    assert_clean_error(
        &atoll(&["simulate", &sync], d),
        "sync.quorum: expected at most sync.learners (2), got 3",
    );
    assert_clean_error(
        &atoll(&["simulate", &ok, "--set", "sync.codec=int4"], d),
        "sync.codec: unknown variant `int4`",
    );
    assert_clean_error(
        &atoll(&["simulate", &ok, "--set", "sync.h=0"], d),
        "sync.h: expected a positive integer, got 0",
    );
    assert_clean_error(
        &atoll(&["simulate", &ok, "--set", "sync.link.part_values=1000"], d),
        "sync.link.part_values: 1000 values per part: expected a multiple of 256",
    );
    // A coordinator whose frame limit could never admit the largest contribution part (gemma3-tiny's
    // embedding, 2 MiB as f32) refuses to start rather than refuse every such contribution.
    let job = write(
        d,
        "g.yaml",
        "model: {preset: gemma3-tiny}\nsync: {codec: f32, secret: test-secret-0123456789abcdef}\n",
    );
    assert_clean_error(
        &atoll(
            &[
                "coordinator",
                &job,
                "--max-frame-mib",
                "1",
                "--run-dir",
                "coord",
            ],
            d,
        ),
        "a frame limit of 1 MiB is below the 3 MiB the largest contribution part needs",
    );
    // Nothing was created for runs that failed validation before they started.
    assert!(!d.join("runs/a").exists());
}

#[test]
fn bad_checkpoints_and_ids_get_one_clear_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let probe = |model: &str, ids: &str| {
        atoll(
            &[
                "logits",
                "--model",
                model,
                "--ids",
                ids,
                "--out",
                "x.safetensors",
            ],
            d,
        )
    };
    assert_clean_error(
        &probe(&fixture("gemma3-tiny"), "2,256"),
        "token id 256 is outside the vocabulary (0..256)",
    );
    assert_clean_error(
        &probe(&fixture("gemma3-tiny"), "2,x"),
        "`x` is not an integer token id",
    );
    assert_clean_error(&probe(d.to_str().unwrap(), "2"), "config.json");

    let broken = d.join("broken");
    std::fs::create_dir(&broken).unwrap();
    let src = repo_root().join("tests/fixtures/gemma3-tiny");
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        broken.join("config.json"),
        config.replace("gemma3_text", "gpt2"),
    )
    .unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    assert_clean_error(
        &probe(broken.to_str().unwrap(), "2"),
        "unknown model_type `gpt2`",
    );

    std::fs::write(broken.join("config.json"), &config).unwrap();
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &weights[..1000]).unwrap();
    assert_clean_error(
        &probe(broken.to_str().unwrap(), "2"),
        "not a valid safetensors file",
    );
    assert!(!d.join("x.safetensors").exists());
}

#[test]
fn plan_projects_the_12b_four_region_job_from_flags_and_a_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = atoll(
        &[
            "plan",
            "--model",
            "gemma4-12b",
            "--learners",
            "4",
            "--gpus-per-learner",
            "64",
            "--link-rate",
            "2gbps",
            "--link-rtt",
            "40ms",
            "--codec",
            "e3m0",
            "--out",
            "plan",
        ],
        d,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Decoupled DiLoCo"), "{}", stdout(&o));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("plan/plan.json")).unwrap()).unwrap();
    let decoupled = plan["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == "decoupled")
        .unwrap();
    assert!(
        decoupled["speedup_vs_dp"].as_f64().unwrap() > 20.0,
        "{decoupled}"
    );
    assert!(std::fs::read_to_string(d.join("plan/plan.svg"))
        .unwrap()
        .starts_with("<svg"));
    // Memory per chip: the learner sharded over its 64 chips, one 4096-token sequence per rank
    // at once, by the same model as `atoll model info --ranks`.
    let total = |text: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with("total:"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no memory total in\n{text}"))
    };
    let info = atoll(
        &[
            "model",
            "info",
            "gemma4-12b",
            "--ranks",
            "64",
            "--seq",
            "4096",
            "--batch",
            "1",
        ],
        d,
    );
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(
        stdout(&o).contains("sharded data parallel over 64 ranks"),
        "{}",
        stdout(&o)
    );
    assert_eq!(total(&stdout(&o)), total(&stdout(&info)));

    // From a recipe: its model, learners, link and codec.
    let recipe = repo_root().join("recipes/decoupled-tiny.yaml");
    let o = atoll(&["plan", recipe.to_str().unwrap(), "--out", "tiny"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tiny/plan.json")).unwrap()).unwrap();
    assert_eq!(plan["input"]["learners"], 4);
    assert_eq!(plan["input"]["codec"], "e3m0");

    let o = atoll(&["plan", "--link-rate", "fast", "--out", "x"], d);
    assert_clean_error(&o, "fast");

    let o = atoll(&["plan", "--merge-time", "20ms", "--out", "merge"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("merge/plan.json")).unwrap()).unwrap();
    assert_eq!(plan["input"]["merge_s"], 0.02);
    let o = atoll(&["plan", "--merge-time", "soon", "--out", "x"], d);
    assert_clean_error(&o, "--merge-time");
}

/// `atoll bench codecs` on a real difference of two checkpoints: one row per codec, the lossless
/// codec exact, e3m0's error that of a 4-bit code, zstd's column filled; bad pairs refused.
#[test]
fn bench_codecs_measures_the_difference_of_two_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for seed in ["1", "2"] {
        let o = atoll(
            &[
                "model",
                "init",
                "gemma3-tiny",
                "--seed",
                seed,
                "--out",
                seed,
            ],
            d,
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let bench = |pair: &str| {
        atoll(
            &[
                "bench",
                "codecs",
                "--repeats",
                "1",
                "--zstd-level",
                "1",
                "--outer-gradient",
                pair,
            ],
            d,
        )
    };
    let o = bench("1,2");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let row = |codec: &str| -> Vec<f64> {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(codec))
            .unwrap_or_else(|| panic!("no {codec} row in:\n{out}"))
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect()
    };
    // bits/value, rel. error, encode, decode, zstd bits/value, frame encode, frame decode.
    let (f32_row, e3m0, int2) = (row("f32"), row("e3m0"), row("int2"));
    assert_eq!(f32_row[1], 0.0, "{out}");
    assert_eq!(e3m0[0], 4.125);
    assert!(e3m0[1] > 0.05 && e3m0[1] < 0.4, "{out}");
    assert!(int2[4] > 1.0 && int2[4] < 2.125 * 1.05, "{out}");
    assert!(row("bf16").len() == 7 && row("int8").len() == 7, "{out}");

    assert_clean_error(&bench("1"), "takes two checkpoints");
    assert_clean_error(&bench("1,1"), "hold the same weights");
    assert_clean_error(&bench("1,missing"), "missing");
}

/// `atoll bench merge`: one row per thread count asked for, with positive timings; bad
/// arguments refused with one clear line.
/// `atoll bench lm-head` times the fused loss against whole logits, with and without softcap;
/// the logits it holds are its blocks, not every row. Bad shapes are one clear error.
#[test]
fn bench_lm_head_times_fused_and_whole_logits() {
    let dir = tempfile::tempdir().unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "lm-head",
            "--rows",
            "600",
            "--hidden",
            "32",
            "--vocab",
            "8192",
            "--repeats",
            "2",
        ];
        args.extend_from_slice(extra);
        atoll(&args, dir.path())
    };
    for extra in [&[][..], &["--softcap", "30"][..]] {
        let o = bench(extra);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let number_after = |label: &str| -> Vec<f64> {
            let line = out
                .lines()
                .find(|l| l.contains(label))
                .unwrap_or_else(|| panic!("{out}"));
            line.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        };
        // Whole logits: 3 × 600 × 8192 f32 = 56.25 MiB; blocks of 512 rows: 2 (with the softcap
        // 3) × 16 MiB.
        let whole = number_after("whole logits");
        assert!(whole[0] > 0.0 && (whole[1] - 56.25).abs() < 0.1, "{out}");
        let fused = number_after("fused, blocks of");
        assert_eq!(fused[0], 512.0, "{out}");
        let blocks = if extra.is_empty() { 2.0 } else { 3.0 };
        assert!(
            fused[1] > 0.0 && (fused[2] - blocks * 16.0).abs() < 0.1,
            "{out}"
        );
        assert!(out.contains("ratio (unfused / fused)"), "{out}");
        assert_eq!(out.contains("softcap 30"), !extra.is_empty(), "{out}");
    }
    let bad = |flag: &str| atoll(&["bench", "lm-head", flag, "0"], dir.path());
    assert_clean_error(&bad("--vocab"), "must be positive");
    assert_clean_error(&bad("--threads"), "--threads must be positive");
}

#[test]
fn bench_merge_times_each_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "merge", "--values", "300000", "--repeats", "1"];
        args.extend_from_slice(extra);
        atoll(&args, dir.path())
    };
    let o = bench(&["--threads", "1,2", "--learners", "3", "--codec", "int2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("3 learners, int2 broadcast"), "{out}");
    let rows: Vec<Vec<f64>> = out
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (v.len() == 5).then_some(v)
        })
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!((rows[0][0], rows[1][0]), (1.0, 2.0), "{out}");
    // The round through the syncer: its own thread's share and the merge job's, both timed.
    for label in ["syncer's own thread", "merge job on a blocking thread"] {
        let seconds = out
            .lines()
            .find(|l| l.contains(label))
            .and_then(|l| l.split_whitespace().rev().nth(1))
            .and_then(|s| s.parse::<f64>().ok());
        assert!(seconds.is_some_and(|s| s >= 0.0), "{label}: {out}");
    }
    assert!(
        rows.iter().all(|r| r[1..].iter().all(|x| *x > 0.0)),
        "{out}"
    );

    assert_clean_error(&bench(&["--codec", "e5m2"]), "unknown codec");
    assert_clean_error(&bench(&["--threads", "0"]), "positive thread counts");
    assert_clean_error(&bench(&["--learners", "0"]), "must be positive");
}

/// `atoll plan | head`: a reader that closed its end ends a printing command quietly (SIGPIPE's
/// default action), not with a panic and a backtrace on stderr.
#[test]
fn a_closed_stdout_ends_a_printing_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(atoll_bin())
        .args(["model", "info", "gemma3-12b"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the process has loaded its libraries, so its first write finds no reader.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "stderr:\n{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "stderr:\n{err}");
}
