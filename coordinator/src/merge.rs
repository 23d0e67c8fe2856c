//! Merging learners' outer gradients and the outer optimizer, in f32 storage with f64 sums.
//!
//! Learner weights are c_tokens² / c_steps ("quantity × quality": tokens seen, times tokens per
//! step). Non-embedding tensors use the RDA merge, Σw‖Δ‖/Σw · φ(Σw·φ(Δ)/Σw) with φ(x) = x/‖x‖,
//! φ(0) = 0: the weighted mean of norms times the normalised weighted mean of directions, so the
//! merged step keeps the learners' typical length even when their directions are near-orthogonal.
//! Embedding tensors (and everything under `merge: mean`) use the weighted mean Σw·Δ/Σw.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MergeRule {
    #[default]
    Rda,
    Mean,
}

/// What the job's last round (the flush once every learner has stopped) does with the merged
/// outer gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FinalStep {
    /// Θ becomes the plain average of the learners' models as they were at their last inner
    /// step (outer lr 1, no momentum, every learner once, every fragment). Nesterov's look-ahead
    /// along old, large-lr updates would overshoot the learners' final, low-lr models; and a
    /// version merged after a learner stopped, applied to its model, can only make it worse
    /// for the learner cannot train on it any more (docs/diloco.md, *The final model*).
    #[default]
    Average,
    /// The usual merge rule and outer Nesterov step.
    Outer,
}

pub fn learner_weight(c_tokens: u64, c_steps: u64) -> f64 {
    if c_steps == 0 {
        0.0
    } else {
        (c_tokens as f64) * (c_tokens as f64) / c_steps as f64
    }
}

/// SGD with Nesterov momentum on the outer gradient Δ (= anchor − local, so a step of −lr·Δ moves
/// the global parameters towards the learners): buf ← μ·buf + Δ; Θ ← Θ − lr·(Δ + μ·buf).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OuterOptimizer {
    pub lr: f64,
    pub momentum: f64,
}

impl OuterOptimizer {
    pub fn step(&self, theta: &mut [f32], momentum_buf: &mut [f32], delta: &[f32]) {
        for ((t, b), d) in theta.iter_mut().zip(momentum_buf.iter_mut()).zip(delta) {
            let buf = self.momentum * *b as f64 + *d as f64;
            *b = buf as f32;
            *t = (*t as f64 - self.lr * (*d as f64 + self.momentum * buf)) as f32;
        }
    }
}

/// Elements per unit of work in [`merge_tensor`]. Sums run in order within a chunk and then
/// over the chunks' sums in order, so the result does not depend on the thread count, and a
/// tensor of one chunk sums exactly as one sequential loop does. A whole number of codec blocks,
/// so each chunk encodes to its own contiguous run of the broadcast's bytes.
pub const MERGE_CHUNK: usize = 1 << 20;
const _: () = assert!(MERGE_CHUNK.is_multiple_of(atoll_wire::DEFAULT_BLOCK));

/// Elements merged per pass over the contributions inside a chunk: small enough that the f64
/// accumulators stay in the core's cache while each Δ streams through once.
const TILE: usize = 2048;
const _: () = assert!(TILE.is_multiple_of(atoll_wire::DEFAULT_BLOCK));

/// How a tensor's merged outer gradient moves Θ.
pub enum OuterStep<'a> {
    /// Θ ← Θ − Δ: the learners' plain average (the job's last round).
    Average,
    /// The outer Nesterov step, with the tensor's momentum buffer.
    Nesterov {
        optimizer: OuterOptimizer,
        momentum: &'a mut [f32],
    },
}

/// One tensor of a round: the contributions' Δ (all as long as Θ), their weights, the rule.
pub struct TensorMerge<'a> {
    pub deltas: &'a [&'a [f32]],
    pub weights: &'a [f64],
    pub rule: MergeRule,
}

/// The quantised broadcast of the update, with its error-feedback residual where there is one.
pub struct BroadcastCodec<'a> {
    pub codec: atoll_wire::Codec,
    pub residual: Option<&'a mut [f32]>,
}

