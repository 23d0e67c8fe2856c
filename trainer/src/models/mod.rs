//! Gemma models in tch. One file per architecture; `layers.rs` holds the shared blocks.

pub mod gemma3;
pub mod gemma4;
pub mod gemma4_assistant;
pub mod layers;

use crate::config::{Architecture, GemmaConfig, LayerType};
use anyhow::{bail, Result};
use layers::{attention_mask, LayerInputs, RotaryTable};
use tch::{nn, Device, Kind, Tensor};

enum Network {
    Gemma3(gemma3::Gemma3),
    Gemma4(gemma4::Gemma4),
}

/// A Gemma causal LM whose variables carry Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
pub struct GemmaModel {
    pub config: GemmaConfig,
    pub vs: nn::VarStore,
    network: Network,
}

impl GemmaModel {
    /// A randomly initialised model (HF initialisation: N(0, 0.02) matrices, identity norms).
    /// Draws from libtorch's global generator; use `new_seeded` for reproducible weights.
    pub fn new(config: GemmaConfig, device: Device, kind: Kind) -> Result<Self> {
        config.validate()?;
        let mut vs = nn::VarStore::new(device);
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
        })
    }

    /// A randomly initialised model whose weights depend only on `seed`. libtorch's generator is
    /// process-wide, so seeding and drawing happen under one lock: two models built concurrently
    /// (tests, several simulated learners) cannot interleave their draws.
    pub fn new_seeded(config: GemmaConfig, device: Device, kind: Kind, seed: u64) -> Result<Self> {
        static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = INIT_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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

    fn layer_inputs(&self, seq_len: i64) -> LayerInputs {
        let device = self.device();
        let cfg = &self.config;
        let full_head_dim = cfg
            .layer_types
            .iter()
            .position(|t| *t == LayerType::Full)
            .map(|i| cfg.layer_attention(i).head_dim)
            .unwrap_or(cfg.head_dim);
        LayerInputs {
            sliding_mask: attention_mask(LayerType::Sliding, seq_len, cfg.sliding_window, device),
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

    /// ids [B, T] (int64) -> logits [B, T, vocab] in f32.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.logits_from_hidden(&self.hidden_states(ids))
    }

    /// Mean next-token cross-entropy of `inputs` [B, T] predicting `targets` [B, T].
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(inputs);
        let vocab = logits.size()[2];
        logits
            .reshape([-1, vocab])
            .cross_entropy_for_logits(&targets.reshape([-1]))
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
