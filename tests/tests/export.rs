//! `atoll export` as a user runs it: train from a multimodal Gemma 3 checkpoint, export the run
//! to a Hugging Face directory (full and text-only) and to GGUF in every quant type, and check
//! the files with transformers and the gguf package (tests/scripts/check_export.py); bad input
//! gives one error line and leaves nothing at the output path. Gemma 4 GGUF exports are checked
//! against llama.cpp's `gemma4` layout, the MTP drafter's against llama.cpp's own converter.

use atoll_system_tests::{assert_clean_error, atoll, repo_root, run_reference_python, stderr};
use std::ffi::OsStr;
use std::path::Path;

fn fixture(name: &str) -> String {
    repo_root()
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn ok(args: &[&str], cwd: &Path) {
    let o = atoll(args, cwd);
    assert!(o.status.success(), "atoll {args:?}:\n{}", stderr(&o));
}

/// Everything in `dir`, for "no partial file left" checks.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn train_from_multimodal(dir: &Path, checkpoint_every: Option<usize>) -> std::path::PathBuf {
    let checkpoint = checkpoint_every
        .map(|n| format!("checkpoint: {{every: {n}}}\n"))
        .unwrap_or_default();
    let recipe = format!(
        "name: mm
seed: 5
model: {{init_from: {}}}
data: {{corpus: builtin:tinyshakespeare, tokenizer: {{vocab_size: 300}}, seq_len: 16}}
train: {{max_steps: 2, batch_size: 2, lr: 1.0e-3, eval_batches: 1, threads: 1, device: cpu}}
run: {{save_final: true, dir: {}}}
{checkpoint}",
        fixture("gemma3-multimodal-tiny"),
        dir.join("run").display()
    );
    std::fs::write(dir.join("mm.yaml"), recipe).unwrap();
    ok(&["train", "mm.yaml"], dir);
    dir.join("run")
}

