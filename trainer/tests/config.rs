//! Config parsing and parameter counts against transformers.

use atoll_trainer::config::{GemmaConfig, LayerType, RopeKind};
use atoll_trainer::presets::preset;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `param_counts.json` holds the state_dict element counts transformers gives the released 12B
/// and 27B layouts (built on the meta device by scripts/make_fixtures.py).
#[test]
fn released_presets_count_what_the_real_checkpoints_hold() {
    let text = std::fs::read_to_string(fixtures().join("param_counts.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    for name in ["gemma3-12b", "gemma4-12b", "gemma3-27b"] {
        let p = preset(name).unwrap();
        let ours = p.config.num_parameters() + p.extras.vision + p.extras.audio;
        assert_eq!(ours, reference[name].as_u64().unwrap(), "{name}");
    }
    assert_eq!(
        preset("gemma3-12b").unwrap().config.num_parameters(),
        11_766_034_176
    );
}

#[test]
fn gemma4_12b_shapes_follow_the_released_layout() {
    let cfg = preset("gemma4-12b").unwrap().config;
    let specs = cfg.tensor_specs();
    // 48 layers × 13 tensors + 40 sliding v_proj + embedding + final norm.
    assert_eq!(specs.len(), 48 * 13 + 40 + 2);
    let shape = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
    assert_eq!(
        shape("model.layers.5.self_attn.q_proj.weight"),
        Some(vec![8192, 3840])
    );
    assert_eq!(
        shape("model.layers.5.self_attn.k_proj.weight"),
        Some(vec![512, 3840])
    );
    assert_eq!(shape("model.layers.5.self_attn.v_proj.weight"), None);
    assert_eq!(
        shape("model.layers.4.self_attn.v_proj.weight"),
        Some(vec![2048, 3840])
    );
    assert_eq!(
        shape("model.layers.47.self_attn.q_norm.weight"),
        Some(vec![512])
    );
}

#[test]
fn legacy_and_v5_spellings_parse_to_the_same_config() {
    let v5 = GemmaConfig::from_file(&fixtures().join("gemma3-tiny/config.json")).unwrap();
    let legacy =
        GemmaConfig::from_file(&fixtures().join("gemma3-tiny-legacy-config/config.json")).unwrap();
    assert_eq!(v5, legacy);
    assert_eq!(v5.layer_types[2], LayerType::Full);
    assert_eq!(v5.rope_full.kind, RopeKind::Linear { factor: 8.0 });
    assert_eq!(v5.rope_sliding.theta, 10_000.0);
}

#[test]
fn gemma4_legacy_global_fields_match_per_layer_config() {
    let text = std::fs::read_to_string(fixtures().join("gemma4-tiny/config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let modern = GemmaConfig::from_hf_json(&value).unwrap();
    let obj = value.as_object_mut().unwrap();
    obj.remove("per_layer_config");
    obj.insert("global_head_dim".into(), serde_json::json!(32));
    obj.insert("num_global_key_value_heads".into(), serde_json::json!(1));
    assert_eq!(GemmaConfig::from_hf_json(&value).unwrap(), modern);
    assert_eq!(modern.layer_attention(2).head_dim, 32);
    assert_eq!(modern.layer_attention(2).num_kv_heads, 1);
    assert!(modern.layer_attention(2).k_eq_v);
    assert!(!modern.layer_attention(1).k_eq_v);
}

#[test]
fn nested_text_config_of_multimodal_wrappers_is_read() {
    let cfg =
        GemmaConfig::from_file(&fixtures().join("gemma4-unified-tiny-sharded-bf16/config.json"))
            .unwrap();
    assert_eq!(cfg.hidden_size, 64);
    assert_eq!(cfg.final_logit_softcapping, Some(30.0));
}

#[test]
fn written_config_parses_back_identically() {
    for name in ["gemma3-12b", "gemma4-12b", "gemma3-tiny", "gemma4-tiny"] {
        let cfg = preset(name).unwrap().config;
        assert_eq!(
            GemmaConfig::from_hf_json(&cfg.to_hf_json()).unwrap(),
            cfg,
            "{name}"
        );
    }
}

#[test]
fn bad_configs_get_clear_errors() {
    let err = |v: serde_json::Value| format!("{:#}", GemmaConfig::from_hf_json(&v).unwrap_err());
    assert!(
        err(serde_json::json!({"model_type": "mistral"})).contains("unknown model_type `mistral`")
    );
    assert!(err(serde_json::json!({"model_type": "gemma3_text"}))
        .contains("missing required field `num_hidden_layers`"));
    let mut v = preset("gemma3-tiny").unwrap().config.to_hf_json();
    v["num_attention_heads"] = serde_json::json!(3);
    assert!(err(v).contains("must be a multiple of num_key_value_heads"));
}
