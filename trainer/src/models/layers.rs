//! Building blocks shared by the Gemma architectures: RMSNorm, rotary embeddings, attention masks,
//! the GeGLU MLP and the attention kernel. Numerics follow transformers: norms, RoPE tables and
//! softmax in f32, cast back to the activation dtype afterwards.

use super::head_loss::{lm_head_cross_entropy, LmHead, Reduction};
use crate::config::{GemmaConfig, LayerType, RopeKind, RopeParams};
use tch::{nn, Device, Kind, Tensor};

pub const INIT_STD: f64 = 0.02;

/// How the learned norm weight enters: Gemma 3 multiplies by (1 + w), Gemma 4 by w.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormScale {
    OnePlusWeight,
    Weight,
    /// Gemma 4's value norm has no weight at all.
    None,
}

#[derive(Debug)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    scale: NormScale,
    eps: f64,
}

impl RmsNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64, scale: NormScale) -> Self {
        let weight = match scale {
            NormScale::OnePlusWeight => Some(p.zeros("weight", &[dim])),
            NormScale::Weight => Some(p.ones("weight", &[dim])),
            NormScale::None => None,
        };
        RmsNorm { weight, scale, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        // Both kernels compute in the input dtype, so the input is upcast first; (1 + w) and w
        // are tiny vectors, built in f32 before the call. libtorch's rms_norm is fused on the GPU
        // only; on the CPU it is a chain of element-wise operators, so Atoll runs its own there.
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let dim = *x.size().last().expect("at least one dimension");
        let weight = match (&self.weight, self.scale) {
            (Some(w), NormScale::OnePlusWeight) => Some(w.to_kind(Kind::Float) + 1.0),
            (Some(w), _) => Some(w.to_kind(Kind::Float)),
            (None, _) => None,
        };
        let y = if xf.device() == Device::Cpu {
            super::cpu_kernels::rms_norm(&xf, weight.as_ref(), self.eps)
        } else {
            xf.rms_norm([dim], weight.as_ref(), self.eps)
        };
        y.to_kind(kind)
    }
}

/// A bias-free linear layer `x·Wᵀ` whose weight keeps its Hugging Face name, and which can carry a
/// LoRA adapter (see `lora.rs`).
#[derive(Debug)]
pub struct Linear {
    /// The module's Hugging Face name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: Tensor,
    pub lora: Option<super::lora::LoraAdapter>,
}

impl Linear {
    pub fn new(p: nn::Path, out_dim: i64, in_dim: i64) -> Self {
        Linear {
            name: p.components().collect::<Vec<_>>().join("."),
            weight: linear_weight(p, out_dim, in_dim),
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.linear::<Tensor>(&self.weight, None);
        match &self.lora {
            Some(adapter) => adapter.add_to(x, base),
            None => base,
        }
    }
}

pub fn linear_weight(p: nn::Path, out_dim: i64, in_dim: i64) -> Tensor {
    p.var(
        "weight",
        &[out_dim, in_dim],
        nn::Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
    )
}

/// cos/sin tables [T, head_dim] in f32 for positions 0..T, as transformers builds them:
/// inv_freq in f32, angles = pos * inv_freq, duplicated over both halves (rotate_half layout).
#[derive(Debug)]
pub struct RotaryTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

pub fn inverse_frequencies(head_dim: usize, rope: RopeParams, device: Device) -> Tensor {
    let dim = head_dim as i64;
    let base = Tensor::from(rope.theta as f32).to_device(device);
    let (rotated_pairs, factor) = match rope.kind {
        RopeKind::Default => (dim / 2, 1.0),
        RopeKind::Linear { factor } => (dim / 2, factor),
        RopeKind::Proportional {
            partial_rotary_factor,
            factor,
        } => (((partial_rotary_factor * dim as f64) as i64) / 2, factor),
    };
    let exponents =
        Tensor::arange_start_step(0, 2 * rotated_pairs, 2, (Kind::Float, device)) / dim as f64;
    let rotated = base.pow(&exponents).reciprocal();
    let inv_freq = if rotated_pairs < dim / 2 {
        let identity = Tensor::zeros([dim / 2 - rotated_pairs], (Kind::Float, device));
        Tensor::cat(&[rotated, identity], 0)
    } else {
        rotated
    };
    inv_freq / factor
}

impl RotaryTable {
    pub fn new(head_dim: usize, rope: RopeParams, seq_len: i64, device: Device) -> Self {
        Self::at_positions(
            head_dim,
            rope,
            &Tensor::arange(seq_len, (Kind::Float, device)),
        )
    }

