//! Gemma 4 MTP drafters (the model is `models::gemma4_assistant`): training against a frozen
//! base (`atoll train` with `model.drafter`), greedy speculative verification (`atoll eval
//! drafter`) and the export transformers loads as the assistant model. See docs/drafter.md.
//!
//! A drafter run writes `<run>/final/drafter/` (the Hugging Face assistant layout); the base
//! model stays where `model.init_from` points.

pub mod eval;
pub mod export;
pub mod train;

use crate::config::{Architecture, GemmaConfig, LayerType};
use crate::models::gemma4_assistant::{self, AssistantConfig, Gemma4Assistant};
use crate::models::GemmaModel;
use crate::recipe::drafter::DrafterSection;
use crate::recipe::Recipe;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::Device;

pub use export::{drafter_tokenizer, export_drafter, find_drafter, ExportedDrafter};

/// Where a drafter run keeps its drafter.
pub fn run_drafter_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("final").join("drafter")
}

/// The recipe's drafter section and the frozen base checkpoint it trains against.
pub fn drafter_recipe(recipe: &Recipe) -> Result<(&DrafterSection, &Path)> {
    let section = recipe
        .model
        .drafter
        .as_ref()
        .ok_or_else(|| anyhow!("model.drafter: the recipe has no drafter section"))?;
    let base = recipe.model.init_from.as_deref().ok_or_else(|| {
        anyhow!("model.drafter: needs model.init_from, the trained Gemma 4 base the drafter learns to predict (a preset would be a random base)")
    })?;
    Ok((section, base))
}

/// The config of a fresh drafter for `base`: the section's width and depth, the base's K/V
/// geometry (every drafter layer reads the base's last layer of its type), RoPE, window and
/// vocabulary.
pub fn fresh_config(section: &DrafterSection, base: &GemmaConfig) -> Result<AssistantConfig> {
    if base.architecture != Architecture::Gemma4 {
        bail!("model.drafter: the base model (model.init_from) is Gemma 3; MTP drafters read a Gemma 4 target");
    }
    let layers = section.num_hidden_layers.0;
    let mut layer_types = vec![LayerType::Sliding; layers - 1];
    layer_types.push(LayerType::Full);
    let text = GemmaConfig {
        vocab_size: base.vocab_size,
        hidden_size: section.hidden_size.0,
        intermediate_size: section.intermediate_size.0,
        num_hidden_layers: layers,
        num_attention_heads: section
            .num_attention_heads
            .map_or(base.num_attention_heads, |h| h.0),
        layer_types,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        tie_word_embeddings: true,
        ..base.clone()
    };
    text.validate().context("model.drafter")?;
    let config = AssistantConfig {
        text,
        backbone_hidden_size: base.hidden_size,
        num_centroids: 2048,
        centroid_intermediate_top_k: 32,
    };
    config.check_target(base).context("model.drafter")?;
    Ok(config)
}

/// The drafter a run starts from: `model.drafter.init_from`, or a fresh one seeded by the recipe.
pub fn initial_drafter(
    recipe: &Recipe,
    section: &DrafterSection,
    base: &GemmaModel,
    device: Device,
) -> Result<Gemma4Assistant> {
    let drafter = match &section.init_from {
        Some(dir) => gemma4_assistant::load(dir, device)
            .with_context(|| format!("model.drafter.init_from: {}", dir.display()))?,
        None => {
            Gemma4Assistant::new_seeded(fresh_config(section, &base.config)?, device, recipe.seed)?
        }
    };
    drafter
        .config
        .check_target(&base.config)
        .context("model.drafter")?;
    Ok(drafter)
}
