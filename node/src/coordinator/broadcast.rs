//! Fragments going down to the learners: encoded updates after a merge, full values for a
//! catch-up, with at most a few sends in flight per learner.

use super::Core;
use crate::parts::send_part;
use anyhow::{anyhow, Result};
use atoll_coordinator::{EncodedUpdate, FragmentPlan, FragmentValues, LearnerId, PartSpan};
use atoll_link::data::HEADER_LEN;
use atoll_link::{PartHeader, PartKind};
use atoll_wire::{encode_frame, Codec, DEFAULT_BLOCK};
use bytes::Bytes;

impl Core {
    /// Fragment sends in flight to one learner at most.
    pub(super) fn down_permits(&self) -> usize {
        4 * self.plan.len().max(1)
    }

    /// Sends fragment `p` at `version` to a learner: the encoded update when it holds the base,
    /// the full f32 values otherwise. A learner already holding too much in flight is skipped
    /// (and gets the full fragment next time) rather than buffered without bound.
    pub(super) fn send_fragment(&mut self, learner: LearnerId, p: usize, version: u64, full: bool) {
        let Some(m) = self.members.get_mut(&learner) else {
            return;
        };
        m.conns.retain(|c| c.close_reason().is_none());
        if m.conns.is_empty() {
            m.sent[p] = None;
            return;
        }
        let Ok(permit) = m.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(
                "learner {learner}'s down link is saturated: fragment {p} v{version} skipped"
            );
            m.sent[p] = None;
            return;
        };
        let (kind, base, frames) = match self.syncer.broadcast_update(p, version) {
            Some(u) if !full && m.sent[p] == Some(u.base_version) => match frame_update_once(
                &mut self.framed_updates[p],
                &self.plan,
                p,
                version,
                u,
                self.zstd_level,
            ) {
                Ok(f) => (PartKind::Update, u.base_version, DownFrames::Ready(f)),
                Err(e) => {
                    tracing::error!("encoding fragment {p} for learner {learner}: {e}");
                    return;
                }
            },
            // A full fragment is framed in the send task, a part at a time: at 12B a learner's
            // catch-up is 48 GB of f32, which neither this actor's time nor the coordinator's
            // memory could take at once.
            _ => (
                PartKind::Full,
                version,
                DownFrames::Full(self.syncer.fragment_values(p), self.plan.part_spans(p)),
            ),
        };
        m.sent[p] = Some(version);
        let conns = m.conns.clone();
        let parts = frames.len() as u32;
        let bytes_down =
            metrics::counter!("atoll_bytes_down_total", "learner" => learner.to_string());
        tokio::spawn(async move {
            let _permit = permit;
            let mut streams = Vec::with_capacity(parts as usize);
            let mut frames = frames.into_stream();
            for k in 0..parts as usize {
                let frame = match frames.next().await {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::error!("encoding fragment {p} for learner {learner}: {e}");
                        return;
                    }
                };
                bytes_down.increment((frame.len() + HEADER_LEN) as u64);
                let header = PartHeader {
                    kind,
                    fragment: p as u32,
                    round_or_version: version,
                    base_version: base,
                    steps: 0,
                    tokens: 0,
                    part: k as u32,
                    parts,
                    frame_len: frame.len() as u32,
                };
                let conn = &conns[k % conns.len()];
                match send_part(conn, &header, frame).await {
                    Ok(stream) => streams.push(stream),
                    Err(e) => {
                        tracing::debug!("sending fragment {p} to learner {learner}: {e}");
                        return;
                    }
                }
            }
            // Hold the permit until the learner has acknowledged every part: the coordinator
            // reads "no permit out" as "nothing still travelling" before it exits.
            for stream in streams {
                let _ = stream.stopped().await;
            }
        });
    }
}

/// What one send carries down: frames already made (an update's, shared by every learner), or a
/// fragment's full values with the plan's parts, framed as they go.
enum DownFrames {
    Ready(Vec<Bytes>),
    Full(FragmentValues, Vec<PartSpan>),
}

impl DownFrames {
    fn len(&self) -> usize {
        match self {
            DownFrames::Ready(frames) => frames.len(),
            DownFrames::Full(_, spans) => spans.len(),
        }
    }

    fn into_stream(self) -> FrameStream {
        FrameStream {
            frames: self,
            next: 0,
            framing: None,
        }
    }
}

/// Hands out a send's frames in part order. Full values are framed on the blocking pool, the
/// next part while the current one is sent, so at most two framed parts per send exist.
struct FrameStream {
    frames: DownFrames,
    next: usize,
    /// The framing of part `next`, started while the one before was sent.
    framing: Option<tokio::task::JoinHandle<Result<Bytes>>>,
}

impl FrameStream {
    async fn next(&mut self) -> Result<Bytes> {
        let k = self.next;
        self.next += 1;
        let (values, spans) = match &self.frames {
            DownFrames::Ready(frames) => return Ok(frames[k].clone()),
            DownFrames::Full(values, spans) => (values, spans),
        };
        let frame_full = |k: usize| {
            let (values, span) = (values.clone(), spans[k]);
            tokio::task::spawn_blocking(move || -> Result<Bytes> {
                let run = &values[span.tensor][span.start..span.end];
                let frame = encode_frame(
                    Codec::F32,
                    DEFAULT_BLOCK as u32,
                    &[span.len() as u64],
                    run,
                    0,
                )?;
                Ok(Bytes::from(frame))
            })
        };
        let current = match self.framing.take() {
            Some(handle) => handle,
            None => frame_full(k),
        };
        if k + 1 < spans.len() {
            self.framing = Some(frame_full(k + 1));
        }
        current
            .await
            .map_err(|e| anyhow!("framing part {k}: {e}"))?
    }
}

/// The wire frames of an encoded update, framed (and compressed) on the first send of `version`
/// and shared by every later one, which `slot` keeps. A merge frames its update on its own
/// thread and fills the slot before its broadcast (`rounds.rs`), so this frames only an update
/// whose frames were not kept.
fn frame_update_once(
    slot: &mut Option<(u64, Vec<Bytes>)>,
    plan: &FragmentPlan,
    p: usize,
    version: u64,
    update: &EncodedUpdate,
    zstd_level: i32,
) -> Result<Vec<Bytes>, atoll_wire::WireError> {
    if let Some((v, frames)) = slot {
        if *v == version {
            return Ok(frames.clone());
        }
    }
    let frames = frame_update(plan, p, update.codec, &update.tensors, zstd_level)?;
    *slot = Some((version, frames.clone()));
    Ok(frames)
}

/// Fragment `p`'s encoded update as wire frames, one per part of the plan (compressed at
/// `zstd_level`), on every core.
pub(super) fn frame_update(
    plan: &FragmentPlan,
    p: usize,
    codec: Codec,
    tensors: &[Vec<u8>],
    zstd_level: i32,
) -> Result<Vec<Bytes>, atoll_wire::WireError> {
    let frames = plan.frame_parts(p, codec, tensors, zstd_level)?;
    Ok(frames.into_iter().map(Bytes::from).collect())
}
