//! Moving data-plane parts over a QUIC connection, the same way on both ends: one part per
//! unidirectional stream, sent by [`send_part`] and received by [`receive_parts`].

use anyhow::{anyhow, Result};
use atoll_coordinator::{all_finite, FragmentPlan};
use atoll_link::data::HEADER_LEN;
use atoll_link::PartHeader;
use atoll_wire::{decode_frame, Codec, FrameLimits, DEFAULT_BLOCK};
use bytes::Bytes;
use tokio::sync::mpsc;

/// A received part.
#[derive(Debug)]
pub struct ReceivedPart {
    pub header: PartHeader,
    pub values: Vec<f32>,
    /// Whether every value is finite, checked right after decoding (on the blocking pool for
    /// large frames) where the receiver asks for it, so the coordinator's actor does not read a
    /// contribution once more to admit it; `true` where it does not (a learner's broadcasts come
    /// from a syncer that admits nothing else).
    pub finite: bool,
    /// The bytes it took on the wire (header and frame).
    pub wire_bytes: u64,
}

/// Parts decoded but not yet taken by the consumer; past this, the readers stop reading and
/// QUIC flow control slows the sender down.
const RECEIVED_QUEUE: usize = 64;

/// Frames from this size on are decoded on the blocking pool rather than on a runtime thread
/// (an e3m0 frame of that size holds half a million values, about 0.2 ms of decoding; smaller
/// ones are not worth the hand-over).
const DECODE_OFF_RUNTIME_BYTES: usize = 256 * 1024;

/// The largest frame the data plane accepts for a plan whose largest part holds `largest_part`
/// values: that part as f32 (the widest codec, and what a full fragment travels as), plus what
/// zstd may add to incompressible bytes (under 1/128) and the frame's header; never below 1 GiB.
fn frame_limit(largest_part: u64) -> u64 {
    largest_frame(Codec::F32, largest_part, 1 << 20).max(1 << 30)
}

/// The largest frame `values` values can make in `codec`: the codec's bytes, what zstd may add
/// to incompressible bytes (under 1/128), and `header` bytes for the frame's header.
fn largest_frame(codec: Codec, values: u64, header: u64) -> u64 {
    let bytes = codec.encoded_len(values as usize, DEFAULT_BLOCK) as u64;
    bytes + bytes / 128 + header
}

/// The frame limit of a learner or coordinator of `plan`: `configured`, or what the plan's
/// largest part needs ([`frame_limit`]). Parts hold at most
/// [`atoll_coordinator::plan::MAX_PART_VALUES`] values, so every frame's length fits the part
/// header's 32 bits.
pub fn frame_limit_for(plan: &FragmentPlan, configured: Option<u64>) -> u64 {
    configured.unwrap_or_else(|| frame_limit(plan.largest_part().1))
}

/// Refuses a configured frame limit below what the plan's largest part can make in `codec` (what
/// learners send up): every contribution to that fragment would be refused as bad data.
pub fn check_contribution_limit(plan: &FragmentPlan, codec: Codec, limit: u64) -> Result<()> {
    let (_, values) = plan.largest_part();
    // A frame's header is under 100 bytes.
    let needed = largest_frame(codec, values, 4096);
    if limit < needed {
        return Err(anyhow!(
            "a frame limit of {} MiB is below the {} MiB the largest contribution part needs \
             ({values} values in {}, with zstd's worst case): raise --max-frame-mib or lower \
             sync.link.part_values",
            limit >> 20,
            needed.div_ceil(1 << 20),
            codec.name()
        ));
    }
    Ok(())
}

/// Sends one part on a stream of its own and finishes it; the returned stream can be awaited
/// (`stopped`) for the peer's acknowledgement. The frame is handed to QUIC as it is, not copied
/// into the stream's send buffer; a frame sent to several peers is shared, not cloned.
pub async fn send_part(
    conn: &quinn::Connection,
    header: &PartHeader,
    frame: Bytes,
) -> Result<quinn::SendStream> {
    // A frame past the header's 32-bit length would arrive cut; the plan's parts are far
    // smaller, so this catches a caller's mistake.
    if header.frame_len as usize != frame.len() {
        return Err(anyhow!(
            "part header gives {} bytes but the frame has {} (a part holds at most {} bytes)",
            header.frame_len,
            frame.len(),
            u32::MAX
        ));
    }
    let mut s = conn.open_uni().await?;
    let mut chunks = [Bytes::copy_from_slice(&header.encode()), frame];
    s.write_all_chunks(&mut chunks).await?;
    s.finish()?;
    Ok(s)
}

