//! A Gemma 3 or Gemma 4 text stack as a GGUF file for llama.cpp / Ollama
//! (`general.architecture = gemma3` / `gemma4`), with llama.cpp's metadata keys and tensor names
//! and the tokenizer embedded; and a Gemma 4 MTP drafter as llama.cpp's `gemma4-assistant`
//! (llama.cpp's speculative decoding loads it beside its target). What Gemma 4 adds is in
//! [`gguf_gemma4`]; a multimodal checkpoint's vision/audio tensors are left out (llama.cpp reads
//! them from an mmproj file).
//!
//! Conventions llama.cpp expects for `gemma3`:
//! - RMSNorm weights are stored as 1 + w (the HF checkpoint stores w); they stay f32.
//! - Attention scores are scaled by 1/sqrt(head_dim) whatever `query_pre_attn_scalar` says,
//!   except in a 62-layer model (llama.cpp's "27B"), which it scales by
//!   1/sqrt(hidden_size / num_attention_heads), Gemma 3 27B's `query_pre_attn_scalar` of 168;
//!   where the scale llama.cpp picks differs from 1/sqrt(query_pre_attn_scalar), the ratio is
//!   folded into the q_norm weights (q is RMS-normalised, then rotated: both linear in those
//!   weights), so the scores match ([`llama_cpp_q_scale`]).
//! - Sliding layers use `rope.freq_base_swa` without scaling; full layers `rope.freq_base` with
//!   `rope.scaling.*`.
//!
//! A drafter is a Gemma 4 stack without K/V projections (every layer reads the target's K/V),
//! written with the gemma4 keys under its own prefix plus `embedding_length_out` (the target's
//! width, which `post_projection` maps back to) and `nextn_predict_layers` (all its layers); its
//! `pre_projection` / `post_projection` become `nextn.pre_projection` / `nextn.post_projection`.

use crate::direct_file::DirectFile;
use crate::gguf::{GgufWriter, MetaValue, TensorInfo};
use crate::gguf_gemma4;
use crate::quant::{decode_into, GgmlType, BLOCK};
use crate::source::{Checkpoint, WeightSource};
use crate::tokenizer::{self, SpecialIds};
use crate::{progress, ExportSummary, PendingOutput};
use anyhow::{anyhow, bail, Context, Result};
use atoll_trainer::checkpoint::TextLayout;
use atoll_trainer::config::{Architecture, GemmaConfig, LayerType, RopeKind, TensorSpec};
use atoll_trainer::models::gemma4_assistant::AssistantConfig;
use std::path::Path;

/// Source bytes read per step when streaming a tensor (whole rows at a time).
const CHUNK_BYTES: usize = 32 << 20;

/// Values converted per step inside a chunk (a multiple of the 32-value quant block).
const STEP_VALUES: usize = 16 << 10;

/// The GGUF tensor name of an Atoll (HF) text-stack tensor name.
pub fn gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        "pre_projection.weight" => return Some("nextn.pre_projection.weight".into()),
        "post_projection.weight" => return Some("nextn.post_projection.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.q_norm.weight" => "attn_q_norm",
        "self_attn.k_norm.weight" => "attn_k_norm",
        "post_attention_layernorm.weight" => "post_attention_norm",
        "pre_feedforward_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "post_feedforward_layernorm.weight" => "post_ffw_norm",
        "layer_scalar" => "layer_output_scale",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// `general.file_type` of an export in `ty` (1-D tensors stay f32).
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::Bf16 => 32,
    }
}

/// The period p of a layer pattern where every p-th layer (p-1, 2p-1, …) is full attention.
fn sliding_window_period(config: &GemmaConfig) -> Result<u32> {
    let first_full = config
        .layer_types
        .iter()
        .position(|t| *t == LayerType::Full)
        .unwrap_or(config.layer_types.len());
    let period = first_full + 1;
    let periodic = config
        .layer_types
        .iter()
        .enumerate()
        .all(|(i, t)| (*t == LayerType::Full) == ((i + 1) % period == 0));
    if !periodic {
        bail!(
            "GGUF export: layer_types are not one full-attention layer every N layers, which is the only pattern llama.cpp's gemma3 describes"
        );
    }
    Ok(period as u32)
}

