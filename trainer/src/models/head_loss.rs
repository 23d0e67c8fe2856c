//! The LM head and the next-token cross-entropy, fused and computed a block of rows at a time.
//!
//! Unfused, the head's f32 logits, their log-softmax and their gradient are three tensors of
//! rows × vocabulary: at Gemma's 262,144-token vocabulary and 4,096 positions, 12 GiB, the
//! largest activation of a 12B step. Here each block of rows gets its logits, its loss and,
//! when gradients are wanted, the gradient of its logits at once (softmax − one-hot, through the
//! softcap), which is multiplied straight into the gradients of the hidden states and of the
//! head; only one block's logits exist at a time. The GEMMs are the same three as autograd's
//! (logits, then the two products of the backward pass), done during the forward call.
//!
//! tch has no custom autograd functions, so the precomputed gradients re-enter the graph through
//! a surrogate: `s = ⟨hidden, ∂L/∂hidden⟩ + ⟨head, ∂L/∂head⟩` has exactly those gradients, and
//! the returned loss is `L + (s − s.detach())`, whose value is exactly L. Backward through it
//! (scaled or not, `backward` or `run_backward`) then reaches the trunk and the head as the
//! unfused loss would. A trained head's gradient (the head's size) is held from this call to the
//! backward pass; a frozen head (LoRA) has none.

use tch::{Device, Kind, Tensor};

/// Label of a position that has no target (prompt tokens, padding).
pub const IGNORE_LABEL: i64 = -100;

/// What the loss is over the labelled positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Sum,
}

/// Rows per block: 4 Mi logits (16 MiB) on a CPU (of 0.5 to 16 Mi, 2 and 4 Mi were the
/// fastest on the 2-core development machine); 128 Mi (512 MiB, 512 rows of
/// Gemma's vocabulary) on a GPU, large enough to keep its GEMMs efficient. Never fewer than 256
/// rows, so that each pass over the head's weights serves enough rows to stay compute-bound.
pub fn block_rows(device: Device, vocab: i64) -> i64 {
    let values: i64 = match device {
        Device::Cpu => 1 << 22,
        _ => 1 << 27,
    };
    (values / vocab.max(1)).max(256)
}

/// Accelerator bytes the logits take at the fused loss's peak for `tokens` positions: three f32
/// blocks (tanh, capped logits, log-softmax). Unfused it was three tensors of every position.
pub fn logits_bytes_on_gpu(tokens: f64, vocab: usize) -> f64 {
    let rows = (block_rows(Device::Cuda(0), vocab as i64) as f64).min(tokens);
    3.0 * 4.0 * rows * vocab as f64
}

/// The cross-entropy of `hidden` [..., d] through `head` [vocab, d] (then `cap`·tanh(z/`cap`)
/// if `softcap`) against `labels` [...] (ignored where [`IGNORE_LABEL`]), as an f32 scalar.
/// `Mean` divides by the labelled positions (NaN if there are none, as libtorch's does).
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    labels: &Tensor,
    reduction: Reduction,
) -> Tensor {
    let rows = block_rows(hidden.device(), head.size()[0]);
    cross_entropy_in_blocks(hidden, head, softcap, labels, reduction, rows)
}

