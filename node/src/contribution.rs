//! A learner's contributions, encoded off its training thread.
//!
//! When a pull arrives the training thread takes the fragment's values (it keeps them anyway,
//! for `apply: rebase`) and hands them over with the anchor, both shared rather than copied.
//! Everything else, Δ = anchor − local, the codec through its error feedback, framing and zstd,
//! is several passes over what at 12B scale is billions of values per fragment. A thread of its
//! own does that, one contribution after another in the order they were handed over, while the
//! training thread goes on to its next step. It owns the error-feedback state, which nothing
//! else reads.

use crate::serial_worker::SerialWorker;
use anyhow::{anyhow, Result};
use atoll_coordinator::{FragmentPlan, FragmentValues};
use atoll_wire::{encode, frame_encoded, Codec, ErrorFeedback, DEFAULT_BLOCK};

/// How contributions go on the wire (the recipe's `sync.codec`, `sync.error_feedback` and
/// `sync.zstd_level`).
#[derive(Clone, Copy, Debug)]
pub struct Wire {
    pub codec: Codec,
    pub error_feedback: bool,
    pub zstd_level: i32,
}

/// The wire frames of fragment `p`'s contribution, one per part of the plan
/// ([`FragmentPlan::part_spans`]): Δ = anchor − local over the part's run of values, encoded
/// through the part's error feedback where `wire` asks for it. Parts are independent (error
/// feedback is per value, and a part is a run of whole codec blocks, so the frames are those of
/// the whole tensor cut at block boundaries), so they are encoded on every core: a 12B
/// embedding's 15 parts no longer go through one.
pub fn contribution_frames(
    wire: Wire,
    plan: &FragmentPlan,
    p: usize,
    anchor: &[Vec<f32>],
    local: &[Vec<f32>],
    feedback: &mut [ErrorFeedback],
) -> Result<Vec<Vec<u8>>> {
    let shapes = plan.fragment_shapes(p);
    let fits = |values: &[Vec<f32>]| {
        values.len() == shapes.len()
            && values
                .iter()
                .zip(&shapes)
                .all(|(v, &n)| v.len() as u64 == n)
    };
    let spans = plan.part_spans(p);
    if !fits(anchor) || !fits(local) || feedback.len() != spans.len() {
        return Err(anyhow!(
            "a contribution to fragment {p} does not fit the plan's {} tensors ({} parts)",
            shapes.len(),
            spans.len()
        ));
    }
    let work: Vec<_> = spans.into_iter().zip(feedback.iter_mut()).collect();
    let threads = atoll_coordinator::parallel::available_threads();
    atoll_coordinator::parallel::map(work, threads, |(span, feedback)| {
        let (a, x) = (
            &anchor[span.tensor][span.start..span.end],
            &local[span.tensor][span.start..span.end],
        );
        let delta: Vec<f32> = a.iter().zip(x).map(|(a, x)| a - x).collect();
        // With error feedback the codec's bytes come from the feedback state (which keeps what
        // they leave out); they are framed as they are rather than decoded and encoded again.
        let mut raw = Vec::new();
        if wire.error_feedback {
            feedback.encode(wire.codec, &delta, DEFAULT_BLOCK, &mut raw)?;
        } else {
            encode(wire.codec, &delta, DEFAULT_BLOCK, &mut raw)?;
        }
        drop(delta);
        frame_encoded(
            wire.codec,
            DEFAULT_BLOCK as u32,
            &[span.len() as u64],
            &raw,
            wire.zstd_level,
        )
    })
    .into_iter()
    .map(|frame| frame.map_err(anyhow::Error::from))
    .collect()
}

/// A fragment's anchor and local values to encode the Δ of, with what the caller needs to send
/// its frames (`tag`).
struct Job<T> {
    fragment: usize,
    anchor: FragmentValues,
    local: FragmentValues,
    tag: T,
}

/// The encoding thread. Each submitted contribution's frames (or the error that stopped them)
/// reach `sink` on that thread, in the order the contributions were submitted. Dropping it
/// finishes the contributions already submitted and ends the thread.
pub struct ContributionEncoder<T: Send + 'static> {
    worker: SerialWorker<Job<T>>,
}