/// Where a GGUF tensor's values come from.
enum TensorSource {
    /// A checkpoint tensor, streamed.
    Stored(String),
    /// Computed from the config (Gemma 4's `rope_freqs`).
    Values(Vec<f32>),
}

/// One tensor to write: where it comes from and how it is transformed.
struct Planned {
    info: TensorInfo,
    source: TensorSource,
    /// Added to every value (the Gemma norm shift), then multiplied by `scale`.
    shift: f32,
    scale: f32,
}

/// What a GGUF export holds.
#[derive(Clone, Copy)]
enum Stack<'a> {
    /// A Gemma 3 or Gemma 4 text stack.
    Text(&'a GemmaConfig),
    /// A Gemma 4 MTP drafter.
    Drafter(&'a AssistantConfig),
}

impl<'a> Stack<'a> {
    fn text(self) -> &'a GemmaConfig {
        match self {
            Stack::Text(config) => config,
            Stack::Drafter(drafter) => &drafter.text,
        }
    }

    /// `general.architecture`, also the prefix of the model's keys.
    fn architecture(self) -> &'static str {
        match self {
            Stack::Text(config) => config.architecture.name(),
            Stack::Drafter(_) => gguf_gemma4::DRAFTER_ARCHITECTURE,
        }
    }

    fn tensor_specs(self) -> Vec<TensorSpec> {
        match self {
            Stack::Text(config) => config.tensor_specs(),
            Stack::Drafter(drafter) => drafter.tensor_specs(),
        }
    }
}

