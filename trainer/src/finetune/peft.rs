//! PEFT's LoRA adapter format: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], which
//! `PeftModel.from_pretrained` loads onto the transformers model (and vLLM serves).

use crate::checkpoint::{serialize_host, tensors_from_bytes, HostTensor};
use crate::models::lora::{LoraSet, LoraSpec};
use crate::models::GemmaModel;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Kind, Tensor};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// `adapter_config.json` for a set of adapters on a base checkpoint.
pub fn adapter_config(spec: &LoraSpec, base_model: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": spec.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// The two files of a PEFT adapter, in memory (tensors in f32).
pub fn adapter_files(set: &LoraSet, base_model: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let tensors = set
        .named_tensors()
        .iter()
        .map(|(name, t)| {
            HostTensor::copy_of(&format!("{KEY_PREFIX}{name}"), &t.to_kind(Kind::Float))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(vec![
        (
            ADAPTER_CONFIG.to_string(),
            (serde_json::to_string_pretty(&adapter_config(&set.spec, base_model))? + "\n")
                .into_bytes(),
        ),
        (
            ADAPTER_WEIGHTS.to_string(),
            serialize_host(&tensors, Some(metadata))?,
        ),
    ])
}

/// Writes a PEFT adapter directory (files under temporary names, then renamed).
pub fn save_adapter(set: &LoraSet, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in adapter_files(set, base_model)? {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(&name))
            .with_context(|| format!("cannot write {}", dir.join(&name).display()))?;
    }
    Ok(())
}

/// A PEFT adapter read from disk: its hyper-parameters and (A, B) per module (Atoll's names).
pub struct PeftAdapter {
    pub spec: LoraSpec,
    pub weights: BTreeMap<String, (Option<Tensor>, Option<Tensor>)>,
}

fn config_spec(config: &Value, origin: &str) -> Result<LoraSpec> {
    let field = |name: &str| config.get(name).filter(|v| !v.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") | None => {}
        Some(other) => bail!("{origin}: peft_type `{other}` is not supported (only LORA)"),
    }
    if field("use_dora").and_then(Value::as_bool) == Some(true) {
        bail!("{origin}: DoRA adapters (use_dora: true) are not supported");
    }
    if let Some(bias) = field("bias").and_then(Value::as_str) {
        if bias != "none" {
            bail!("{origin}: bias `{bias}` is not supported (only \"none\")");
        }
    }
    if field("lora_bias").and_then(Value::as_bool) == Some(true) {
        bail!("{origin}: lora_bias: true is not supported");
    }
    for unsupported in [
        "modules_to_save",
        "layers_to_transform",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
    ] {
        if field(unsupported).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            bail!("{origin}: `{unsupported}` is not supported");
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if field(pattern)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            bail!("{origin}: per-module `{pattern}` is not supported");
        }
    }
    if field("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        bail!("{origin}: fan_in_fan_out: true is not supported (Gemma's layers are nn.Linear)");
    }
    let rank = field("r")
        .and_then(Value::as_i64)
        .ok_or_else(|| anyhow!("{origin}: `r` must be an integer"))?;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("{origin}: `lora_alpha` must be a number"))?;
    let targets = match field("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{origin}: target_modules must be names"))
            })
            .collect::<Result<Vec<_>>>()?,
        // A regex: the saved weights say which modules it selected.
        Some(Value::String(s)) => vec![s.clone()],
        _ => bail!("{origin}: `target_modules` is missing"),
    };
    let spec = LoraSpec {
        rank,
        alpha,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        targets,
    };
    spec.validate().map_err(|e| anyhow!("{origin}: {e}"))?;
    Ok(spec)
}

/// Maps a saved key to (module, "lora_A" | "lora_B") in Atoll's text-stack names.
fn module_of(key: &str) -> Option<(String, &'static str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (module, ab) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, "lora_A")
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, "lora_B")
    } else {
        return None;
    };
    // Multimodal checkpoints nest the text stack under `model.language_model.`.
    let module = match module.strip_prefix("model.language_model.") {
        Some(tail) => format!("model.{tail}"),
        None => module.to_string(),
    };
    Some((module, ab))
}

/// Reads a PEFT adapter directory.
pub fn read_adapter(dir: &Path) -> Result<PeftAdapter> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON ({e})", config_path.display()))?;
    let spec = config_spec(&config, &config_path.display().to_string())?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights_path)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    let origin = weights_path.display().to_string();
    let mut weights: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, tensor) in tensors_from_bytes(&bytes, &origin)? {
        let (module, ab) = module_of(&key).ok_or_else(|| {
            anyhow!("{origin}: unexpected tensor `{key}` (expected base_model.model.<module>.lora_A/lora_B.weight)")
        })?;
        let entry = weights.entry(module).or_default();
        match ab {
            "lora_A" => entry.0 = Some(tensor),
            _ => entry.1 = Some(tensor),
        }
    }
    if weights.is_empty() {
        bail!("{origin}: no LoRA tensors");
    }
    Ok(PeftAdapter { spec, weights })
}

/// Attaches a PEFT adapter from `dir` to `model` (freezing the base). Every saved module must
/// exist in the model with matching shapes.
pub fn load_adapter(model: &mut GemmaModel, dir: &Path) -> Result<LoraSet> {
    let adapter = read_adapter(dir)?;
    let origin = dir.join(ADAPTER_WEIGHTS).display().to_string();
    let shapes: HashMap<String, Vec<i64>> = model
        .linears_mut()
        .iter()
        .map(|l| (l.name.clone(), l.weight.size()))
        .collect();
    let r = adapter.spec.rank;
    for (module, (a, b)) in &adapter.weights {
        let w = shapes.get(module).ok_or_else(|| {
            anyhow!("{origin}: adapter for `{module}`, which is not a linear layer of this model")
        })?;
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            _ => bail!("{origin}: `{module}` needs both lora_A and lora_B"),
        };
        if a.size() != [r, w[1]] || b.size() != [w[0], r] {
            bail!(
                "{origin}: `{module}` has lora_A {:?} and lora_B {:?}; with r = {r} and a {:?} weight they must be [{r}, {}] and [{}, {r}]",
                a.size(),
                b.size(),
                w,
                w[1],
                w[0]
            );
        }
    }
    let set = LoraSet::attach_where(model, &adapter.spec, 0, |name| {
        adapter.weights.contains_key(name)
    })?;
    let _guard = tch::no_grad_guard();
    let mut vars = set.vs.variables();
    for (module, (a, b)) in adapter.weights {
        for (ab, t) in [("lora_A", a), ("lora_B", b)] {
            let t = t.expect("checked above");
            let var = vars
                .get_mut(&format!("{module}.{ab}.weight"))
                .expect("attached above");
            var.copy_(&t.to_kind(var.kind()).to_device(var.device()));
        }
    }
    Ok(set)
}
