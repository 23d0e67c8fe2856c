//! `atoll bench link`: how much of an emulated WAN link the data plane fills. Real e3m0 codec
//! frames go, one part per stream as in a job ([`send_part`]), from a QUIC client through the
//! userspace [`Emulator`] to a QUIC server, both tuned by [`LinkTuning`] exactly as a learner
//! and the coordinator are; the server reads every stream concurrently. Everything runs in this
//! process, so the CPU it reports is both endpoints' plus the emulator's.

use crate::parts::send_part;
use anyhow::{anyhow, Result};
use atoll_link::emulator::{process_cpu_time, Emulator, EmulatorConfig, EmulatorStats};
use atoll_link::quic::{client_endpoint, connect, server_endpoint};
use atoll_link::{Congestion, JobTls, LinkTuning, PartHeader, PartKind};
use atoll_wire::{encode_frame, synthetic_outer_gradient, Codec, DEFAULT_BLOCK};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One link configuration to measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub rate_bps: u64,
    pub rtt: Duration,
    pub loss: f64,
    pub congestion: Congestion,
    /// QUIC connections striped over the link, as `sync.link.connections`.
    pub connections: usize,
    /// The path MTU: the emulator drops larger datagrams and QUIC probes up to it.
    pub mtu: u16,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Time for the congestion controller to leave slow start before measuring.
    pub warmup: Duration,
    pub measure: Duration,
    /// Values per frame (f32 before encoding).
    pub frame_values: usize,
    /// Streams each connection keeps open at once (a fragment's tensors go out together).
    pub streams_per_connection: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            warmup: Duration::from_millis(1500),
            measure: Duration::from_secs(3),
            frame_values: 1 << 20,
            streams_per_connection: 8,
        }
    }
}

/// What a case achieved.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub case: Case,
    /// Application bytes (part headers and frames) received per second over the measured span.
    pub achieved_bps: f64,
    /// CPU seconds of both QUIC endpoints per GB delivered.
    pub endpoint_cpu_s_per_gb: f64,
    /// CPU seconds of the emulator's relay threads per GB it forwarded.
    pub emulator_cpu_s_per_gb: f64,
    pub emulator: EmulatorStats,
    /// The sender's view, summed over its connections.
    pub transport: TransportStats,
}

/// What the sending QUIC connections saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransportStats {
    pub sent_packets: u64,
    /// Packets QUIC declared lost: the emulator's drops plus any the endpoints' sockets dropped.
    pub lost_packets: u64,
    pub congestion_events: u64,
}

impl Outcome {
    /// UDP payload bytes per datagram the client sent towards the server.
    pub fn bytes_per_packet(&self) -> f64 {
        let up = &self.emulator.up;
        up.offered_bytes as f64 / up.offered_packets.max(1) as f64
    }

    pub fn efficiency(&self) -> f64 {
        self.achieved_bps / self.case.rate_bps as f64
    }

    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.case;
        serde_json::json!({
            "rate_bps": c.rate_bps,
            "rtt_ms": c.rtt.as_secs_f64() * 1e3,
            "loss": c.loss,
            "congestion": congestion_name(c.congestion),
            "connections": c.connections,
            "mtu": c.mtu,
            "bytes_per_packet": self.bytes_per_packet(),
            "achieved_bps": self.achieved_bps,
            "efficiency": self.efficiency(),
            "endpoint_cpu_s_per_gb": self.endpoint_cpu_s_per_gb,
            "emulator_cpu_s_per_gb": self.emulator_cpu_s_per_gb,
            "dropped_loss": self.emulator.up.dropped_loss + self.emulator.down.dropped_loss,
            "dropped_queue": self.emulator.up.dropped_queue + self.emulator.down.dropped_queue,
            "dropped_mtu": self.emulator.up.dropped_mtu + self.emulator.down.dropped_mtu,
            "dropped_send": self.emulator.up.dropped_send + self.emulator.down.dropped_send,
            "sent_packets": self.transport.sent_packets,
            "lost_packets": self.transport.lost_packets,
            "congestion_events": self.transport.congestion_events,
        })
    }
}

