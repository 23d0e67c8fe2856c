//! The Gemma 4 MTP drafter ("assistant") as in transformers' `gemma4_unified_assistant`
//! (`Gemma4UnifiedAssistantForCausalLM`): a small Gemma 4 decoder that owns no K/V. It drafts
//! tokens for a Gemma 4 target from what the target already computed:
//!
//! - input: concat(target's scaled embedding of the newest token x_c, target's final hidden state
//!   h_{c-1} (after its final norm)) [2·backbone] -> `pre_projection` -> hidden;
//! - every layer is KV-shared: queries (q_proj, q_norm, RoPE at position id c) attend to the
//!   target's K/V of positions 0..c-1, sliding layers to the target's last sliding layer (the last
//!   `sliding_window + 1` positions), the full layer to its last full layer; attention scale 1.0;
//!   sandwich norms, GeGLU MLP and `layer_scalar` as in the Gemma 4 text stack;
//! - output: final norm -> logits through the tied LM head (no softcap), and `post_projection`
//!   back to the target's width: the "hidden state" the next draft step reads in place of h.
//!
//! Every draft step of one round uses the same position id c and the same target K/V; step s
//! feeds the token drafted at step s-1 and the projected state of step s-1.
//!
//! Weight names equal transformers' (`pre_projection.weight`, `model.layers.N.self_attn.q_proj.weight`,
//! `model.embed_tokens.weight`, ...). Centroid-masked ("ordered") embeddings are not supported.

use super::gemma4::SharedKv;
use super::head_loss::LmHead;
use super::layers::{
    attend, linear_weight, lm_logits, Mlp, NormScale, RmsNorm, RotaryTable, INIT_STD,
};
use crate::checkpoint::{
    dtype_from_kind, kind_from_dtype, serialize_host, weight_files, HostTensor, SINGLE_FILE,
};
use crate::config::{Architecture, GemmaConfig, LayerType, TensorSpec};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

pub const MODEL_TYPE: &str = "gemma4_unified_assistant";
pub const ARCHITECTURE: &str = "Gemma4UnifiedAssistantForCausalLM";

/// `config.json` of a drafter: its own decoder (a Gemma 4 text config whose layers are all
/// KV-shared) and the width of the target it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct AssistantConfig {
    pub text: GemmaConfig,
    pub backbone_hidden_size: usize,
    /// Kept for the round trip; only used by ordered embeddings, which Atoll does not support.
    pub num_centroids: usize,
    pub centroid_intermediate_top_k: usize,
}

