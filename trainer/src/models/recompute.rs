//! Layer-by-layer access to the decoder and the fine-tuning forward/backward: a masked next-token
//! loss over packed rows, optionally with per-layer activation checkpointing.
//!
//! tch has no checkpoint API, so recomputation is done by hand: the forward pass runs without a
//! graph and keeps only each layer's input; the backward pass walks the layers from the top,
//! recomputes one layer with a graph and back-propagates the upstream gradient through it
//! (`sum(out · g)` has gradient g with respect to `out`), which accumulates into the adapters'
//! gradients and yields the gradient for the layer below. Peak activation memory is then one
//! layer's graph plus one hidden state per layer.

use super::layers::{DecoderLayerForward, LayerInputs, Linear};
use super::{GemmaModel, Network};
use tch::{Kind, Tensor};

pub use super::head_loss::IGNORE_LABEL;

/// One micro-batch of packed rows, all [B, T] int64 on the model's device.
pub struct TokenBatch {
    pub ids: Tensor,
    /// The token each position must predict, or [`IGNORE_LABEL`].
    pub labels: Tensor,
    /// Position of each token inside its example (RoPE restarts at 0 per example).
    pub positions: Tensor,
    /// Which example of the row each token belongs to; attention stays inside it.
    pub segments: Tensor,
}

impl TokenBatch {
    /// Rows holding one example each, from tokens [B, T + 1]: position t predicts token t + 1.
    pub fn from_rows(tokens: &Tensor) -> TokenBatch {
        let seq = tokens.size()[1] - 1;
        Self::from_pair(
            tokens.narrow(1, 0, seq).contiguous(),
            tokens.narrow(1, 1, seq).contiguous(),
        )
    }

    /// Rows holding one example each, from inputs [B, T] and the tokens they predict [B, T].
    pub fn from_pair(ids: Tensor, labels: Tensor) -> TokenBatch {
        let (rows, seq) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        TokenBatch {
            ids,
            labels,
            positions: Tensor::arange(seq, (Kind::Int64, device))
                .unsqueeze(0)
                .repeat([rows, 1]),
            segments: Tensor::zeros([rows, seq], (Kind::Int64, device)),
        }
    }

    /// Labelled positions: the token count the loss is a sum over.
    pub fn target_count(&self) -> i64 {
        self.labels
            .ne(IGNORE_LABEL)
            .sum(Kind::Int64)
            .int64_value(&[])
    }
}

impl GemmaModel {
    /// Every linear layer of the decoder, in model order.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.network {
            Network::Gemma3(m) => m
                .layers_mut()
                .iter_mut()
                .flat_map(|l| l.linears_mut())
                .collect(),
            Network::Gemma4(m) => m
                .layers_mut()
                .iter_mut()
                .flat_map(|l| l.linears_mut())
                .collect(),
        }
    }

    pub(crate) fn layer_count(&self) -> usize {
        self.config.num_hidden_layers
    }

    pub(crate) fn embed(&self, ids: &Tensor) -> Tensor {
        match &self.network {
            Network::Gemma3(m) => m.input_embeddings(ids),
            Network::Gemma4(m) => m.input_embeddings(ids),
        }
    }

    pub(crate) fn final_norm(&self, x: &Tensor) -> Tensor {
        match &self.network {
            Network::Gemma3(m) => m.final_norm(x),
            Network::Gemma4(m) => m.final_norm(x),
        }
    }

    /// Layer `i`. With `dropout_seed`, libtorch's generator is seeded from (seed, i) first, under
    /// the process-wide RNG lock, so a recomputation draws the same dropout masks.
    pub(crate) fn layer_forward(
        &self,
        i: usize,
        x: &Tensor,
        inputs: &LayerInputs,
        dropout_seed: Option<u64>,
    ) -> Tensor {
        let run = || match &self.network {
            Network::Gemma3(m) => DecoderLayerForward::forward(&m.layers()[i], x, inputs),
            Network::Gemma4(m) => DecoderLayerForward::forward(&m.layers()[i], x, inputs),
        };
        match dropout_seed {
            None => run(),
            Some(seed) => {
                let _rng = super::rng_guard();
                tch::manual_seed(
                    (seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64,
                );
                run()
            }
        }
    }

    /// Sum over labelled positions of the next-token cross-entropy (f32).
    pub(crate) fn labelled_loss_sum(&self, hidden: &Tensor, labels: &Tensor) -> Tensor {
        self.next_token_loss(hidden, labels, super::head_loss::Reduction::Sum)
    }

    /// Logits [B, T, vocab] of packed rows (each example attended and positioned on its own).
    pub fn packed_logits(&self, batch: &TokenBatch) -> Tensor {
        let inputs = self.packed_layer_inputs(&batch.positions, &batch.segments);
        let mut x = self.embed(&batch.ids);
        for i in 0..self.layer_count() {
            x = self.layer_forward(i, &x, &inputs, None);
        }
        self.logits_from_hidden(&self.final_norm(&x))
    }

    /// The summed loss of a batch without gradients (evaluation).
    pub fn packed_loss_sum(&self, batch: &TokenBatch) -> f64 {
        let _guard = tch::no_grad_guard();
        let inputs = self.packed_layer_inputs(&batch.positions, &batch.segments);
        let mut x = self.embed(&batch.ids);
        for i in 0..self.layer_count() {
            x = self.layer_forward(i, &x, &inputs, None);
        }
        self.labelled_loss_sum(&self.final_norm(&x), &batch.labels)
            .double_value(&[])
    }

    /// Forward and backward of `scale` × (summed loss of `batch`): gradients accumulate into every
    /// tensor that requires them (the adapters). With `recompute`, activations are checkpointed
    /// per layer (see the module doc). Returns the summed loss.
    pub fn packed_loss_backward(
        &self,
        batch: &TokenBatch,
        scale: f64,
        recompute: bool,
        dropout_seed: Option<u64>,
    ) -> f64 {
        let inputs = self.packed_layer_inputs(&batch.positions, &batch.segments);
        if !recompute {
            let mut x = self.embed(&batch.ids);
            for i in 0..self.layer_count() {
                x = self.layer_forward(i, &x, &inputs, dropout_seed);
            }
            let loss = self.labelled_loss_sum(&self.final_norm(&x), &batch.labels);
            (&loss * scale).backward();
            return loss.double_value(&[]);
        }
        let mut saved = Vec::with_capacity(self.layer_count());
        let top = tch::no_grad(|| {
            let mut x = self.embed(&batch.ids);
            for i in 0..self.layer_count() {
                saved.push(x.shallow_clone());
                x = self.layer_forward(i, &x, &inputs, dropout_seed);
            }
            x
        });
        let top = top.detach().set_requires_grad(true);
        let loss = self.labelled_loss_sum(&self.final_norm(&top), &batch.labels);
        (&loss * scale).backward();
        let mut upstream = top.grad();
        for i in (0..self.layer_count()).rev() {
            let x = saved[i].detach().set_requires_grad(i > 0);
            let out = self.layer_forward(i, &x, &inputs, dropout_seed);
            if !out.requires_grad() {
                break; // nothing below this layer is trained
            }
            (out * upstream.detach()).sum(Kind::Float).backward();
            if i > 0 {
                upstream = x.grad();
            }
            saved.truncate(i);
        }
        loss.double_value(&[])
    }
}