pub struct MergedTensor {
    /// Θ after the round: with a broadcast codec, Θ_old + Q(update), which is what learners
    /// reconstruct from the broadcast; the exact step otherwise (or when the update would not
    /// encode).
    pub values: Vec<f32>,
    /// The broadcast's payload in the codec (None without a codec or when encoding failed).
    pub encoded: Option<Vec<u8>>,
    /// RDA only: how far the learners' directions agree, ‖Σw·Δ/‖Δ‖‖ / Σw: 1 when they point
    /// the same way, about 1/√M for M orthogonal ones, near 0 when they cancel (the merged step
    /// still has the learners' mean length, so its direction is then mostly noise).
    pub agreement: Option<f64>,
}

/// What multiplies each contribution's value before summing, element by element.
enum Scale {
    /// Σw·Δ / Σw.
    Mean { total: f64 },
    /// radius · (Σ w·Δ/‖Δ‖) / ‖Σ w·Δ/‖Δ‖‖; contributions of norm 0 left out.
    Rda {
        norms: Vec<f64>,
        radius: f64,
        dir_norm: f64,
    },
    /// Nothing to merge: Δ = 0.
    Zero,
}

/// One round's update of one tensor: merge the contributions, take the outer step, and (with a
/// broadcast codec) quantise the update the learners will receive, carrying its error into the
/// residual. Element for element the arithmetic is [`weighted_mean`] or [`rda`], then
/// [`OuterOptimizer::step`] (or Θ − Δ), then `Θ_old + Q(Θ_new − Θ_old + residual)`; the work is
/// split into [`MERGE_CHUNK`]s over up to `threads` threads, which at 12B scale (a fragment of
/// billions of values) is what keeps a round to seconds.
pub fn merge_tensor(
    round: &TensorMerge,
    old: &[f32],
    step: OuterStep,
    broadcast: Option<BroadcastCodec>,
    threads: usize,
) -> MergedTensor {
    let n = old.len();
    let chunks = n.div_ceil(MERGE_CHUNK).max(1);
    let range = |c: usize| c * MERGE_CHUNK..((c + 1) * MERGE_CHUNK).min(n);
    let scale = merge_scale(round, n, chunks, threads, range);
    let agreement = match &scale {
        Scale::Rda { dir_norm, .. } => Some(dir_norm / round.weights.iter().sum::<f64>()),
        _ => None,
    };

    let (optimizer, momentum) = match step {
        OuterStep::Average => (None, None),
        OuterStep::Nesterov {
            optimizer,
            momentum,
        } => (Some(optimizer), Some(momentum)),
    };
    let rule = RoundRule {
        round,
        scale,
        optimizer,
    };
    let (codec, mut residual) = match broadcast {
        Some(b) => (Some(b.codec), b.residual),
        None => (None, None),
    };
    let mut values = vec![0.0f32; n];
    let momentum_chunks = split_optional(momentum, chunks);
    let work: Vec<_> = values
        .chunks_mut(MERGE_CHUNK)
        .zip(momentum_chunks)
        .enumerate()
        .collect();
    let residual_read = residual.as_deref();
    let encoded: Vec<Option<Result<Vec<u8>, atoll_wire::WireError>>> =
        crate::parallel::map(work, threads, |(c, (new, momentum))| {
            let r = range(c);
            let broadcast = codec.map(|codec| (codec, residual_read.map(|res| &res[r.clone()])));
            step_chunk(&rule, r.clone(), &old[r], new, momentum, broadcast)
        });
    let Some(codec) = codec else {
        return MergedTensor {
            values,
            encoded: None,
            agreement,
        };
    };
    let Ok(parts) = encoded
        .into_iter()
        .map(|e| e.expect("a codec encodes every chunk"))
        .collect::<Result<Vec<_>, _>>()
    else {
        // Θ keeps the exact step (sent as full values), which owes nothing.
        if let Some(r) = residual.as_deref_mut() {
            r.fill(0.0);
        }
        return MergedTensor {
            values,
            encoded: None,
            agreement,
        };
    };
    let residual_chunks = split_optional(residual, chunks);
    let work: Vec<_> = values
        .chunks_mut(MERGE_CHUNK)
        .zip(residual_chunks)
        .zip(&parts)
        .enumerate()
        .collect();
    let decoded: Vec<Result<(), atoll_wire::WireError>> =
        crate::parallel::map(work, threads, |(c, ((new, residual), bytes))| {
            apply_quantised(codec, &old[range(c)], new, residual, bytes)
        });
    // Decoding what this process just encoded with the same codec and length cannot fail.
    decoded
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .expect("a codec decodes its own encoding");
    MergedTensor {
        values,
        encoded: Some(parts.concat()),
        agreement,
    }
}

