//! The LM head and its losses, fused and computed a block of rows at a time: the next-token
//! cross-entropy against labels, and the distillation loss against a teacher's distributions.
//!
//! Unfused, the head's f32 logits, their log-softmax and their gradient are three tensors of
//! rows × vocabulary: at Gemma's 262,144-token vocabulary and 4,096 positions, 12 GiB, the
//! largest activation of a 12B step. Here each block of rows gets its logits, its loss and,
//! when gradients are wanted, the gradient of its logits at once (softmax − target, through the
//! softcap), which is multiplied straight into the gradients of the hidden states and of the
//! head; only one block's logits exist at a time. The GEMMs are the same three as autograd's
//! (logits, then the two products of the backward pass), done during the forward call. A
//! teacher's logits are made a block at a time too, once per block however many students read it.
//!
//! tch has no custom autograd functions, so the precomputed gradients re-enter the graph through
//! a surrogate: `s = ⟨hidden, ∂L/∂hidden⟩ + ⟨head, ∂L/∂head⟩` has exactly those gradients, and
//! the returned loss is `L + (s − s.detach())`, whose value is exactly L. Backward through it
//! (scaled or not, `backward` or `run_backward`) then reaches the trunk and the head as the
//! unfused loss would. A trained head's gradient (the head's size) is held from this call to the
//! backward pass; a frozen head (LoRA) has none.

use crate::config::GemmaConfig;
use anyhow::{bail, Result};
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

/// f32 blocks of logits alive at once at the fused loss's peak: the logits and their
/// log-softmax, and with a softcap its tanh too.
pub fn logits_blocks_held(softcap: bool) -> f64 {
    if softcap {
        3.0
    } else {
        2.0
    }
}

/// Accelerator bytes `cfg`'s logits take at the fused loss's peak for `tokens` positions
/// (unfused it was three tensors of every position).
pub fn logits_bytes_on_gpu(tokens: f64, cfg: &GemmaConfig) -> f64 {
    let vocab = cfg.vocab_size;
    let rows = (block_rows(Device::Cuda(0), vocab as i64) as f64).min(tokens);
    logits_blocks_held(cfg.final_logit_softcapping.is_some()) * 4.0 * rows * vocab as f64
}

/// An LM head: `weights` [vocab, d], then `cap`·tanh(z/`cap`) if `softcap`.
#[derive(Clone, Copy, Debug)]
pub struct LmHead<'a> {
    pub weights: &'a Tensor,
    pub softcap: Option<f64>,
}

/// The cross-entropy of `hidden` [..., d] through `head` against `labels` [...] (ignored where
/// [`IGNORE_LABEL`]), as an f32 scalar. `Mean` divides by the labelled positions (NaN if there
/// are none, as libtorch's does).
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    head: LmHead,
    labels: &Tensor,
    reduction: Reduction,
) -> Tensor {
    let rows = block_rows(hidden.device(), head.weights.size()[0]);
    cross_entropy_in_blocks(hidden, head, labels, reduction, rows)
}

/// The mean distillation loss −Σ_v p_v log q_v of several sets of student rows against one
/// teacher: `students[s]` [B, A_s, d] through `student_head` gives q, and its row [b, i] is
/// trained towards the teacher's distribution p at position [b, i + offsets[s]], the softmax of
/// `teacher_hidden` [B, T, d'] through `teacher_head`. The mean is over every row of every set.
/// The teacher gets no gradient; its logits are made once per block of its positions.
pub fn lm_head_distillation(
    students: &[Tensor],
    offsets: &[i64],
    student_head: LmHead,
    teacher_hidden: &Tensor,
    teacher_head: LmHead,
) -> Result<Tensor> {
    let rows = block_rows(teacher_hidden.device(), teacher_head.weights.size()[0]);
    distillation_in_blocks(
        students,
        offsets,
        student_head,
        teacher_hidden,
        teacher_head,
        rows,
    )
}

/// What a block of student rows is trained towards.
enum BlockTarget<'a> {
    /// Token ids [n, 1] and which rows count [n, 1] (f32, 0 or 1).
    Labels { ids: &'a Tensor, keep: &'a Tensor },
    /// Probabilities [n, vocab] (f32) and which rows count [n, 1] (f32, 0 or 1).
    Distribution { probs: &'a Tensor, keep: &'a Tensor },
}

/// The student's head while a loss runs over it: its weights (detached), and the f32 gradient
/// accumulated into when the head is trained.
struct StudentHead {
    weights: Tensor,
    softcap: Option<f64>,
    grad: Option<Tensor>,
}