/// The metadata keys of a Gemma 3, Gemma 4 or drafter GGUF (tokenizer keys excluded).
fn model_metadata(stack: Stack, ty: GgmlType, name: &str) -> Result<Vec<(String, MetaValue)>> {
    let u32_of = |n: usize| MetaValue::U32(n as u32);
    let config = stack.text();
    let a = stack.architecture();
    let mut m = vec![
        ("general.architecture".to_string(), MetaValue::Str(a.into())),
        ("general.name".to_string(), MetaValue::Str(name.into())),
        (
            "general.file_type".to_string(),
            MetaValue::U32(file_type(ty)),
        ),
        (
            "general.quantization_version".to_string(),
            MetaValue::U32(2),
        ),
        (
            "general.alignment".to_string(),
            MetaValue::U32(crate::gguf::ALIGNMENT as u32),
        ),
        (
            format!("{a}.context_length"),
            u32_of(config.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u32_of(config.hidden_size)),
        (format!("{a}.block_count"), u32_of(config.num_hidden_layers)),
        (
            format!("{a}.feed_forward_length"),
            u32_of(config.intermediate_size),
        ),
        (format!("{a}.vocab_size"), u32_of(config.vocab_size)),
        (
            format!("{a}.attention.head_count"),
            u32_of(config.num_attention_heads),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            MetaValue::F32(config.rms_norm_eps as f32),
        ),
        (
            format!("{a}.attention.sliding_window"),
            u32_of(config.sliding_window),
        ),
        (
            format!("{a}.rope.freq_base"),
            MetaValue::F32(config.rope_full.theta as f32),
        ),
        (
            format!("{a}.rope.freq_base_swa"),
            MetaValue::F32(config.rope_sliding.theta as f32),
        ),
    ];
    if let Some(cap) = config.final_logit_softcapping {
        m.push((
            format!("{a}.final_logit_softcapping"),
            MetaValue::F32(cap as f32),
        ));
    }
    match stack {
        Stack::Text(config) => match config.architecture {
            Architecture::Gemma3 => m.extend(gemma3_metadata(config, a)?),
            Architecture::Gemma4 => m.extend(gguf_gemma4::metadata(config, a, 0)?),
        },
        Stack::Drafter(drafter) => {
            let layers = drafter.text.num_hidden_layers;
            m.extend(gguf_gemma4::metadata(&drafter.text, a, layers)?);
            m.push((
                format!("{a}.embedding_length_out"),
                u32_of(drafter.backbone_hidden_size),
            ));
            m.push((format!("{a}.nextn_predict_layers"), u32_of(layers)));
        }
    }
    Ok(m)
}

/// The gemma3-specific keys: one head geometry for every layer, the period of the layer
/// pattern, RoPE scaling of the full layers.
fn gemma3_metadata(config: &GemmaConfig, a: &str) -> Result<Vec<(String, MetaValue)>> {
    let u32_of = |n: usize| MetaValue::U32(n as u32);
    let mut m = vec![
        (
            format!("{a}.attention.head_count_kv"),
            u32_of(config.num_key_value_heads),
        ),
        (format!("{a}.attention.key_length"), u32_of(config.head_dim)),
        (
            format!("{a}.attention.value_length"),
            u32_of(config.head_dim),
        ),
        (
            format!("{a}.attention.sliding_window_pattern"),
            MetaValue::U32(sliding_window_period(config)?),
        ),
    ];
    if config.rope_sliding.kind != RopeKind::Default {
        bail!("GGUF export: llama.cpp's gemma3 applies no RoPE scaling on sliding layers, but config.json scales them");
    }
    match config.rope_full.kind {
        RopeKind::Default => {}
        RopeKind::Linear { factor } => {
            m.push((
                format!("{a}.rope.scaling.type"),
                MetaValue::Str("linear".into()),
            ));
            m.push((
                format!("{a}.rope.scaling.factor"),
                MetaValue::F32(factor as f32),
            ));
        }
        RopeKind::Proportional { .. } => {
            bail!("GGUF export: proportional RoPE (a Gemma 4 feature) has no gemma3 GGUF key")
        }
    }
    Ok(m)
}

/// Writes the text stack of checkpoint `ck` to the GGUF file `out` with 2-D weights in `ty`.
/// `tokenizer` overrides the checkpoint's own `tokenizer.json`.
pub fn export_gguf(
    ck: &Checkpoint,
    out: &Path,
    ty: GgmlType,
    tokenizer: Option<&Path>,
) -> Result<ExportSummary> {
    if atoll_trainer::drafter::export::is_drafter_dir(&ck.dir) {
        bail!(
            "{}: this is an MTP drafter, not a model; export it with --format drafter-gguf",
            ck.dir.display()
        );
    }
    let config = GemmaConfig::from_file(&ck.dir.join("config.json"))?;
    let tokenizer = tokenizer
        .map(Path::to_path_buf)
        .or_else(|| ck.tokenizer.clone())
        .ok_or_else(|| {
            anyhow!(
                "{}: no tokenizer.json with the checkpoint; pass --tokenizer FILE (a GGUF embeds its tokenizer)",
                ck.dir.display()
            )
        })?;
    write_gguf(&ck.dir, Stack::Text(&config), out, ty, &tokenizer)
}

/// Writes the Gemma 4 MTP drafter in `dir` (a `gemma4_unified_assistant` checkpoint) to the GGUF
/// file `out` as llama.cpp's `gemma4-assistant`, 2-D weights in `ty`, with `tokenizer` (the
/// target's) embedded.
pub fn export_drafter_gguf(
    dir: &Path,
    out: &Path,
    ty: GgmlType,
    tokenizer: &Path,
) -> Result<ExportSummary> {
    let config = AssistantConfig::from_file(&dir.join("config.json"))?;
    write_gguf(dir, Stack::Drafter(&config), out, ty, tokenizer)
}

/// The export itself: every tensor of `stack` streamed from the checkpoint in `dir` into `out`.
fn write_gguf(
    dir: &Path,
    stack: Stack,
    out: &Path,
    ty: GgmlType,
    tokenizer_path: &Path,
) -> Result<ExportSummary> {
    let config = stack.text();
    let gemma3 = config.architecture == Architecture::Gemma3;
    let pending = PendingOutput::new(out)?;
    let name = out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("atoll")
        .to_string();
    let mut metadata = model_metadata(stack, ty, &name)?;
    metadata.extend(tokenizer::gguf_metadata(
        tokenizer_path,
        config.vocab_size,
        &SpecialIds {
            bos: config.bos_token_id,
            eos: config.eos_token_id,
            pad: config.pad_token_id,
        },
    )?);

    let source = WeightSource::open(dir)?;
    let layout = TextLayout::detect(source.tensors.iter().map(|t| t.name.as_str()));
    // A drafter's names are its own; a text stack's may carry a multimodal prefix.
    let stored_name = |name: &str| match stack {
        Stack::Text(_) => layout.stored_name(name),
        Stack::Drafter(_) => name.to_string(),
    };
    let q_scale = if gemma3 {
        llama_cpp_q_scale(config)
    } else {
        1.0
    };
    if q_scale != 1.0 {
        tracing::info!(
            "query_pre_attn_scalar {} differs from what llama.cpp scales this model's scores by: folding x{q_scale} into q_norm",
            config.query_pre_attn_scalar,
        );
    }
    let mut plan = Vec::new();
    if !gemma3 {
        let freqs = gguf_gemma4::rope_freqs(config);
        plan.push(Planned {
            info: TensorInfo {
                name: "rope_freqs.weight".into(),
                dims: vec![freqs.len() as u64],
                ty: GgmlType::F32,
            },
            source: TensorSource::Values(freqs),
            shift: 0.0,
            scale: 1.0,
        });
    }
    for spec in stack.tensor_specs() {
        let stored = stored_name(&spec.name);
        let entry = source.get(&stored).ok_or_else(|| {
            anyhow!(
                "{}: tensor {stored} is missing from the checkpoint",
                dir.display()
            )
        })?;
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        if shape != spec.shape {
            bail!(
                "{}: tensor {stored} has shape {:?}, config.json implies {:?}",
                dir.display(),
                entry.shape,
                spec.shape
            );
        }
        let gguf = gguf_name(&spec.name)
            .ok_or_else(|| anyhow!("internal: no GGUF name for {}", spec.name))?;
        let dims: Vec<u64> = entry.shape.iter().rev().map(|&d| d as u64).collect();
        let is_norm = spec.name.ends_with("norm.weight");
        let tensor_ty = if dims.len() < 2 {
            GgmlType::F32
        } else if ty.is_block() && !(dims[0] as usize).is_multiple_of(BLOCK) {
            GgmlType::F16 // llama.cpp's converter falls back the same way
        } else {
            ty
        };
        plan.push(Planned {
            info: TensorInfo {
                name: gguf,
                dims,
                ty: tensor_ty,
            },
            source: TensorSource::Stored(stored),
            shift: if is_norm && gemma3 { 1.0 } else { 0.0 },
            scale: if spec.name.ends_with("self_attn.q_norm.weight") {
                q_scale
            } else {
                1.0
            },
        });
    }

    let total: u64 = plan.iter().map(|p| p.info.n_bytes()).sum();
    let bar = progress(total, &format!("writing {}", out.display()));
    let file = DirectFile::create(&pending.temp)
        .with_context(|| format!("cannot create {}", pending.temp.display()))?;
    let infos = plan.iter().map(|p| p.info.clone()).collect();
    let mut writer = GgufWriter::start(file, &metadata, infos)?;
    // Buffers reused for every chunk of every tensor.
    let (mut raw, mut values, mut encoded) = (Vec::new(), Vec::new(), Vec::new());
    for p in &plan {
        let stored = match &p.source {
            TensorSource::Stored(name) => name,
            TensorSource::Values(values) => {
                encoded.clear();
                p.info.ty.encode(values, values.len(), &mut encoded)?;
                writer.write_chunk(&encoded)?;
                bar.inc(encoded.len() as u64);
                writer.end_tensor()?;
                continue;
            }
        };
        let entry = source
            .get(stored)
            .ok_or_else(|| anyhow!("internal: {stored} vanished"))?;
        let row_values = p.info.dims[0] as usize;
        let elem = (entry.len as usize) / (p.info.n_elements() as usize).max(1);
        let row_bytes = (row_values * elem).max(1);
        let chunk = (CHUNK_BYTES / row_bytes).max(1) * row_bytes;
        let mut offset = 0u64;
        while offset < entry.len {
            source.read_range_into(entry, offset, chunk as u64, &mut raw)?;
            offset += raw.len() as u64;
            encoded.clear();
            // Cache-sized steps (whole 32-value blocks): decode, shift, encode while the values
            // are still in L2.
            for piece in raw.chunks(STEP_VALUES * elem.max(1)) {
                decode_into(&entry.dtype, piece, &mut values)
                    .with_context(|| format!("tensor {}", entry.name))?;
                if p.shift != 0.0 || p.scale != 1.0 {
                    values
                        .iter_mut()
                        .for_each(|v| *v = (*v + p.shift) * p.scale);
                }
                p.info
                    .ty
                    .encode(&values, row_values, &mut encoded)
                    .with_context(|| format!("tensor {}", entry.name))?;
            }
            writer.write_chunk(&encoded)?;
            bar.inc(encoded.len() as u64);
        }
        writer.end_tensor()?;
    }
    let file = writer
        .finish()?
        .finish()
        .with_context(|| format!("cannot write {}", pending.temp.display()))?;
    file.sync_all()?;
    bar.finish_and_clear();
    let bytes = std::fs::metadata(&pending.temp)?.len();
    let path = pending.commit()?;
    Ok(ExportSummary {
        path,
        tensors: plan.len(),
        bytes,
    })
}

/// The factor a Gemma 3 export folds into q_norm so that llama.cpp's attention scale gives the
/// model's 1/sqrt(`query_pre_attn_scalar`). llama.cpp does not read that field: it scales by
/// 1/sqrt(head_dim), or, for a model of 62 layers (its "27B" type, after gemma_pytorch's
/// config), by 1/sqrt(hidden_size / num_attention_heads) in integer division. Gemma 3 27B's
/// 168 = 5376 / 32 then needs no fold; 1.0 wherever the two agree.
pub fn llama_cpp_q_scale(config: &GemmaConfig) -> f32 {
    let llama_cpp_dim = if config.num_hidden_layers == 62 {
        (config.hidden_size / config.num_attention_heads) as f64
    } else {
        config.head_dim as f64
    };
    if llama_cpp_dim == config.query_pre_attn_scalar {
        1.0
    } else {
        (llama_cpp_dim / config.query_pre_attn_scalar).sqrt() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_trainer::presets::preset;

    /// Gemma 3 27B (62 layers, 5376 / 32 = 168 = its query_pre_attn_scalar) and 12B (256 =
    /// head_dim) need no fold; a model whose scalar matches neither rule gets the ratio to the
    /// rule llama.cpp applies to its layer count.
    #[test]
    fn the_q_norm_fold_follows_the_scale_llama_cpp_picks_by_layer_count() {
        let gemma3_27b = preset("gemma3-27b").unwrap().config;
        assert_eq!(gemma3_27b.num_hidden_layers, 62);
        assert_eq!(gemma3_27b.head_dim, 128);
        assert_eq!(llama_cpp_q_scale(&gemma3_27b), 1.0);
        assert_eq!(
            llama_cpp_q_scale(&preset("gemma3-12b").unwrap().config),
            1.0
        );
        let mut other = gemma3_27b.clone();
        other.query_pre_attn_scalar = 128.0;
        assert!((llama_cpp_q_scale(&other) - (168.0f32 / 128.0).sqrt()).abs() < 1e-7);
        let mut tiny = preset("gemma3-tiny").unwrap().config;
        tiny.query_pre_attn_scalar = 20.0;
        let head_dim = tiny.head_dim as f32;
        assert!((llama_cpp_q_scale(&tiny) - (head_dim / 20.0).sqrt()).abs() < 1e-7);
    }
}