/// Receives every part the peer sends on `conn` until the connection closes. Each stream is
/// read by a task of its own: read one after another, the streams not yet read would keep
/// their buffered bytes, and once those fill the connection's flow-control window the stream
/// being read can never receive the rest of its data, so the connection stalls for good.
///
/// An `Err` is a malformed part (the peer's fault); a connection that closes mid-part is not
/// reported.
pub fn receive_parts(
    conn: quinn::Connection,
    max_frame: u64,
    check_finite: bool,
) -> mpsc::Receiver<Result<ReceivedPart>> {
    let (tx, rx) = mpsc::channel(RECEIVED_QUEUE);
    tokio::spawn(async move {
        loop {
            let recv = tokio::select! {
                r = conn.accept_uni() => r,
                _ = tx.closed() => return,
            };
            let Ok(mut recv) = recv else {
                return; // closed by the peer or timed out
            };
            let tx = tx.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                let result = match read_part(&mut recv, max_frame, check_finite).await {
                    Ok(Some(part)) => Ok(part),
                    Ok(None) => return,
                    Err(_) if conn.close_reason().is_some() => return,
                    Err(e) => Err(e),
                };
                let _ = tx.send(result).await;
            });
        }
    });
    rx
}

/// Bytes of a frame that must arrive before its receive buffer is sized to the header's length.
const TRUST_FRAME_LEN_AFTER: usize = 64 << 20;

/// Makes room in `frame` for `incoming` more bytes of a frame of `len`. Below
/// [`TRUST_FRAME_LEN_AFTER`] received bytes the buffer grows by doubling, so a header that claims
/// gigabytes costs memory only as its bytes arrive; past it, the peer has shown it sends a large
/// frame and the buffer takes exactly `len` at once. A 12B embedding's 4 GB catch-up frame then
/// holds 4 GB plus one 64 MiB copy, rather than doubling to 4 GiB through 2 GiB (6 GiB at once
/// and 4 GB copied on the way).
fn reserve_frame(frame: &mut Vec<u8>, len: usize, incoming: usize) {
    let needed = frame.len() + incoming;
    if needed <= frame.capacity() {
        return;
    }
    let target = if frame.len() >= TRUST_FRAME_LEN_AFTER {
        len
    } else {
        (2 * frame.capacity()).min(len)
    };
    frame.reserve_exact(target.max(needed) - frame.len());
}

