//! LoRA against PEFT (fixtures made by scripts/make_lora_fixtures.py), packing and activation
//! checkpointing against the plain forward/backward.

use atoll_trainer::finetune::{load_base, peft};
use atoll_trainer::models::lora::{LoraSet, LoraSpec, DEFAULT_TARGETS};
use atoll_trainer::models::recompute::{TokenBatch, IGNORE_LABEL};
use atoll_trainer::recipe::ParamDtype;
use atoll_trainer::GemmaModel;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn reference(name: &str) -> (Tensor, Tensor) {
    let path = fixtures()
        .join("lora")
        .join(name)
        .join("reference.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    (
        tensors["input_ids"].shallow_clone(),
        tensors["logits"].shallow_clone(),
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A PEFT-saved adapter on the transformers fixture gives PEFT's float32 eager logits within 1e-4.
#[test]
fn peft_saved_adapters_give_peft_logits() {
    for (name, base) in [
        ("gemma3-tiny-r4", "gemma3-tiny"),
        ("gemma4-tiny-rslora", "gemma4-tiny"),
    ] {
        let mut model = load_base(&fixtures().join(base), Device::Cpu, ParamDtype::F32).unwrap();
        let set = peft::load_adapter(&mut model, &fixtures().join("lora").join(name)).unwrap();
        let (ids, expected) = reference(name);
        let logits = tch::no_grad(|| model.forward(&ids.unsqueeze(0))).squeeze_dim(0);
        let diff = max_diff(&logits, &expected);
        assert!(diff < 1e-4, "{name}: logits differ from PEFT's by {diff}");
        // The adapter matters: without it the logits are far off.
        set.merge(&mut model).unwrap();
        set.unmerge(&mut model).unwrap();
        let plain = load_base(&fixtures().join(base), Device::Cpu, ParamDtype::F32).unwrap();
        let base_logits = tch::no_grad(|| plain.forward(&ids.unsqueeze(0))).squeeze_dim(0);
        assert!(max_diff(&base_logits, &expected) > 1e-2, "{name}");
        if name == "gemma4-tiny-rslora" {
            assert!(set.spec.rslora);
            // Full layers of this fixture have K = V and no v_proj to adapt.
            assert!(!set
                .modules
                .iter()
                .any(|m| m == "model.layers.5.self_attn.v_proj"));
        }
    }
}

/// What Atoll writes, Atoll reads back with the same values and logits (the PEFT side of this
/// round trip is the system test tests/tests/finetune.rs).
#[test]
fn saved_adapters_round_trip() {
    let base = fixtures().join("gemma3-tiny");
    let mut model = load_base(&base, Device::Cpu, ParamDtype::F32).unwrap();
    let set = peft::load_adapter(&mut model, &fixtures().join("lora/gemma3-tiny-r4")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    peft::save_adapter(&set, dir.path(), "tests/fixtures/gemma3-tiny").unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(peft::ADAPTER_CONFIG)).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    let mut again = load_base(&base, Device::Cpu, ParamDtype::F32).unwrap();
    peft::load_adapter(&mut again, dir.path()).unwrap();
    let (ids, expected) = reference("gemma3-tiny-r4");
    let logits = tch::no_grad(|| again.forward(&ids.unsqueeze(0))).squeeze_dim(0);
    assert!(max_diff(&logits, &expected) < 1e-4);
}

#[test]
fn bad_adapters_are_clear_errors() {
    let base = fixtures().join("gemma3-tiny");
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("lora/gemma3-tiny-r4");
    std::fs::copy(
        src.join(peft::ADAPTER_WEIGHTS),
        dir.path().join(peft::ADAPTER_WEIGHTS),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join(peft::ADAPTER_CONFIG)).unwrap();
    let cases = [
        (
            config.replace("\"r\": 4", "\"r\": 0"),
            "rank must be a positive",
        ),
        (config.replace("\"r\": 4", "\"r\": 5"), "with r = 5"),
        (
            config.replace("\"use_dora\": false", "\"use_dora\": true"),
            "DoRA",
        ),
        ("{".to_string(), "not valid JSON"),
    ];
    for (text, needle) in cases {
        std::fs::write(dir.path().join(peft::ADAPTER_CONFIG), text).unwrap();
        let mut model = load_base(&base, Device::Cpu, ParamDtype::F32).unwrap();
        let err = format!(
            "{:#}",
            peft::load_adapter(&mut model, dir.path()).err().unwrap()
        );
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    }
    // An adapter made for Gemma 4 does not fit Gemma 3's layers.
    let mut model = load_base(&base, Device::Cpu, ParamDtype::F32).unwrap();
    let err = format!(
        "{:#}",
        peft::load_adapter(&mut model, &fixtures().join("lora/gemma4-tiny-rslora"))
            .err()
            .unwrap()
    );
    assert!(err.contains("lora_A"), "{err}");
}

fn row_batch(ids: &[i64], labels: &[i64], positions: &[i64], segments: &[i64]) -> TokenBatch {
    let t = |v: &[i64]| Tensor::from_slice(v).view([1, -1]);
    TokenBatch {
        ids: t(ids),
        labels: t(labels),
        positions: t(positions),
        segments: t(segments),
    }
}

/// Two examples packed in one row give the logits each has alone (positions restart, attention
/// stays inside), on both architectures (sliding window 8 is shorter than the examples).
#[test]
fn packed_examples_are_computed_as_if_alone() {
    for base in ["gemma3-tiny", "gemma4-tiny"] {
        let model = load_base(&fixtures().join(base), Device::Cpu, ParamDtype::F32).unwrap();
        let a: Vec<i64> = (0..13).map(|i| (i * 7 + 3) % 256).collect();
        let b: Vec<i64> = (0..11).map(|i| (i * 13 + 5) % 256).collect();
        let alone = |x: &[i64]| {
            tch::no_grad(|| model.forward(&Tensor::from_slice(x).unsqueeze(0))).squeeze_dim(0)
        };
        let ids: Vec<i64> = a.iter().chain(&b).copied().collect();
        let positions: Vec<i64> = (0..13).chain(0..11).collect();
        let segments: Vec<i64> = [0; 13].into_iter().chain([1; 11]).collect();
        let labels = vec![IGNORE_LABEL; 24];
        let packed =
            tch::no_grad(|| model.packed_logits(&row_batch(&ids, &labels, &positions, &segments)))
                .squeeze_dim(0);
        let da = max_diff(&packed.narrow(0, 0, 13), &alone(&a));
        let db = max_diff(&packed.narrow(0, 13, 11), &alone(&b));
        // The same arithmetic over other GEMM shapes (one row of 24 against rows of 13 and 11):
        // f32 rounding, 1.2e-5 seen on an AVX-512 Xeon. Attention leaking across the two
        // examples or a position not restarting moves logits by O(1).
        assert!(da < 1e-4 && db < 1e-4, "{base}: {da} {db}");
    }
}

fn adapted_tiny(dropout: f64) -> (GemmaModel, LoraSet) {
    let mut model = load_base(
        &fixtures().join("gemma4-tiny"),
        Device::Cpu,
        ParamDtype::F32,
    )
    .unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout,
        rslora: false,
        targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
    };
    let set = LoraSet::attach(&mut model, &spec, 7).unwrap();
    {
        // Non-zero B from a formula, not libtorch's process-wide generator, which the other
        // tests' threads draw from concurrently.
        let _g = tch::no_grad_guard();
        for (name, mut t) in set.named_tensors() {
            if name.contains("lora_B") {
                let n = t.numel() as i64;
                let values = (Tensor::arange(n, (Kind::Float, t.device())) * 0.37).sin() * 0.1;
                t.copy_(&values.view(t.size().as_slice()));
            }
        }
    }
    set.set_training(true);
    (model, set)
}

fn grads(set: &LoraSet) -> Vec<Tensor> {
    set.parameters().iter().map(|p| p.grad().copy()).collect()
}

/// Per-layer recomputation gives the gradients of the plain backward: f32, within 1e-5 relative
/// to the largest gradient; with dropout too, since the recomputation replays the masks.
#[test]
fn checkpointing_gives_the_same_adapter_gradients() {
    let ids: Vec<i64> = (0..20).map(|i| (i * 31 + 7) % 256).collect();
    let labels: Vec<i64> = ids[1..]
        .iter()
        .copied()
        .chain([IGNORE_LABEL])
        .enumerate()
        .map(|(i, l)| if i < 6 { IGNORE_LABEL } else { l })
        .collect();
    let positions: Vec<i64> = (0..12).chain(0..8).collect();
    let segments: Vec<i64> = [0; 12].into_iter().chain([1; 8]).collect();
    let batch = row_batch(&ids, &labels, &positions, &segments);
    for dropout in [0.0, 0.2] {
        let seed = (dropout > 0.0).then_some(99);
        let (model, set) = adapted_tiny(dropout);
        let plain_loss = model.packed_loss_backward(&batch, 0.1, false, seed);
        let plain = grads(&set);
        let (model, set) = adapted_tiny(dropout);
        let ckpt_loss = model.packed_loss_backward(&batch, 0.1, true, seed);
        let ckpt = grads(&set);
        // Without a graph libtorch may pick other kernels: equal to float32 rounding.
        assert!(
            (plain_loss - ckpt_loss).abs() < 1e-6 * plain_loss.abs(),
            "dropout {dropout}: loss {plain_loss} vs {ckpt_loss}"
        );
        let scale = plain
            .iter()
            .map(|g| g.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(scale > 0.0);
        for (p, c) in plain.iter().zip(&ckpt) {
            let d = max_diff(p, c);
            assert!(
                d <= 1e-6 * scale,
                "dropout {dropout}: gradient differs by {d} (scale {scale})"
            );
        }
    }
}

/// A bf16 base stays bf16 (loaded without an f32 copy), the adapters are f32, and the logits
/// follow the f32 model's within bf16 rounding.
#[test]
fn bf16_base_with_f32_adapters() {
    let base = fixtures().join("gemma3-tiny");
    let mut model = load_base(&base, Device::Cpu, ParamDtype::Bf16).unwrap();
    let set = peft::load_adapter(&mut model, &fixtures().join("lora/gemma3-tiny-r4")).unwrap();
    assert!(model
        .vs
        .variables()
        .values()
        .all(|t| t.kind() == Kind::BFloat16));
    assert!(set.parameters().iter().all(|t| t.kind() == Kind::Float));
    let (ids, expected) = reference("gemma3-tiny-r4");
    let logits = tch::no_grad(|| model.forward(&ids.unsqueeze(0))).squeeze_dim(0);
    let rel = max_diff(&logits, &expected) / expected.abs().max().double_value(&[]);
    assert!(rel < 0.05, "bf16 logits off by {rel} of the range");
}