impl AssistantConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&value).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_hf_json(value: &Value) -> Result<Self> {
        let top = value
            .as_object()
            .ok_or_else(|| anyhow!("config.json: expected a JSON object"))?;
        let model_type = top.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != MODEL_TYPE {
            bail!(
                "config.json: model_type is `{model_type}`, not a Gemma 4 drafter (`{MODEL_TYPE}`)"
            );
        }
        if top.get("use_ordered_embeddings").and_then(Value::as_bool) == Some(true) {
            bail!("config.json: use_ordered_embeddings=true (centroid-masked logits) is not supported by Atoll");
        }
        let mut text = top
            .get("text_config")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| anyhow!("config.json: missing `text_config` object"))?;
        // Every drafter layer reads the target's K/V; the text parser knows no KV sharing.
        let layers = text.get("num_hidden_layers").and_then(Value::as_u64);
        match text.remove("num_kv_shared_layers").and_then(|v| v.as_u64()) {
            None | Some(0) => {}
            Some(n) if Some(n) == layers => {}
            Some(n) => bail!(
                "config.json: text_config.num_kv_shared_layers is {n}; a drafter shares all {} layers",
                layers.unwrap_or(0)
            ),
        }
        let text =
            GemmaConfig::from_hf_json(&Value::Object(text)).context("config.json: text_config")?;
        if text.architecture != Architecture::Gemma4 {
            bail!("config.json: text_config must be a Gemma 4 text config (gemma4_unified_text)");
        }
        let usize_field = |key: &str, default: usize| -> Result<usize> {
            match top.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        anyhow!("config.json: `{key}` must be a positive integer, got {v}")
                    }),
            }
        };
        Ok(AssistantConfig {
            backbone_hidden_size: usize_field("backbone_hidden_size", 3840)?,
            num_centroids: usize_field("num_centroids", 2048)?,
            centroid_intermediate_top_k: usize_field("centroid_intermediate_top_k", 32)?,
            text,
        })
    }

    /// The config as transformers writes it for `Gemma4UnifiedAssistantForCausalLM`.
    pub fn to_hf_json(&self) -> Value {
        let mut text = self.text.to_hf_json();
        if let Value::Object(map) = &mut text {
            map.remove("architectures");
            map.insert(
                "num_kv_shared_layers".into(),
                json!(self.text.num_hidden_layers),
            );
        }
        json!({
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "backbone_hidden_size": self.backbone_hidden_size,
            "use_ordered_embeddings": false,
            "num_centroids": self.num_centroids,
            "centroid_intermediate_top_k": self.centroid_intermediate_top_k,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": text,
        })
    }

    /// Checks that this drafter can read `target`: a Gemma 4 of the same width and vocabulary
    /// whose last sliding / full layers have the K/V shapes the drafter's layers expect.
    pub fn check_target(&self, target: &GemmaConfig) -> Result<()> {
        if target.architecture != Architecture::Gemma4 {
            bail!("the drafter needs a Gemma 4 target; the base model is Gemma 3");
        }
        if target.hidden_size != self.backbone_hidden_size {
            bail!(
                "the drafter reads a target of width {} (backbone_hidden_size) but the base model's hidden_size is {}",
                self.backbone_hidden_size,
                target.hidden_size
            );
        }
        if target.vocab_size != self.text.vocab_size {
            bail!(
                "the drafter's vocabulary ({}) differs from the base model's ({})",
                self.text.vocab_size,
                target.vocab_size
            );
        }
        for (i, &layer_type) in self.text.layer_types.iter().enumerate() {
            let Some(t) = target.layer_types.iter().rposition(|t| *t == layer_type) else {
                bail!(
                    "drafter layer {i} is a {layer_type:?} layer but the base model has none to read K/V from"
                );
            };
            let (mine, theirs) = (self.text.layer_attention(i), target.layer_attention(t));
            if (mine.head_dim, mine.num_kv_heads) != (theirs.head_dim, theirs.num_kv_heads) {
                bail!(
                    "drafter layer {i} expects K/V of {} heads x {} but the base model's last {layer_type:?} layer has {} x {}",
                    mine.num_kv_heads,
                    mine.head_dim,
                    theirs.num_kv_heads,
                    theirs.head_dim
                );
            }
        }
        Ok(())
    }

    /// Every tensor a drafter checkpoint holds, in Hugging Face names and shapes.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let cfg = &self.text;
        let (h, ffn, bb) = (
            cfg.hidden_size as i64,
            cfg.intermediate_size as i64,
            self.backbone_hidden_size as i64,
        );
        let spec = |name: String, shape: Vec<i64>| TensorSpec {
            name,
            shape,
            trainable: true,
        };
        let mut specs = vec![spec(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size as i64, h],
        )];
        for i in 0..cfg.num_hidden_layers {
            let a = cfg.layer_attention(i);
            let (hd, heads) = (a.head_dim as i64, cfg.num_attention_heads as i64);
            let p = format!("model.layers.{i}");
            specs.push(spec(
                format!("{p}.self_attn.q_proj.weight"),
                vec![heads * hd, h],
            ));
            specs.push(spec(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, heads * hd],
            ));
            specs.push(spec(format!("{p}.self_attn.q_norm.weight"), vec![hd]));
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
            specs.push(TensorSpec {
                name: format!("{p}.layer_scalar"),
                shape: vec![1],
                trainable: false,
            });
        }
        specs.push(spec("model.norm.weight".into(), vec![h]));
        specs.push(spec("pre_projection.weight".into(), vec![h, 2 * bb]));
        specs.push(spec("post_projection.weight".into(), vec![bb, h]));
        if !cfg.tie_word_embeddings {
            specs.push(spec(
                "lm_head.weight".into(),
                vec![cfg.vocab_size as i64, h],
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
}

#[derive(Debug)]
struct Attention {
    layer_type: LayerType,
    q_proj: Tensor,
    q_norm: RmsNorm,
    o_proj: Tensor,
    num_heads: i64,
    head_dim: i64,
}

#[derive(Debug)]
struct Layer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    layer_scalar: Tensor,
}

/// Per-call inputs shared by the layers: RoPE tables at the queries' positions and the masks
/// over the target's K/V.
struct StepInputs {
    rope_sliding: RotaryTable,
    rope_full: RotaryTable,
    /// [Q, T] bool: key j is visible to a query at position c when j < c ...
    full_mask: Tensor,
    /// ... and, for sliding layers, c - 1 - j <= sliding_window.
    sliding_mask: Tensor,
}

impl Layer {
    fn new(p: nn::Path, cfg: &GemmaConfig, index: usize) -> Self {
        let (h, eps) = (cfg.hidden_size as i64, cfg.rms_norm_eps);
        let norm = |name: &str| RmsNorm::new(&p / name, h, eps, NormScale::Weight);
        let a = cfg.layer_attention(index);
        let (heads, hd) = (cfg.num_attention_heads as i64, a.head_dim as i64);
        let attn = &p / "self_attn";
        Layer {
            self_attn: Attention {
                layer_type: a.layer_type,
                q_proj: linear_weight(&attn / "q_proj", heads * hd, h),
                q_norm: RmsNorm::new(&attn / "q_norm", hd, eps, NormScale::Weight),
                o_proj: linear_weight(&attn / "o_proj", h, heads * hd),
                num_heads: heads,
                head_dim: hd,
            },
            mlp: Mlp::new(&p / "mlp", h, cfg.intermediate_size as i64),
            input_layernorm: norm("input_layernorm"),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
            layer_scalar: p.ones_no_train("layer_scalar", &[1]),
        }
    }

    fn forward(&self, x: &Tensor, kv: &SharedKv, inputs: &StepInputs) -> Tensor {
        let a = &self.self_attn;
        let (b, q_len) = (x.size()[0], x.size()[1]);
        let (rope, mask) = match a.layer_type {
            LayerType::Sliding => (&inputs.rope_sliding, &inputs.sliding_mask),
            LayerType::Full => (&inputs.rope_full, &inputs.full_mask),
        };
        let target = kv
            .of(a.layer_type)
            .expect("check_target guarantees the target has this layer type");
        let normed = self.input_layernorm.forward(x);
        let q = normed
            .linear::<Tensor>(&a.q_proj, None)
            .view([b, q_len, a.num_heads, a.head_dim]);
        let q = rope.apply(&a.q_norm.forward(&q)).transpose(1, 2);
        let attn = attend(&q, &target.keys, &target.values, Some(mask), 1.0)
            .transpose(1, 2)
            .reshape([b, q_len, a.num_heads * a.head_dim])
            .linear::<Tensor>(&a.o_proj, None);
        let h = x + self.post_attention_layernorm.forward(&attn);
        let ffn = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&h));
        (&h + self.post_feedforward_layernorm.forward(&ffn)) * &self.layer_scalar
    }
}