#[test]
fn exports_load_in_transformers_and_the_gguf_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = train_from_multimodal(dir, None);
    let run_s = run.display().to_string();
    let final_dir = run.join("final");

    ok(
        &["export", &run_s, "--format", "hf", "--out", "hf-full"],
        dir,
    );
    ok(
        &[
            "export",
            &run_s,
            "--format",
            "hf",
            "--text-only",
            "--out",
            "hf-text",
        ],
        dir,
    );
    std::fs::create_dir(dir.join("gguf")).unwrap();
    for q in ["f32", "f16", "bf16", "q8_0", "q4_0"] {
        let out = format!("gguf/model-{q}.gguf");
        ok(
            &[
                "export", &run_s, "--format", "gguf", "--quant", q, "--out", &out,
            ],
            dir,
        );
    }
    let ids = "2,40,77,120,5,260,299,13,1,2,64,64,90,33,17,250";
    ok(
        &[
            "logits",
            "--model",
            final_dir.to_str().unwrap(),
            "--ids",
            ids,
            "--out",
            "logits.safetensors",
        ],
        dir,
    );
    let script = repo_root().join("tests/scripts/check_export.py");
    let args: Vec<std::path::PathBuf> = vec![
        repo_root().join("tests/fixtures/gemma3-multimodal-tiny"),
        final_dir.clone(),
        dir.join("logits-with-ids.safetensors"),
        dir.join("hf-full"),
        dir.join("hf-text"),
        dir.join("gguf"),
    ];
    // `atoll logits` writes logits only; the checker wants the ids next to them.
    write_logits_with_ids(
        &dir.join("logits.safetensors"),
        ids,
        &dir.join("logits-with-ids.safetensors"),
    );
    let args: Vec<&OsStr> = args.iter().map(|p| p.as_os_str()).collect();
    let out = run_reference_python(&script, &args);
    println!("{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

/// Prepends an int64 `input_ids` tensor to the safetensors file `atoll logits` wrote.
fn write_logits_with_ids(logits: &Path, ids: &str, out: &Path) {
    let bytes = std::fs::read(logits).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let (start, end) = (
        header["logits"]["data_offsets"][0].as_u64().unwrap() as usize,
        header["logits"]["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let ids: Vec<i64> = ids.split(',').map(|s| s.parse().unwrap()).collect();
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let new_header = serde_json::json!({
        "input_ids": {"dtype": "I64", "shape": [ids.len()], "data_offsets": [0, id_bytes.len()]},
        "logits": {"dtype": "F32", "shape": header["logits"]["shape"], "data_offsets": [id_bytes.len(), id_bytes.len() + end - start]},
    });
    let mut h = serde_json::to_vec(&new_header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(id_bytes);
    file.extend(&data[start..end]);
    std::fs::write(out, file).unwrap();
}

#[test]
fn bad_exports_fail_with_one_line_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let gemma3 = fixture("gemma3-multimodal-tiny");
    std::fs::create_dir(dir.join("out")).unwrap();

    let o = atoll(
        &[
            "export",
            &gemma3,
            "--format",
            "gguf",
            "--quant",
            "q5_k",
            "--out",
            "out/m.gguf",
        ],
        dir,
    );
    assert_clean_error(&o, "unknown --quant \"q5_k\"");

    // A Gemma 4 whose sliding layers scale RoPE: Atoll runs it, llama.cpp's gemma4 cannot say it.
    let scaled = dir.join("gemma4-scaled-sliding-rope");
    std::fs::create_dir(&scaled).unwrap();
    let source = Path::new(&fixture("gemma4-tiny")).to_path_buf();
    std::fs::copy(
        source.join("model.safetensors"),
        scaled.join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"]["sliding_attention"] =
        serde_json::json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0});
    std::fs::write(scaled.join("config.json"), config.to_string()).unwrap();
    write_byte_level_tokenizer(&dir.join("tokenizer.json"));
    let o = atoll(
        &[
            "export",
            scaled.to_str().unwrap(),
            "--format",
            "gguf",
            "--tokenizer",
            "tokenizer.json",
            "--out",
            "out/m.gguf",
        ],
        dir,
    );
    assert_clean_error(
        &o,
        "llama.cpp's gemma4 rotates sliding layers without scaling or partial rotation",
    );

    let o = atoll(
        &["export", &gemma3, "--format", "gguf", "--out", "out/m.gguf"],
        dir,
    );
    assert_clean_error(
        &o,
        "no tokenizer.json with the checkpoint; pass --tokenizer",
    );

    let o = atoll(
        &["export", "no/such/dir", "--format", "hf", "--out", "out/hf"],
        dir,
    );
    assert_clean_error(&o, "no/such/dir");
    assert_eq!(entries(&dir.join("out")), Vec::<String>::new());

    // A checkpoint whose manifest no longer matches its files.
    let run = train_from_multimodal(dir, Some(1));
    let store = run.join("checkpoints");
    let step = store.join("step-2");
    assert!(step.join("manifest.json").exists(), "{:?}", entries(&store));
    let weights = step.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    for reference in [
        step.display().to_string(),
        format!("{}/step-2", store.display()),
    ] {
        let o = atoll(
            &["export", &reference, "--format", "hf", "--out", "out/hf"],
            dir,
        );
        assert_clean_error(&o, "fails verification against its manifest");
    }
    // latest falls back to the intact step-1.
    ok(
        &[
            "export",
            &format!("{}/latest", store.display()),
            "--format",
            "hf",
            "--out",
            "out/hf",
        ],
        dir,
    );
    assert_eq!(entries(&dir.join("out")), vec!["hf".to_string()]);
    let o = atoll(
        &[
            "export",
            &run.display().to_string(),
            "--format",
            "hf",
            "--out",
            "out/hf",
        ],
        dir,
    );
    assert_clean_error(&o, "exists and is not empty");

    // An export that fails mid-way (the final norm, written last, stored as I32) removes what
    // it had written.
    let broken = dir.join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        Path::new(&gemma3).join("config.json"),
        broken.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(Path::new(&gemma3).join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    header["language_model.model.norm.weight"]["dtype"] = serde_json::json!("I32");
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(&bytes[8 + header_len..]);
    std::fs::write(broken.join("model.safetensors"), file).unwrap();
    let o = atoll(
        &[
            "export",
            broken.to_str().unwrap(),
            "--format",
            "gguf",
            "--tokenizer",
            run.join("tokenizer.json").to_str().unwrap(),
            "--out",
            "out/broken.gguf",
        ],
        dir,
    );
    assert_clean_error(&o, "tensor dtype I32 cannot be exported");
    assert_eq!(entries(&dir.join("out")), vec!["hf".to_string()]);
}

/// GPT-2's byte-to-character table: a byte-level BPE's 256 base tokens.
fn byte_level_alphabet() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap().to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap().to_string()
            }
        })
        .collect()
}

/// A 256-token byte-level BPE tokenizer.json (ids = the tiny fixtures' vocabulary).
fn write_byte_level_tokenizer(path: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_level_alphabet()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    });
    std::fs::write(path, tokenizer.to_string()).unwrap();
}

/// `atoll export` of fixture `name` as `format` (gguf or drafter-gguf) in `quant`, with the
/// byte-level tokenizer at `dir/tokenizer.json`, to `out` (relative to `dir`).
fn export_fixture_gguf(dir: &Path, name: &str, format: &str, quant: &str, out: &str) {
    ok(
        &[
            "export",
            &fixture(name),
            "--format",
            format,
            "--quant",
            quant,
            "--tokenizer",
            "tokenizer.json",
            "--out",
            out,
        ],
        dir,
    );
}