    /// Tables [..., head_dim] for explicit positions [...] (int64): [B, T] restarting at 0 at each
    /// example packed into a row, as transformers does with `position_ids`, or [P] in any order
    /// with repeats (the MTP drafter's queries all sit at the last accepted token's position).
    pub fn at_positions(head_dim: usize, rope: RopeParams, positions: &Tensor) -> Self {
        let inv_freq = inverse_frequencies(head_dim, rope, positions.device());
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        RotaryTable {
            cos: emb.cos(),
            sin: emb.sin(),
        }
    }

    /// x: [B, T, H, D] -> x·cos + rotate_half(x)·sin, in x's dtype.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let d = x.size()[3];
        // Tables are [T, D], or [B, T, D] for per-example positions: the head axis goes before D.
        let cos = self.cos.to_kind(kind).unsqueeze(-2);
        let sin = self.sin.to_kind(kind).unsqueeze(-2);
        let x1 = x.narrow(-1, 0, d / 2);
        let x2 = x.narrow(-1, d / 2, d / 2);
        let rotated = Tensor::cat(&[x2.neg(), x1], -1);
        x * cos + rotated * sin
    }
}

/// Boolean mask [T, T]: true where query q may attend key k (causal, and within the window for
/// sliding layers: k > q - window, so a window of W covers W positions including q itself).
pub fn attention_mask(
    layer_type: LayerType,
    seq_len: i64,
    window: usize,
    device: Device,
) -> Option<Tensor> {
    match layer_type {
        LayerType::Full => None,
        LayerType::Sliding if seq_len <= window as i64 => None,
        LayerType::Sliding => {
            let q = Tensor::arange(seq_len, (Kind::Int64, device)).unsqueeze(1);
            let k = Tensor::arange(seq_len, (Kind::Int64, device)).unsqueeze(0);
            let causal = k.le_tensor(&q);
            let in_window = k.gt_tensor(&(q - window as i64));
            Some(causal.logical_and(&in_window))
        }
    }
}

/// Boolean mask [B, 1, T, T] for rows holding several examples back to back: query q attends key
/// k only inside its own example (`segments` [B, T] equal), causally, and on sliding layers
/// (`window` given) within the window.
pub fn packed_attention_mask(segments: &Tensor, window: Option<usize>) -> Tensor {
    let t = segments.size()[1];
    let device = segments.device();
    let q = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = window {
        allowed = allowed.logical_and(&k.gt_tensor(&(q - w as i64)));
    }
    let same_example = segments.unsqueeze(2).eq_tensor(&segments.unsqueeze(1));
    same_example.logical_and(&allowed.unsqueeze(0)).unsqueeze(1)
}

/// Per-forward masks and rotary tables, built once and shared by all layers of a type.
pub struct LayerInputs {
    pub sliding_mask: Option<Tensor>,
    /// None: plain causal attention on full layers.
    pub full_mask: Option<Tensor>,
    pub rope_sliding: RotaryTable,
    pub rope_full: RotaryTable,
}

/// GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)).
#[derive(Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn new(p: nn::Path, hidden: i64, intermediate: i64) -> Self {
        Mlp {
            gate_proj: Linear::new(&p / "gate_proj", intermediate, hidden),
            up_proj: Linear::new(&p / "up_proj", intermediate, hidden),
            down_proj: Linear::new(&p / "down_proj", hidden, intermediate),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x);
        let up = self.up_proj.forward(x);
        let hidden = if gate.device() == Device::Cpu && gate.kind() == Kind::Float {
            super::cpu_kernels::geglu(&gate, &up)
        } else {
            gate.gelu("tanh") * up
        };
        self.down_proj.forward(&hidden)
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }
}

