//! Hugging Face checkpoint reading and writing: round trips, shards, dtypes and bad files.

use atoll_trainer::checkpoint::{
    load_model, save_model, HostModel, SharedTensor, DEFAULT_MAX_SHARD_BYTES, INDEX_FILE,
    SINGLE_FILE,
};
use atoll_trainer::presets::preset;
use atoll_trainer::GemmaModel;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn tiny(name: &str, seed: u64) -> GemmaModel {
    let mut cfg = preset(name).unwrap().config;
    cfg.vocab_size = 300;
    GemmaModel::new_seeded(cfg, Device::Cpu, Kind::Float, seed).unwrap()
}

fn ids() -> Tensor {
    Tensor::from_slice(&(0..80i64).map(|i| (i * 37) % 300).collect::<Vec<_>>()).unsqueeze(0)
}

fn logits(model: &GemmaModel) -> Tensor {
    tch::no_grad(|| model.forward(&ids()))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn f32_round_trip_is_exact_for_both_architectures() {
    for name in ["gemma3-tiny", "gemma4-tiny"] {
        let model = tiny(name, 11);
        let dir = tempfile::tempdir().unwrap();
        save_model(&model, dir.path(), Kind::Float, DEFAULT_MAX_SHARD_BYTES).unwrap();
        assert!(dir.path().join(SINGLE_FILE).exists());
        assert!(!dir.path().join(INDEX_FILE).exists());
        let loaded = load_model(dir.path(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(loaded.config, model.config);
        assert_eq!(max_diff(&logits(&model), &logits(&loaded)), 0.0, "{name}");
    }
}

#[test]
fn sharded_bf16_save_writes_an_index_and_loads_back() {
    let model = tiny("gemma4-tiny", 12);
    let dir = tempfile::tempdir().unwrap();
    save_model(&model, dir.path(), Kind::BFloat16, 300_000).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), model.config.tensor_specs().len());
    let shards: std::collections::BTreeSet<_> = map
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(shards.len() > 1);
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        2 * model.config.num_parameters()
    );
    let loaded = load_model(dir.path(), Device::Cpu, Kind::Float).unwrap();
    // Every weight comes back as exactly its bf16 rounding.
    let original = model.vs.variables();
    for (name, t) in loaded.vs.variables() {
        let expected = original[&name].to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert_eq!(max_diff(&t, &expected), 0.0, "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    assert_eq!(config["architectures"][0], "Gemma4UnifiedForCausalLM");
}

/// The coordinator checkpoints Θ from the syncer's fragments, never loading them into a model:
/// a model's checkpoint taking every trainable tensor from shared f32 values must equal, byte for
/// byte, the checkpoint of a model that holds those values, in f32 and in bf16, sharded.
#[test]
fn a_checkpoint_of_shared_values_equals_one_of_a_model_holding_them() {
    let holder = tiny("gemma4-tiny", 12);
    let other = tiny("gemma4-tiny", 13);
    // The holder's trainable tensors in two shared groups, as fragments would be.
    let named = holder.named_trainable_parameters();
    let values: Vec<Vec<f32>> = named
        .iter()
        .map(|(_, t)| atoll_trainer::worker::flat(t))
        .collect();
    let half = values.len() / 2;
    let groups = [
        std::sync::Arc::new(values[..half].to_vec()),
        std::sync::Arc::new(values[half..].to_vec()),
    ];
    let shared = |name: &str| -> Option<SharedTensor> {
        let i = named.iter().position(|(n, _)| n == name)?;
        Some(if i < half {
            (groups[0].clone(), i)
        } else {
            (groups[1].clone(), i - half)
        })
    };
    for kind in [Kind::Float, Kind::BFloat16] {
        let expected = HostModel::copy_of(&holder, kind, 300_000)
            .unwrap()
            .into_files()
            .unwrap();
        let got = HostModel::sharing(&other, kind, 300_000, &shared)
            .unwrap()
            .into_files()
            .unwrap();
        assert!(expected.len() > 2, "sharded: {}", expected.len());
        assert_eq!(got.len(), expected.len());
        for ((name, bytes), (want_name, want)) in got.iter().zip(&expected) {
            assert_eq!(name, want_name);
            assert!(bytes == want, "{name} differs ({kind:?})");
        }
        // And the shared values are what was written, not the model's own.
        let unshared = HostModel::copy_of(&other, kind, 300_000)
            .unwrap()
            .into_files()
            .unwrap();
        assert!(unshared[0].1 != expected[0].1);
    }
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gemma3-tiny"), dir.path());
    let file = dir.path().join(SINGLE_FILE);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("not a valid safetensors file") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_weights_and_missing_shards_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gemma3-tiny"), dir.path());
    std::fs::remove_file(dir.path().join(SINGLE_FILE)).unwrap();
    assert!(load_err(dir.path()).contains("no model.safetensors or model.safetensors.index.json"));

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gemma4-unified-tiny-sharded-bf16"), dir.path());
    std::fs::remove_file(dir.path().join("model-00003-of-00007.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model-00003-of-00007.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn shape_disagreeing_with_the_config_is_reported_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gemma3-tiny"), dir.path());
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("tensor `model.layers.0.mlp.down_proj.weight` has shape [64, 160] but config.json implies [64, 96]"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let model = tiny("gemma3-tiny", 13);
    let dir = tempfile::tempdir().unwrap();
    save_model(&model, dir.path(), Kind::Float, DEFAULT_MAX_SHARD_BYTES).unwrap();
    // Declare one more layer than the file holds.
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(5);
    config["layer_types"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!("full_attention"));
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("missing from the checkpoint") && err.contains("model.layers.4."),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gemma3-tiny"), dir.path());
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("gemma3_text", "llama");
    std::fs::write(&path, text).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("unknown model_type `llama`"), "{err}");
}
