//! Gemma 3 text decoder (`Gemma3ForCausalLM`, `model_type: gemma3_text`).
//!
//! x = E[ids]·sqrt(d); per layer (sandwich norms, (1 + w) RMSNorm):
//!   h = x + post_attention_layernorm(attn(input_layernorm(x)))
//!   out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
//! Attention: q/k norms before RoPE (local θ on sliding layers, global θ with linear scaling on full
//! layers), GQA, scores × query_pre_attn_scalar^-0.5, sliding-window mask.
//! Output: final norm, tied LM head, optional logit softcap.

use super::layers::{
    attend, DecoderLayerForward, DecoderStack, LayerInputs, Linear, Mlp, NormScale, RmsNorm,
};
use crate::config::{GemmaConfig, LayerType};
use tch::{nn, Tensor};

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    scale: f64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &GemmaConfig) -> Self {
        let (h, heads, kv, hd) = (
            cfg.hidden_size as i64,
            cfg.num_attention_heads as i64,
            cfg.num_key_value_heads as i64,
            cfg.head_dim as i64,
        );
        Attention {
            q_proj: Linear::new(&p / "q_proj", heads * hd, h),
            k_proj: Linear::new(&p / "k_proj", kv * hd, h),
            v_proj: Linear::new(&p / "v_proj", kv * hd, h),
            o_proj: Linear::new(&p / "o_proj", h, heads * hd),
            q_norm: RmsNorm::new(
                &p / "q_norm",
                hd,
                cfg.rms_norm_eps,
                NormScale::OnePlusWeight,
            ),
            k_norm: RmsNorm::new(
                &p / "k_norm",
                hd,
                cfg.rms_norm_eps,
                NormScale::OnePlusWeight,
            ),
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
            // transformers' Gemma 3 never applies `attn_logit_softcapping` (it was Gemma 2's);
            // parity with it, and with the released checkpoints (null), means ignoring it too.
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
        }
    }

    fn forward(&self, x: &Tensor, layer_type: LayerType, inputs: &LayerInputs) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let rope = match layer_type {
            LayerType::Sliding => &inputs.rope_sliding,
            LayerType::Full => &inputs.rope_full,
        };
        let project = |w: &Linear, heads: i64| w.forward(x).view([b, t, heads, self.head_dim]);
        let q = rope.apply(&self.q_norm.forward(&project(&self.q_proj, self.num_heads)));
        let k = rope.apply(
            &self
                .k_norm
                .forward(&project(&self.k_proj, self.num_kv_heads)),
        );
        let v = project(&self.v_proj, self.num_kv_heads);
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let mask = match layer_type {
            LayerType::Sliding => inputs.sliding_mask.as_ref(),
            LayerType::Full => inputs.full_mask.as_ref(),
        };
        let out = attend(&q, &k, &v, mask, self.scale);
        self.o_proj.forward(
            &out.transpose(1, 2)
                .reshape([b, t, self.num_heads * self.head_dim]),
        )
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    layer_type: LayerType,
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

impl DecoderLayerForward for DecoderLayer {
    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor {
        DecoderLayer::forward(self, x, inputs)
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let a = &mut self.self_attn;
        let mut out = vec![&mut a.q_proj, &mut a.k_proj];
        out.push(&mut a.v_proj);
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
                NormScale::OnePlusWeight,
            )
        };
        DecoderLayer {
            layer_type: cfg.layer_types[index],
            self_attn: Attention::new(&p / "self_attn", cfg),
            mlp: Mlp::new(
                &p / "mlp",
                cfg.hidden_size as i64,
                cfg.intermediate_size as i64,
            ),
            input_layernorm: norm("input_layernorm"),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
        }
    }

    fn forward(&self, x: &Tensor, inputs: &LayerInputs) -> Tensor {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x), self.layer_type, inputs);
        let h = x + self.post_attention_layernorm.forward(&attn);
        let ffn = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&h));
        &h + self.post_feedforward_layernorm.forward(&ffn)
    }
}

/// The full decoder: scaled embedding, the layers above, final norm, tied LM head.
pub type Gemma3 = DecoderStack<DecoderLayer>;

pub fn new(root: &nn::Path, cfg: &GemmaConfig) -> Gemma3 {
    DecoderStack::new(root, cfg, NormScale::OnePlusWeight, |p, i| {
        DecoderLayer::new(p, cfg, i)
    })
}