/// Runs a check script of tests/scripts/ with the reference stack; it prints `ok` last when every
/// check holds.
fn assert_reference_check(script: &str, args: &[&OsStr]) {
    let out = run_reference_python(&repo_root().join("tests/scripts").join(script), args);
    println!("{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

/// Gemma 4 as llama.cpp's `gemma4` (tests/scripts/check_gguf_gemma4.py): the K = V fixture in
/// every quant type, the one with v_proj on full layers, and the unified multimodal bf16 sharded
/// checkpoint (vision/audio left out); keys, tensor names and values read back with the gguf
/// package, logits through transformers' GGUF loader.
#[test]
fn gguf_gemma4_reads_back_in_llama_cpp_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_byte_level_tokenizer(&dir.join("tokenizer.json"));
    std::fs::create_dir(dir.join("gguf")).unwrap();
    let cases: [(&str, &[&str]); 3] = [
        ("gemma4-tiny", &["f32", "f16", "bf16", "q8_0", "q4_0"]),
        ("gemma4-tiny-no-keqv", &["f32", "f16"]),
        ("gemma4-unified-tiny-sharded-bf16", &["f32", "q8_0"]),
    ];
    for (name, quants) in cases {
        for q in quants {
            export_fixture_gguf(dir, name, "gguf", q, &format!("gguf/{name}-{q}.gguf"));
        }
    }
    let mut args = vec![dir.join("gguf"), dir.join("tokenizer.json")];
    args.extend(
        cases
            .iter()
            .map(|(name, _)| repo_root().join("tests/fixtures").join(name)),
    );
    let args: Vec<&OsStr> = args.iter().map(|p| p.as_os_str()).collect();
    assert_reference_check("check_gguf_gemma4.py", &args);
}

/// gemma3-tiny has query_pre_attn_scalar 20 and head_dim 24: llama.cpp scales scores by
/// 1/sqrt(head_dim), so the export folds sqrt(24/20) into q_norm; transformers reading the GGUF
/// (with that fold undone, since it applies query_pre_attn_scalar itself) reproduces the
/// fixture's reference logits.
#[test]
fn gguf_folds_query_pre_attn_scalar_into_q_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_byte_level_tokenizer(&dir.join("tokenizer.json"));
    std::fs::create_dir(dir.join("gguf")).unwrap();
    export_fixture_gguf(dir, "gemma3-tiny", "gguf", "f32", "gguf/tiny.gguf");
    let fixture_dir = repo_root().join("tests/fixtures/gemma3-tiny");
    let gguf_dir = dir.join("gguf");
    assert_reference_check(
        "check_gguf_fold.py",
        &[fixture_dir.as_os_str(), gguf_dir.as_os_str()],
    );
}

/// The MTP drafter as llama.cpp's `gemma4-assistant` (tests/scripts/check_gguf_drafter.py): the
/// drafter fixture exported in every quant type has the same model keys, tensor names, dims and
/// values as llama.cpp's own converter writes for it (tests/fixtures/gemma4-assistant-tiny/
/// llama-cpp-f32.gguf, from scripts/make_drafter_gguf_fixture.py), with the tokenizer embedded.
#[test]
fn gguf_drafter_equals_llama_cpps_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_byte_level_tokenizer(&dir.join("tokenizer.json"));
    std::fs::create_dir(dir.join("gguf")).unwrap();
    let mut exports = Vec::new();
    for q in ["f32", "f16", "bf16", "q8_0", "q4_0"] {
        let out = format!("gguf/drafter-{q}.gguf");
        export_fixture_gguf(dir, "gemma4-assistant-tiny", "drafter-gguf", q, &out);
        exports.push(dir.join(out));
    }
    let reference = repo_root().join("tests/fixtures/gemma4-assistant-tiny/llama-cpp-f32.gguf");
    let tokenizer = dir.join("tokenizer.json");
    let mut args = vec![reference.as_os_str(), tokenizer.as_os_str()];
    args.extend(exports.iter().map(|p| p.as_os_str()));
    assert_reference_check("check_gguf_drafter.py", &args);

    // Each a clear error, and no file: no tokenizer (the fixture has none and is no drafter
    // run); a text model, which is no drafter; a drafter through the model's format, pointed to
    // the drafter's.
    let refusals = [
        (
            "gemma4-assistant-tiny",
            "drafter-gguf",
            false,
            "no tokenizer.json with the drafter",
        ),
        ("gemma4-tiny", "drafter-gguf", true, "has no drafter"),
        (
            "gemma4-assistant-tiny",
            "gguf",
            true,
            "export it with --format drafter-gguf",
        ),
    ];
    for (name, format, with_tokenizer, needle) in refusals {
        let source = fixture(name);
        let mut args = vec![
            "export",
            &source,
            "--format",
            format,
            "--out",
            "gguf/none.gguf",
        ];
        if with_tokenizer {
            args.extend(["--tokenizer", "tokenizer.json"]);
        }
        assert_clean_error(&atoll(&args, dir), needle);
    }
    assert_eq!(entries(&dir.join("gguf")).len(), exports.len());
}
