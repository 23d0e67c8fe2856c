//! Nothing silently lost: loading a multimodal checkpoint and saving it keeps every tensor Atoll
//! does not train (vision tower, projector, vision/audio embedders) bit for bit, the text stack
//! under the source's own names, and the source config.json.

use atoll_trainer::checkpoint::{load_model, save_model, weight_files, DEFAULT_MAX_SHARD_BYTES};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// name -> (dtype, shape, bytes) of every tensor of a checkpoint directory.
fn all_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for file in weight_files(dir).unwrap() {
        let bytes = std::fs::read(&file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let entry = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            assert!(out.insert(name.clone(), entry).is_none(), "{name} twice");
        }
    }
    out
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn is_text(name: &str) -> bool {
    name.starts_with("language_model.") || name.starts_with("model.language_model.")
}

#[test]
fn multimodal_checkpoints_survive_load_and_save_bit_for_bit() {
    for (name, kind, shard) in [
        (
            "gemma3-multimodal-tiny",
            Kind::Float,
            DEFAULT_MAX_SHARD_BYTES,
        ),
        ("gemma4-unified-tiny-sharded-bf16", Kind::BFloat16, 200_000),
    ] {
        let src = fixture(name);
        let source = all_tensors(&src);
        assert!(
            source.keys().filter(|n| !is_text(n)).count() >= 4,
            "{name}: fixture has its vision/audio tensors"
        );
        // Loaded in f32 for training, saved in the checkpoint's own dtype.
        let model = load_model(&src, Device::Cpu, Kind::Float).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_model(&model, out.path(), kind, shard).unwrap();
        let saved = all_tensors(out.path());
        assert_eq!(
            saved.keys().collect::<Vec<_>>(),
            source.keys().collect::<Vec<_>>(),
            "{name}: same tensor names"
        );
        for (tensor, expected) in &source {
            assert_eq!(&saved[tensor], expected, "{name}: {tensor} differs");
        }
        assert_eq!(config(out.path()), config(&src), "{name}: config.json");
        assert_eq!(
            std::fs::read(out.path().join("generation_config.json")).unwrap(),
            std::fs::read(src.join("generation_config.json")).unwrap()
        );

        // A second generation (load what Atoll saved, save again in f32) still keeps the
        // untrained tensors bit for bit; the text stack changes dtype only.
        let again = load_model(out.path(), Device::Cpu, Kind::Float).unwrap();
        let out2 = tempfile::tempdir().unwrap();
        save_model(&again, out2.path(), Kind::Float, DEFAULT_MAX_SHARD_BYTES).unwrap();
        let saved2 = all_tensors(out2.path());
        assert_eq!(saved2.len(), source.len());
        for (tensor, expected) in source.iter().filter(|(n, _)| !is_text(n)) {
            assert_eq!(
                &saved2[tensor], expected,
                "{name}: {tensor} after two saves"
            );
        }
        let mut cfg2 = config(out2.path());
        assert_eq!(cfg2["dtype"], "float32");
        cfg2["dtype"] = config(&src)["dtype"].clone();
        assert_eq!(cfg2, config(&src), "{name}: config.json after two saves");
    }
}

#[test]
fn models_built_from_presets_save_the_text_only_layout() {
    let cfg = atoll_trainer::presets::preset("gemma3-tiny")
        .unwrap()
        .config;
    let model = atoll_trainer::GemmaModel::new_seeded(cfg, Device::Cpu, Kind::Float, 1).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_model(&model, out.path(), Kind::Float, DEFAULT_MAX_SHARD_BYTES).unwrap();
    assert!(all_tensors(out.path())
        .keys()
        .all(|n| n.starts_with("model.layers.") || n.starts_with("model.")));
    assert_eq!(config(out.path())["model_type"], "gemma3_text");
}