fn merge_scale(
    round: &TensorMerge,
    n: usize,
    chunks: usize,
    threads: usize,
    range: impl Fn(usize) -> std::ops::Range<usize> + Sync,
) -> Scale {
    let total: f64 = round.weights.iter().sum();
    if round.deltas.is_empty() || total <= 0.0 {
        return Scale::Zero;
    }
    if round.rule == MergeRule::Mean {
        return Scale::Mean { total };
    }
    let m = round.deltas.len();
    let partial = crate::parallel::map((0..chunks).collect(), threads, |c| {
        let r = range(c);
        round
            .deltas
            .iter()
            .map(|d| sum_of_squares(&d[r.clone()]))
            .collect::<Vec<f64>>()
    });
    let norms: Vec<f64> = (0..m)
        .map(|i| partial.iter().map(|p| p[i]).sum::<f64>().sqrt())
        .collect();
    let radius = norms
        .iter()
        .zip(round.weights)
        .map(|(r, w)| r * w)
        .sum::<f64>()
        / total;
    let partial = crate::parallel::map((0..chunks).collect(), threads, |c| {
        let r = range(c);
        let mut acc = [0.0f64; TILE];
        let mut sum = 0.0f64;
        for start in r.clone().step_by(TILE) {
            let tile = start..(start + TILE).min(r.end);
            let acc = &mut acc[..tile.len()];
            direction_tile(round, Some(&norms), tile, acc);
            for a in acc.iter() {
                sum += a * a;
            }
        }
        sum
    });
    let dir_norm = partial.iter().sum::<f64>().sqrt();
    if dir_norm == 0.0 || n == 0 {
        return Scale::Zero;
    }
    Scale::Rda {
        norms,
        radius,
        dir_norm,
    }
}

fn sum_of_squares(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>()
}

/// Fills `acc` with the unscaled merge of elements `tile`: Σ w·Δ (mean, without `norms`) or
/// Σ w·Δ/‖Δ‖ (RDA), each element summed over the contributions in order, as the whole-tensor
/// loops did.
fn direction_tile(
    round: &TensorMerge,
    norms: Option<&[f64]>,
    tile: std::ops::Range<usize>,
    acc: &mut [f64],
) {
    acc.fill(0.0);
    for (i, (d, w)) in round.deltas.iter().zip(round.weights).enumerate() {
        let d = &d[tile.clone()];
        match norms {
            Some(norms) => {
                let r = norms[i];
                if r > 0.0 {
                    for (a, x) in acc.iter_mut().zip(d) {
                        *a += w * (*x as f64) / r;
                    }
                }
            }
            None => {
                for (a, x) in acc.iter_mut().zip(d) {
                    *a += w * *x as f64;
                }
            }
        }
    }
}