impl StudentHead {
    fn new(head: LmHead) -> Self {
        // A view of a leaf that requires gradients requires them only where autograd is on.
        let trained = head.weights.narrow(0, 0, 1).requires_grad();
        StudentHead {
            weights: head.weights.detach(),
            softcap: head.softcap,
            grad: trained
                .then(|| Tensor::zeros(head.weights.size(), (Kind::Float, head.weights.device()))),
        }
    }

    /// One block of rows `h` [n, d] (detached): the unscaled loss sum, and, if `want_hidden`,
    /// ∂L/∂h times `row_factor` [n, 1]; the head's gradient (also times `row_factor`) is added to
    /// `self.grad`.
    fn block(
        &self,
        h: &Tensor,
        target: BlockTarget,
        row_factor: &Tensor,
        want_hidden: bool,
    ) -> (Tensor, Option<Tensor>) {
        // At most three f32 blocks live at once (with a softcap: tanh, the capped logits, their
        // log-softmax), each dropped as soon as the next is made.
        let (logits, mut tanh) = block_logits(h, &self.weights, self.softcap);
        let mut log_probs = logits.log_softmax(1, Kind::Float);
        drop(logits);
        let loss = match &target {
            BlockTarget::Labels { ids, keep } => {
                -(log_probs.gather(1, ids, false) * *keep).sum(Kind::Float)
            }
            BlockTarget::Distribution { probs, keep } => {
                // Rows that do not count are zeroed in place (their gradient is masked below),
                // so one dot product of the flattened blocks sums the rest.
                let _ = log_probs.g_mul_(keep);
                -probs.reshape([-1]).dot(&log_probs.reshape([-1]))
            }
        };
        if !want_hidden && self.grad.is_none() {
            return (loss, None);
        }
        // ∂L/∂logits = softmax − target; the row factor is applied to the narrow side of each
        // product (h, and P·E), not to P.
        let mut grad = log_probs.exp_();
        match target {
            BlockTarget::Labels { ids, keep } => {
                let _ = grad.scatter_add_(1, ids, &(-keep));
            }
            BlockTarget::Distribution { probs, .. } => {
                let _ = grad.g_sub_(probs);
            }
        }
        if let Some(t) = tanh.as_mut() {
            // Through the softcap: d(cap·tanh(z/cap))/dz = 1 − tanh².
            let _ = grad.g_mul_(&t.square_().neg_().g_add_scalar_(1.0));
        }
        drop(tanh);
        let row_factor = row_factor.to_kind(self.weights.kind());
        let grad_z = grad.to_kind(self.weights.kind());
        drop(grad);
        if let Some(g) = &self.grad {
            let h_scaled = h * &row_factor;
            let mut sum = g.shallow_clone();
            if self.weights.kind() == Kind::Float {
                let _ = sum.addmm_(&grad_z.tr(), &h_scaled);
            } else {
                let _ = sum.g_add_(&grad_z.tr().mm(&h_scaled).to_kind(Kind::Float));
            }
        }
        let grad_h = want_hidden.then(|| grad_z.mm(&self.weights) * &row_factor);
        (loss, grad_h)
    }
}

/// The f32 logits of rows `h` [n, d] through `weights` and the softcap, with the softcap's tanh
/// (which its derivative needs).
fn block_logits(h: &Tensor, weights: &Tensor, softcap: Option<f64>) -> (Tensor, Option<Tensor>) {
    let mut z = h.linear::<Tensor>(weights, None).to_kind(Kind::Float);
    match softcap {
        Some(cap) => {
            let t = z.g_div_scalar_(cap).tanh_();
            (&t * cap, Some(t))
        }
        None => (z, None),
    }
}

/// (first row, rows) of each block of at most `block_rows` over `rows` rows.
fn blocks(rows: i64, block_rows: i64) -> impl Iterator<Item = (i64, i64)> {
    let block = block_rows.clamp(1, rows.max(1));
    (0..rows)
        .step_by(block as usize)
        .map(move |start| (start, block.min(rows - start)))
}

/// `loss` carrying the precomputed gradients `(tensor, ∂L/∂tensor)` back into the graph.
fn with_gradients(loss: Tensor, gradients: Vec<(&Tensor, Tensor)>) -> Tensor {
    let surrogate = gradients
        .into_iter()
        .map(|(x, g)| {
            x.reshape([-1])
                .dot(&g.to_kind(x.kind()).reshape([-1]))
                .to_kind(Kind::Float)
        })
        .reduce(|a, b| a + b);
    match surrogate {
        Some(s) => loss + (&s - s.detach()),
        None => loss,
    }
}