/// A few e3m0 frames of outer-gradient-like values.
pub fn sample_frames(values: usize, count: usize) -> Result<Vec<Bytes>> {
    (0..count as u64)
        .map(|k| {
            let v = synthetic_outer_gradient(values, 0x9e37_79b9_7f4a_7c15 ^ k);
            encode_frame(Codec::E3M0, DEFAULT_BLOCK as u32, &[values as u64], &v, 0)
                .map(Bytes::from)
                .map_err(|e| anyhow!("encoding a sample frame: {e}"))
        })
        .collect()
}

/// Runs one case on loopback: the emulator between a client and a server, for
/// `warmup + measure`, with the job TLS material in `tls`.
pub fn run_case(case: Case, opts: &Options, tls: &JobTls, frames: &[Bytes]) -> Result<Outcome> {
    if case.connections == 0 || frames.is_empty() {
        return Err(anyhow!(
            "a link case needs at least one connection and one frame"
        ));
    }
    let ca_pem = std::fs::read(&tls.ca_cert)?;
    let tuning = LinkTuning {
        bandwidth_bps: case.rate_bps as f64,
        rtt: case.rtt,
        congestion: case.congestion,
        connections: case.connections,
        mtu: case.mtu,
        ..LinkTuning::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let frames: Arc<Vec<Bytes>> = Arc::new(frames.to_vec());
    let cpu_start = process_cpu_time();
    let result = runtime.block_on(async {
        let server = server_endpoint(loopback, tls, tuning)?;
        let mut config = EmulatorConfig::new(loopback, server.local_addr()?);
        config.rate_bps = Some(case.rate_bps);
        config.rtt = case.rtt;
        config.loss = case.loss;
        config.mtu = case.mtu;
        config.seed = 7;
        // Its start-up line would interleave with the table.
        let quiet = tracing::Dispatch::none();
        let emulator = tracing::dispatcher::with_default(&quiet, || Emulator::start(config))?;
        let counted = received.clone();
        let accept = tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok(mut recv) = conn.accept_uni().await {
                        let counted = counted.clone();
                        tokio::spawn(async move {
                            while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, false).await {
                                counted.fetch_add(chunk.bytes.len() as u64, Relaxed);
                            }
                        });
                    }
                });
            }
        });
        let client = client_endpoint(&ca_pem, tuning, loopback)?;
        let mut conns = Vec::with_capacity(case.connections);
        for _ in 0..case.connections {
            conns.push(connect(&client, emulator.local_addr()).await?);
        }
        let mut senders = Vec::new();
        for (c, conn) in conns.iter().enumerate() {
            for s in 0..opts.streams_per_connection {
                let (conn, frames, stop) = (conn.clone(), frames.clone(), stop.clone());
                senders.push(tokio::spawn(async move {
                    let mut k = c + s;
                    while !stop.load(Relaxed) {
                        let frame = &frames[k % frames.len()];
                        let header = PartHeader {
                            kind: PartKind::Contribution,
                            fragment: 0,
                            round_or_version: k as u64,
                            base_version: 0,
                            steps: 1,
                            tokens: 1,
                            part: 0,
                            parts: 1,
                            frame_len: frame.len() as u32,
                        };
                        if send_part(&conn, &header, frame.clone()).await.is_err() {
                            return;
                        }
                        k += 1;
                    }
                }));
            }
        }
        tokio::time::sleep(opts.warmup).await;
        let (b0, t0) = (received.load(Relaxed), Instant::now());
        tokio::time::sleep(opts.measure).await;
        let (b1, t1) = (received.load(Relaxed), Instant::now());
        stop.store(true, Relaxed);
        let mut transport = TransportStats::default();
        for conn in &conns {
            let path = conn.stats().path;
            transport.lost_packets += path.lost_packets;
            transport.congestion_events += path.congestion_events;
            transport.sent_packets += path.sent_packets;
        }
        for conn in &conns {
            conn.close(0u32.into(), b"done");
        }
        for s in senders {
            let _ = s.await;
        }
        accept.abort();
        let stats = emulator.stop();
        let achieved_bps = (b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64().max(1e-9);
        Ok::<_, anyhow::Error>((achieved_bps, received.load(Relaxed), stats, transport))
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let (achieved_bps, delivered, stats, transport) = result?;
    // CPU over the whole case, warm-up included: the work per byte hardly depends on the rate.
    let total_cpu = process_cpu_time().saturating_sub(cpu_start).as_secs_f64();
    let emulator_cpu = (stats.up.cpu_time + stats.down.cpu_time).as_secs_f64();
    let forwarded = (stats.up.forwarded_bytes + stats.down.forwarded_bytes) as f64;
    Ok(Outcome {
        case,
        achieved_bps,
        endpoint_cpu_s_per_gb: (total_cpu - emulator_cpu).max(0.0)
            / (delivered as f64 / 1e9).max(1e-12),
        emulator_cpu_s_per_gb: emulator_cpu / (forwarded / 1e9).max(1e-12),
        emulator: stats,
        transport,
    })
}

