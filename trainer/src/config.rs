//! Model configuration mirroring Hugging Face `config.json` for the Gemma 3 text and Gemma 4
//! (`gemma4_unified` text stack) architectures.
//!
//! Both config spellings are accepted: transformers v5 (`rope_parameters` per layer type, explicit
//! `layer_types`, `per_layer_config`) and the legacy one (`rope_theta`, `rope_local_base_freq`,
//! `rope_scaling`, `sliding_window_pattern`, `global_head_dim`, `num_global_key_value_heads`).
//! Multimodal wrappers (`gemma3`, `gemma4_unified`) are read through their `text_config`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `Gemma3ForCausalLM`, `model_type: gemma3_text`.
    Gemma3,
    /// The text stack of `Gemma4UnifiedForCausalLM`, `model_type: gemma4_unified_text`.
    Gemma4,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Gemma3 => "gemma3",
            Architecture::Gemma4 => "gemma4",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Full,
}

impl LayerType {
    fn hf_name(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeKind {
    Default,
    /// Frequencies divided by `factor` (Gemma 3 global layers: 8).
    Linear {
        factor: f64,
    },
    /// Only the first `partial_rotary_factor` of the frequency pairs rotate; the rest are identity
    /// (Gemma 4 global layers: 0.25).
    Proportional {
        partial_rotary_factor: f64,
        factor: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    pub kind: RopeKind,
}

/// Attention geometry of one layer (Gemma 4 full layers differ from sliding ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAttention {
    pub layer_type: LayerType,
    pub head_dim: usize,
    pub num_kv_heads: usize,
    /// K = V: the layer has no `v_proj`; values are the raw `k_proj` output.
    pub k_eq_v: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_sliding: RopeParams,
    pub rope_full: RopeParams,
    /// Gemma 3: scores are scaled by `query_pre_attn_scalar^-0.5`. Gemma 4 uses 1.0.
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 4 full layers: head dim, KV-head count and K = V.
    pub global_head_dim: usize,
    pub num_global_key_value_heads: usize,
    pub attention_k_eq_v: bool,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub pad_token_id: i64,
}

/// One tensor of the Hugging Face checkpoint layout (names without any prefix beyond `model.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    /// Buffers such as `layer_scalar` are stored in checkpoints but not trained.
    pub trainable: bool,
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn req_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    opt_usize(obj, key)?.ok_or_else(|| anyhow!("config.json: missing required field `{key}`"))
}

fn opt_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match get(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("config.json: `{key}` must be a positive integer, got {v}")),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match get(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("config.json: `{key}` must be a number, got {v}")),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match get(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| anyhow!("config.json: `{key}` must be true or false, got {v}")),
    }
}

/// `eos_token_id` may be a list (`[1, 106]`); the first entry ends training documents.
fn token_id(obj: &Map<String, Value>, key: &str, default: i64) -> i64 {
    match get(obj, key) {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(default),
        Some(Value::Array(a)) => a.first().and_then(Value::as_i64).unwrap_or(default),
        _ => default,
    }
}