impl Scale {
    /// The merged Δ of one tile, in f32.
    fn merge_tile(
        &self,
        round: &TensorMerge,
        tile: std::ops::Range<usize>,
        acc: &mut [f64],
        merged: &mut [f32],
    ) {
        let (norms, factor) = match self {
            Scale::Zero => {
                merged.fill(0.0);
                return;
            }
            Scale::Mean { total } => (None, *total),
            Scale::Rda {
                norms, dir_norm, ..
            } => (Some(norms.as_slice()), *dir_norm),
        };
        direction_tile(round, norms, tile, acc);
        match self {
            Scale::Rda { radius, .. } => {
                for (m, a) in merged.iter_mut().zip(acc.iter()) {
                    *m = (radius * a / factor) as f32;
                }
            }
            _ => {
                for (m, a) in merged.iter_mut().zip(acc.iter()) {
                    *m = (a / factor) as f32;
                }
            }
        }
    }
}

/// What every chunk of a tensor's round shares.
struct RoundRule<'a> {
    round: &'a TensorMerge<'a>,
    scale: Scale,
    optimizer: Option<OuterOptimizer>,
}

/// Θ_new for one chunk: the merged Δ element by element, then the outer step; with a broadcast
/// codec, the update's encoding too.
fn step_chunk(
    rule: &RoundRule,
    chunk: std::ops::Range<usize>,
    old: &[f32],
    new: &mut [f32],
    mut momentum: Option<&mut [f32]>,
    broadcast: Option<(atoll_wire::Codec, Option<&[f32]>)>,
) -> Option<Result<Vec<u8>, atoll_wire::WireError>> {
    let mut acc = [0.0f64; TILE];
    let mut merged = [0.0f32; TILE];
    let mut update = [0.0f32; TILE];
    let mut encoded = broadcast.map(|(codec, _)| {
        Ok(Vec::with_capacity(
            codec.encoded_len(chunk.len(), atoll_wire::DEFAULT_BLOCK),
        ))
    });
    for start in (0..chunk.len()).step_by(TILE) {
        let end = (start + TILE).min(chunk.len());
        let merged = &mut merged[..end - start];
        let acc = &mut acc[..end - start];
        rule.scale.merge_tile(
            rule.round,
            chunk.start + start..chunk.start + end,
            acc,
            merged,
        );
        let old = &old[start..end];
        let new = &mut new[start..end];
        match (rule.optimizer, momentum.as_deref_mut()) {
            (Some(opt), Some(buf)) => {
                new.copy_from_slice(old);
                opt.step(new, &mut buf[start..end], merged);
            }
            _ => {
                for ((n, o), d) in new.iter_mut().zip(old).zip(merged.iter()) {
                    *n = o - d;
                }
            }
        }
        // Encoding tile by tile appends whole codec blocks, so the bytes are those of the chunk.
        if let (Some((codec, residual)), Some(Ok(bytes))) = (broadcast, encoded.as_mut()) {
            let update = &mut update[..end - start];
            update_of(new, old, residual.map(|r| &r[start..end]), update);
            if let Err(e) = atoll_wire::encode(codec, update, atoll_wire::DEFAULT_BLOCK, bytes) {
                encoded = Some(Err(e));
            }
        }
    }
    encoded
}

/// Pass two of a broadcast: Θ_new = Θ_old + Q(update) from the chunk's encoded bytes, and the
/// residual becomes what Q left out of the update.
fn apply_quantised(
    codec: atoll_wire::Codec,
    old: &[f32],
    new: &mut [f32],
    mut residual: Option<&mut [f32]>,
    bytes: &[u8],
) -> Result<(), atoll_wire::WireError> {
    let block = atoll_wire::DEFAULT_BLOCK;
    let tile_bytes = codec.encoded_len(TILE, block);
    let mut quantised = [0.0f32; TILE];
    let mut update = [0.0f32; TILE];
    for (t, start) in (0..new.len()).step_by(TILE).enumerate() {
        let end = (start + TILE).min(new.len());
        let payload = &bytes[t * tile_bytes..][..codec.encoded_len(end - start, block)];
        let quantised = &mut quantised[..end - start];
        atoll_wire::decode(codec, payload, block, quantised)?;
        let (old, new) = (&old[start..end], &mut new[start..end]);
        if let Some(res) = residual.as_deref_mut() {
            let res = &mut res[start..end];
            let update = &mut update[..end - start];
            update_of(new, old, Some(res), update);
            for ((r, u), q) in res.iter_mut().zip(update.iter()).zip(quantised.iter()) {
                *r = u - q;
            }
        }
        crate::syncer::apply_update(old, quantised, new);
    }
    Ok(())
}

