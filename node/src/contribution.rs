//! A learner's contributions, encoded off its training thread.
//!
//! When a pull arrives the training thread takes the fragment's values (it keeps them anyway,
//! for `apply: rebase`) and hands them over with the anchor, both shared rather than copied.
//! Everything else, Δ = anchor − local, the codec through its error feedback, framing and zstd,
//! is several passes over what at 12B scale is billions of values per fragment. A thread of its
//! own does that, one contribution after another in the order they were handed over, while the
//! training thread goes on to its next step. It owns the error-feedback state, which nothing
//! else reads.

use anyhow::{anyhow, Result};
use atoll_coordinator::FragmentValues;
use atoll_wire::{encode_frame, frame_encoded, Codec, ErrorFeedback, DEFAULT_BLOCK};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// How contributions go on the wire (the recipe's `sync.codec`, `sync.error_feedback` and
/// `sync.zstd_level`).
#[derive(Clone, Copy, Debug)]
pub struct Wire {
    pub codec: Codec,
    pub error_feedback: bool,
    pub zstd_level: i32,
}

/// One wire frame per tensor of a contribution: Δ = anchor − local, encoded through the tensor's
/// error feedback where `wire` asks for it. Tensors are independent, so they are encoded on every
/// core.
pub fn contribution_frames(
    wire: Wire,
    anchor: &[Vec<f32>],
    local: &[Vec<f32>],
    feedback: &mut [ErrorFeedback],
) -> Result<Vec<Vec<u8>>> {
    let work: Vec<_> = anchor.iter().zip(local).zip(feedback.iter_mut()).collect();
    let threads = atoll_coordinator::parallel::available_threads();
    atoll_coordinator::parallel::map(work, threads, |((anchor, values), feedback)| {
        let delta: Vec<f32> = anchor.iter().zip(values).map(|(a, x)| a - x).collect();
        let shape = [delta.len() as u64];
        // With error feedback the codec's bytes come from the feedback state (which keeps what
        // they leave out); they are framed as they are rather than decoded and encoded again.
        if wire.error_feedback {
            let mut buf = Vec::new();
            feedback.encode(wire.codec, &delta, DEFAULT_BLOCK, &mut buf)?;
            frame_encoded(
                wire.codec,
                DEFAULT_BLOCK as u32,
                &shape,
                buf,
                wire.zstd_level,
            )
        } else {
            encode_frame(
                wire.codec,
                DEFAULT_BLOCK as u32,
                &shape,
                &delta,
                wire.zstd_level,
            )
        }
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
    jobs: Option<mpsc::Sender<Job<T>>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> ContributionEncoder<T> {
    /// `fragment_tensors[p]`: how many tensors fragment p has (one error-feedback state each).
    pub fn start(
        wire: Wire,
        fragment_tensors: &[usize],
        mut sink: impl FnMut(T, Result<Vec<Vec<u8>>>) + Send + 'static,
    ) -> Result<Self> {
        let mut feedback: Vec<Vec<ErrorFeedback>> = fragment_tensors
            .iter()
            .map(|&n| vec![ErrorFeedback::default(); n])
            .collect();
        let (jobs, queue) = mpsc::channel::<Job<T>>();
        let thread = std::thread::Builder::new()
            .name("atoll-encoder".into())
            .spawn(move || {
                for job in queue {
                    let tensors = job.local.len();
                    let frames = match feedback.get_mut(job.fragment) {
                        Some(states) if states.len() == tensors && job.anchor.len() == tensors => {
                            contribution_frames(wire, &job.anchor, &job.local, states)
                        }
                        _ => Err(anyhow!(
                            "a contribution to fragment {} with {tensors} tensors does not fit the plan",
                            job.fragment,
                        )),
                    };
                    sink(job.tag, frames);
                }
            })?;
        Ok(ContributionEncoder {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues fragment `fragment`'s contribution, Δ = `anchor` − `local`; returns at once.
    pub fn submit(
        &self,
        fragment: usize,
        anchor: FragmentValues,
        local: FragmentValues,
        tag: T,
    ) -> Result<()> {
        self.jobs
            .as_ref()
            .ok_or_else(|| anyhow!("the contribution encoder has stopped"))?
            .send(Job {
                fragment,
                anchor,
                local,
                tag,
            })
            .map_err(|_| anyhow!("the contribution encoder has stopped"))
    }
}

impl<T: Send + 'static> Drop for ContributionEncoder<T> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn values(seed: u32, sizes: &[usize]) -> Vec<Vec<f32>> {
        sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (0..n)
                    .map(|i| {
                        let x = (i as u32)
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(seed * 97 + t as u32);
                        (x % 2001) as f32 / 1000.0 - 1.0
                    })
                    .collect()
            })
            .collect()
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
        let tensors = [vec![300, 1000], vec![700]];
        let jobs = [(0usize, 1u32), (1, 2), (0, 3), (0, 4), (1, 5)];
        let (tx, rx) = std::sync::mpsc::channel();
        let encoder = ContributionEncoder::start(wire, &[2, 1], move |tag: u32, frames| {
            tx.send((tag, frames.expect("encodes")))
                .expect("test receives");
        })
        .expect("starts");
        for &(p, seed) in &jobs {
            let (anchor, local) = (values(seed, &tensors[p]), values(seed + 100, &tensors[p]));
            encoder
                .submit(p, Arc::new(anchor), Arc::new(local), seed)
                .expect("queued");
        }
        drop(encoder);
        let got: Vec<(u32, Vec<Vec<u8>>)> = rx.iter().collect();

        let mut feedback = [
            vec![ErrorFeedback::default(); 2],
            vec![ErrorFeedback::default(); 1],
        ];
        let want: Vec<(u32, Vec<Vec<u8>>)> = jobs
            .iter()
            .map(|&(p, seed)| {
                let (anchor, local) = (values(seed, &tensors[p]), values(seed + 100, &tensors[p]));
                let frames = contribution_frames(wire, &anchor, &local, &mut feedback[p]);
                (seed, frames.expect("encodes"))
            })
            .collect();
        assert_eq!(got, want);
        // The carried feedback matters: fragment 0's second contribution differs from a fresh
        // state's encoding of the same Δ.
        let fresh = contribution_frames(
            wire,
            &values(3, &tensors[0]),
            &values(103, &tensors[0]),
            &mut vec![ErrorFeedback::default(); 2],
        )
        .expect("encodes");
        assert_ne!(fresh, want[2].1);
    }

    #[test]
    fn a_contribution_that_does_not_fit_the_plan_is_an_error() {
        let wire = Wire {
            codec: Codec::E3M0,
            error_feedback: false,
            zstd_level: 0,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let encoder = ContributionEncoder::start(wire, &[1], move |_: (), frames| {
            tx.send(frames.map(|f| f.len())).expect("test receives");
        })
        .expect("starts");
        let shared = |sizes: &[usize]| Arc::new(values(1, sizes));
        encoder
            .submit(0, shared(&[10, 10]), shared(&[10, 10]), ())
            .expect("queued");
        encoder
            .submit(3, shared(&[10]), shared(&[10]), ())
            .expect("queued");
        encoder
            .submit(0, shared(&[10]), shared(&[10]), ())
            .expect("queued");
        drop(encoder);
        let results: Vec<_> = rx.iter().collect();
        assert!(results[0].is_err() && results[1].is_err());
        assert_eq!(results[2].as_ref().ok(), Some(&1));
    }
}