fn cross_entropy_in_blocks(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    labels: &Tensor,
    reduction: Reduction,
    block_rows: i64,
) -> Tensor {
    let width = hidden.size().last().copied().unwrap_or(0);
    let rows_in = hidden.reshape([-1, width]).detach();
    let labels = labels.reshape([-1]);
    let rows = rows_in.size()[0];
    let vocab = head.size()[0];
    let device = hidden.device();
    let weights = head.detach();

    let labelled = labels.ne(IGNORE_LABEL);
    let mask = labelled.to_kind(Kind::Float).unsqueeze(1);
    let targets = labels.where_scalarother(&labelled, 0).unsqueeze(1);
    let scale = match reduction {
        Reduction::Sum => 1.0,
        Reduction::Mean => 1.0 / labelled.sum(Kind::Int64).int64_value(&[]) as f64,
    };

    let want_hidden = hidden.requires_grad();
    // A view of a leaf that requires gradients requires them only where autograd is on.
    let want_head = head.narrow(0, 0, 1).requires_grad();
    let grad_hidden = want_hidden.then(|| Tensor::empty([rows, width], (hidden.kind(), device)));
    let grad_head = want_head.then(|| Tensor::zeros([vocab, width], (Kind::Float, device)));

    let block = block_rows.clamp(1, rows.max(1));
    let mut loss = Tensor::zeros([], (Kind::Float, device));
    let _no_graph = tch::no_grad_guard();
    let mut start = 0;
    while start < rows {
        let n = block.min(rows - start);
        let h = rows_in.narrow(0, start, n);
        let (target, keep) = (targets.narrow(0, start, n), mask.narrow(0, start, n));
        // At most three f32 blocks live at once (with a softcap: tanh, the capped logits, their
        // log-softmax), each dropped as soon as the next is made.
        let mut z = h.linear::<Tensor>(&weights, None).to_kind(Kind::Float);
        let (logits, mut tanh) = match softcap {
            Some(cap) => {
                let t = z.g_div_scalar_(cap).tanh_();
                (&t * cap, Some(t))
            }
            None => (z, None),
        };
        let mut log_probs = logits.log_softmax(1, Kind::Float);
        drop(logits);
        loss -= (log_probs.gather(1, &target, false) * &keep).sum(Kind::Float);
        if want_hidden || want_head {
            // ∂L/∂logits = (softmax − one-hot)·scale on labelled rows and 0 elsewhere; the row
            // factor is applied to the narrow side of each product (h, and P·E), not to P.
            let mut grad = log_probs.exp_();
            let _ = grad.scatter_add_(1, &target, &(-&keep));
            if let Some(t) = tanh.as_mut() {
                // Through the softcap: d(cap·tanh(z/cap))/dz = 1 − tanh².
                let _ = grad.g_mul_(&t.square_().neg_().g_add_scalar_(1.0));
            }
            drop(tanh);
            let row_factor = (&keep * scale).to_kind(weights.kind());
            let grad_z = grad.to_kind(weights.kind());
            drop(grad);
            if let Some(g) = &grad_hidden {
                g.narrow(0, start, n)
                    .copy_(&(grad_z.mm(&weights) * &row_factor));
            }
            if let Some(g) = &grad_head {
                let h_scaled = &h * &row_factor;
                let mut sum = g.shallow_clone();
                if weights.kind() == Kind::Float {
                    let _ = sum.addmm_(&grad_z.tr(), &h_scaled);
                } else {
                    let _ = sum.g_add_(&grad_z.tr().mm(&h_scaled).to_kind(Kind::Float));
                }
            }
        }
        start += n;
    }
    let loss = loss * scale;
    drop(_no_graph);

    // The surrogate carrying the precomputed gradients back into the graph.
    let mut surrogate: Option<Tensor> = None;
    let mut add = |term: Tensor| {
        surrogate = Some(match surrogate.take() {
            Some(s) => s + term,
            None => term,
        })
    };
    if let Some(g) = grad_hidden {
        add(hidden
            .reshape([-1])
            .dot(&g.reshape([-1]))
            .to_kind(Kind::Float));
    }
    if let Some(g) = grad_head {
        add(head
            .reshape([-1])
            .dot(&g.to_kind(head.kind()).reshape([-1]))
            .to_kind(Kind::Float));
    }
    match surrogate {
        Some(s) => loss + (&s - s.detach()),
        None => loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unfused loss in float64, differentiated by autograd.
    fn reference(
        hidden: &Tensor,
        head: &Tensor,
        softcap: Option<f64>,
        labels: &Tensor,
        reduction: Reduction,
    ) -> (f64, Tensor, Tensor) {
        let h = hidden
            .to_kind(Kind::Double)
            .detach()
            .set_requires_grad(true);
        let e = head.to_kind(Kind::Double).detach().set_requires_grad(true);
        let mut logits = h.reshape([-1, h.size()[2]]).matmul(&e.tr());
        if let Some(cap) = softcap {
            logits = (logits / cap).tanh() * cap;
        }
        let labels = labels.reshape([-1]);
        let keep = labels.ne(IGNORE_LABEL).to_kind(Kind::Double);
        let picked = logits
            .log_softmax(1, Kind::Double)
            .gather(1, &labels.clamp_min(0).unsqueeze(1), false)
            .squeeze_dim(1);
        let mut loss = -(picked * &keep).sum(Kind::Double);
        if reduction == Reduction::Mean {
            loss /= keep.sum(Kind::Double);
        }
        loss.backward();
        (loss.double_value(&[]), h.grad(), e.grad())
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    fn inputs(softcap: Option<f64>) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(7);
        let hidden = Tensor::randn([2, 19, 16], (Kind::Float, Device::Cpu));
        // Large enough logits that the softcap bends them.
        let head = Tensor::randn([50, 16], (Kind::Float, Device::Cpu))
            * if softcap.is_some() { 3.0 } else { 0.5 };
        let labels = Tensor::randint(50, [2, 19], (Kind::Int64, Device::Cpu));
        for (row, col) in [(0, 0), (0, 7), (1, 18)] {
            let _ = labels.get(row).get(col).fill_(IGNORE_LABEL);
        }
        (hidden, head, labels)
    }

    /// Loss, ∂/∂hidden and ∂/∂head of the fused blocks against float64 autograd on the whole
    /// logits: within 1e-5 relative to the largest value, over block sizes that split the 38
    /// rows unevenly, with and without a softcap, summed and averaged, under a scaled backward.
    #[test]
    fn blocks_give_the_loss_and_gradients_of_float64_autograd() {
        for softcap in [None, Some(5.0)] {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let (hidden, head, labels) = inputs(softcap);
                let (want_loss, want_dh, want_de) =
                    reference(&hidden, &head, softcap, &labels, reduction);
                for block in [1, 5, 38, 1000] {
                    let h = hidden.copy().set_requires_grad(true);
                    let e = head.copy().set_requires_grad(true);
                    let loss = cross_entropy_in_blocks(&h, &e, softcap, &labels, reduction, block);
                    let case = format!("softcap {softcap:?}, {reduction:?}, block {block}");
                    let got = loss.double_value(&[]);
                    assert!(
                        (got - want_loss).abs() <= 1e-5 * want_loss.abs(),
                        "{case}: loss {got} vs {want_loss}"
                    );
                    (loss * 0.25).backward();
                    for (name, got, want) in
                        [("hidden", h.grad(), &want_dh), ("head", e.grad(), &want_de)]
                    {
                        let err = max_abs(&(got.to_kind(Kind::Double) - want * 0.25));
                        let scale = max_abs(want) * 0.25;
                        assert!(
                            err <= 1e-5 * scale,
                            "{case}: ∂/∂{name} off by {err} (largest {scale})"
                        );
                    }
                }
            }
        }
    }

    /// A frozen head (LoRA) gets no gradient, and without autograd only the loss is computed.
    #[test]
    fn a_frozen_head_gets_no_gradient_and_no_grad_mode_builds_no_graph() {
        let (hidden, head, labels) = inputs(None);
        let (want, want_dh, _) = reference(&hidden, &head, None, &labels, Reduction::Mean);
        let h = hidden.copy().set_requires_grad(true);
        let loss = lm_head_cross_entropy(&h, &head, None, &labels, Reduction::Mean);
        loss.backward();
        assert!(
            !head.grad().defined(),
            "a head that does not require gradients got one"
        );
        assert!(max_abs(&(h.grad().to_kind(Kind::Double) - &want_dh)) <= 1e-5 * max_abs(&want_dh));

        let e = head.copy().set_requires_grad(true);
        let loss =
            tch::no_grad(|| lm_head_cross_entropy(&hidden, &e, None, &labels, Reduction::Mean));
        assert!(!loss.requires_grad());
        assert!((loss.double_value(&[]) - want).abs() <= 1e-5 * want.abs());
    }

    #[test]
    fn blocks_are_sized_by_the_vocabulary_and_never_below_256_rows() {
        assert_eq!(block_rows(Device::Cpu, 8192), 512);
        assert_eq!(block_rows(Device::Cpu, 262_144), 256);
        assert_eq!(block_rows(Device::Cuda(0), 262_144), 512);
    }
}
