//! Gemma 4 text decoder as in transformers' `gemma4_unified` (the encoder-free 12B).
//!
//! Differences from Gemma 3 (see `gemma3.rs`):
//! - RMSNorm multiplies by w (not 1 + w); values get a weightless RMSNorm (`v_norm`).
//! - Attention scale 1.0 (q/k norms carry the scale).
//! - Full layers use `global_head_dim` and their own KV-head count; with `attention_k_eq_v` they
//!   have no `v_proj`: V is the raw `k_proj` output (v_norm, no RoPE), K gets k_norm + RoPE.
//! - Full layers use proportional RoPE (only `partial_rotary_factor` of the pairs rotate).
//! - `layer_scalar` multiplies the whole layer output: out = (x + attn + mlp) · layer_scalar.
//! - Final logits are soft-capped (30 in the 12B).

use super::layers::{
    attend, DecoderLayerForward, DecoderStack, LayerInputs, Linear, Mlp, NormScale, RmsNorm,
};
use crate::config::{GemmaConfig, LayerType};
use tch::{nn, Kind, Tensor};

#[derive(Debug)]
struct Attention {
    layer_type: LayerType,
    q_proj: Linear,
    k_proj: Linear,
    /// None on K = V layers.
    v_proj: Option<Linear>,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    v_norm: RmsNorm,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &GemmaConfig, index: usize) -> Self {
        let shape = cfg.layer_attention(index);
        let (h, heads, kv, hd) = (
            cfg.hidden_size as i64,
            cfg.num_attention_heads as i64,
            shape.num_kv_heads as i64,
            shape.head_dim as i64,
        );
        let eps = cfg.rms_norm_eps;
        Attention {
            layer_type: shape.layer_type,
            q_proj: Linear::new(&p / "q_proj", heads * hd, h),
            k_proj: Linear::new(&p / "k_proj", kv * hd, h),
            v_proj: (!shape.k_eq_v).then(|| Linear::new(&p / "v_proj", kv * hd, h)),
            o_proj: Linear::new(&p / "o_proj", h, heads * hd),
            q_norm: RmsNorm::new(&p / "q_norm", hd, eps, NormScale::Weight),
            k_norm: RmsNorm::new(&p / "k_norm", hd, eps, NormScale::Weight),
            v_norm: RmsNorm::new(&p / "v_norm", hd, eps, NormScale::None),
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
        }
    }

    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor {
        self.forward_with_kv(x, inputs).0
    }

    /// The attention output and the K/V it attended with ([B, KV, T, D]: K after k_norm and
    /// RoPE, V after v_norm), which an MTP drafter reads from the target's last layers.
    fn forward_with_kv(&self, x: &Tensor, inputs: &LayerInputs) -> (Tensor, LayerKv) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (rope, mask) = match self.layer_type {
            LayerType::Sliding => (&inputs.rope_sliding, inputs.sliding_mask.as_ref()),
            LayerType::Full => (&inputs.rope_full, inputs.full_mask.as_ref()),
        };
        let project = |w: &Linear, heads: i64| w.forward(x).view([b, t, heads, self.head_dim]);
        let q = rope.apply(&self.q_norm.forward(&project(&self.q_proj, self.num_heads)));
        let k_raw = project(&self.k_proj, self.num_kv_heads);
        let v_raw = match &self.v_proj {
            Some(w) => project(w, self.num_kv_heads),
            None => k_raw.shallow_clone(),
        };
        let k = rope.apply(&self.k_norm.forward(&k_raw));
        let v = self.v_norm.forward(&v_raw);
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let out = attend(&q, &k, &v, mask, 1.0);
        let out = self.o_proj.forward(&out.transpose(1, 2).reshape([
            b,
            t,
            self.num_heads * self.head_dim,
        ]));
        (out, LayerKv { keys: k, values: v })
    }
}

/// Keys and values of one attention layer, [B, KV heads, T, head_dim].
#[derive(Debug)]
pub struct LayerKv {
    pub keys: Tensor,
    pub values: Tensor,
}