fn cross_entropy_in_blocks(
    hidden: &Tensor,
    head: LmHead,
    labels: &Tensor,
    reduction: Reduction,
    block_rows: i64,
) -> Tensor {
    let width = hidden.size().last().copied().unwrap_or(0);
    let rows_in = hidden.reshape([-1, width]).detach();
    let labels = labels.reshape([-1]);
    let rows = rows_in.size()[0];
    let device = hidden.device();
    let student = StudentHead::new(head);

    let labelled = labels.ne(IGNORE_LABEL);
    let mask = labelled.to_kind(Kind::Float).unsqueeze(1);
    let targets = labels.where_scalarother(&labelled, 0).unsqueeze(1);
    let scale = match reduction {
        Reduction::Sum => 1.0,
        Reduction::Mean => 1.0 / labelled.sum(Kind::Int64).int64_value(&[]) as f64,
    };

    let want_hidden = hidden.requires_grad();
    let grad_hidden = want_hidden.then(|| Tensor::empty([rows, width], (hidden.kind(), device)));
    let mut loss = Tensor::zeros([], (Kind::Float, device));
    let _no_graph = tch::no_grad_guard();
    for (start, n) in blocks(rows, block_rows) {
        let keep = mask.narrow(0, start, n);
        let target = BlockTarget::Labels {
            ids: &targets.narrow(0, start, n),
            keep: &keep,
        };
        let (sum, grad) = student.block(
            &rows_in.narrow(0, start, n),
            target,
            &(&keep * scale),
            want_hidden,
        );
        loss += sum;
        if let (Some(g), Some(all)) = (grad, &grad_hidden) {
            all.narrow(0, start, n).copy_(&g);
        }
    }
    let loss = loss * scale;
    drop(_no_graph);

    let mut gradients = Vec::new();
    if let Some(g) = grad_hidden {
        gradients.push((hidden, g));
    }
    if let Some(g) = student.grad {
        gradients.push((head.weights, g));
    }
    with_gradients(loss, gradients)
}

fn distillation_in_blocks(
    students: &[Tensor],
    offsets: &[i64],
    student_head: LmHead,
    teacher_hidden: &Tensor,
    teacher_head: LmHead,
    block_rows: i64,
) -> Result<Tensor> {
    let [batch, positions, teacher_width] = teacher_hidden.size()[..] else {
        bail!(
            "distillation: the teacher's hidden states must be [batch, positions, width], not {:?}",
            teacher_hidden.size()
        );
    };
    if students.len() != offsets.len() {
        bail!(
            "distillation: {} student sets but {} offsets",
            students.len(),
            offsets.len()
        );
    }
    let device = teacher_hidden.device();
    // Blocks run over the teacher's rows, batch after batch; each set's rows are gathered to
    // line up with them (a row with no student row there is masked out), so that each block of
    // the teacher's probabilities serves every set as it is, and blocks span sequences.
    let rows = batch * positions;
    let teacher_position = Tensor::arange(rows, (Kind::Int64, device)).remainder(positions);
    let teacher_sequence =
        Tensor::arange(rows, (Kind::Int64, device)).floor_divide_scalar(positions);
    let mut sets = Vec::with_capacity(students.len());
    let mut total_rows = 0;
    for (s, (x, &offset)) in students.iter().zip(offsets).enumerate() {
        let [b, set_rows, width] = x.size()[..] else {
            bail!(
                "distillation: student set {s} must be [batch, rows, width], not {:?}",
                x.size()
            );
        };
        if b != batch || offset < 0 || offset + set_rows > positions {
            bail!("distillation: student set {s} ({b} x {set_rows} rows from teacher position {offset}) does not fit the teacher's {batch} x {positions} positions");
        }
        total_rows += b * set_rows;
        if set_rows == 0 {
            continue; // nothing to gather from
        }
        let row = &teacher_position - offset;
        let present = row.ge(0).logical_and(&row.lt(set_rows));
        sets.push(StudentSet {
            source: s,
            rows: x.detach().reshape([-1, width]),
            index: (&teacher_sequence * set_rows + row).where_scalarother(&present, 0),
            present: present.to_kind(Kind::Float).unsqueeze(1),
            grad: x
                .requires_grad()
                .then(|| Tensor::zeros([b * set_rows, width], (x.kind(), device))),
        });
    }
    if total_rows == 0 {
        bail!("distillation: the student sets have no rows");
    }
    let scale = 1.0 / total_rows as f64;
    let student = StudentHead::new(student_head);
    let teacher_rows = teacher_hidden.detach().reshape([rows, teacher_width]);
    let teacher_weights = teacher_head.weights.detach();

    let mut loss = Tensor::zeros([], (Kind::Float, device));
    let _no_graph = tch::no_grad_guard();
    for (start, n) in blocks(rows, block_rows) {
        let (logits, _) = block_logits(
            &teacher_rows.narrow(0, start, n),
            &teacher_weights,
            teacher_head.softcap,
        );
        let probs = logits.softmax(1, Kind::Float);
        drop(logits);
        for set in &sets {
            let index = set.index.narrow(0, start, n);
            let present = set.present.narrow(0, start, n);
            let (sum, grad) = student.block(
                &set.rows.index_select(0, &index),
                BlockTarget::Distribution {
                    probs: &probs,
                    keep: &present,
                },
                &(&present * scale),
                set.grad.is_some(),
            );
            loss += sum;
            if let (Some(g), Some(all)) = (grad, &set.grad) {
                // Rows masked out add zeros.
                let _ = all.shallow_clone().index_add_(0, &index, &g);
            }
        }
    }
    let loss = loss * scale;
    drop(_no_graph);

    let mut gradients: Vec<(&Tensor, Tensor)> = sets
        .into_iter()
        .filter_map(|set| set.grad.map(|g| (&students[set.source], g)))
        .collect();
    if let Some(g) = student.grad {
        gradients.push((student_head.weights, g));
    }
    Ok(with_gradients(loss, gradients))
}