/// One draft step's outputs for every query.
#[derive(Debug)]
pub struct DraftStep {
    /// [B, Q, vocab], f32.
    pub logits: Tensor,
    /// [B, Q, backbone]: the next step's stand-in for the target's hidden state.
    pub projected: Tensor,
}

/// One draft step's states before the LM head.
#[derive(Debug)]
pub struct DraftStates {
    /// [B, Q, hidden]: after the final norm, what the LM head reads.
    pub hidden: Tensor,
    /// [B, Q, backbone]: the next step's stand-in for the target's hidden state.
    pub projected: Tensor,
}

/// A greedy draft chain of one round.
#[derive(Debug)]
pub struct Draft {
    /// [B, steps] int64.
    pub tokens: Tensor,
    /// [B, steps, vocab] f32.
    pub logits: Tensor,
    /// [B, steps, backbone].
    pub projected: Tensor,
}

/// A Gemma 4 MTP drafter whose variables carry Hugging Face names.
pub struct Gemma4Assistant {
    pub config: AssistantConfig,
    pub vs: nn::VarStore,
    embed_tokens: Tensor,
    lm_head: Option<Tensor>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    pre_projection: Tensor,
    post_projection: Tensor,
}

impl Gemma4Assistant {
    /// A randomly initialised drafter (N(0, 0.02) matrices, unit norms) whose weights depend only
    /// on `seed`.
    pub fn new_seeded(config: AssistantConfig, device: Device, seed: u64) -> Result<Self> {
        // libtorch's generator is process-wide: seeding and drawing happen under one lock.
        static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _init_guard = INIT_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(seed as i64);
        Self::build(config, device)
    }

