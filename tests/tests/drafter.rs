//! The MTP drafter end to end through the `atoll` binary: a tiny Gemma 4 base trained briefly,
//! a drafter trained against it (`model.drafter`), `atoll eval drafter`, `atoll drafter export`
//! checked with transformers (loads as `Gemma4UnifiedAssistantForCausalLM`, equal draft chain
//! within 1e-4), its GGUF for llama.cpp (`atoll export --format drafter-gguf`) from the run, and
//! the export of a checkpoint without a drafter refused cleanly.

use atoll_system_tests::{assert_clean_error, atoll, repo_root, run_reference_python, stderr};
use std::ffi::OsStr;
use std::path::Path;

fn ok(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", stderr(o));
}

#[test]
fn drafter_trains_evaluates_and_exports_for_transformers() {
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let path = |p: &str| t.join(p).display().to_string();
    let small = [
        "--set",
        "data.seq_len=32",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.warmup_steps=2",
    ];

    let mut args = vec![
        "train".to_string(),
        root.join("recipes/drafter-base.yaml").display().to_string(),
        "--set".into(),
        format!("run.dir={}", path("base")),
        "--set".into(),
        "train.max_steps=15".into(),
        "--set".into(),
        "data.tokenizer.vocab_size=400".into(),
    ];
    args.extend(small.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&atoll(&argv, t), "training the base");

    let mut args = vec![
        "train".to_string(),
        root.join("recipes/drafter-tiny.yaml").display().to_string(),
        "--set".into(),
        format!("run.dir={}", path("drafter")),
        "--set".into(),
        format!("model.init_from={}", path("base/final")),
        "--set".into(),
        "train.max_steps=10".into(),
    ];
    args.extend(small.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let trained = atoll(&argv, t);
    ok(&trained, "training the drafter");
    assert!(t.join("drafter/final/drafter/model.safetensors").exists());

    let eval = atoll(
        &[
            "eval",
            "drafter",
            &path("drafter"),
            "--prompts",
            "2",
            "--prompt-len",
            "12",
            "--new-tokens",
            "10",
        ],
        t,
    );
    ok(&eval, "atoll eval drafter");
    let report: serde_json::Value =
        serde_json::from_str(&atoll_system_tests::stdout(&eval)).expect("eval prints JSON");
    for phase in ["before", "after"] {
        let rate = report[phase]["acceptance_rate"].as_f64().expect("a rate");
        assert!((0.0..=1.0).contains(&rate), "{phase}: {rate}");
        // Per prompt, 9 tokens come from rounds drafting min(4, remaining - 1): at most
        // 4+4+4+4+4+3+2+1 = 26 when every draft is rejected.
        let drafted = report[phase]["drafted"].as_u64().unwrap();
        assert!(drafted > 0 && drafted <= 52, "{phase}: drafted {drafted}");
    }
    assert!(t.join("drafter/drafter_eval.json").exists());

    ok(
        &atoll(&["drafter", "export", &path("drafter"), &path("export")], t),
        "atoll drafter export",
    );
    let ids = "2,17,5,99,43,8,120,7,61,230,11,3,64,150,9";
    ok(
        &atoll(
            &[
                "drafter",
                "draft",
                "--base",
                &path("base/final"),
                "--drafter",
                &path("export"),
                "--ids",
                ids,
                "--steps",
                "4",
                "--out",
                &path("probe.safetensors"),
            ],
            t,
        ),
        "atoll drafter draft",
    );
    let script = root.join("tests/scripts/check_drafter_export.py");
    let out = run_reference_python(
        &script,
        &[
            OsStr::new(&path("base/final")),
            OsStr::new(&path("export")),
            OsStr::new(&path("probe.safetensors")),
            OsStr::new(ids),
        ],
    );
    assert!(out.contains("OK"), "{out}");

    // GGUF for llama.cpp from the run: its tokenizer is found in the run, and the file equals the
    // one written from the exported drafter, which carries that tokenizer (the layout itself is
    // checked against llama.cpp's converter in tests/tests/export.rs).
    std::fs::create_dir_all(path("gguf-run")).unwrap();
    std::fs::create_dir_all(path("gguf-export")).unwrap();
    ok(
        &atoll(
            &[
                "export",
                &path("drafter"),
                "--format",
                "drafter-gguf",
                "--out",
                &path("gguf-run/drafter.gguf"),
            ],
            t,
        ),
        "atoll export --format drafter-gguf (run)",
    );
    ok(
        &atoll(
            &[
                "export",
                &path("export"),
                "--format",
                "drafter-gguf",
                "--out",
                &path("gguf-export/drafter.gguf"),
            ],
            t,
        ),
        "atoll export --format drafter-gguf (exported drafter)",
    );
    assert_eq!(
        std::fs::read(path("export/tokenizer.json")).unwrap(),
        std::fs::read(path("drafter/tokenizer.json")).unwrap()
    );
    let from_run = std::fs::read(path("gguf-run/drafter.gguf")).unwrap();
    assert!(from_run == std::fs::read(path("gguf-export/drafter.gguf")).unwrap());

    // A checkpoint with no drafter: one clear error, nothing at the output path.
    let refused = atoll(
        &["drafter", "export", &path("base/final"), &path("nothing")],
        t,
    );
    assert_clean_error(&refused, "has no drafter");
    assert!(!Path::new(&path("nothing")).exists());
    let leftovers: Vec<_> = std::fs::read_dir(t)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_drafter_recipe_needs_a_trained_base() {
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let o = atoll(
        &[
            "train",
            &root.join("recipes/drafter-tiny.yaml").display().to_string(),
            "--set",
            &format!("model.init_from={}", tmp.path().join("missing").display()),
            "--set",
            &format!("run.dir={}", tmp.path().join("run").display()),
        ],
        tmp.path(),
    );
    assert_clean_error(&o, "model.init_from");
}