/// One set of student rows in a distillation: its rows [B·A, d] (detached), for each of the
/// teacher's rows the student row trained towards it and whether there is one, and the
/// gradient of its rows when they want one.
struct StudentSet {
    /// Which of the students it is.
    source: usize,
    rows: Tensor,
    index: Tensor,
    present: Tensor,
    grad: Option<Tensor>,
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

    /// `loss` equals `want_loss`, and after a backward scaled by 0.25 each gradient `gradients`
    /// names (what it is, the fused loss's, the reference's unscaled) equals the reference's:
    /// both within 1e-5 relative to the largest value.
    fn assert_matches_reference(
        case: &str,
        loss: Tensor,
        want_loss: f64,
        gradients: impl FnOnce() -> Vec<(String, Tensor, Tensor)>,
    ) {
        let got = loss.double_value(&[]);
        assert!(
            (got - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "{case}: loss {got} vs {want_loss}"
        );
        (loss * 0.25).backward();
        for (name, got, want) in gradients() {
            let err = max_abs(&(got.to_kind(Kind::Double) - &want * 0.25));
            let scale = max_abs(&want) * 0.25;
            assert!(
                err <= 1e-5 * scale,
                "{case}: ∂/∂{name} off by {err} (largest {scale})"
            );
        }
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
                    let head = LmHead {
                        weights: &e,
                        softcap,
                    };
                    let loss = cross_entropy_in_blocks(&h, head, &labels, reduction, block);
                    let case = format!("softcap {softcap:?}, {reduction:?}, block {block}");
                    assert_matches_reference(&case, loss, want_loss, || {
                        vec![
                            ("hidden".into(), h.grad(), want_dh.shallow_clone()),
                            ("head".into(), e.grad(), want_de.shallow_clone()),
                        ]
                    });
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
        let plain = |weights| LmHead {
            weights,
            softcap: None,
        };
        let loss = lm_head_cross_entropy(&h, plain(&head), &labels, Reduction::Mean);
        loss.backward();
        assert!(
            !head.grad().defined(),
            "a head that does not require gradients got one"
        );
        assert!(max_abs(&(h.grad().to_kind(Kind::Double) - &want_dh)) <= 1e-5 * max_abs(&want_dh));

        let e = head.copy().set_requires_grad(true);
        let loss =
            tch::no_grad(|| lm_head_cross_entropy(&hidden, plain(&e), &labels, Reduction::Mean));
        assert!(!loss.requires_grad());
        assert!((loss.double_value(&[]) - want).abs() <= 1e-5 * want.abs());
    }

    /// Distillation of three student sets (different row counts and teacher offsets, as a
    /// drafter's steps) against float64 autograd on whole logits: the mean over every row of
    /// −Σ softmax(teacher)·log_softmax(student). Within 1e-5 relative to the largest value, for
    /// the loss, each set's ∂/∂hidden and the student head's ∂/∂head, over block sizes that cut
    /// the 11 teacher positions unevenly, with and without a student softcap (the teacher has
    /// one), under a scaled backward. The teacher gets no gradient.
    #[test]
    fn distillation_blocks_give_the_loss_and_gradients_of_float64_autograd() {
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let teacher_hidden = Tensor::randn([2, 11, 12], opts).set_requires_grad(true);
        let teacher_head = Tensor::randn([40, 12], opts) * 2.0;
        let head = Tensor::randn([40, 8], opts) * 1.5;
        let students: Vec<Tensor> = [10, 9, 7]
            .iter()
            .map(|&rows| Tensor::randn([2, rows, 8], opts))
            .collect();
        let offsets = [1, 2, 4];
        let teacher_cap = Some(4.0);
        for student_cap in [None, Some(3.0)] {
            // The reference: float64, whole logits, autograd.
            let xs: Vec<Tensor> = students
                .iter()
                .map(|x| x.to_kind(Kind::Double).set_requires_grad(true))
                .collect();
            let e = head.to_kind(Kind::Double).set_requires_grad(true);
            let capped = |z: Tensor, cap: Option<f64>| match cap {
                Some(c) => (z / c).tanh() * c,
                None => z,
            };
            let p = capped(
                teacher_hidden
                    .detach()
                    .to_kind(Kind::Double)
                    .matmul(&teacher_head.to_kind(Kind::Double).tr()),
                teacher_cap,
            )
            .softmax(-1, Kind::Double);
            let mut sum = Tensor::zeros([], (Kind::Double, Device::Cpu));
            let mut rows = 0;
            for (x, &offset) in xs.iter().zip(&offsets) {
                let n = x.size()[1];
                let log_q = capped(x.matmul(&e.tr()), student_cap).log_softmax(-1, Kind::Double);
                sum -= (p.narrow(1, offset, n) * log_q).sum(Kind::Double);
                rows += 2 * n;
            }
            let want = sum / rows as f64;
            want.backward();
            let want_loss = want.double_value(&[]);

            for block in [1, 3, 5, 11, 1000] {
                let got_xs: Vec<Tensor> = students
                    .iter()
                    .map(|x| x.copy().set_requires_grad(true))
                    .collect();
                let got_e = head.copy().set_requires_grad(true);
                let loss = distillation_in_blocks(
                    &got_xs,
                    &offsets,
                    LmHead {
                        weights: &got_e,
                        softcap: student_cap,
                    },
                    &teacher_hidden,
                    LmHead {
                        weights: &teacher_head,
                        softcap: teacher_cap,
                    },
                    block,
                )
                .unwrap();
                let case = format!("student softcap {student_cap:?}, block {block}");
                assert_matches_reference(&case, loss, want_loss, || {
                    let mut pairs: Vec<(String, Tensor, Tensor)> = got_xs
                        .iter()
                        .zip(&xs)
                        .enumerate()
                        .map(|(s, (g, w))| (format!("student set {s}"), g.grad(), w.grad()))
                        .collect();
                    pairs.push(("head".into(), got_e.grad(), e.grad()));
                    pairs
                });
            }
            assert!(
                !teacher_hidden.grad().defined(),
                "the teacher got a gradient"
            );
        }
    }

    #[test]
    fn distillation_refuses_rows_past_the_teacher_and_passes_over_empty_sets() {
        let opts = (Kind::Float, Device::Cpu);
        let teacher = Tensor::zeros([2, 5, 4], opts);
        let head = Tensor::zeros([10, 4], opts);
        let students = [Tensor::zeros([2, 4, 4], opts)];
        let lm = LmHead {
            weights: &head,
            softcap: None,
        };
        let err = lm_head_distillation(&students, &[2], lm, &teacher, lm).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(lm_head_distillation(&students, &[1], lm, &teacher, lm).is_ok());
        assert!(lm_head_distillation(&students, &[1, 2], lm, &teacher, lm).is_err());
        // A set without rows adds nothing; no rows at all is refused.
        let with_empty = [
            Tensor::zeros([2, 4, 4], opts),
            Tensor::zeros([2, 0, 4], opts),
        ];
        let alone = lm_head_distillation(&with_empty[..1], &[1], lm, &teacher, lm).unwrap();
        let both = lm_head_distillation(&with_empty, &[1, 5], lm, &teacher, lm).unwrap();
        assert_eq!(alone.double_value(&[]), both.double_value(&[]));
        assert!(lm_head_distillation(&with_empty[1..], &[0], lm, &teacher, lm).is_err());
    }

    #[test]
    fn blocks_are_sized_by_the_vocabulary_and_never_below_256_rows() {
        assert_eq!(block_rows(Device::Cpu, 8192), 512);
        assert_eq!(block_rows(Device::Cpu, 262_144), 256);
        assert_eq!(block_rows(Device::Cuda(0), 262_144), 512);
    }
}
