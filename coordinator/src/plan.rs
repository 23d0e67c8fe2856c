//! The fragment plan: a deterministic partition of the model's tensors into P fragments,
//! derived only from tensor names and shapes, so every learner and the syncer compute the same one.
//!
//! Embedding tensors (`embed_tokens`, an untied `lm_head`) form a fragment of their own (merged
//! with a plain weighted mean); the other tensors are bin-packed into the remaining P − 1
//! fragments by longest-processing-time-first (largest tensor first, ties by name, into the
//! lightest fragment, ties by index), which keeps the largest fragment within 4/3 of optimal.
//!
//! On the data plane a fragment travels as parts, one per tensor, except that a tensor of more
//! than [`FragmentPlan::part_values`] values is cut into several parts of consecutive values
//! ([`FragmentPlan::part_spans`]). A part's frame length is 32 bits, so without the cut a
//! 27B Gemma's embedding (1.41 billion values, 5.6 GB as f32) could not travel at all, and a
//! 12B one would arrive as one 4 GB frame, decoded on one core after its last byte.

use atoll_wire::{frame_encoded, Codec, WireError, DEFAULT_BLOCK};
use serde::Serialize;

/// Values one data-plane part carries at most, by default: 64 Mi, 256 MiB as f32. Of a 12B
/// Gemma's tensors only the embedding (1.007 billion values) is larger; it travels as 15 parts
/// (Gemma 4's 262,144 rows) or 16 (Gemma 3's 262,208).
pub const DEFAULT_PART_VALUES: u64 = 1 << 26;

/// The largest part size a plan accepts: 512 Mi values, a 2 GiB f32 frame, well inside the
/// 32-bit frame length with zstd's worst case on top.
pub const MAX_PART_VALUES: u64 = 1 << 29;

/// Whether `values` may bound a plan's parts: a whole number of codec blocks (so a part is a run
/// of whole blocks), at most [`MAX_PART_VALUES`].
pub fn check_part_values(values: u64) -> Result<(), PlanError> {
    let block = DEFAULT_BLOCK as u64;
    if values < block || values > MAX_PART_VALUES || !values.is_multiple_of(block) {
        return Err(PlanError::BadPartValues(values));
    }
    Ok(())
}

/// How many parts a tensor of `values` values travels as, parts holding at most `part_values`
/// (an empty tensor is one empty part).
pub fn parts_of(values: u64, part_values: u64) -> u64 {
    values.div_ceil(part_values).max(1)
}

/// One data-plane part of a fragment: values `start..end` (row-major) of the fragment's tensor
/// `tensor`, an index into [`Fragment::tensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSpan {
    pub tensor: usize,
    pub start: usize,
    pub end: usize,
}

impl PartSpan {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<u64>,
}

impl TensorInfo {
    pub fn new(name: impl Into<String>, shape: &[u64]) -> Self {
        TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Embeddings are not near-orthogonal across learners, so they are averaged, not RDA-merged.
pub fn is_embedding(name: &str) -> bool {
    name.contains("embed_tokens") || name.ends_with("lm_head.weight")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fragment {
    pub id: usize,
    /// Indices into the plan's tensor list, in that list's order.
    pub tensors: Vec<usize>,
    pub elements: u64,
    pub embedding: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FragmentPlan {
    pub tensors: Vec<TensorInfo>,
    pub fragments: Vec<Fragment>,
    /// Values one data-plane part carries at most (a multiple of the codecs' block, so a
    /// tensor's parts encode exactly as the whole tensor would).
    pub part_values: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("sync.fragments must be at least 1")]
    NoFragments,
    #[error(
        "sync.fragments = {fragments} but the model has only {tensors} tensors to spread over them"
    )]
    TooManyFragments { fragments: usize, tensors: usize },
    #[error("tensor names must be unique; `{0}` appears twice")]
    DuplicateName(String),
    #[error(
        "{0} values per part: expected a multiple of {DEFAULT_BLOCK} (the codecs' block) from {DEFAULT_BLOCK} to {MAX_PART_VALUES}"
    )]
    BadPartValues(u64),
    #[error("part {part} of fragment {fragment} holds {got} values where the plan has {expected}")]
    PartLength {
        fragment: usize,
        part: usize,
        got: usize,
        expected: usize,
    },
    #[error("fragment {fragment} has {expected} parts, not {got}")]
    PartCount {
        fragment: usize,
        got: usize,
        expected: usize,
    },
}