impl<T: Send + 'static> ContributionEncoder<T> {
    /// Frames contributions to `plan`'s fragments (one error-feedback state per part).
    pub fn start(
        wire: Wire,
        plan: FragmentPlan,
        mut sink: impl FnMut(T, Result<Vec<Vec<u8>>>) + Send + 'static,
    ) -> Result<Self> {
        let mut feedback: Vec<Vec<ErrorFeedback>> = (0..plan.len())
            .map(|p| vec![ErrorFeedback::default(); plan.part_count(p)])
            .collect();
        let worker = SerialWorker::start("atoll-encoder", move |job: Job<T>| {
            let frames = match feedback.get_mut(job.fragment) {
                Some(states) => {
                    contribution_frames(wire, &plan, job.fragment, &job.anchor, &job.local, states)
                }
                None => Err(anyhow!(
                    "a contribution to fragment {}, which the plan does not have",
                    job.fragment,
                )),
            };
            sink(job.tag, frames);
        })?;
        Ok(ContributionEncoder { worker })
    }

    /// Queues fragment `fragment`'s contribution, Δ = `anchor` − `local`; returns at once.
    pub fn submit(
        &self,
        fragment: usize,
        anchor: FragmentValues,
        local: FragmentValues,
        tag: T,
    ) -> Result<()> {
        let job = Job {
            fragment,
            anchor,
            local,
            tag,
        };
        if !self.worker.send(job) {
            return Err(anyhow!("the contribution encoder has stopped"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_coordinator::TensorInfo;
    use atoll_wire::{decode_frame, FrameLimits};
    use std::sync::Arc;

    fn values(seed: u32, sizes: &[u64]) -> Vec<Vec<f32>> {
        sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (0..n as u32)
                    .map(|i| {
                        let x = i
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(seed * 97 + t as u32);
                        (x % 2001) as f32 / 1000.0 - 1.0
                    })
                    .collect()
            })
            .collect()
    }

    /// Two fragments over tensors of 1000, 700 and 300 values, cut into parts of 256 values.
    fn plan() -> FragmentPlan {
        let tensors = [("a", 1000), ("b", 700), ("c", 300)]
            .map(|(name, n)| TensorInfo::new(name, &[n]))
            .to_vec();
        FragmentPlan::new(tensors, 2)
            .unwrap()
            .with_part_values(256)
            .unwrap()
    }

    /// The thread gives, in submission order, exactly the frames the same contributions encoded
    /// one after another on the caller's thread give, error feedback carried from one
    /// contribution of a fragment to the next (so a lost or reordered state would change bytes).
    #[test]
    fn frames_come_back_in_order_and_equal_to_encoding_in_place() {
        let wire = Wire {
            codec: Codec::Int2,
            error_feedback: true,
            zstd_level: 1,
        };
        let plan = plan();
        let shapes = [plan.fragment_shapes(0), plan.fragment_shapes(1)];
        let jobs = [(0usize, 1u32), (1, 2), (0, 3), (0, 4), (1, 5)];
        let (tx, rx) = std::sync::mpsc::channel();
        let encoder = ContributionEncoder::start(wire, plan.clone(), move |tag: u32, frames| {
            tx.send((tag, frames.expect("encodes")))
                .expect("test receives");
        })
        .expect("starts");
        for &(p, seed) in &jobs {
            let (anchor, local) = (values(seed, &shapes[p]), values(seed + 100, &shapes[p]));
            encoder
                .submit(p, Arc::new(anchor), Arc::new(local), seed)
                .expect("queued");
        }
        drop(encoder);
        let got: Vec<(u32, Vec<Vec<u8>>)> = rx.iter().collect();

        let mut feedback = [0, 1].map(|p| vec![ErrorFeedback::default(); plan.part_spans(p).len()]);
        let want: Vec<(u32, Vec<Vec<u8>>)> = jobs
            .iter()
            .map(|&(p, seed)| {
                let (anchor, local) = (values(seed, &shapes[p]), values(seed + 100, &shapes[p]));
                let frames = contribution_frames(wire, &plan, p, &anchor, &local, &mut feedback[p]);
                (seed, frames.expect("encodes"))
            })
            .collect();
        assert_eq!(got, want);
        // The carried feedback matters: fragment 0's second contribution differs from a fresh
        // state's encoding of the same Δ.
        let fresh = contribution_frames(
            wire,
            &plan,
            0,
            &values(3, &shapes[0]),
            &values(103, &shapes[0]),
            &mut vec![ErrorFeedback::default(); plan.part_spans(0).len()],
        )
        .expect("encodes");
        assert_ne!(fresh, want[2].1);
    }

    /// A contribution travels as one frame per part, and the parts decode to the Δ the whole
    /// tensors' frames give (e3m0 rounds per block, and a part is a run of whole blocks).
    #[test]
    fn a_contribution_is_framed_part_by_part() {
        let wire = Wire {
            codec: Codec::E3M0,
            error_feedback: false,
            zstd_level: 0,
        };
        let plan = plan();
        for p in 0..plan.len() {
            let shapes = plan.fragment_shapes(p);
            let (anchor, local) = (values(1, &shapes), values(2, &shapes));
            let mut feedback = vec![ErrorFeedback::default(); plan.part_spans(p).len()];
            let frames = contribution_frames(wire, &plan, p, &anchor, &local, &mut feedback)
                .expect("encodes");
            assert_eq!(frames.len(), plan.part_spans(p).len());
            let parts = frames
                .iter()
                .map(|f| decode_frame(f, FrameLimits::default()).unwrap().values)
                .collect();
            let joined = plan.join_parts(p, parts).expect("parts fit the plan");
            for (k, tensor) in joined.iter().enumerate() {
                let delta: Vec<f32> = anchor[k]
                    .iter()
                    .zip(&local[k])
                    .map(|(a, x)| a - x)
                    .collect();
                let whole = atoll_wire::encode_frame(
                    Codec::E3M0,
                    DEFAULT_BLOCK as u32,
                    &[shapes[k]],
                    &delta,
                    0,
                )
                .unwrap();
                assert_eq!(
                    tensor,
                    &decode_frame(&whole, FrameLimits::default()).unwrap().values
                );
            }
        }
    }

    /// Error feedback kept per part gives, contribution after contribution, the frames of the
    /// whole tensor's feedback cut at block boundaries: parts change where the encoding runs,
    /// not what it sends.
    #[test]
    fn per_part_feedback_equals_whole_tensor_feedback_cut_into_parts() {
        let wire = Wire {
            codec: Codec::Int2,
            error_feedback: true,
            zstd_level: 3,
        };
        let plan = plan();
        for p in 0..plan.len() {
            let shapes = plan.fragment_shapes(p);
            let mut per_part = vec![ErrorFeedback::default(); plan.part_spans(p).len()];
            let mut per_tensor = vec![ErrorFeedback::default(); shapes.len()];
            for seed in 1..4 {
                let (anchor, local) = (values(seed, &shapes), values(seed + 10, &shapes));
                let got = contribution_frames(wire, &plan, p, &anchor, &local, &mut per_part)
                    .expect("encodes");
                let raws: Vec<Vec<u8>> = anchor
                    .iter()
                    .zip(&local)
                    .zip(&mut per_tensor)
                    .map(|((a, x), feedback)| {
                        let delta: Vec<f32> = a.iter().zip(x).map(|(a, x)| a - x).collect();
                        let mut raw = Vec::new();
                        feedback
                            .encode(wire.codec, &delta, DEFAULT_BLOCK, &mut raw)
                            .unwrap();
                        raw
                    })
                    .collect();
                let want = plan
                    .frame_parts(p, wire.codec, &raws, wire.zstd_level)
                    .unwrap();
                assert_eq!(got, want, "fragment {p}, contribution {seed}");
            }
        }
    }

    #[test]
    fn a_contribution_that_does_not_fit_the_plan_is_an_error() {
        let wire = Wire {
            codec: Codec::E3M0,
            error_feedback: false,
            zstd_level: 0,
        };
        let plan = plan();
        let shapes = plan.fragment_shapes(0);
        let (tx, rx) = std::sync::mpsc::channel();
        let encoder = ContributionEncoder::start(wire, plan, move |_: (), frames| {
            tx.send(frames.map(|f| f.len())).expect("test receives");
        })
        .expect("starts");
        let shared = |sizes: &[u64]| Arc::new(values(1, sizes));
        encoder
            .submit(0, shared(&[10, 10]), shared(&[10, 10]), ())
            .expect("queued");
        encoder
            .submit(3, shared(&[10]), shared(&[10]), ())
            .expect("queued");
        encoder
            .submit(0, shared(&[10]), shared(&[10]), ())
            .expect("queued");
        encoder
            .submit(0, shared(&shapes), shared(&shapes), ())
            .expect("queued");
        drop(encoder);
        let results: Vec<_> = rx.iter().collect();
        assert!(results[0].is_err() && results[1].is_err() && results[2].is_err());
        assert_eq!(results[3].as_ref().ok(), Some(&4));
    }
}
