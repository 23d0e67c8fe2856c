//! Named model configurations: the real 12B and 27B shapes and tiny ones for tests and demos.
//!
//! Presets are written as Hugging Face `config.json` values so they go through the same parser as
//! checkpoints on disk.

use crate::config::GemmaConfig;
use anyhow::Result;
use serde_json::{json, Value};

/// Parameters a real checkpoint holds besides the text stack (vision/audio front ends), so that
/// `atoll model info` counts what the released files contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MultimodalExtras {
    pub vision: u64,
    pub audio: u64,
}

pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    pub config: GemmaConfig,
    pub extras: MultimodalExtras,
}

/// The names are the recipe's (atoll-recipe checks `model.preset` against them when it reads a
/// recipe); `preset_json` below gives each its shapes.
pub use atoll_recipe::PRESET_NAMES;

fn five_to_one(layers: usize) -> Vec<&'static str> {
    (0..layers)
        .map(|i| {
            if (i + 1) % 6 == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect()
}

/// SigLIP-So400m/14 at 896 px (27 layers, width 1152, MLP 4304) plus the Gemma 3 multimodal
/// projector into a text stack of width `hidden`.
fn gemma3_vision(hidden: u64) -> u64 {
    let (w, mlp, layers, patch, grid) = (1152u64, 4304u64, 27u64, 14u64, 64u64);
    let patch_embed = w * 3 * patch * patch + w;
    let positions = grid * grid * w;
    let layer = 2 * (2 * w) + 4 * (w * w + w) + (w * mlp + mlp) + (mlp * w + w);
    let post_ln = 2 * w;
    let projector = w * hidden + w;
    patch_embed + positions + layers * layer + post_ln + projector
}

/// The encoder-free Gemma 4 12B front ends: 48x48x3 patch embedder and the 640-sample audio projection.
fn gemma4_12b_extras() -> MultimodalExtras {
    let (patch, d, posemb) = (6912u64, 3840u64, 1120u64);
    let vision = 2 * patch // patch_ln1
        + patch * d + d // patch_dense
        + 2 * d // patch_ln2
        + posemb * 2 * d // pos_embedding
        + 2 * d // pos_norm
        + d * d; // embed_vision.embedding_projection
    MultimodalExtras {
        vision,
        audio: 640 * d,
    }
}

/// The text config of a released Gemma 3 (multimodal vocabulary, 1024-token window, five sliding
/// layers to one full, linear RoPE x8 on full layers) of the given shapes.
fn gemma3_released(
    hidden: u64,
    intermediate: u64,
    layers: usize,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    query_pre_attn_scalar: u64,
) -> Value {
    json!({
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar, "sliding_window": 1024,
        "layer_types": five_to_one(layers), "max_position_embeddings": 131072,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
        }
    })
}

fn preset_json(name: &str) -> Option<(Value, &'static str, MultimodalExtras)> {
    let v = match name {
        "gemma3-12b" => (
            gemma3_released(3840, 15360, 48, 16, 8, 256, 256),
            "Gemma 3 12B (text stack; vision tower counted separately)",
            MultimodalExtras {
                vision: gemma3_vision(3840),
                audio: 0,
            },
        ),
        // The 27B's attention scale is 1/sqrt(hidden / heads) = 1/sqrt(168), not 1/sqrt(head_dim).
        "gemma3-27b" => (
            gemma3_released(5376, 21504, 62, 32, 16, 128, 168),
            "Gemma 3 27B (text stack; vision tower counted separately)",
            MultimodalExtras {
                vision: gemma3_vision(5376),
                audio: 0,
            },
        ),
        "gemma4-12b" => (
            json!({
                "model_type": "gemma4_unified_text", "vocab_size": 262144, "hidden_size": 3840,
                "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
                "num_global_key_value_heads": 1, "attention_k_eq_v": true,
                "sliding_window": 1024, "layer_types": five_to_one(48),
                "final_logit_softcapping": 30.0, "max_position_embeddings": 262144,
                "rope_parameters": {
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
                }
            }),
            "Gemma 4 12B, encoder-free (text stack; patch and audio embedders counted separately)",
            gemma4_12b_extras(),
        ),
        "gemma3-tiny" => (
            json!({
                "model_type": "gemma3_text", "vocab_size": 4096, "hidden_size": 128,
                "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
                "sliding_window": 64,
                "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                "max_position_embeddings": 2048,
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
                }
            }),
            "tiny Gemma 3 for tests and the CPU demo",
            MultimodalExtras::default(),
        ),
        "gemma4-tiny" => (
            json!({
                "model_type": "gemma4_unified_text", "vocab_size": 4096, "hidden_size": 128,
                "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 64,
                "num_global_key_value_heads": 1, "attention_k_eq_v": true,
                "sliding_window": 64, "final_logit_softcapping": 30.0,
                "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                "max_position_embeddings": 2048,
                "rope_parameters": {
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
                }
            }),
            "tiny Gemma 4 (K=V, proportional RoPE, layer_scalar, softcap) for tests and demos",
            MultimodalExtras::default(),
        ),
        "gemma3-bench" => (
            json!({
                "model_type": "gemma3_text", "vocab_size": 8192, "hidden_size": 256,
                "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64,
                "sliding_window": 128, "layer_types": five_to_one(6),
                "max_position_embeddings": 4096,
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
                }
            }),
            "6 layers, hidden 256: the training-step benchmark against transformers",
            MultimodalExtras::default(),
        ),
        _ => return None,
    };
    Some(v)
}

pub fn preset(name: &str) -> Result<Preset> {
    let Some((value, description, extras)) = preset_json(name) else {
        return Err(atoll_recipe::unknown_preset(name));
    };
    let config = GemmaConfig::from_hf_json(&value)?;
    let name = PRESET_NAMES
        .iter()
        .copied()
        .find(|n| *n == name)
        .unwrap_or("custom");
    Ok(Preset {
        name,
        description,
        config,
        extras,
    })
}
