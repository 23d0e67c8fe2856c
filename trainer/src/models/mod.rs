//! Gemma models in tch. One file per architecture; `layers.rs` holds the shared blocks.

pub mod cpu_kernels;
pub mod gemma3;
pub mod gemma4;
pub mod gemma4_assistant;
pub mod head_loss;
pub mod layers;
pub mod lora;
pub mod recompute;

use crate::config::{Architecture, GemmaConfig, LayerType};
use anyhow::{bail, Result};
use layers::{attention_mask, packed_attention_mask, LayerInputs, RotaryTable};
use tch::{nn, Device, Kind, Tensor};

enum Network {
    Gemma3(gemma3::Gemma3),
    Gemma4(gemma4::Gemma4),
}

/// libtorch's random generator is process-wide: seeding it and drawing from it happen under this
/// lock (seeded initialisation, LoRA adapters, dropout that a recomputed layer must replay), so
/// threads building or training models at once cannot interleave their draws.
pub(crate) fn rng_guard() -> std::sync::MutexGuard<'static, ()> {
    static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A Gemma causal LM whose variables carry Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
pub struct GemmaModel {
    pub config: GemmaConfig,
    pub vs: nn::VarStore,
    network: Network,
    /// What the checkpoint this model was loaded from holds besides the text stack (vision tower,
    /// embedders, config.json), written back by every save; None for a model built from a preset.
    pub passthrough: Option<std::sync::Arc<crate::checkpoint::Passthrough>>,
}

impl GemmaModel {
    /// A randomly initialised model (HF initialisation: N(0, 0.02) matrices, identity norms).
    /// Draws from libtorch's global generator; use `new_seeded` for reproducible weights.
    pub fn new(config: GemmaConfig, device: Device, kind: Kind) -> Result<Self> {
        Self::build(config, nn::VarStore::new(device), kind)
    }

    /// A model whose weights are allocated in `kind` from the start (values unspecified), to be
    /// overwritten by a checkpoint: a bf16 12B base then never exists in f32.
    pub fn new_for_loading(config: GemmaConfig, device: Device, kind: Kind) -> Result<Self> {
        // Building draws (unused) initial values: not in the middle of another thread's seeded draws.
        let _guard = rng_guard();
        let mut vs = nn::VarStore::new(device);
        if matches!(kind, Kind::BFloat16 | Kind::Half) {
            vs.set_kind(kind);
        }
        Self::build(config, vs, kind)
    }

    fn build(config: GemmaConfig, mut vs: nn::VarStore, kind: Kind) -> Result<Self> {
        config.validate()?;
        let root = vs.root();
        let network = match config.architecture {
            Architecture::Gemma3 => Network::Gemma3(gemma3::new(&root, &config)),
            Architecture::Gemma4 => Network::Gemma4(gemma4::new(&root, &config)),
        };
        match kind {
            Kind::Float => {}
            Kind::BFloat16 => vs.bfloat16(),
            Kind::Half => vs.half(),
            other => bail!("unsupported parameter dtype {other:?} (use f32, bf16 or f16)"),
        }
        Ok(GemmaModel {
            config,
            vs,
            network,
            passthrough: None,
        })
    }

    /// A randomly initialised model whose weights depend only on `seed`. libtorch's generator is
    /// process-wide, so seeding and drawing happen under one lock: two models built concurrently
    /// (tests, several simulated learners) cannot interleave their draws.
    pub fn new_seeded(config: GemmaConfig, device: Device, kind: Kind, seed: u64) -> Result<Self> {
        let _guard = rng_guard();
        tch::manual_seed(seed as i64);
        Self::new(config, device, kind)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.vs
            .trainable_variables()
            .first()
            .map(|t| t.kind())
            .unwrap_or(Kind::Float)
    }