fn parse_rope(entry: &Value, default_theta: f64, what: &str) -> Result<RopeParams> {
    let obj = entry
        .as_object()
        .ok_or_else(|| anyhow!("config.json: rope parameters for {what} must be an object"))?;
    let theta = opt_f64(obj, "rope_theta")?.unwrap_or(default_theta);
    let rope_type = get(obj, "rope_type")
        .or_else(|| get(obj, "type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = opt_f64(obj, "factor")?.unwrap_or(1.0);
    let kind = match rope_type {
        "default" => RopeKind::Default,
        "linear" => RopeKind::Linear { factor },
        "proportional" => RopeKind::Proportional {
            partial_rotary_factor: opt_f64(obj, "partial_rotary_factor")?.unwrap_or(1.0),
            factor,
        },
        other => bail!(
            "config.json: rope_type `{other}` for {what} is not supported (supported: default, linear, proportional)"
        ),
    };
    Ok(RopeParams { theta, kind })
}

impl GemmaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&value).with_context(|| format!("in {}", path.display()))
    }

    /// Parses a Hugging Face `config.json` value.
    pub fn from_hf_json(value: &Value) -> Result<Self> {
        let top = value
            .as_object()
            .ok_or_else(|| anyhow!("config.json: expected a JSON object"))?;
        let model_type = get(top, "model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("config.json: missing `model_type`"))?;
        let (architecture, obj) = match model_type {
            "gemma3_text" => (Architecture::Gemma3, top),
            "gemma4_unified_text" => (Architecture::Gemma4, top),
            "gemma3" | "gemma4_unified" => {
                let text = get(top, "text_config").and_then(Value::as_object).ok_or_else(|| {
                    anyhow!("config.json: `{model_type}` config has no `text_config` object")
                })?;
                let arch = if model_type == "gemma3" {
                    Architecture::Gemma3
                } else {
                    Architecture::Gemma4
                };
                (arch, text)
            }
            other => bail!(
                "config.json: unknown model_type `{other}` (supported: gemma3_text, gemma3, gemma4_unified_text, gemma4_unified)"
            ),
        };
        let gemma4 = architecture == Architecture::Gemma4;

        if let Some(act) = get(obj, "hidden_activation").and_then(Value::as_str) {
            if act != "gelu_pytorch_tanh" {
                bail!("config.json: hidden_activation `{act}` is not supported (Gemma uses gelu_pytorch_tanh)");
            }
        }
        if opt_bool(obj, "attention_bias")?.unwrap_or(false) {
            bail!("config.json: attention_bias=true is not supported by Gemma");
        }
        if get(obj, "num_kv_shared_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            > 0
        {
            bail!(
                "config.json: num_kv_shared_layers > 0 (KV sharing) is not supported by Atoll yet"
            );
        }
        if gemma4 && opt_bool(obj, "use_double_wide_mlp")?.unwrap_or(false) {
            bail!("config.json: use_double_wide_mlp is not supported by Atoll yet");
        }
        if let Some(Value::String(mode)) = get(obj, "use_bidirectional_attention") {
            if mode == "all" {
                bail!("config.json: use_bidirectional_attention=\"all\" (a bidirectional encoder) is not supported");
            }
        }
        if opt_bool(obj, "use_bidirectional_attention").unwrap_or(None) == Some(true) {
            bail!("config.json: use_bidirectional_attention=true is not supported");
        }

        let num_hidden_layers = req_usize(obj, "num_hidden_layers")?;
        let num_attention_heads = req_usize(obj, "num_attention_heads")?;
        let hidden_size = req_usize(obj, "hidden_size")?;
        let head_dim =
            opt_usize(obj, "head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
        let num_key_value_heads =
            opt_usize(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads);

        let layer_types = match get(obj, "layer_types") {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    Some("full_attention") => Ok(LayerType::Full),
                    _ => Err(anyhow!(
                        "config.json: layer_types[{i}] must be \"sliding_attention\" or \"full_attention\", got {v}"
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => bail!("config.json: `layer_types` must be a list, got {other}"),
            None => {
                let pattern = opt_usize(obj, "sliding_window_pattern")?
                    .or(opt_usize(obj, "_sliding_window_pattern")?)
                    .unwrap_or(6);
                (0..num_hidden_layers)
                    .map(|i| {
                        if (i + 1) % pattern == 0 {
                            LayerType::Full
                        } else {
                            LayerType::Sliding
                        }
                    })
                    .collect()
            }
        };
        if layer_types.len() != num_hidden_layers {
            bail!(
                "config.json: layer_types has {} entries but num_hidden_layers is {num_hidden_layers}",
                layer_types.len()
            );
        }

        let (default_full, default_sliding) = (1_000_000.0, 10_000.0);
        let (rope_full, rope_sliding) = match get(obj, "rope_parameters") {
            Some(Value::Object(rp)) if rp.contains_key("full_attention") => {
                let full = parse_rope(&rp["full_attention"], default_full, "full_attention")?;
                let sliding = match get(rp, "sliding_attention") {
                    Some(s) => parse_rope(s, default_sliding, "sliding_attention")?,
                    None => RopeParams {
                        theta: default_sliding,
                        kind: RopeKind::Default,
                    },
                };
                (full, sliding)
            }
            Some(single @ Value::Object(_)) => {
                // One dict for every layer type (older v5 form): applies to full layers; the
                // sliding layers keep the local base frequency.
                let full = parse_rope(single, default_full, "all layers")?;
                let local = opt_f64(obj, "rope_local_base_freq")?.unwrap_or(default_sliding);
                (
                    full,
                    RopeParams {
                        theta: local,
                        kind: RopeKind::Default,
                    },
                )
            }
            Some(other) => bail!("config.json: `rope_parameters` must be an object, got {other}"),
            None => {
                let theta = opt_f64(obj, "rope_theta")?.unwrap_or(default_full);
                let full = match get(obj, "rope_scaling") {
                    Some(s) => parse_rope(s, theta, "rope_scaling")?,
                    None => RopeParams {
                        theta,
                        kind: RopeKind::Default,
                    },
                };
                let full = RopeParams { theta, ..full };
                let local = opt_f64(obj, "rope_local_base_freq")?.unwrap_or(default_sliding);
                (
                    full,
                    RopeParams {
                        theta: local,
                        kind: RopeKind::Default,
                    },
                )
            }
        };

        let attention_k_eq_v = gemma4 && opt_bool(obj, "attention_k_eq_v")?.unwrap_or(false);
        let (mut global_head_dim, mut num_global_key_value_heads) = (head_dim, num_key_value_heads);
        if gemma4 {
            global_head_dim = opt_usize(obj, "global_head_dim")?.unwrap_or(512);
            if attention_k_eq_v {
                if let Some(n) = opt_usize(obj, "num_global_key_value_heads")? {
                    num_global_key_value_heads = n;
                }
            }
            // transformers >= 5.x serialises the overrides as `per_layer_config` keyed by layer index.
            if let Some(Value::Object(per_layer)) = get(obj, "per_layer_config") {
                let mut seen = None;
                for (key, entry) in per_layer {
                    let idx: usize = key.parse().map_err(|_| {
                        anyhow!("config.json: per_layer_config key `{key}` is not a layer index")
                    })?;
                    if layer_types.get(idx) != Some(&LayerType::Full) {
                        bail!("config.json: per_layer_config overrides layer {idx}, which is not a full-attention layer");
                    }
                    let e = entry.as_object().ok_or_else(|| {
                        anyhow!("config.json: per_layer_config[{key}] must be an object")
                    })?;
                    let hd = opt_usize(e, "head_dim")?.unwrap_or(head_dim);
                    let kv = opt_usize(e, "num_key_value_heads")?.unwrap_or(num_key_value_heads);
                    if seen.is_some_and(|s| s != (hd, kv)) {
                        bail!("config.json: per_layer_config gives full layers different shapes; Atoll supports one shape for all full layers");
                    }
                    seen = Some((hd, kv));
                }
                if let Some((hd, kv)) = seen {
                    global_head_dim = hd;
                    num_global_key_value_heads = kv;
                }
            }
        }

        let cfg = GemmaConfig {
            architecture,
            vocab_size: req_usize(obj, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(obj, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: opt_usize(obj, "max_position_embeddings")?.unwrap_or(8192),
            rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?
                .or(opt_bool(top, "tie_word_embeddings")?)
                .unwrap_or(true),
            sliding_window: opt_usize(obj, "sliding_window")?.unwrap_or(4096),
            layer_types,
            rope_sliding,
            rope_full,
            query_pre_attn_scalar: if gemma4 {
                1.0
            } else {
                opt_f64(obj, "query_pre_attn_scalar")?.unwrap_or(head_dim as f64)
            },
            attn_logit_softcapping: opt_f64(obj, "attn_logit_softcapping")?,
            final_logit_softcapping: opt_f64(obj, "final_logit_softcapping")?,
            global_head_dim,
            num_global_key_value_heads,
            attention_k_eq_v,
            bos_token_id: token_id(obj, "bos_token_id", 2),
            eos_token_id: token_id(obj, "eos_token_id", 1),
            pad_token_id: token_id(obj, "pad_token_id", 0),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_global_key_value_heads)
        {
            bail!(
                "config: num_attention_heads ({}) must be a multiple of the full layers' KV heads ({})",
                self.num_attention_heads,
                self.num_global_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) || !self.global_head_dim.is_multiple_of(2) {
            bail!("config: head dimensions must be even for RoPE");
        }
        if self.architecture == Architecture::Gemma3 && self.query_pre_attn_scalar <= 0.0 {
            bail!("config: query_pre_attn_scalar must be positive");
        }
        Ok(())
    }

    pub fn layer_attention(&self, layer: usize) -> LayerAttention {
        let layer_type = self.layer_types[layer];
        match (self.architecture, layer_type) {
            (Architecture::Gemma4, LayerType::Full) => LayerAttention {
                layer_type,
                head_dim: self.global_head_dim,
                num_kv_heads: self.num_global_key_value_heads,
                k_eq_v: self.attention_k_eq_v,
            },
            _ => LayerAttention {
                layer_type,
                head_dim: self.head_dim,
                num_kv_heads: self.num_key_value_heads,
                k_eq_v: false,
            },
        }
    }

    pub fn rope(&self, layer_type: LayerType) -> RopeParams {
        match layer_type {
            LayerType::Sliding => self.rope_sliding,
            LayerType::Full => self.rope_full,
        }
    }

    /// Every tensor a checkpoint of this config holds, in Hugging Face names and shapes.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let h = self.hidden_size as i64;
        let ffn = self.intermediate_size as i64;
        let spec = |name: String, shape: Vec<i64>| TensorSpec {
            name,
            shape,
            trainable: true,
        };
        let mut specs = vec![spec(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size as i64, h],
        )];
        for i in 0..self.num_hidden_layers {
            let a = self.layer_attention(i);
            let (hd, kv, heads) = (
                a.head_dim as i64,
                a.num_kv_heads as i64,
                self.num_attention_heads as i64,
            );
            let p = format!("model.layers.{i}");
            specs.push(spec(
                format!("{p}.self_attn.q_proj.weight"),
                vec![heads * hd, h],
            ));
            specs.push(spec(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv * hd, h],
            ));
            if !a.k_eq_v {
                specs.push(spec(
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![kv * hd, h],
                ));
            }
            specs.push(spec(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, heads * hd],
            ));
            specs.push(spec(format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            specs.push(spec(format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            specs.push(spec(format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]));
            specs.push(spec(format!("{p}.mlp.up_proj.weight"), vec![ffn, h]));
            specs.push(spec(format!("{p}.mlp.down_proj.weight"), vec![h, ffn]));
            for norm in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ] {
                specs.push(spec(format!("{p}.{norm}.weight"), vec![h]));
            }
            if self.architecture == Architecture::Gemma4 {
                specs.push(TensorSpec {
                    name: format!("{p}.layer_scalar"),
                    shape: vec![1],
                    trainable: false,
                });
            }
        }
        specs.push(spec("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            specs.push(spec(
                "lm_head.weight".into(),
                vec![self.vocab_size as i64, h],
            ));
        }
        specs
    }

    pub fn num_parameters(&self) -> u64 {
        self.tensor_specs()
            .iter()
            .map(|s| s.shape.iter().product::<i64>() as u64)
            .sum()
    }

    /// The config as a transformers v5 `config.json` for a text-only causal LM.
    pub fn to_hf_json(&self) -> Value {
        let gemma4 = self.architecture == Architecture::Gemma4;
        let rope = |r: RopeParams| -> Value {
            match r.kind {
                RopeKind::Default => json!({"rope_type": "default", "rope_theta": r.theta}),
                RopeKind::Linear { factor } => {
                    json!({"rope_type": "linear", "factor": factor, "rope_theta": r.theta})
                }
                RopeKind::Proportional {
                    partial_rotary_factor,
                    factor,
                } => {
                    let mut v = json!({"rope_type": "proportional", "partial_rotary_factor": partial_rotary_factor, "rope_theta": r.theta});
                    if factor != 1.0 {
                        v["factor"] = json!(factor);
                    }
                    v
                }
            }
        };
        let mut v = json!({
            "architectures": [if gemma4 { "Gemma4UnifiedForCausalLM" } else { "Gemma3ForCausalLM" }],
            "model_type": if gemma4 { "gemma4_unified_text" } else { "gemma3_text" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types.iter().map(|t| t.hf_name()).collect::<Vec<_>>(),
            "rope_parameters": {
                "full_attention": rope(self.rope_full),
                "sliding_attention": rope(self.rope_sliding),
            },
            "final_logit_softcapping": self.final_logit_softcapping,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        });
        if gemma4 {
            v["attention_k_eq_v"] = json!(self.attention_k_eq_v);
            v["num_kv_shared_layers"] = json!(0);
            v["use_bidirectional_attention"] = json!("vision");
            let mut per_layer = Map::new();
            for (i, t) in self.layer_types.iter().enumerate() {
                if *t == LayerType::Full {
                    let mut o = json!({"head_dim": self.global_head_dim});
                    if self.attention_k_eq_v {
                        o["num_key_value_heads"] = json!(self.num_global_key_value_heads);
                    }
                    per_layer.insert(i.to_string(), o);
                }
            }
            v["per_layer_config"] = Value::Object(per_layer);
        } else {
            // transformers' strict config wants an int here whenever the value is integral.
            let scalar = self.query_pre_attn_scalar;
            v["query_pre_attn_scalar"] = if scalar.fract() == 0.0 {
                json!(scalar as i64)
            } else {
                json!(scalar)
            };
            v["attn_logit_softcapping"] = json!(self.attn_logit_softcapping);
        }
        v
    }
}
