//! Accelerator memory of a LoRA fine-tune, from the model's shapes: the bf16 (or f32) base, the
//! adapters with their gradients and AdamW moments in f32, and the activations of one micro-batch
//! with or without per-layer checkpointing. An estimate of what the tensors of Atoll's own
//! forward and backward hold (listed term by term below), not a measurement; the CUDA context
//! and allocator slack come on top.

use crate::config::{GemmaConfig, LayerType};
use crate::models::lora::target_matches;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct LoraMemory {
    pub base_weights: f64,
    pub adapter_parameters: u64,
    /// Adapters, their gradients and two AdamW moments, all f32.
    pub adapter_state: f64,
    /// The hidden state kept per layer under checkpointing (0 without).
    pub checkpoints: f64,
    /// What autograd keeps for one layer (checkpointing) or for all of them.
    pub layer_activations: f64,
    /// The fused loss's f32 logits blocks ([`crate::models::head_loss`]).
    pub logits: f64,
    pub total: f64,
}

/// Bytes per token that one layer's backward keeps (activations at `act` bytes per element).
pub(crate) fn layer_bytes_per_token(
    cfg: &GemmaConfig,
    layer: usize,
    act: f64,
    adapted: &[bool; 7],
) -> f64 {
    let shape = cfg.layer_attention(layer);
    let d = cfg.hidden_size as f64;
    let q = (cfg.num_attention_heads * shape.head_dim) as f64;
    let kv = (shape.num_kv_heads * shape.head_dim) as f64;
    let ffn = cfg.intermediate_size as f64;
    // Norm inputs are upcast to f32 and kept: four sandwich norms, q/k norms (and v on Gemma 4).
    let norms = 4.0 * 4.0 * d + 4.0 * (q + 2.0 * kv);
    // Inputs of the projections (q/k/v share one), q, k, v after RoPE, attention output, and
    // the MLP's gate, gelu(gate), up and their product.
    let linear_inputs = act * (2.0 * d + q + ffn);
    let attention = act * (2.0 * q + 2.0 * kv);
    let mlp = act * 3.0 * ffn;
    // Each adapter keeps its f32 input (A's gradient) and the rank-sized product (negligible).
    let widths = [d, d, d, q, d, d, ffn]; // q, k, v, o, gate, up, down
    let adapters: f64 = widths
        .iter()
        .zip(adapted)
        .filter(|(_, on)| **on)
        .map(|(w, _)| 4.0 * w)
        .sum();
    let residual = act * 2.0 * d;
    norms + linear_inputs + attention + mlp + adapters + residual
}

/// The estimate for micro-batches of `batch` sequences of `seq` tokens.
pub fn estimate(
    cfg: &GemmaConfig,
    rank: u64,
    targets: &[String],
    seq: u64,
    batch: u64,
    base_bytes_per_param: f64,
    checkpointing: bool,
) -> LoraMemory {
    let act = base_bytes_per_param; // activations run in the base dtype
    let mut adapter_parameters = 0u64;
    for spec in cfg.tensor_specs() {
        let Some(module) = spec.name.strip_suffix(".weight") else {
            continue;
        };
        if spec.shape.len() == 2
            && module.contains(".layers.")
            && targets.iter().any(|t| target_matches(module, t))
        {
            adapter_parameters += rank * (spec.shape[0] + spec.shape[1]) as u64;
        }
    }
    let names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let adapted = names.map(|n| {
        targets
            .iter()
            .any(|t| target_matches(&format!("model.layers.0.{n}"), t))
    });
    let tokens = (seq * batch) as f64;
    let per_layer: Vec<f64> = (0..cfg.num_hidden_layers)
        .map(|l| tokens * layer_bytes_per_token(cfg, l, act, &adapted))
        .collect();
    let largest = per_layer.iter().cloned().fold(0.0, f64::max);
    let (checkpoints, layer_activations) = if checkpointing {
        (
            cfg.num_hidden_layers as f64 * tokens * cfg.hidden_size as f64 * act,
            largest,
        )
    } else {
        (0.0, per_layer.iter().sum())
    };
    let logits = crate::models::head_loss::logits_bytes_on_gpu(tokens, cfg);
    let base_weights = cfg.num_parameters() as f64 * base_bytes_per_param;
    let adapter_state = 16.0 * adapter_parameters as f64;
    LoraMemory {
        base_weights,
        adapter_parameters,
        adapter_state,
        checkpoints,
        layer_activations,
        logits,
        total: base_weights + adapter_state + checkpoints + layer_activations + logits,
    }
}

/// Whether any layer is a full-attention layer (for the printout).
pub fn has_full_layers(cfg: &GemmaConfig) -> bool {
    cfg.layer_types.contains(&LayerType::Full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::lora::DEFAULT_TARGETS;
    use crate::presets::preset;

    fn targets() -> Vec<String> {
        DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()
    }

    /// The adapter count is r·(in + out) summed over the adapted matrices: checked by hand for
    /// Gemma 3 12B (48 layers, d 3840, 16 heads × 256, 8 KV heads, ffn 15360).
    #[test]
    fn gemma3_12b_adapter_count_and_fit() {
        let cfg = preset("gemma3-12b").unwrap().config;
        let m = estimate(&cfg, 16, &targets(), 4096, 1, 2.0, true);
        let per_layer = 16 * ((3840 + 4096) * 2 + (3840 + 2048) * 2 + (3840 + 15360) * 3);
        assert_eq!(m.adapter_parameters, 48 * per_layer);
        assert!(m.total < 80e9, "{m:?}");
        let without = estimate(&cfg, 16, &targets(), 4096, 1, 2.0, false);
        assert!(without.layer_activations > 20.0 * m.layer_activations);
    }

    #[test]
    fn gemma4_12b_fits_one_80_gb_gpu_with_checkpointing() {
        let cfg = preset("gemma4-12b").unwrap().config;
        let m = estimate(&cfg, 16, &targets(), 4096, 1, 2.0, true);
        assert!(m.total < 80e9, "{m:?}");
        assert!(m.base_weights > 20e9);
        // The fused loss holds three f32 blocks of 512 rows of the 262,144-token vocabulary,
        // whatever the sequence length beyond them (unfused: three of all 4,096 rows, 12 GiB).
        assert_eq!(m.logits, 12.0 * 512.0 * 262_144.0);
        let longer = estimate(&cfg, 16, &targets(), 8192, 1, 2.0, true);
        assert_eq!(longer.logits, m.logits);
    }
}