    /// The variables, drawn from libtorch's global generator.
    fn build(config: AssistantConfig, device: Device) -> Result<Self> {
        config.text.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let cfg = &config.text;
        let (vocab, h, bb) = (
            cfg.vocab_size as i64,
            cfg.hidden_size as i64,
            config.backbone_hidden_size as i64,
        );
        let m = &root / "model";
        let embed_tokens = (&m / "embed_tokens").var(
            "weight",
            &[vocab, h],
            nn::Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&m / "layers" / i, cfg, i))
            .collect();
        let norm = RmsNorm::new(&m / "norm", h, cfg.rms_norm_eps, NormScale::Weight);
        let pre_projection = linear_weight(&root / "pre_projection", h, 2 * bb);
        let post_projection = linear_weight(&root / "post_projection", bb, h);
        let lm_head =
            (!cfg.tie_word_embeddings).then(|| linear_weight(&root / "lm_head", vocab, h));
        Ok(Gemma4Assistant {
            config,
            vs,
            embed_tokens,
            lm_head,
            layers,
            norm,
            pre_projection,
            post_projection,
        })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Trainable parameters in checkpoint order (stable, so optimizer state lines up).
    pub fn trainable_parameters(&self) -> Vec<Tensor> {
        let vars = self.vs.variables();
        self.config
            .tensor_specs()
            .into_iter()
            .filter(|s| s.trainable)
            .filter_map(|s| vars.get(&s.name).map(Tensor::shallow_clone))
            .collect()
    }

    /// One draft step for Q queries per sequence, all of which see the same K/V.
    ///
    /// `inputs_embeds` [B, Q, 2·backbone] = concat(target embedding of the newest token, target
    /// hidden state or previous projected state); `positions` [Q] (int64) the position id c of
    /// each query: it attends to keys j < c of `kv` (the target's K/V, [B, KV, T, D], T >= c),
    /// and in sliding layers only to c - 1 - j <= sliding_window, as transformers' flipped
    /// bidirectional masks over K/V cut to c positions.
    pub fn forward(&self, inputs_embeds: &Tensor, positions: &Tensor, kv: &SharedKv) -> DraftStep {
        let states = self.step_states(inputs_embeds, positions, kv);
        DraftStep {
            logits: lm_logits(&states.hidden, self.lm_head().weights, None),
            projected: states.projected,
        }
    }

    /// The LM head (tied to the embeddings by default; no softcap).
    pub fn lm_head(&self) -> LmHead<'_> {
        LmHead {
            weights: self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            softcap: None,
        }
    }

    /// [`Self::forward`] without the logits: the final hidden states the LM head reads, for a
    /// loss that applies the head a block of rows at a time (`head_loss.rs`).
    pub fn step_states(
        &self,
        inputs_embeds: &Tensor,
        positions: &Tensor,
        kv: &SharedKv,
    ) -> DraftStates {
        let cfg = &self.config.text;
        let keys = kv
            .full
            .as_ref()
            .or(kv.sliding.as_ref())
            .map(|k| k.keys.size()[2])
            .unwrap_or(0);
        let device = inputs_embeds.device();
        let c = positions
            .to_device(device)
            .to_kind(Kind::Int64)
            .unsqueeze(1);
        let j = Tensor::arange(keys, (Kind::Int64, device)).unsqueeze(0);
        let full_mask = j.lt_tensor(&c);
        let sliding_mask =
            full_mask.logical_and(&j.ge_tensor(&(&c - 1 - cfg.sliding_window as i64)));
        let full_head_dim = cfg
            .layer_types
            .iter()
            .position(|t| *t == LayerType::Full)
            .map(|i| cfg.layer_attention(i).head_dim)
            .unwrap_or(cfg.global_head_dim);
        let inputs = StepInputs {
            rope_sliding: RotaryTable::at_positions(cfg.head_dim, cfg.rope_sliding, positions),
            rope_full: RotaryTable::at_positions(full_head_dim, cfg.rope_full, positions),
            full_mask,
            sliding_mask,
        };
        let mut x = inputs_embeds.linear::<Tensor>(&self.pre_projection, None);
        for layer in &self.layers {
            x = layer.forward(&x, kv, &inputs);
        }
        let hidden = self.norm.forward(&x);
        DraftStates {
            projected: hidden.linear::<Tensor>(&self.post_projection, None),
            hidden,
        }
    }

    /// The greedy chain of one speculation round, as transformers'
    /// `SinglePositionMultiTokenCandidateGenerator` runs it: the newest token `token` [B, 1] at
    /// position `context` (so the target's K/V of positions 0..context-1 and its hidden state
    /// `hidden` [B, 1, backbone] at context-1), `steps` tokens, each fed back with its projected
    /// state.
    pub fn draft(
        &self,
        target: &crate::models::GemmaModel,
        token: &Tensor,
        hidden: &Tensor,
        context: i64,
        kv: &SharedKv,
        steps: usize,
    ) -> Draft {
        let positions = Tensor::from_slice(&[context]).to_device(self.device());
        let (mut token, mut hidden) = (token.shallow_clone(), hidden.shallow_clone());
        let (mut tokens, mut logits, mut projected) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..steps {
            let embeds = Tensor::cat(&[target.input_embeddings(&token), hidden], -1);
            let step = self.forward(&embeds, &positions, kv);
            token = step.logits.argmax(-1, false);
            hidden = step.projected.shallow_clone();
            tokens.push(token.shallow_clone());
            logits.push(step.logits);
            projected.push(step.projected);
        }
        Draft {
            tokens: Tensor::cat(&tokens, 1),
            logits: Tensor::cat(&logits, 1),
            projected: Tensor::cat(&projected, 1),
        }
    }
}

