//! Accelerator memory per rank of a sharded data-parallel step ([`super::ShardedModel`]), from
//! the model's shapes: the f32 master shards with their gradients and AdamW moments, one unit
//! gathered in the compute dtype with its full gradient, and the checkpointed activations of the
//! rank's rows (one hidden state per layer, one layer's graph, the logits). The layer and logit
//! terms are the LoRA estimate's ([`crate::finetune::memory`]) without adapters. An estimate of
//! what the step's tensors hold, not a measurement; the CUDA context, allocator slack and
//! collective buffers come on top.

use super::plan_units;
use crate::config::GemmaConfig;
use crate::finetune::memory::layer_bytes_per_token;
use anyhow::Result;
use serde::Serialize;

/// Bytes per rank, term by term.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardedMemory {
    pub ranks: usize,
    /// Parameters one rank owns (its shards, padding included).
    pub shard_parameters: u64,
    /// The f32 master shards.
    pub master_shards: f64,
    /// The largest unit gathered in the compute dtype (one at a time).
    pub gathered_unit: f64,
    /// The shards' f32 gradients.
    pub gradient_shards: f64,
    /// The largest unit's full gradient before its reduce-scatter: the compute-dtype gradients
    /// autograd returns and their flattened f32 copy.
    pub unit_gradient: f64,
    /// Two f32 AdamW moments per shard element.
    pub optimizer: f64,
    /// One hidden state per layer (the checkpointed layer inputs).
    pub checkpoints: f64,
    /// What autograd keeps for the largest layer while it is recomputed.
    pub layer_activations: f64,
    /// The fused loss's f32 logits blocks ([`crate::models::head_loss`]).
    pub logits: f64,
    /// ∂L/∂head in the compute dtype, which the fused loss holds until the outer unit's backward.
    pub head_gradient: f64,
    pub total: f64,
}

impl ShardedMemory {
    pub fn weights(&self) -> f64 {
        self.master_shards + self.gathered_unit
    }

    pub fn gradients(&self) -> f64 {
        self.gradient_shards + self.unit_gradient + self.head_gradient
    }

    pub fn activations(&self) -> f64 {
        self.checkpoints + self.layer_activations + self.logits
    }
}

/// The estimate for `ranks` ranks, each computing `batch` sequences of `seq` tokens with units
/// gathered in a dtype of `compute_bytes` bytes per element (2 for bf16).
pub fn estimate(
    cfg: &GemmaConfig,
    ranks: usize,
    seq: u64,
    batch: u64,
    compute_bytes: f64,
) -> Result<ShardedMemory> {
    let units = plan_units(cfg, ranks)?;
    let shard: i64 = units.iter().map(|u| u.shard_len(ranks)).sum();
    let largest_unit = units
        .iter()
        .map(|u| u.groups.iter().map(|g| g.padded).sum::<i64>())
        .max()
        .unwrap_or(0) as f64;
    let s = shard as f64;
    let tokens = (seq * batch) as f64;
    let layer_activations = (0..cfg.num_hidden_layers)
        .map(|l| tokens * layer_bytes_per_token(cfg, l, compute_bytes, &[false; 7]))
        .fold(0.0, f64::max);
    let mut m = ShardedMemory {
        ranks,
        shard_parameters: shard as u64,
        master_shards: 4.0 * s,
        gathered_unit: compute_bytes * largest_unit,
        gradient_shards: 4.0 * s,
        unit_gradient: (compute_bytes + 4.0) * largest_unit,
        optimizer: 8.0 * s,
        checkpoints: cfg.num_hidden_layers as f64 * tokens * cfg.hidden_size as f64 * compute_bytes,
        layer_activations,
        logits: crate::models::head_loss::logits_bytes_on_gpu(tokens, cfg),
        head_gradient: compute_bytes * (cfg.vocab_size * cfg.hidden_size) as f64,
        total: 0.0,
    };
    m.total = m.weights() + m.gradients() + m.optimizer + m.activations();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;

    /// gemma3-tiny (vocab 4096, d 128, 4 layers, 4 heads × 32, 2 KV heads, ffn 512) on 3 ranks,
    /// seq 64, 2 sequences per rank, bf16 compute, against a hand computation.
    #[test]
    fn sharded_memory_matches_a_hand_computation() {
        let cfg = preset("gemma3-tiny").unwrap().config;
        let m = estimate(&cfg, 3, 64, 2, 2.0).unwrap();
        // Per layer: q 128·128, k and v 64·128, o 128·128, gate/up/down 512·128 = 245 760
        // matrix elements (3 | 245 760), 4 norms · 128 + q/k norms 2 · 32 = 576 vector elements.
        // Outer: embedding 4096·128 = 524 288 → padded 524 289; final norm 128 → 129.
        let shard = 4 * (245_760 / 3 + 576 / 3) + 524_289 / 3 + 129 / 3;
        assert_eq!(m.shard_parameters, shard as u64);
        assert_eq!(m.master_shards, 4.0 * shard as f64);
        assert_eq!(m.gradient_shards, 4.0 * shard as f64);
        assert_eq!(m.optimizer, 8.0 * shard as f64);
        // The largest unit is the outer one: 524 289 + 129 elements.
        assert_eq!(m.gathered_unit, 2.0 * 524_418.0);
        assert_eq!(m.unit_gradient, 6.0 * 524_418.0);
        let tokens = 128.0;
        assert_eq!(m.checkpoints, 4.0 * tokens * 128.0 * 2.0);
        // One layer's graph per token, bf16: f32 norm inputs 16·128 + 4·(128 + 2·64) = 3072,
        // projection inputs 2·(2·128 + 128 + 512) = 1792, q/k/v/attention 2·(2·128 + 2·64) = 768,
        // MLP 2·3·512 = 3072, residual 2·2·128 = 512: 9216 bytes.
        assert_eq!(m.layer_activations, tokens * 9216.0);
        // 128 positions make one block of the fused loss: Gemma 3 has no final softcap, so two
        // f32 blocks of 128 × 4096 (logits and log-softmax).
        assert_eq!(m.logits, 8.0 * tokens * 4096.0);
        assert_eq!(m.head_gradient, 2.0 * 4096.0 * 128.0);
        let total = 16.0 * shard as f64
            + 8.0 * 524_418.0
            + 2.0 * 4096.0 * 128.0
            + 4.0 * tokens * 256.0
            + tokens * 9216.0
            + 8.0 * tokens * 4096.0;
        assert!((m.total - total).abs() < 1e-6, "{} vs {total}", m.total);
    }

    /// Sharding divides the optimizer-state terms by the rank count: Gemma 3 12B's AdamW state
    /// does not fit one 80 GB GPU but does on 8 ranks.
    #[test]
    fn sharded_memory_of_gemma3_12b_shrinks_with_ranks() {
        let cfg = preset("gemma3-12b").unwrap().config;
        let one = estimate(&cfg, 1, 4096, 1, 2.0).unwrap();
        let eight = estimate(&cfg, 8, 4096, 1, 2.0).unwrap();
        assert!(one.total > 150e9, "{one:?}");
        assert!(eight.total < 80e9, "{eight:?}");
        let ratio = one.optimizer / eight.optimizer;
        assert!((ratio - 8.0).abs() < 1e-3, "{ratio}");
        assert_eq!(one.checkpoints, eight.checkpoints);
    }
}
