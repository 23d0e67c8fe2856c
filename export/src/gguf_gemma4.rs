//! What a Gemma 4 text stack needs in a GGUF beyond the keys every Gemma architecture shares
//! (`general.architecture = gemma4`, as llama.cpp's converter writes it for
//! `Gemma4ForCausalLM` / `Gemma4UnifiedForConditionalGeneration`):
//!
//! - Sliding and full layers have their own head sizes: `attention.key_length` /
//!   `value_length` are the full layers' (`global_head_dim`), the `_swa` keys the sliding
//!   layers' (`head_dim`); `attention.head_count_kv` is a per-layer array.
//! - `attention.sliding_window_pattern` is a per-layer bool array (true = sliding).
//! - `attention.shared_kv_layers` and `embedding_length_per_layer_input` are required keys;
//!   Atoll's Gemma 4 shares no KV and has no per-layer embeddings, so both are 0. A drafter
//!   (`gemma4-assistant`) shares every layer's K/V with its target: `shared_kv_layers` is its
//!   layer count, the `num_kv_shared_layers` its config.json holds (Atoll reads no other value)
//!   and llama.cpp's converter copies.
//! - Norm weights are stored as they are (Gemma 4's RMSNorm multiplies by w, not 1 + w); V is
//!   RMS-normalised without a weight; scores are not scaled (the q/k norms carry the scale);
//!   the embedding scale sqrt(hidden) is hard-coded by llama.cpp, as in Atoll.
//! - K = V full layers have no `attn_v`: llama.cpp then uses the raw K projection as V.
//! - `layer_scalar` becomes `blk.N.layer_output_scale.weight` (f32, multiplies the layer output).
//! - Full layers rotate with NeoX RoPE over the whole head and a `rope_freqs.weight` tensor
//!   [global_head_dim / 2] of frequency divisors: proportional RoPE's rotated pairs get the
//!   RoPE factor (1 when unscaled), its identity pairs 1e30 (angle ~0). llama.cpp reads it on
//!   full layers only; sliding layers rotate fully with `rope.freq_base_swa`, unscaled.

use crate::gguf::MetaValue;
use anyhow::{bail, Result};
use atoll_trainer::config::{GemmaConfig, LayerType, RopeKind};

/// `general.architecture` of a Gemma 4 MTP drafter (llama.cpp's `LLM_ARCH_GEMMA4_ASSISTANT`).
pub const DRAFTER_ARCHITECTURE: &str = "gemma4-assistant";

/// The frequency divisor llama.cpp's converter gives the pairs proportional RoPE leaves alone.
const UNROTATED: f32 = 1e30;

/// The gemma4-specific metadata keys (those the shared Gemma writer does not write), under the
/// architecture prefix `a`; `shared_kv_layers` of the layers read another model's K/V.
pub fn metadata(
    config: &GemmaConfig,
    a: &str,
    shared_kv_layers: usize,
) -> Result<Vec<(String, MetaValue)>> {
    if config.rope_sliding.kind != RopeKind::Default {
        bail!("GGUF export: llama.cpp's gemma4 rotates sliding layers without scaling or partial rotation, but config.json's sliding_attention rope is {:?}", config.rope_sliding.kind);
    }
    let u32_of = |n: usize| MetaValue::U32(n as u32);
    let per_layer_kv = (0..config.num_hidden_layers)
        .map(|i| config.layer_attention(i).num_kv_heads as i32)
        .collect();
    let sliding = config
        .layer_types
        .iter()
        .map(|t| *t == LayerType::Sliding)
        .collect();
    Ok(vec![
        (
            format!("{a}.attention.head_count_kv"),
            MetaValue::I32Array(per_layer_kv),
        ),
        (
            format!("{a}.attention.key_length"),
            u32_of(config.global_head_dim),
        ),
        (
            format!("{a}.attention.value_length"),
            u32_of(config.global_head_dim),
        ),
        (
            format!("{a}.attention.key_length_swa"),
            u32_of(config.head_dim),
        ),
        (
            format!("{a}.attention.value_length_swa"),
            u32_of(config.head_dim),
        ),
        (
            format!("{a}.attention.sliding_window_pattern"),
            MetaValue::BoolArray(sliding),
        ),
        (
            format!("{a}.attention.shared_kv_layers"),
            u32_of(shared_kv_layers),
        ),
        (
            format!("{a}.embedding_length_per_layer_input"),
            MetaValue::U32(0),
        ),
        (
            format!("{a}.rope.dimension_count"),
            u32_of(config.global_head_dim),
        ),
        (
            format!("{a}.rope.dimension_count_swa"),
            u32_of(config.head_dim),
        ),
    ])
}

/// `rope_freqs.weight`: per frequency pair of a full layer's head, the divisor llama.cpp
/// applies to its angle, so that NeoX RoPE over the whole head reproduces Atoll's full-layer
/// RoPE (`inverse_frequencies` in trainer/src/models/layers.rs): inv_freq_i / factor on the
/// rotated pairs, 0 on the rest.
pub fn rope_freqs(config: &GemmaConfig) -> Vec<f32> {
    let pairs = config.global_head_dim / 2;
    let (rotated, factor) = match config.rope_full.kind {
        RopeKind::Default => (pairs, 1.0),
        RopeKind::Linear { factor } => (pairs, factor),
        RopeKind::Proportional {
            partial_rotary_factor,
            factor,
        } => (
            ((partial_rotary_factor * config.global_head_dim as f64) as usize) / 2,
            factor,
        ),
    };
    (0..pairs)
        .map(|i| {
            if i < rotated {
                factor as f32
            } else {
                UNROTATED
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_trainer::models::layers::inverse_frequencies;
    use tch::{Device, Kind};

    /// llama.cpp's NeoX RoPE over the whole head with `rope_freqs` gives pair i the angle
    /// pos · base^(-2i / head) / rope_freqs[i]; that must equal Atoll's full-layer frequencies
    /// for every RoPE kind (1e-6 relative, f32), the identity pairs ~0.
    #[test]
    fn rope_freqs_reproduce_atolls_full_layer_frequencies() {
        let kinds = [
            RopeKind::Default,
            RopeKind::Linear { factor: 8.0 },
            RopeKind::Proportional {
                partial_rotary_factor: 0.25,
                factor: 1.0,
            },
            RopeKind::Proportional {
                partial_rotary_factor: 0.5,
                factor: 4.0,
            },
        ];
        let mut config = GemmaConfig::from_hf_json(&serde_json::json!({
            "model_type": "gemma4_unified_text", "vocab_size": 16, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "global_head_dim": 64,
            "layer_types": ["sliding_attention", "full_attention"],
        }))
        .unwrap();
        for kind in kinds {
            config.rope_full.kind = kind;
            let theta = config.rope_full.theta;
            let head = config.global_head_dim;
            let freqs = rope_freqs(&config);
            assert_eq!(freqs.len(), head / 2);
            let atoll = Vec::<f32>::try_from(
                inverse_frequencies(head, config.rope_full, Device::Cpu).to_kind(Kind::Float),
            )
            .unwrap();
            for (i, (&divisor, &want)) in freqs.iter().zip(&atoll).enumerate() {
                let got = theta.powf(-2.0 * i as f64 / head as f64) / divisor as f64;
                let tolerance = 1e-6 * want.abs() as f64 + 1e-30;
                assert!(
                    (got - want as f64).abs() <= tolerance,
                    "{kind:?} pair {i}: llama.cpp {got}, Atoll {want}"
                );
            }
        }
    }
}