/// Loads a drafter checkpoint directory (`config.json` + `model.safetensors` or shards) in f32.
pub fn load(dir: &Path, device: Device) -> Result<Gemma4Assistant> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let config = AssistantConfig::from_file(&dir.join("config.json"))?;
    let model = Gemma4Assistant::build(config, device)?;
    let mut vars: HashMap<String, Tensor> = model.vs.variables().into_iter().collect();
    let mut filled = HashSet::new();
    let _guard = tch::no_grad_guard();
    for path in weight_files(dir)? {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        for (name, view) in st.tensors() {
            if name == "lm_head.weight" && model.config.text.tie_word_embeddings {
                continue;
            }
            let Some(var) = vars.get_mut(&name) else {
                bail!(
                    "{}: unexpected tensor `{name}`: not part of a drafter with this config.json",
                    path.display()
                );
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                bail!(
                    "{}: tensor `{name}` has shape {shape:?} but config.json implies {:?}",
                    path.display(),
                    var.size()
                );
            }
            let kind = kind_from_dtype(view.dtype()).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}` has unsupported dtype {:?}",
                    path.display(),
                    view.dtype()
                )
            })?;
            let src = Tensor::from_data_size(view.data(), &shape, kind);
            var.copy_(&src.to_device(var.device()).to_kind(var.kind()));
            filled.insert(name);
        }
    }
    let mut missing: Vec<&String> = vars.keys().filter(|k| !filled.contains(*k)).collect();
    if !missing.is_empty() {
        missing.sort();
        bail!(
            "{}: {} drafter tensor(s) missing, e.g. {}",
            dir.display(),
            missing.len(),
            missing
                .iter()
                .take(3)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(model)
}

/// The files of a drafter checkpoint in the layout transformers loads as
/// `Gemma4UnifiedAssistantForCausalLM`: `model.safetensors` (weights in `kind`), `config.json`
/// and a `generation_config.json` that drafts `num_assistant_tokens` tokens per round.
pub fn files(
    model: &Gemma4Assistant,
    kind: Kind,
    num_assistant_tokens: usize,
) -> Result<Vec<(String, Vec<u8>)>> {
    let dtype = dtype_from_kind(kind)?;
    let vars = model.vs.variables();
    let tensors = model
        .config
        .tensor_specs()
        .iter()
        .map(|spec| {
            let var = vars
                .get(&spec.name)
                .ok_or_else(|| anyhow!("internal: drafter lacks variable {}", spec.name))?;
            let host = HostTensor::copy_of(&spec.name, &var.to_kind(kind))?;
            Ok(HostTensor { dtype, ..host })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut config = model.config.to_hf_json();
    config["dtype"] = json!(match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    });
    let text = &model.config.text;
    let generation = json!({
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
        "num_assistant_tokens": num_assistant_tokens,
        "num_assistant_tokens_schedule": "constant",
    });
    let pretty = |v: &Value| -> Result<Vec<u8>> {
        Ok((serde_json::to_string_pretty(v)? + "\n").into_bytes())
    };
    Ok(vec![
        (
            SINGLE_FILE.to_string(),
            serialize_host(&tensors, Some(metadata))?,
        ),
        ("config.json".to_string(), pretty(&config)?),
        ("generation_config.json".to_string(), pretty(&generation)?),
    ])
}

/// `num_assistant_tokens` of a drafter directory's `generation_config.json`, if it has one.
pub fn num_assistant_tokens(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("generation_config.json")).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value
        .get("num_assistant_tokens")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
}