impl FragmentPlan {
    /// Values in the model's largest tensor: what bounds one data-plane part.
    pub fn largest_tensor(&self) -> u64 {
        self.tensors
            .iter()
            .map(TensorInfo::elements)
            .max()
            .unwrap_or(0)
    }

    pub fn new(tensors: Vec<TensorInfo>, fragments: usize) -> Result<Self, PlanError> {
        if fragments == 0 {
            return Err(PlanError::NoFragments);
        }
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlanError::DuplicateName(w[0].to_string()));
        }
        let (embed, dense): (Vec<usize>, Vec<usize>) =
            (0..tensors.len()).partition(|&i| is_embedding(&tensors[i].name));
        let separate_embedding = fragments >= 2 && !embed.is_empty();
        let dense_bins = if separate_embedding {
            fragments - 1
        } else {
            fragments
        };
        let packable = if separate_embedding {
            dense.len()
        } else {
            tensors.len()
        };
        if packable < dense_bins {
            return Err(PlanError::TooManyFragments {
                fragments,
                tensors: tensors.len(),
            });
        }
        let mut order: Vec<usize> = if separate_embedding {
            dense
        } else {
            (0..tensors.len()).collect()
        };
        order.sort_by(|&a, &b| {
            tensors[b]
                .elements()
                .cmp(&tensors[a].elements())
                .then_with(|| tensors[a].name.cmp(&tensors[b].name))
        });
        let mut bins: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); dense_bins];
        for i in order {
            let lightest = (0..bins.len())
                .min_by_key(|&b| (bins[b].0, b))
                .expect("at least one bin");
            bins[lightest].0 += tensors[i].elements();
            bins[lightest].1.push(i);
        }
        let mut out = Vec::with_capacity(fragments);
        if separate_embedding {
            let elements = embed.iter().map(|&i| tensors[i].elements()).sum();
            out.push(Fragment {
                id: 0,
                tensors: embed,
                elements,
                embedding: true,
            });
        }
        for (elements, mut members) in bins {
            members.sort_unstable();
            out.push(Fragment {
                id: out.len(),
                tensors: members,
                elements,
                embedding: false,
            });
        }
        Ok(FragmentPlan {
            tensors,
            fragments: out,
            part_values: DEFAULT_PART_VALUES,
        })
    }

    /// The same plan with parts of at most `values` values ([`check_part_values`]).
    pub fn with_part_values(mut self, values: u64) -> Result<Self, PlanError> {
        check_part_values(values)?;
        self.part_values = values;
        Ok(self)
    }

    /// Fragment `p`'s data-plane parts in order: its tensors in the fragment's order, each cut
    /// into runs of [`Self::part_values`] values (an empty tensor is one empty part).
    pub fn part_spans(&self, p: usize) -> Vec<PartSpan> {
        let mut spans = Vec::new();
        for k in 0..self.fragments[p].tensors.len() {
            spans.extend(self.tensor_spans(p, k));
        }
        spans
    }

    /// How many parts fragment `p` travels as ([`Self::part_spans`] without building them).
    pub fn part_count(&self, p: usize) -> usize {
        self.fragments[p]
            .tensors
            .iter()
            .map(|&t| parts_of(self.tensors[t].elements(), self.part_values) as usize)
            .sum()
    }

    /// Whether fragment `p` has a tensor cut into several parts.
    pub fn is_cut(&self, p: usize) -> bool {
        self.part_count(p) != self.fragments[p].tensors.len()
    }

    /// The parts of tensor `k` of fragment `p`.
    fn tensor_spans(&self, p: usize, k: usize) -> Vec<PartSpan> {
        let n = self.tensors[self.fragments[p].tensors[k]].elements();
        let step = self.part_values as usize;
        let n_usize = n as usize;
        (0..parts_of(n, self.part_values) as usize)
            .map(|r| PartSpan {
                tensor: k,
                start: r * step,
                end: ((r + 1) * step).min(n_usize),
            })
            .collect()
    }

    /// How many parts the largest tensor travels as, and the values in its largest part.
    pub fn largest_part(&self) -> (u64, u64) {
        let n = self.largest_tensor();
        (parts_of(n, self.part_values), n.min(self.part_values))
    }

    /// Fragment `p`'s parts as wire frames, from each tensor's bytes encoded whole with `codec`
    /// (block [`DEFAULT_BLOCK`]): a part's frame carries its run of the tensor's blocks, so the
    /// parts decode to exactly what the whole tensor's frame would. Framed (and compressed at
    /// `zstd_level`) a part at a time on every core.
    pub fn frame_parts(
        &self,
        p: usize,
        codec: Codec,
        encoded: &[Vec<u8>],
        zstd_level: i32,
    ) -> Result<Vec<Vec<u8>>, WireError> {
        let tensors = &self.fragments[p].tensors;
        if encoded.len() != tensors.len() {
            return Err(WireError::ShapeMismatch {
                elements: tensors.len() as u64,
                values: encoded.len() as u64,
            });
        }
        for (bytes, &t) in encoded.iter().zip(tensors) {
            let n = self.tensors[t].elements();
            if bytes.len() != codec.encoded_len(n as usize, DEFAULT_BLOCK) {
                return Err(WireError::ShapeMismatch {
                    elements: n,
                    values: bytes.len() as u64,
                });
            }
        }
        let byte_at = |value: usize| codec.encoded_len(value, DEFAULT_BLOCK);
        let runs: Vec<(u64, &[u8])> = self
            .part_spans(p)
            .into_iter()
            .map(|s| {
                let run = &encoded[s.tensor][byte_at(s.start)..byte_at(s.end)];
                (s.len() as u64, run)
            })
            .collect();
        let threads = crate::parallel::available_threads();
        crate::parallel::map(runs, threads, |(n, run)| {
            frame_encoded(codec, DEFAULT_BLOCK as u32, &[n], run, zstd_level)
        })
        .into_iter()
        .collect()
    }

    /// Fragment `p`'s tensors from its parts (in [`Self::part_spans`] order), each part's
    /// length checked against the plan; a tensor sent whole is moved, not copied.
    pub fn join_parts(&self, p: usize, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, PlanError> {
        let spans = self.part_spans(p);
        if parts.len() != spans.len() {
            return Err(PlanError::PartCount {
                fragment: p,
                got: parts.len(),
                expected: spans.len(),
            });
        }
        let mut tensors: Vec<Vec<f32>> = Vec::with_capacity(self.fragments[p].tensors.len());
        for (k, (span, values)) in spans.iter().zip(parts).enumerate() {
            if values.len() != span.len() {
                return Err(PlanError::PartLength {
                    fragment: p,
                    part: k,
                    got: values.len(),
                    expected: span.len(),
                });
            }
            if span.start == 0 {
                let whole = self.tensors[self.fragments[p].tensors[span.tensor]].elements();
                if span.end as u64 == whole {
                    tensors.push(values);
                } else {
                    let mut tensor = Vec::with_capacity(whole as usize);
                    tensor.extend_from_slice(&values);
                    tensors.push(tensor);
                }
            } else if let Some(tensor) = tensors.last_mut() {
                tensor.extend_from_slice(&values);
            }
        }
        Ok(tensors)
    }

    /// The element count of each tensor of fragment `p`, in the fragment's order.
    pub fn fragment_shapes(&self, p: usize) -> Vec<u64> {
        self.fragments[p]
            .tensors
            .iter()
            .map(|&t| self.tensors[t].elements())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.fragments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fragments.is_empty()
    }

    /// A stable fingerprint of the plan (FNV-1a over names, shapes and assignment), compared at
    /// join time so a learner with a different model is refused.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= *b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        // Absent from the default so plans (and checkpoints) from before parts were cut keep
        // their fingerprint.
        if self.part_values != DEFAULT_PART_VALUES {
            eat(b"part_values");
            eat(&self.part_values.to_le_bytes());
        }
        for f in &self.fragments {
            eat(&(f.id as u64).to_le_bytes());
            for &t in &f.tensors {
                eat(self.tensors[t].name.as_bytes());
                for d in &self.tensors[t].shape {
                    eat(&d.to_le_bytes());
                }
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Vec<TensorInfo> {
        let mut t = vec![TensorInfo::new("model.embed_tokens.weight", &[1000, 64])];
        for l in 0..4 {
            for (n, s) in [
                ("q_proj", [128, 64]),
                ("k_proj", [64, 64]),
                ("o_proj", [64, 128]),
                ("up_proj", [256, 64]),
            ] {
                t.push(TensorInfo::new(format!("model.layers.{l}.{n}.weight"), &s));
            }
            t.push(TensorInfo::new(
                format!("model.layers.{l}.norm.weight"),
                &[64],
            ));
        }
        t.push(TensorInfo::new("model.norm.weight", &[64]));
        t
    }

    #[test]
    fn the_plan_is_a_partition_with_the_embedding_alone() {
        let plan = FragmentPlan::new(model(), 4).unwrap();
        assert_eq!(plan.len(), 4);
        let mut seen: Vec<usize> = plan
            .fragments
            .iter()
            .flat_map(|f| f.tensors.clone())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..plan.tensors.len()).collect::<Vec<_>>());
        assert!(plan.fragments[0].embedding && plan.fragments[0].tensors == vec![0]);
        let loads: Vec<u64> = plan.fragments[1..].iter().map(|f| f.elements).collect();
        let (max, min) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
        assert!(max as f64 <= 1.34 * min as f64, "balanced: {loads:?}");
    }

    #[test]
    fn the_plan_is_identical_across_runs_and_input_orders() {
        let a = FragmentPlan::new(model(), 3).unwrap();
        assert_eq!(a, FragmentPlan::new(model(), 3).unwrap());
        let mut shuffled = model();
        shuffled.reverse();
        let b = FragmentPlan::new(shuffled, 3).unwrap();
        let names = |p: &FragmentPlan| -> Vec<Vec<String>> {
            p.fragments
                .iter()
                .map(|f| {
                    let mut n: Vec<String> = f
                        .tensors
                        .iter()
                        .map(|&i| p.tensors[i].name.clone())
                        .collect();
                    n.sort();
                    n
                })
                .collect()
        };
        assert_eq!(names(&a), names(&b));
        assert_eq!(
            a.fingerprint(),
            FragmentPlan::new(model(), 3).unwrap().fingerprint()
        );
        assert_ne!(
            a.fingerprint(),
            FragmentPlan::new(model(), 4).unwrap().fingerprint()
        );
    }

    #[test]
    fn bad_fragment_counts_are_refused() {
        assert_eq!(FragmentPlan::new(model(), 0), Err(PlanError::NoFragments));
        assert!(matches!(
            FragmentPlan::new(model(), 100),
            Err(PlanError::TooManyFragments { .. })
        ));
        let one = FragmentPlan::new(model(), 1).unwrap();
        assert_eq!(one.fragments[0].tensors.len(), model().len());
    }

    /// A tensor above the part size is cut into consecutive runs, the others travel whole, and
    /// joining the runs gives the tensors back; a part of the wrong length or count is refused.
    #[test]
    fn large_tensors_travel_as_several_parts_and_join_back() {
        let plan = FragmentPlan::new(model(), 2)
            .unwrap()
            .with_part_values(25_600)
            .unwrap();
        // The embedding (1000 x 64 = 64,000 values) alone in fragment 0: 25,600 + 25,600 + 12,800.
        let spans = plan.part_spans(0);
        assert_eq!(
            spans,
            vec![
                PartSpan {
                    tensor: 0,
                    start: 0,
                    end: 25_600
                },
                PartSpan {
                    tensor: 0,
                    start: 25_600,
                    end: 51_200
                },
                PartSpan {
                    tensor: 0,
                    start: 51_200,
                    end: 64_000
                },
            ]
        );
        assert_eq!(plan.largest_part(), (3, 25_600));
        // Every other tensor is smaller than a part: one part each, in the fragment's order.
        let dense = plan.part_spans(1);
        assert_eq!(dense.len(), plan.fragments[1].tensors.len());
        assert!(dense
            .iter()
            .enumerate()
            .all(|(k, s)| s.tensor == k && s.start == 0));

        let embedding: Vec<f32> = (0..64_000).map(|i| i as f32).collect();
        let parts: Vec<Vec<f32>> = spans
            .iter()
            .map(|s| embedding[s.start..s.end].to_vec())
            .collect();
        assert_eq!(plan.join_parts(0, parts.clone()).unwrap(), vec![embedding]);
        let mut short = parts.clone();
        short[1].pop();
        assert_eq!(
            plan.join_parts(0, short),
            Err(PlanError::PartLength {
                fragment: 0,
                part: 1,
                got: 25_599,
                expected: 25_600
            })
        );
        assert_eq!(
            plan.join_parts(0, parts[..2].to_vec()),
            Err(PlanError::PartCount {
                fragment: 0,
                got: 2,
                expected: 3
            })
        );
    }

    #[test]
    fn part_sizes_off_the_codec_block_are_refused_and_the_default_keeps_the_fingerprint() {
        let plan = FragmentPlan::new(model(), 3).unwrap();
        for bad in [0, 100, 25_601, MAX_PART_VALUES + 256] {
            assert_eq!(
                plan.clone().with_part_values(bad),
                Err(PlanError::BadPartValues(bad))
            );
        }
        let same = plan.clone().with_part_values(DEFAULT_PART_VALUES).unwrap();
        assert_eq!(same.fingerprint(), plan.fingerprint());
        let cut = plan.clone().with_part_values(25_600).unwrap();
        assert_ne!(cut.fingerprint(), plan.fingerprint());
    }

    /// Parts framed from a tensor encoded whole decode to exactly the whole tensor's frame, in
    /// every codec and with zstd; bytes of the wrong length are refused.
    #[test]
    fn parts_framed_from_whole_tensors_decode_to_the_whole_frame() {
        use atoll_wire::{decode_frame, encode, encode_frame, FrameLimits, ALL_CODECS};
        let plan = FragmentPlan::new(model(), 2)
            .unwrap()
            .with_part_values(25_600)
            .unwrap();
        let embedding = atoll_wire::synthetic_outer_gradient(64_000, 7);
        for codec in ALL_CODECS {
            for zstd_level in [0, 3] {
                let mut raw = Vec::new();
                encode(codec, &embedding, DEFAULT_BLOCK, &mut raw).unwrap();
                let frames = plan
                    .frame_parts(0, codec, &[raw.clone()], zstd_level)
                    .unwrap();
                assert_eq!(frames.len(), 3);
                let parts = frames
                    .iter()
                    .map(|f| decode_frame(f, FrameLimits::default()).unwrap().values)
                    .collect();
                let whole =
                    encode_frame(codec, DEFAULT_BLOCK as u32, &[64_000], &embedding, 0).unwrap();
                let whole = decode_frame(&whole, FrameLimits::default()).unwrap().values;
                assert_eq!(plan.join_parts(0, parts).unwrap(), vec![whole], "{codec:?}");
                raw.pop();
                assert!(plan.frame_parts(0, codec, &[raw], zstd_level).is_err());
            }
        }
    }

    /// Over tensor sizes around the block and the part size (empty, one value, exact multiples,
    /// one past), the parts cover each tensor once, in order, none longer than the part size and
    /// each starting on a block; split and joined, and framed in e3m0 and decoded, every tensor
    /// comes back as its whole frame gives it.
    #[test]
    fn parts_cover_every_tensor_once_whatever_its_size() {
        use atoll_wire::{decode_frame, encode, encode_frame, FrameLimits};
        let sizes = [0u64, 1, 255, 256, 257, 511, 512, 513, 1000, 1024, 1025];
        for part_values in [256u64, 512, 1024] {
            let tensors: Vec<TensorInfo> = sizes
                .iter()
                .map(|&n| TensorInfo::new(format!("model.layers.0.t{n}.weight"), &[n]))
                .collect();
            let plan = FragmentPlan::new(tensors, 1)
                .unwrap()
                .with_part_values(part_values)
                .unwrap();
            let spans = plan.part_spans(0);
            let values: Vec<Vec<f32>> = plan
                .fragment_shapes(0)
                .iter()
                .map(|&n| atoll_wire::synthetic_outer_gradient(n as usize, n))
                .collect();
            for (k, tensor) in values.iter().enumerate() {
                let mine: Vec<&PartSpan> = spans.iter().filter(|s| s.tensor == k).collect();
                let mut next = 0;
                for s in &mine {
                    assert_eq!(s.start, next, "contiguous");
                    assert!(s.len() as u64 <= part_values);
                    assert_eq!(s.start % DEFAULT_BLOCK, 0, "starts on a block");
                    next = s.end;
                }
                assert_eq!(next, tensor.len(), "covers the tensor");
                assert_eq!(
                    mine.len(),
                    tensor.len().div_ceil(part_values as usize).max(1)
                );
            }
            let parts: Vec<Vec<f32>> = spans
                .iter()
                .map(|s| values[s.tensor][s.start..s.end].to_vec())
                .collect();
            assert_eq!(plan.join_parts(0, parts).unwrap(), values);
            let encoded: Vec<Vec<u8>> = values
                .iter()
                .map(|v| {
                    let mut raw = Vec::new();
                    encode(Codec::E3M0, v, DEFAULT_BLOCK, &mut raw).unwrap();
                    raw
                })
                .collect();
            let frames = plan.frame_parts(0, Codec::E3M0, &encoded, 0).unwrap();
            let decoded = frames
                .iter()
                .map(|f| decode_frame(f, FrameLimits::default()).unwrap().values)
                .collect();
            let whole: Vec<Vec<f32>> = values
                .iter()
                .map(|v| {
                    let n = [v.len() as u64];
                    let f = encode_frame(Codec::E3M0, DEFAULT_BLOCK as u32, &n, v, 0).unwrap();
                    decode_frame(&f, FrameLimits::default()).unwrap().values
                })
                .collect();
            assert_eq!(plan.join_parts(0, decoded).unwrap(), whole, "{part_values}");
        }
    }
}