/// The update a broadcast carries, into `out`: Θ_new − Θ_old, plus what earlier broadcasts left
/// out.
fn update_of(new: &[f32], old: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
    match residual {
        Some(res) => {
            for (((u, n), o), r) in out.iter_mut().zip(new).zip(old).zip(res) {
                *u = n - o + r;
            }
        }
        None => {
            for ((u, n), o) in out.iter_mut().zip(new).zip(old) {
                *u = n - o;
            }
        }
    }
}

fn split_optional(slice: Option<&mut [f32]>, chunks: usize) -> Vec<Option<&mut [f32]>> {
    match slice {
        Some(s) => s.chunks_mut(MERGE_CHUNK).map(Some).collect(),
        None => (0..chunks).map(|_| None).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_wire::Codec;
    use rand::{Rng, SeedableRng};

    /// The merge as it was written before it was chunked: one sequential loop per step, whole
    /// tensors at a time. `merge_tensor` must match it bit for bit on tensors of one chunk.
    mod straightforward {
        use super::super::OuterOptimizer;

        fn norm(v: &[f32]) -> f64 {
            v.iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt()
        }

        pub fn weighted_mean(deltas: &[&[f32]], weights: &[f64]) -> Vec<f32> {
            let total: f64 = weights.iter().sum();
            let n = deltas.first().map_or(0, |d| d.len());
            let mut acc = vec![0.0f64; n];
            for (d, w) in deltas.iter().zip(weights) {
                for (a, x) in acc.iter_mut().zip(d.iter()) {
                    *a += w * *x as f64;
                }
            }
            acc.into_iter()
                .map(|a| if total > 0.0 { (a / total) as f32 } else { 0.0 })
                .collect()
        }

        pub fn rda(deltas: &[&[f32]], weights: &[f64]) -> Vec<f32> {
            let total: f64 = weights.iter().sum();
            let n = deltas.first().map_or(0, |d| d.len());
            if total <= 0.0 {
                return vec![0.0; n];
            }
            let norms: Vec<f64> = deltas.iter().map(|d| norm(d)).collect();
            let radius: f64 = norms.iter().zip(weights).map(|(r, w)| r * w).sum::<f64>() / total;
            let mut direction = vec![0.0f64; n];
            for ((d, w), r) in deltas.iter().zip(weights).zip(&norms) {
                if *r > 0.0 {
                    for (a, x) in direction.iter_mut().zip(d.iter()) {
                        *a += w * (*x as f64) / r;
                    }
                }
            }
            let dir_norm = direction.iter().map(|x| x * x).sum::<f64>().sqrt();
            if dir_norm == 0.0 {
                return vec![0.0; n];
            }
            direction
                .into_iter()
                .map(|x| (radius * x / dir_norm) as f32)
                .collect()
        }

        /// Θ after the round and the broadcast bytes, as the syncer computed them.
        pub fn round(
            merged: &[f32],
            old: &[f32],
            outer: Option<(OuterOptimizer, &mut [f32])>,
            codec: Option<atoll_wire::Codec>,
            residual: Option<&mut [f32]>,
        ) -> (Vec<f32>, Option<Vec<u8>>) {
            let mut values = old.to_vec();
            match outer {
                Some((opt, buf)) => opt.step(&mut values, buf, merged),
                None => values.iter_mut().zip(merged).for_each(|(t, d)| *t -= d),
            }
            let Some(codec) = codec else {
                return (values, None);
            };
            let mut update: Vec<f32> = values.iter().zip(old).map(|(n, o)| n - o).collect();
            if let Some(r) = residual.as_deref() {
                update.iter_mut().zip(r).for_each(|(u, r)| *u += r);
            }
            let mut bytes = Vec::new();
            let mut q = vec![0.0f32; update.len()];
            let ok = atoll_wire::encode(codec, &update, atoll_wire::DEFAULT_BLOCK, &mut bytes)
                .and_then(|()| {
                    atoll_wire::decode(codec, &bytes, atoll_wire::DEFAULT_BLOCK, &mut q)
                });
            if ok.is_err() {
                if let Some(r) = residual {
                    r.fill(0.0);
                }
                return (values, None);
            }
            crate::syncer::apply_update(old, &q, &mut values);
            if let Some(r) = residual {
                for ((r, u), q) in r.iter_mut().zip(&update).zip(&q) {
                    *r = u - q;
                }
            }
            (values, Some(bytes))
        }
    }

    /// The merged Δ alone: Θ = 0 stepped by the plain average is exactly −Δ.
    fn merged(deltas: &[&[f32]], weights: &[f64], rule: MergeRule, threads: usize) -> Vec<f32> {
        let n = deltas.first().map_or(0, |d| d.len());
        let round = TensorMerge {
            deltas,
            weights,
            rule,
        };
        merge_tensor(&round, &vec![0.0; n], OuterStep::Average, None, threads)
            .values
            .into_iter()
            .map(|x| -x)
            .collect()
    }

    fn random(n: usize, scale: f32, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    struct Case {
        n: usize,
        rule: MergeRule,
        nesterov: bool,
        codec: Option<Codec>,
        feedback: bool,
    }

    /// Runs one round through `merge_tensor` (with `threads`) and through the straightforward
    /// code; returns both results and both momentum and residual buffers.
    #[allow(clippy::type_complexity)]
    fn both(
        case: &Case,
        threads: usize,
        seed: u64,
    ) -> [(Vec<f32>, Option<Vec<u8>>, Vec<f32>, Vec<f32>); 2] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let deltas: Vec<Vec<f32>> = (0..3).map(|_| random(case.n, 1e-3, &mut rng)).collect();
        let refs: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        let weights = [learner_weight(4096, 16), learner_weight(2048, 16), 0.5];
        let old = random(case.n, 0.1, &mut rng);
        let momentum0 = random(case.n, 1e-3, &mut rng);
        let residual0 = random(case.n, 1e-5, &mut rng);
        let optimizer = OuterOptimizer {
            lr: 0.7,
            momentum: 0.5,
        };

        let (mut momentum, mut residual) = (momentum0.clone(), residual0.clone());
        let round = TensorMerge {
            deltas: &refs,
            weights: &weights,
            rule: case.rule,
        };
        let step = if case.nesterov {
            OuterStep::Nesterov {
                optimizer,
                momentum: &mut momentum,
            }
        } else {
            OuterStep::Average
        };
        let broadcast = case.codec.map(|codec| BroadcastCodec {
            codec,
            residual: case.feedback.then_some(residual.as_mut_slice()),
        });
        let got = merge_tensor(&round, &old, step, broadcast, threads);
        let chunked = (got.values, got.encoded, momentum, residual);

        let (mut momentum, mut residual) = (momentum0, residual0);
        let delta = match case.rule {
            MergeRule::Rda => straightforward::rda(&refs, &weights),
            MergeRule::Mean => straightforward::weighted_mean(&refs, &weights),
        };
        let (values, encoded) = straightforward::round(
            &delta,
            &old,
            case.nesterov
                .then_some((optimizer, momentum.as_mut_slice())),
            case.codec,
            case.feedback.then_some(residual.as_mut_slice()),
        );
        [chunked, (values, encoded, momentum, residual)]
    }

    #[test]
    fn a_tensor_of_one_chunk_merges_bit_for_bit_as_the_straightforward_loops() {
        let mut cases = Vec::new();
        for rule in [MergeRule::Rda, MergeRule::Mean] {
            for nesterov in [true, false] {
                for codec in [None, Some(Codec::E3M0), Some(Codec::Int2)] {
                    for feedback in [false, true] {
                        // Lengths off the tile and block sizes, and one full chunk.
                        for n in [1, 1000, 2 * TILE + 77, MERGE_CHUNK] {
                            cases.push(Case {
                                n,
                                rule,
                                nesterov,
                                codec,
                                feedback,
                            });
                        }
                    }
                }
            }
        }
        for (i, case) in cases.iter().enumerate() {
            for threads in [1, 4] {
                let [chunked, reference] = both(case, threads, i as u64);
                assert!(
                    chunked == reference,
                    "case {i} (n {}, {:?}, nesterov {}, {:?}, feedback {}), {threads} threads",
                    case.n,
                    case.rule,
                    case.nesterov,
                    case.codec,
                    case.feedback
                );
            }
        }
    }

    /// Over several chunks the sums are taken per chunk, so RDA may round differently from one
    /// sequential sum (by far less than f32's precision), but never with the thread count.
    #[test]
    fn a_tensor_of_many_chunks_merges_the_same_on_any_thread_count() {
        let n = 2 * MERGE_CHUNK + 3 * TILE + 5;
        for (i, (rule, codec)) in [
            (MergeRule::Rda, None),
            (MergeRule::Rda, Some(Codec::E3M0)),
            (MergeRule::Mean, Some(Codec::Int2)),
        ]
        .into_iter()
        .enumerate()
        {
            let case = Case {
                n,
                rule,
                nesterov: true,
                codec,
                feedback: true,
            };
            let [one, reference] = both(&case, 1, 100 + i as u64);
            let [three, _] = both(&case, 3, 100 + i as u64);
            assert!(one == three, "{rule:?} {codec:?}: 1 and 3 threads differ");
            if rule == MergeRule::Mean {
                // No sums across elements: identical to the straightforward loops at any length.
                assert!(one == reference, "{rule:?} {codec:?}");
            } else {
                let worst = one
                    .0
                    .iter()
                    .zip(&reference.0)
                    .map(|(a, b)| ((a - b).abs() / b.abs().max(1e-30)) as f64)
                    .fold(0.0, f64::max);
                assert!(worst <= 1.2e-7, "{rule:?}: relative difference {worst}");
            }
        }
    }

    #[test]
    fn first_nesterov_step_moves_theta_by_minus_1_33_delta() {
        let opt = OuterOptimizer {
            lr: 0.7,
            momentum: 0.9,
        };
        let (mut theta, mut buf) = (vec![1.0f32, -2.0], vec![0.0f32; 2]);
        opt.step(&mut theta, &mut buf, &[0.5, 1.0]);
        assert!(
            (theta[0] - (1.0 - 1.33 * 0.5)).abs() < 1e-6 && (theta[1] - (-2.0 - 1.33)).abs() < 1e-6,
            "{theta:?}"
        );
        assert_eq!(buf, vec![0.5, 1.0]);
    }

    /// RDA against a float64 computation written from the formula.
    #[test]
    fn rda_matches_the_float64_formula() {
        let a = [3.0f32, 4.0, 0.0];
        let b = [0.0f32, 0.0, 2.0];
        let c = [-1.0f32, 1.0, 1.0];
        let w = [
            learner_weight(100, 10),
            learner_weight(50, 10),
            learner_weight(80, 20),
        ];
        let got = merged(&[&a, &b, &c], &w, MergeRule::Rda, 1);
        let vs = [a, b, c].map(|v| v.map(|x| x as f64));
        let norms: Vec<f64> = vs
            .iter()
            .map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        let tw: f64 = w.iter().sum();
        let radius: f64 = norms.iter().zip(&w).map(|(n, w)| n * w).sum::<f64>() / tw;
        let mut dir = [0.0f64; 3];
        for i in 0..3 {
            for k in 0..3 {
                dir[k] += w[i] * vs[i][k] / norms[i] / tw;
            }
        }
        let dn = dir.iter().map(|x| x * x).sum::<f64>().sqrt();
        for k in 0..3 {
            assert!(
                (got[k] as f64 - radius * dir[k] / dn).abs() < 1e-6,
                "{got:?}"
            );
        }
        // The merged step keeps the mean norm, unlike a plain mean of orthogonal vectors.
        let merged_norm = got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((merged_norm - radius).abs() < 1e-5);
        let mean = merged(&[&a, &b], &[1.0, 1.0], MergeRule::Mean, 1);
        assert!(mean.iter().map(|x| x * x).sum::<f32>().sqrt() < 0.6 * 5.0);
    }

    /// The agreement the merge log records: 1 for learners pointing the same way, 1/√2 for two
    /// orthogonal ones of equal weight, small when they nearly cancel; none for a plain mean.
    #[test]
    fn agreement_measures_how_far_the_learners_directions_cancel() {
        let agreement = |deltas: &[&[f32]], weights: &[f64], rule: MergeRule| {
            let n = deltas[0].len();
            let round = TensorMerge {
                deltas,
                weights,
                rule,
            };
            merge_tensor(&round, &vec![0.0; n], OuterStep::Average, None, 1).agreement
        };
        let rda = MergeRule::Rda;
        let same = agreement(&[&[1.0, 2.0], &[2.0, 4.0]], &[1.0, 3.0], rda).unwrap();
        assert!((same - 1.0).abs() < 1e-9, "{same}");
        let orthogonal = agreement(&[&[3.0, 0.0], &[0.0, 0.5]], &[1.0, 1.0], rda).unwrap();
        assert!((orthogonal - 0.5f64.sqrt()).abs() < 1e-9, "{orthogonal}");
        // Nearly opposite: the unit directions sum to (0, 0.1) · w / 2w.
        let opposite = agreement(&[&[1.0, 0.1], &[-1.0, 0.1]], &[1.0, 1.0], rda).unwrap();
        let expected = 0.1 / 1.01f64.sqrt();
        assert!((opposite - expected).abs() < 1e-6, "{opposite}");
        assert_eq!(
            agreement(&[&[1.0], &[2.0]], &[1.0, 1.0], MergeRule::Mean),
            None
        );
    }

    #[test]
    fn zero_weights_and_zero_deltas_give_zero() {
        assert_eq!(
            merged(&[&[1.0, 2.0]], &[0.0], MergeRule::Rda, 1),
            vec![0.0, 0.0]
        );
        assert_eq!(
            merged(&[&[0.0, 0.0], &[0.0, 0.0]], &[1.0, 2.0], MergeRule::Rda, 1),
            vec![0.0, 0.0]
        );
        assert_eq!(
            merged(&[&[2.0, 4.0], &[4.0, 8.0]], &[1.0, 3.0], MergeRule::Mean, 1),
            vec![3.5, 7.0]
        );
        assert_eq!(learner_weight(10, 0), 0.0);
        assert_eq!(learner_weight(100, 4), 2500.0);
    }

    /// An update that does not encode (here: infinite) leaves Θ at the exact step, sends
    /// nothing quantised and clears the residual, which owes nothing afterwards.
    #[test]
    fn an_update_that_does_not_encode_keeps_the_exact_step() {
        let n = MERGE_CHUNK + 10;
        let mut delta = vec![1e-3f32; n];
        delta[n - 1] = f32::INFINITY;
        let weights = [1.0];
        let round = TensorMerge {
            deltas: &[&delta],
            weights: &weights,
            rule: MergeRule::Mean,
        };
        let mut residual = vec![0.25f32; n];
        let got = merge_tensor(
            &round,
            &vec![1.0; n],
            OuterStep::Average,
            Some(BroadcastCodec {
                codec: Codec::E3M0,
                residual: Some(&mut residual),
            }),
            2,
        );
        assert!(got.encoded.is_none());
        assert_eq!(got.values[0], 1.0 - 1e-3);
        assert!(residual.iter().all(|r| *r == 0.0));
    }
}