/// Attention of q [B, H, T, D] over k, v [B, KV, T, D] through libtorch's fused
/// scaled_dot_product_attention (causal when no mask is given). Grouped-query attention is done by
/// the kernel (`enable_gqa`), which serves query head h from KV head h / (H / KV) as transformers'
/// repeat_kv does, without materialising the repeated K/V.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    match mask {
        None => {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, scale, gqa)
        }
        Some(m) => Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, scale, gqa),
    }
}

/// Token embedding multiplied by sqrt(hidden), the scale rounded to the weight dtype first as
/// transformers does (in bf16, sqrt(3840) becomes 62.0).
pub fn scaled_embedding(weight: &Tensor, ids: &Tensor, hidden: usize) -> Tensor {
    let scale = Tensor::from((hidden as f64).sqrt() as f32)
        .to_kind(weight.kind())
        .to_device(weight.device());
    Tensor::embedding(weight, ids, -1, false, false) * scale
}

/// Final logits in f32: tied (or separate) LM head, then the optional tanh softcap.
pub fn lm_logits(hidden: &Tensor, head: &Tensor, softcap: Option<f64>) -> Tensor {
    let logits = hidden.linear::<Tensor>(head, None).to_kind(Kind::Float);
    match softcap {
        Some(cap) => (logits / cap).tanh() * cap,
        None => logits,
    }
}

/// One decoder layer of an architecture.
pub trait DecoderLayerForward {
    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor;
    /// The layer's linear modules (attention projections, MLP), which can carry adapters.
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
}

/// What every Gemma decoder shares around its layers: x = E[ids]·sqrt(d), the layers, the final
/// norm, and the (tied by default) LM head with the optional logit softcap.
#[derive(Debug)]
pub struct DecoderStack<L> {
    embed_tokens: Tensor,
    layers: Vec<L>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    hidden_size: usize,
    final_softcap: Option<f64>,
}

impl<L: DecoderLayerForward> DecoderStack<L> {
    /// Creates the variables under `root` with Hugging Face names (`model.layers.N....`).
    pub fn new(
        root: &nn::Path,
        cfg: &GemmaConfig,
        norm_scale: NormScale,
        make_layer: impl Fn(nn::Path, usize) -> L,
    ) -> Self {
        let m = root / "model";
        let (vocab, hidden) = (cfg.vocab_size as i64, cfg.hidden_size as i64);
        let embed_tokens = (&m / "embed_tokens").var(
            "weight",
            &[vocab, hidden],
            nn::Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        );
        DecoderStack {
            embed_tokens,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| make_layer(&m / "layers" / i, i))
                .collect(),
            norm: RmsNorm::new(&m / "norm", hidden, cfg.rms_norm_eps, norm_scale),
            lm_head: (!cfg.tie_word_embeddings)
                .then(|| linear_weight(root / "lm_head", vocab, hidden)),
            hidden_size: cfg.hidden_size,
            final_softcap: cfg.final_logit_softcapping,
        }
    }

    /// ids [B, T] -> E[ids]·sqrt(d), the input of the first layer.
    pub fn input_embeddings(&self, ids: &Tensor) -> Tensor {
        scaled_embedding(&self.embed_tokens, ids, self.hidden_size)
    }

    /// ids [B, T] -> final hidden states [B, T, d] (after the final norm).
    pub fn hidden_states(&self, ids: &Tensor, inputs: &LayerInputs) -> Tensor {
        let mut x = self.input_embeddings(ids);
        for layer in &self.layers {
            x = layer.forward(&x, inputs);
        }
        self.norm.forward(&x)
    }

    pub fn layers(&self) -> &[L] {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut [L] {
        &mut self.layers
    }

    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let head = self.lm_head();
        lm_logits(hidden, head.weights, head.softcap)
    }

    /// The next-token cross-entropy of final hidden states against `labels`, without the whole
    /// logits tensor (`head_loss.rs`).
    pub fn next_token_loss(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        reduction: Reduction,
    ) -> Tensor {
        lm_head_cross_entropy(hidden, self.lm_head(), labels, reduction)
    }

    /// The LM head (tied to the embeddings unless the checkpoint has its own) with its softcap.
    pub fn lm_head(&self) -> LmHead<'_> {
        LmHead {
            weights: self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            softcap: self.final_softcap,
        }
    }
}
