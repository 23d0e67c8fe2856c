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
    attend, linear_weight, lm_logits, scaled_embedding, LayerInputs, Mlp, NormScale, RmsNorm,
};
use crate::config::{GemmaConfig, LayerType};
use tch::{nn, Tensor};

#[derive(Debug)]
struct Attention {
    layer_type: LayerType,
    q_proj: Tensor,
    k_proj: Tensor,
    /// None on K = V layers.
    v_proj: Option<Tensor>,
    o_proj: Tensor,
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
            q_proj: linear_weight(&p / "q_proj", heads * hd, h),
            k_proj: linear_weight(&p / "k_proj", kv * hd, h),
            v_proj: (!shape.k_eq_v).then(|| linear_weight(&p / "v_proj", kv * hd, h)),
            o_proj: linear_weight(&p / "o_proj", h, heads * hd),
            q_norm: RmsNorm::new(&p / "q_norm", hd, eps, NormScale::Weight),
            k_norm: RmsNorm::new(&p / "k_norm", hd, eps, NormScale::Weight),
            v_norm: RmsNorm::new(&p / "v_norm", hd, eps, NormScale::None),
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
        }
    }

    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (rope, mask) = match self.layer_type {
            LayerType::Sliding => (&inputs.rope_sliding, inputs.sliding_mask.as_ref()),
            LayerType::Full => (&inputs.rope_full, None),
        };
        let project = |w: &Tensor, heads: i64| {
            x.linear::<Tensor>(w, None)
                .view([b, t, heads, self.head_dim])
        };
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
        out.transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim])
            .linear::<Tensor>(&self.o_proj, None)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    /// A checkpoint buffer (not trained), shape [1].
    layer_scalar: Tensor,
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
        let h = x + self.post_attention_layernorm.forward(&attn);
        let ffn = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&h));
        (&h + self.post_feedforward_layernorm.forward(&ffn)) * &self.layer_scalar
    }
}

#[derive(Debug)]
pub struct Gemma4 {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    hidden_size: usize,
    final_softcap: Option<f64>,
}

impl Gemma4 {
    /// Creates the variables under `root` with Hugging Face names (`model.layers.N....`).
    pub fn new(root: &nn::Path, cfg: &GemmaConfig) -> Self {
        let m = root / "model";
        let embed_tokens = (&m / "embed_tokens").var(
            "weight",
            &[cfg.vocab_size as i64, cfg.hidden_size as i64],
            nn::Init::Randn {
                mean: 0.0,
                stdev: super::layers::INIT_STD,
            },
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&m / "layers" / i, cfg, i))
            .collect();
        let norm = RmsNorm::new(
            &m / "norm",
            cfg.hidden_size as i64,
            cfg.rms_norm_eps,
            NormScale::Weight,
        );
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            linear_weight(
                root / "lm_head",
                cfg.vocab_size as i64,
                cfg.hidden_size as i64,
            )
        });
        Gemma4 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            hidden_size: cfg.hidden_size,
            final_softcap: cfg.final_logit_softcapping,
        }
    }

    /// ids [B, T] -> final hidden states [B, T, d] (after the final norm).
    pub fn hidden_states(&self, ids: &Tensor, inputs: &LayerInputs) -> Tensor {
        let mut x = scaled_embedding(&self.embed_tokens, ids, self.hidden_size);
        for layer in &self.layers {
            x = layer.forward(&x, inputs);
        }
        self.norm.forward(&x)
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        lm_logits(
            hidden,
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            self.final_softcap,
        )
    }
}