/// What an MTP drafter reads from its target besides the last hidden state: the K/V of the
/// target's last sliding and last full layer (transformers' `shared_kv_states`).
#[derive(Debug)]
pub struct SharedKv {
    pub sliding: Option<LayerKv>,
    pub full: Option<LayerKv>,
}

impl SharedKv {
    /// The same K/V in `kind` (a drafter computing in f32 over a bf16 target).
    pub fn to_kind(&self, kind: Kind) -> SharedKv {
        let convert = |kv: &Option<LayerKv>| {
            kv.as_ref().map(|kv| LayerKv {
                keys: kv.keys.to_kind(kind),
                values: kv.values.to_kind(kind),
            })
        };
        SharedKv {
            sliding: convert(&self.sliding),
            full: convert(&self.full),
        }
    }

    pub fn of(&self, layer_type: LayerType) -> Option<&LayerKv> {
        match layer_type {
            LayerType::Sliding => self.sliding.as_ref(),
            LayerType::Full => self.full.as_ref(),
        }
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    /// A checkpoint buffer (not trained), shape [1].
    layer_scalar: Tensor,
}

impl DecoderLayerForward for DecoderLayer {
    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor {
        DecoderLayer::forward(self, x, inputs)
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let a = &mut self.self_attn;
        let mut out = vec![&mut a.q_proj, &mut a.k_proj];
        out.extend(a.v_proj.as_mut());
        out.push(&mut a.o_proj);
        out.extend(self.mlp.linears_mut());
        out
    }
}

impl DecoderLayer {
    fn new(p: nn::Path, cfg: &GemmaConfig, index: usize) -> Self {
        let norm = |name: &str| {
            RmsNorm::new(
                &p / name,
                cfg.hidden_size as i64,
                cfg.rms_norm_eps,
                NormScale::Weight,
            )
        };
        DecoderLayer {
            self_attn: Attention::new(&p / "self_attn", cfg, index),
            mlp: Mlp::new(
                &p / "mlp",
                cfg.hidden_size as i64,
                cfg.intermediate_size as i64,
            ),
            input_layernorm: norm("input_layernorm"),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
            layer_scalar: p.ones_no_train("layer_scalar", &[1]),
        }
    }

    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), inputs);
        self.finish(x, &attn)
    }

    fn forward_with_kv(&self, x: &Tensor, inputs: &LayerInputs) -> (Tensor, LayerKv) {
        let (attn, kv) = self
            .self_attn
            .forward_with_kv(&self.input_layernorm.forward(x), inputs);
        (self.finish(x, &attn), kv)
    }

    /// Everything after attention: its post-norm and residual, the MLP block, layer_scalar.
    fn finish(&self, x: &Tensor, attn: &Tensor) -> Tensor {
        let h = x + self.post_attention_layernorm.forward(attn);
        let ffn = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&h));
        (&h + self.post_feedforward_layernorm.forward(&ffn)) * &self.layer_scalar
    }
}

/// The full decoder: scaled embedding, the layers above, final norm, tied LM head.
pub type Gemma4 = DecoderStack<DecoderLayer>;

/// ids [B, T] -> final hidden states (after the final norm, as transformers'
/// `hidden_states[-1]`) and the K/V of the last sliding and last full layer.
pub fn hidden_states_and_shared_kv(
    stack: &Gemma4,
    ids: &Tensor,
    inputs: &LayerInputs,
) -> (Tensor, SharedKv) {
    let mut x = stack.input_embeddings(ids);
    let mut shared = SharedKv {
        sliding: None,
        full: None,
    };
    for layer in stack.layers() {
        let (out, kv) = layer.forward_with_kv(&x, inputs);
        match layer.self_attn.layer_type {
            LayerType::Sliding => shared.sliding = Some(kv),
            LayerType::Full => shared.full = Some(kv),
        }
        x = out;
    }
    (stack.final_norm(&x), shared)
}

pub fn new(root: &nn::Path, cfg: &GemmaConfig) -> Gemma4 {
    DecoderStack::new(root, cfg, NormScale::Weight, |p, i| {
        DecoderLayer::new(p, cfg, i)
    })
}