    /// Trainable parameters with their names, in checkpoint layout order (stable across runs, so
    /// optimizer state and fragment plans line up).
    pub fn named_trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        self.config
            .tensor_specs()
            .into_iter()
            .filter(|s| s.trainable)
            .filter_map(|s| vars.get(&s.name).map(|t| (s.name, t.shallow_clone())))
            .collect()
    }

    /// The trainable tensors alone, in the same order.
    pub fn trainable_parameters(&self) -> Vec<Tensor> {
        self.named_trainable_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    fn full_head_dim(&self) -> usize {
        let cfg = &self.config;
        cfg.layer_types
            .iter()
            .position(|t| *t == LayerType::Full)
            .map(|i| cfg.layer_attention(i).head_dim)
            .unwrap_or(cfg.head_dim)
    }

    /// Masks and rotary tables for rows that pack several examples: `positions` [B, T] restart at
    /// 0 in each example and attention stays inside the example `segments` [B, T] names, so each
    /// example is computed as if it were alone.
    pub fn packed_layer_inputs(&self, positions: &Tensor, segments: &Tensor) -> LayerInputs {
        let cfg = &self.config;
        LayerInputs {
            sliding_mask: Some(packed_attention_mask(segments, Some(cfg.sliding_window))),
            full_mask: Some(packed_attention_mask(segments, None)),
            rope_sliding: RotaryTable::at_positions(cfg.head_dim, cfg.rope_sliding, positions),
            rope_full: RotaryTable::at_positions(self.full_head_dim(), cfg.rope_full, positions),
        }
    }

    fn layer_inputs(&self, seq_len: i64) -> LayerInputs {
        let device = self.device();
        let cfg = &self.config;
        let full_head_dim = self.full_head_dim();
        LayerInputs {
            sliding_mask: attention_mask(LayerType::Sliding, seq_len, cfg.sliding_window, device),
            full_mask: None,
            rope_sliding: RotaryTable::new(cfg.head_dim, cfg.rope_sliding, seq_len, device),
            rope_full: RotaryTable::new(full_head_dim, cfg.rope_full, seq_len, device),
        }
    }

    /// ids [B, T] (int64) -> hidden states after the final norm [B, T, d].
    pub fn hidden_states(&self, ids: &Tensor) -> Tensor {
        let inputs = self.layer_inputs(ids.size()[1]);
        match &self.network {
            Network::Gemma3(m) => m.hidden_states(ids, &inputs),
            Network::Gemma4(m) => m.hidden_states(ids, &inputs),
        }
    }

    /// ids [B, T] -> E[ids]·sqrt(d), the scaled token embeddings the first layer reads (an MTP
    /// drafter reads them for the last accepted token).
    pub fn input_embeddings(&self, ids: &Tensor) -> Tensor {
        match &self.network {
            Network::Gemma3(m) => m.input_embeddings(ids),
            Network::Gemma4(m) => m.input_embeddings(ids),
        }
    }

    /// ids [B, T] -> final hidden states and the K/V of the last sliding and last full layer:
    /// everything a Gemma 4 MTP drafter reads from its target. Gemma 4 only.
    pub fn hidden_states_and_shared_kv(&self, ids: &Tensor) -> Result<(Tensor, gemma4::SharedKv)> {
        let inputs = self.layer_inputs(ids.size()[1]);
        match &self.network {
            Network::Gemma4(m) => Ok(gemma4::hidden_states_and_shared_kv(m, ids, &inputs)),
            Network::Gemma3(_) => {
                bail!("MTP drafters read a Gemma 4 target; this model is Gemma 3")
            }
        }
    }

    /// Final hidden states -> f32 logits (LM head and softcap).
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> Tensor {
        match &self.network {
            Network::Gemma3(m) => m.logits(hidden),
            Network::Gemma4(m) => m.logits(hidden),
        }
    }

    /// The LM head with its softcap.
    pub fn lm_head(&self) -> head_loss::LmHead<'_> {
        match &self.network {
            Network::Gemma3(m) => m.lm_head(),
            Network::Gemma4(m) => m.lm_head(),
        }
    }

    /// ids [B, T] (int64) -> logits [B, T, vocab] in f32.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.logits_from_hidden(&self.hidden_states(ids))
    }

    /// Mean next-token cross-entropy of `inputs` [B, T] predicting `targets` [B, T].
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Tensor {
        self.next_token_loss(
            &self.hidden_states(inputs),
            targets,
            head_loss::Reduction::Mean,
        )
    }

    /// The cross-entropy of final hidden states [B, T, d] against `labels` [B, T] (positions
    /// labelled [`head_loss::IGNORE_LABEL`] left out), computed without the whole logits tensor.
    pub fn next_token_loss(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        reduction: head_loss::Reduction,
    ) -> Tensor {
        match &self.network {
            Network::Gemma3(m) => m.next_token_loss(hidden, labels, reduction),
            Network::Gemma4(m) => m.next_token_loss(hidden, labels, reduction),
        }
    }

    /// Checks that token ids are inside the vocabulary before they reach an embedding lookup.
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id >= vocab) {
            bail!("token id {bad} is outside the vocabulary (0..{vocab})");
        }
        Ok(())
    }
}