/// Runs every case in turn with a progress bar, printing a table row per case as it finishes.
pub fn run_all(cases: &[Case], opts: &Options) -> Result<Vec<Outcome>> {
    atoll_link::tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("atoll-bench-link-{}", std::process::id()));
    let tls = JobTls::load_or_create(&dir, "bench-link", &["127.0.0.1".into()])?;
    let frames = sample_frames(opts.frame_values, 4)?;
    let per_case = opts.warmup + opts.measure;
    println!(
        "{} cases of {:.1} s each (e3m0 frames of {} values, {} B on the wire)",
        cases.len(),
        per_case.as_secs_f64(),
        opts.frame_values,
        frames[0].len()
    );
    let bar = indicatif::ProgressBar::new(cases.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} cases, {eta} left")
            .expect("template"),
    );
    bar.suspend(|| println!("{TABLE_HEADER}"));
    let mut outcomes = Vec::with_capacity(cases.len());
    for case in cases {
        let outcome = run_case(*case, opts, &tls, &frames);
        bar.inc(1);
        let outcome = outcome?;
        bar.suspend(|| println!("{}", outcome.table_row()));
        outcomes.push(outcome);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcomes)
}

pub const TABLE_HEADER: &str = "rate      RTT    loss   cc     conns  MTU    B/pkt  achieved    of rate  endpoints CPU s/GB  emulator CPU s/GB  drops loss/queue  QUIC lost/congestion";

impl Outcome {
    pub fn table_row(&self) -> String {
        let c = &self.case;
        format!(
            "{:<9} {:<6} {:<6} {:<6} {:>5}  {:<5} {:>6.0}  {:>7.2} Gb/s {:>6.1}%  {:>18.2}  {:>17.2}  {:<16}  {}/{}",
            format!("{} Gb/s", c.rate_bps as f64 / 1e9),
            format!("{} ms", c.rtt.as_millis()),
            format!("{}%", c.loss * 100.0),
            congestion_name(c.congestion),
            c.connections,
            c.mtu,
            self.bytes_per_packet(),
            self.achieved_bps / 1e9,
            self.efficiency() * 100.0,
            self.endpoint_cpu_s_per_gb,
            self.emulator_cpu_s_per_gb,
            format!(
                "{}/{}",
                self.emulator.up.dropped_loss + self.emulator.down.dropped_loss,
                self.emulator.up.dropped_queue + self.emulator.down.dropped_queue
            ),
            self.transport.lost_packets,
            self.transport.congestion_events,
        )
    }
}

fn congestion_name(c: Congestion) -> &'static str {
    match c {
        Congestion::Cubic => "cubic",
        Congestion::Bbr => "bbr",
        Congestion::Provisioned => "prov",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short case moves real frames and never reports more than the link can carry.
    #[test]
    fn a_case_delivers_frames_within_the_configured_rate() {
        atoll_link::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = JobTls::load_or_create(dir.path(), "bench-test", &["127.0.0.1".into()]).unwrap();
        let frames = sample_frames(64 * 1024, 2).unwrap();
        let case = Case {
            rate_bps: 100_000_000,
            rtt: Duration::from_millis(10),
            loss: 0.0,
            congestion: Congestion::Provisioned,
            connections: 1,
            mtu: atoll_link::quic::DEFAULT_MTU,
        };
        let opts = Options {
            warmup: Duration::from_millis(300),
            measure: Duration::from_millis(700),
            ..Options::default()
        };
        let outcome = run_case(case, &opts, &tls, &frames).unwrap();
        assert!(outcome.achieved_bps > 0.0, "{outcome:?}");
        // Payload only, and QUIC framing crosses the 100 Mbit/s bottleneck too; the margin is
        // for a receiver that was behind when the measurement started and caught up inside it.
        assert!(outcome.efficiency() <= 1.25, "{outcome:?}");
        assert!(outcome.emulator.up.forwarded_bytes > 0);
        assert_eq!(outcome.to_json()["congestion"], "prov");
    }
}
