//! Logit parity with transformers on tiny random checkpoints made by `scripts/make_fixtures.py`.
//! Tolerance: max |Δlogit| ≤ 1e-4 in f32 (the reference is transformers eager attention in f32).

use atoll_trainer::checkpoint::{load_model, read_tensors};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn max_logit_error(name: &str) -> f64 {
    let dir = fixture(name);
    let model = load_model(&dir, Device::Cpu, Kind::Float).expect("fixture loads");
    let reference = read_tensors(&dir.join("reference.safetensors")).expect("reference readable");
    let get = |key: &str| -> Tensor {
        reference
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t.shallow_clone())
            .expect(key)
    };
    let ids = get("input_ids");
    let expected = get("logits");
    assert!(
        ids.size()[0] as usize > model.config.sliding_window,
        "sequence must exceed the window"
    );
    let logits = tch::no_grad(|| model.forward(&ids.unsqueeze(0))).squeeze_dim(0);
    assert_eq!(logits.size(), expected.size());
    (logits - expected).abs().max().double_value(&[])
}

macro_rules! parity {
    ($test:ident, $fixture:literal) => {
        #[test]
        fn $test() {
            let err = max_logit_error($fixture);
            assert!(
                err <= TOLERANCE,
                "{}: max |Δlogit| = {err:e} > {TOLERANCE:e}",
                $fixture
            );
        }
    };
}

parity!(gemma3_gqa_sliding_and_full_layers, "gemma3-tiny");
parity!(gemma3_legacy_config_spelling, "gemma3-tiny-legacy-config");
parity!(gemma3_attention_and_final_softcaps, "gemma3-tiny-softcap");
parity!(gemma3_bf16_checkpoint, "gemma3-tiny-bf16");
parity!(gemma4_k_eq_v_proportional_rope_layer_scalar, "gemma4-tiny");
parity!(gemma4_without_k_eq_v, "gemma4-tiny-no-keqv");
parity!(
    gemma4_unified_multimodal_prefix_sharded_bf16,
    "gemma4-unified-tiny-sharded-bf16"
);