/// Reads one part (header then frame) from a stream, checking both before trusting them.
/// Memory grows with the bytes that actually arrived (up to [`TRUST_FRAME_LEN_AFTER`]), not with
/// the length the header claims.
async fn read_part(
    recv: &mut quinn::RecvStream,
    max_frame: u64,
    check_finite: bool,
) -> Result<Option<ReceivedPart>> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(anyhow!("truncated part header: {e}")),
    }
    let h = PartHeader::decode(&header, max_frame)?;
    let len = h.frame_len as usize;
    let mut frame = Vec::with_capacity(len.min(1 << 20));
    while frame.len() < len {
        match recv.read_chunk(len - frame.len(), true).await {
            Ok(Some(chunk)) => {
                reserve_frame(&mut frame, len, chunk.bytes.len());
                frame.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(anyhow!(
                    "truncated frame: {} of {len} bytes before the stream ended",
                    frame.len()
                ))
            }
            Err(e) => return Err(anyhow!("truncated frame: {e}")),
        }
    }
    // Decoding a large frame takes milliseconds of CPU; on a runtime thread it would hold up the
    // QUIC connections that thread drives (their acknowledgements and pacing).
    let decode = move || -> Result<(Vec<f32>, bool)> {
        let values = decode_frame(&frame, FrameLimits::default())?.values;
        let finite = !check_finite || all_finite(&values);
        Ok((values, finite))
    };
    let (values, finite) = if len >= DECODE_OFF_RUNTIME_BYTES {
        tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| anyhow!("decoding a part: {e}"))??
    } else {
        decode()?
    };
    Ok(Some(ReceivedPart {
        header: h,
        values,
        finite,
        wire_bytes: (HEADER_LEN + len) as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_link::quic::{client_endpoint, connect, server_endpoint};
    use atoll_link::{JobTls, LinkTuning, PartKind};
    use atoll_wire::{frame_encoded, Codec, DEFAULT_BLOCK};
    use std::time::Duration;

    /// Chunks of a frame arriving one after another: until 64 MiB have arrived the buffer at most
    /// doubles and never passes the frame's length; after, it is the frame's length exactly, and
    /// grows no more.
    #[test]
    fn a_frame_buffer_doubles_until_trusted_then_takes_the_frame_length() {
        let chunk = 1 << 20;
        for len in [3 * chunk + 5, 200 * chunk + 7] {
            let mut frame: Vec<u8> = Vec::with_capacity(len.min(chunk));
            let mut sizes = vec![frame.capacity()];
            let mut received = 0;
            while received < len {
                let n = chunk.min(len - received);
                reserve_frame(&mut frame, len, n);
                received += n;
                frame.resize(received, 0);
                if sizes.last() != Some(&frame.capacity()) {
                    sizes.push(frame.capacity());
                }
            }
            assert_eq!(frame.capacity(), len, "{sizes:?}");
            for pair in sizes.windows(2) {
                assert!(pair[1] <= 2 * pair[0] || pair[1] == len, "{len}: {sizes:?}");
            }
            if len > TRUST_FRAME_LEN_AFTER {
                // Doubling up to 64 MiB, then the whole frame: one step past the threshold.
                let past: Vec<_> = sizes
                    .iter()
                    .filter(|&&c| c > TRUST_FRAME_LEN_AFTER)
                    .collect();
                assert_eq!(past, vec![&len], "{sizes:?}");
            }
        }
    }

    /// Part `part` of `parts` of fragment 0's version 1, sent in full.
    fn full_part(part: u32, parts: u32, frame_len: u32) -> PartHeader {
        PartHeader {
            kind: PartKind::Full,
            fragment: 0,
            round_or_version: 1,
            base_version: 0,
            steps: 0,
            tokens: 0,
            part,
            parts,
            frame_len,
        }
    }

    /// Gemma 4 12B's tied embedding (262,144 × 3,840 values, 4 GB as f32) travels as 15 parts, and
    /// an embedding of Gemma 3 27B's shape (262,208 × 5,376, 5.6 GB, past a frame's 32-bit
    /// length) as 22: every part's f32 frame passes the limit derived from the plan and fits the
    /// header, with the default part size and with the largest a plan allows; a frame a byte
    /// past the limit is refused.
    #[test]
    fn the_largest_embeddings_travel_as_parts_within_the_frame_limit() {
        use atoll_coordinator::plan::{TensorInfo, MAX_PART_VALUES};
        let config = atoll_trainer::presets::preset("gemma4-12b").unwrap().config;
        let tensors = config
            .tensor_specs()
            .into_iter()
            .map(|s| {
                TensorInfo::new(
                    s.name,
                    &s.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(),
                )
            })
            .collect();
        let gemma_12b = FragmentPlan::new(tensors, 24).unwrap();
        assert_eq!(gemma_12b.largest_tensor(), 262_144 * 3_840);
        assert_eq!(gemma_12b.largest_part().0, 15);
        let gemma_27b_embedding = FragmentPlan::new(
            vec![
                TensorInfo::new("model.embed_tokens.weight", &[262_208, 5_376]),
                TensorInfo::new("model.norm.weight", &[5_376]),
            ],
            2,
        )
        .unwrap();
        assert_eq!(gemma_27b_embedding.largest_part().0, 22);
        // The f32 frame of a part: its values and the frame's header.
        let small = frame_encoded(Codec::F32, DEFAULT_BLOCK as u32, &[2, 3], &[0; 24], 0).unwrap();
        let f32_frame = |values: usize| (values * 4 + small.len() - 24) as u64;
        for plan in [gemma_12b, gemma_27b_embedding] {
            for plan in [
                plan.clone(),
                plan.with_part_values(MAX_PART_VALUES).unwrap(),
            ] {
                let limit = frame_limit_for(&plan, None);
                for p in 0..plan.len() {
                    for span in plan.part_spans(p) {
                        let frame_len = u32::try_from(f32_frame(span.len())).unwrap();
                        let header = full_part(0, 1, frame_len).encode();
                        assert!(PartHeader::decode(&header, limit).is_ok());
                    }
                }
                let past = full_part(0, 1, u32::try_from(limit + 1).unwrap()).encode();
                assert!(PartHeader::decode(&past, limit).is_err());
            }
        }
        // A small model keeps the floor.
        assert_eq!(frame_limit(1 << 20), 1 << 30);
    }

    /// A configured limit below the largest contribution part is refused, naming both ways
    /// out; the same limit passes once parts are small enough or the codec narrow enough.
    #[test]
    fn a_frame_limit_below_the_largest_contribution_part_is_refused() {
        use atoll_coordinator::plan::TensorInfo;
        let plan = FragmentPlan::new(
            vec![TensorInfo::new(
                "model.embed_tokens.weight",
                &[262_144, 3_840],
            )],
            1,
        )
        .unwrap();
        // 64 Mi values: 256 MiB as f32, 33 MiB in e3m0.
        let limit = 100 << 20;
        let err = check_contribution_limit(&plan, Codec::F32, limit)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("100 MiB")
                && err.contains("--max-frame-mib")
                && err.contains("part_values"),
            "{err}"
        );
        assert!(check_contribution_limit(&plan, Codec::E3M0, limit).is_ok());
        let small_parts = plan.with_part_values(16 << 20).unwrap();
        assert!(check_contribution_limit(&small_parts, Codec::F32, limit).is_ok());
    }

    /// Far more bytes in flight on many streams at once than the connection's flow-control
    /// window holds: every part must still arrive intact, and a NaN or an infinity in a part,
    /// small or large, is flagged with it.
    #[test]
    fn parts_larger_than_the_connection_window_all_arrive() {
        atoll_link::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = JobTls::load_or_create(dir.path(), "parts-test", &["127.0.0.1".into()]).unwrap();
        let ca = std::fs::read(&tls.ca_cert).unwrap();
        // The smallest windows the tuning allows: 1 MiB per stream, 2 MiB per connection.
        let tuning = LinkTuning {
            bandwidth_bps: 1e6,
            rtt: Duration::from_millis(1),
            ..LinkTuning::default()
        };
        const PARTS: usize = 24;
        const VALUES: usize = 128 * 1024; // 512 KiB of f32 per part, 12 MiB in all
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let loopback = "127.0.0.1:0".parse().unwrap();
            let server = server_endpoint(loopback, &tls, tuning).unwrap();
            let addr = server.local_addr().unwrap();
            let receiver = tokio::spawn(async move {
                let conn = server.accept().await.unwrap().await.unwrap();
                let mut parts = receive_parts(conn.clone(), 1 << 30, true);
                let mut got = Vec::new();
                while got.len() < PARTS {
                    got.push(parts.recv().await.unwrap().unwrap());
                }
                conn.close(0u32.into(), b"done");
                got
            });
            let client = client_endpoint(&ca, tuning, loopback).unwrap();
            let conn = connect(&client, addr).await.unwrap();
            let mut senders = Vec::new();
            for k in 0..PARTS {
                let conn = conn.clone();
                senders.push(tokio::spawn(async move {
                    let mut values: Vec<f32> =
                        (0..VALUES).map(|i| (i * PARTS + k) as f32).collect();
                    match k {
                        5 => values[VALUES - 1] = f32::NAN,
                        7 => values[12_345] = f32::NEG_INFINITY,
                        _ => {}
                    }
                    // Framed from raw f32 bytes: `encode_frame` refuses NaN and infinities,
                    // a peer need not.
                    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let frame =
                        frame_encoded(Codec::F32, DEFAULT_BLOCK as u32, &[VALUES as u64], &raw, 0)
                            .unwrap();
                    let header = full_part(k as u32, PARTS as u32, frame.len() as u32);
                    send_part(&conn, &header, Bytes::from(frame)).await.unwrap();
                }));
            }
            let mut got = tokio::time::timeout(Duration::from_secs(60), receiver)
                .await
                .expect("every part within 60 s: the connection stalled")
                .unwrap();
            got.sort_by_key(|part| part.header.part);
            for (k, part) in got.iter().enumerate() {
                let h = &part.header;
                assert_eq!(h.part as usize, k);
                assert_eq!(part.values.len(), VALUES);
                let expected = |i: usize| match (k, i) {
                    (5, i) if i == VALUES - 1 => f32::NAN,
                    (7, 12_345) => f32::NEG_INFINITY,
                    _ => (i * PARTS + k) as f32,
                };
                assert!(part
                    .values
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| v.to_bits() == expected(i).to_bits()));
                assert_eq!(part.finite, k != 5 && k != 7, "part {k}");
                assert_eq!(part.wire_bytes, (HEADER_LEN + h.frame_len as usize) as u64);
            }
            for s in senders {
                let _ = s.await;
            }
        });
    }
}
