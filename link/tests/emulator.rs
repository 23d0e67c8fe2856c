//! The link emulator on real sockets (127.0.0.1 only). Each test is bounded in time: receivers
//! stop on a read timeout, never on a fixed sleep, and tolerances allow for a loaded 2-core
//! machine.

use atoll_link::emulator::{Emulator, EmulatorConfig, Outage};
use atoll_link::quic::{client_endpoint, connect, server_endpoint};
use atoll_link::{JobTls, LinkTuning};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A loopback socket whose receive buffer is raised towards net.core.rmem_max (the 208 KiB
/// default holds ~1000 small datagrams: a receiver thread descheduled for a few ms on a busy
/// machine would lose datagrams the link delivered).
fn bind() -> UdpSocket {
    use std::os::fd::AsRawFd;
    let socket = UdpSocket::bind(loopback()).unwrap();
    let bytes: libc::c_int = 8 << 20;
    // SAFETY: a valid socket descriptor and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    socket
}

/// Sends `count` datagrams of `size` bytes to `to`, paced at `bps`.
fn paced_send(socket: &UdpSocket, to: SocketAddr, count: usize, size: usize, bps: f64) {
    let buf = vec![0xa5u8; size];
    let start = Instant::now();
    let mut sent = 0;
    while sent < count {
        let due = (start.elapsed().as_secs_f64() * bps / 8.0 / size as f64) as usize + 1;
        while sent < due.min(count) {
            let _ = socket.send_to(&buf, to);
            sent += 1;
        }
        // Pacing, not waiting for an event: the next batch of datagrams is due in 200 µs.
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Receives until nothing arrived for `quiet`; returns (datagrams, bytes, first, last arrival).
fn drain(socket: &UdpSocket, quiet: Duration) -> (usize, usize, Option<Instant>, Option<Instant>) {
    socket.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = vec![0u8; 65536];
    let (mut n, mut bytes, mut first, mut last) = (0, 0, None, None);
    while let Ok(len) = socket.recv(&mut buf) {
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
        n += 1;
        bytes += len;
    }
    (n, bytes, first, last)
}

#[test]
fn rate_is_enforced() {
    let server = bind();
    let mut config = EmulatorConfig::new(loopback(), server.local_addr().unwrap());
    config.rate_bps = Some(100_000_000);
    config.rtt = Duration::from_millis(10);
    config.queue_limit_bytes = Some(4 << 20);
    let emulator = Emulator::start(config).unwrap();
    let to = emulator.local_addr();
    let receiver = std::thread::spawn(move || drain(&server, Duration::from_millis(500)));
    // 18 MB offered at 150 Mbit/s for about one second: the link drains it at 100 Mbit/s.
    let client = bind();
    paced_send(&client, to, 15_000, 1200, 150e6);
    let (n, bytes, first, last) = receiver.join().unwrap();
    let stats = emulator.stop();
    let span = last.unwrap() - first.unwrap();
    let mbps = (bytes - 1200) as f64 * 8.0 / span.as_secs_f64() / 1e6;
    eprintln!("rate: {n} datagrams, {mbps:.1} Mbit/s over {span:?}; {stats:?}");
    assert!((88.0..=112.0).contains(&mbps), "achieved {mbps:.1} Mbit/s");
    assert_eq!(stats.up.offered_packets, 15_000);
    // The receiving socket may overflow while its thread waits for a busy core, so a few of the
    // forwarded datagrams can be lost on the host after the link delivered them.
    let forwarded = stats.up.forwarded_packets as usize;
    assert!(
        n <= forwarded && n >= forwarded * 99 / 100,
        "{n} of {forwarded} forwarded datagrams received"
    );
    assert_eq!(stats.flows, 1);
}

#[test]
fn round_trip_delay_and_several_clients() {
    // An echo server behind a 40 ms RTT link; two clients share the emulator.
    let server = bind();
    let server_addr = server.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((len, from)) = server.recv_from(&mut buf) {
            if &buf[..len] == b"bye" {
                break;
            }
            server.send_to(&buf[..len], from).unwrap();
        }
    });
    let mut config = EmulatorConfig::new(loopback(), server_addr);
    config.rtt = Duration::from_millis(40);
    config.rate_bps = Some(50_000_000);
    let emulator = Emulator::start(config).unwrap();
    let clients = [bind(), bind()];
    let mut rtts = Vec::new();
    for i in 0..20u32 {
        let client = &clients[i as usize % 2];
        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let start = Instant::now();
        client
            .send_to(&i.to_le_bytes(), emulator.local_addr())
            .unwrap();
        let mut buf = [0u8; 16];
        let (len, from) = client.recv_from(&mut buf).expect("echo within 1 s");
        rtts.push(start.elapsed());
        assert_eq!(
            &buf[..len],
            &i.to_le_bytes(),
            "a reply reached the wrong client"
        );
        assert_eq!(from, emulator.local_addr());
    }
    clients[0].send_to(b"bye", emulator.local_addr()).unwrap();
    echo.join().unwrap();
    let stats = emulator.stop();
    rtts.sort();
    let (min, median) = (rtts[0], rtts[rtts.len() / 2]);
    eprintln!("rtt: min {min:?}, median {median:?}, max {:?}", rtts[19]);
    // Never early; late by the timer tick and scheduling, a few ms at worst on a busy machine.
    assert!(min >= Duration::from_millis(40), "min {min:?}");
    assert!(median <= Duration::from_millis(45), "median {median:?}");
    assert_eq!(stats.flows, 2);
    assert_eq!(stats.down.forwarded_packets, 20);
}

#[test]
fn loss_follows_the_binomial() {
    let server = bind();
    let mut config = EmulatorConfig::new(loopback(), server.local_addr().unwrap());
    config.loss = 0.05;
    config.rtt = Duration::from_millis(2);
    config.seed = 11;
    let emulator = Emulator::start(config).unwrap();
    let to = emulator.local_addr();
    let receiver = std::thread::spawn(move || drain(&server, Duration::from_millis(300)));
    let n = 20_000;
    paced_send(&bind(), to, n, 200, 40e6);
    let (received, _, _, _) = receiver.join().unwrap();
    let stats = emulator.stop();
    eprintln!("loss: received {received} of {n}; {stats:?}");
    // On a busy machine the host may drop a few datagrams before the emulator reads them (its
    // socket buffer is capped by net.core.rmem_max), so the draws are judged on what entered.
    let offered = stats.up.offered_packets as usize;
    assert!(
        offered <= n && offered >= n * 99 / 100,
        "offered {offered} of {n}"
    );
    // Kept: binomial(offered, 0.95), about 19,000 with σ = √(n p (1 − p)) ≈ 30.8; allow 5σ.
    let kept = offered - stats.up.dropped_loss as usize;
    let (expected, sigma) = (offered as f64 * 0.95, (offered as f64 * 0.05 * 0.95).sqrt());
    assert!(
        (kept as f64 - expected).abs() < 5.0 * sigma,
        "kept {kept} of {offered}"
    );
    // Without a rate limit nothing queues: every kept datagram is forwarded (or refused by the
    // host), and the receiver gets what was forwarded, less what its own host may drop.
    let forwarded = stats.up.forwarded_packets as usize;
    assert_eq!(forwarded + stats.up.dropped_send as usize, kept);
    assert!(
        received <= forwarded && received >= forwarded * 99 / 100,
        "received {received} of {forwarded} forwarded"
    );
}

#[test]
fn nothing_passes_during_an_outage() {
    let server = bind();
    let mut config = EmulatorConfig::new(loopback(), server.local_addr().unwrap());
    config.outages = vec![Outage {
        at: Duration::ZERO,
        duration: Duration::from_secs(600),
    }];
    let emulator = Emulator::start(config).unwrap();
    let to = emulator.local_addr();
    let receiver = std::thread::spawn(move || drain(&server, Duration::from_millis(300)));
    paced_send(&bind(), to, 100, 100, 10e6);
    let (received, _, _, _) = receiver.join().unwrap();
    let stats = emulator.stop();
    assert_eq!(received, 0);
    assert_eq!(stats.up.dropped_outage, 100);
}

/// What one QUIC transfer through an emulated link saw.
struct Transfer {
    intact: bool,
    elapsed: Duration,
    path: quinn::PathStats,
    stats: atoll_link::emulator::EmulatorStats,
}

/// A job's TLS material (in a directory removed on drop) and a runtime for QUIC endpoints.
struct QuicFixture {
    _dir: tempfile::TempDir,
    tls: JobTls,
    ca: Vec<u8>,
    rt: tokio::runtime::Runtime,
}

impl QuicFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls =
            JobTls::load_or_create(dir.path(), "emulator-test", &["127.0.0.1".into()]).unwrap();
        let ca = std::fs::read(&tls.ca_cert).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        QuicFixture {
            _dir: dir,
            tls,
            ca,
            rt,
        }
    }
}

/// Sends `len` bytes on one stream from a client to a server tuned by `tuning`, through an
/// emulator configured by `link`; bounded by 60 s.
fn quic_transfer(
    tuning: LinkTuning,
    link: impl FnOnce(&mut EmulatorConfig),
    len: usize,
) -> Transfer {
    let QuicFixture { _dir, tls, ca, rt } = QuicFixture::new();
    rt.block_on(async {
        let server = server_endpoint(loopback(), &tls, tuning).unwrap();
        let mut config = EmulatorConfig::new(loopback(), server.local_addr().unwrap());
        link(&mut config);
        let emulator = Emulator::start(config).unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut stream = conn.accept_uni().await.unwrap();
            let data = stream.read_to_end(len + 1).await.unwrap();
            conn.close(0u32.into(), b"done");
            data
        });
        let client = client_endpoint(&ca, tuning, loopback()).unwrap();
        let start = Instant::now();
        let conn = connect(&client, emulator.local_addr()).await.unwrap();
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut stream = conn.open_uni().await.unwrap();
        stream.write_all(&payload).await.unwrap();
        stream.finish().unwrap();
        let received = tokio::time::timeout(Duration::from_secs(60), accept)
            .await
            .expect("transfer within 60 s")
            .unwrap();
        Transfer {
            intact: received == payload,
            elapsed: start.elapsed(),
            path: conn.stats().path,
            stats: emulator.stop(),
        }
    })
}

#[test]
fn quic_transfer_through_the_emulator() {
    let tuning = LinkTuning {
        bandwidth_bps: 100e6,
        rtt: Duration::from_millis(40),
        ..LinkTuning::default()
    };
    const LEN: usize = 4 << 20;
    let t = quic_transfer(
        tuning,
        |c| {
            c.rate_bps = Some(100_000_000);
            c.rtt = Duration::from_millis(40);
        },
        LEN,
    );
    eprintln!("quic: {LEN} bytes in {:?}; {:?}", t.elapsed, t.stats);
    assert!(t.intact, "payload corrupted");
    // 4 MiB at 100 Mbit/s takes at least 0.34 s, plus the handshake's RTT.
    assert!(
        t.elapsed >= Duration::from_millis(370),
        "{:?}: not rate limited",
        t.elapsed
    );
    assert!(t.stats.up.forwarded_bytes >= LEN as u64);
    // The way back carries the receiver's ACKs: one per ten data packets (ACK-frequency
    // extension) rather than QUIC's default one per two, plus the handshake and MTU probes.
    let (data, acks) = (t.stats.up.offered_packets, t.stats.down.offered_packets);
    assert!(
        acks > 0 && acks * 5 <= data,
        "{acks} packets back for {data} data packets"
    );
}

/// The provisioned-rate controller through a lossy link: the data arrives intact, QUIC sees the
/// losses, and sparse (1%) random loss leaves the window at the configured rate's 1.25 × BDP.
#[test]
fn the_provisioned_controller_keeps_its_window_through_random_loss() {
    let tuning = LinkTuning {
        bandwidth_bps: 100e6,
        rtt: Duration::from_millis(40),
        congestion: atoll_link::Congestion::Provisioned,
        ..LinkTuning::default()
    };
    let t = quic_transfer(
        tuning,
        |c| {
            c.rate_bps = Some(100_000_000);
            c.rtt = Duration::from_millis(40);
            c.loss = 0.01;
            c.seed = 3;
        },
        4 << 20,
    );
    assert!(t.intact, "payload corrupted");
    assert!(t.stats.up.dropped_loss > 0, "{:?}", t.stats);
    // QUIC counts lost path-MTU probes apart, and a dropped packet that carried only ACKs is
    // never declared lost (it is not tracked), so a few drops may go uncounted.
    let seen = t.path.lost_packets + t.path.lost_plpmtud_probes;
    assert!(
        seen * 10 >= t.stats.up.dropped_loss * 9,
        "QUIC saw {seen} of {} drops: {:?} {:?}",
        t.stats.up.dropped_loss,
        t.path,
        t.stats
    );
    // 100 Mbit/s × the measured minimum RTT (≥ 40 ms) × 1.25.
    let floor = (100e6 / 8.0 * 0.040 * 1.25) as u64;
    assert!(
        t.path.cwnd >= floor && t.path.cwnd < 2 * floor,
        "window {} after {} losses (floor {floor})",
        t.path.cwnd,
        t.path.lost_packets
    );
}

/// `LinkTuning::mtu` lets QUIC probe for datagrams as large as the path carries, and the path
/// decides: with jumbo frames both ways the transfer moves a few times fewer, larger datagrams;
/// where the path is narrower than configured, the emulator drops the oversized probes (as a
/// router would) and QUIC keeps to Ethernet-sized datagrams. Either way every byte arrives.
#[test]
fn datagrams_grow_to_the_path_mtu_and_no_further() {
    const LEN: usize = 8 << 20;
    let run = |configured: u16, path: u16| {
        let tuning = LinkTuning {
            bandwidth_bps: 400e6,
            rtt: Duration::from_millis(10),
            congestion: atoll_link::Congestion::Provisioned,
            mtu: configured,
            ..LinkTuning::default()
        };
        let t = quic_transfer(
            tuning,
            |c| {
                c.rate_bps = Some(400_000_000);
                c.rtt = Duration::from_millis(10);
                c.mtu = path;
            },
            LEN,
        );
        assert!(t.intact, "payload corrupted (mtu {configured} over {path})");
        let up = t.stats.up;
        let per_packet = up.forwarded_bytes as f64 / up.forwarded_packets as f64;
        eprintln!("mtu {configured} over a {path} path: {per_packet:.0} B per datagram, {up:?}");
        (per_packet, up.dropped_mtu, t.path.lost_packets)
    };
    let (jumbo, jumbo_drops, jumbo_lost) = run(9000, 9000);
    assert!(
        jumbo > 3000.0,
        "{jumbo:.0} B per datagram on a 9000-byte path"
    );
    assert_eq!(jumbo_drops, 0);
    // No loss on this link: a lost packet would mean oversized segmentation-offload sends.
    assert_eq!(jumbo_lost, 0);
    let (narrow, narrow_drops, _) = run(9000, 1500);
    assert!(
        narrow <= 1472.0,
        "{narrow:.0} B per datagram on a 1500-byte path"
    );
    assert!(narrow_drops > 0, "no MTU probe beyond the path was dropped");
    let (default, default_drops, _) = run(atoll_link::quic::DEFAULT_MTU, 1500);
    assert!(default <= 1452.0, "{default:.0}");
    assert_eq!(default_drops, 0, "the default MTU never exceeds Ethernet's");
}

/// Streams written together are sent in the order they were written, not interleaved: a
/// learner's first parts reach the coordinator whole (and can be decoded) while later parts of
/// the same fragment are still on the wire. With QUIC's round-robin the second part below had
/// 77% of its bytes when the first was complete.
#[test]
fn parts_written_together_arrive_one_after_another() {
    // About one tensor frame of the link benchmark (541 KB), within a stream's flow-control window.
    const LEN: usize = 512 << 10;
    let tuning = LinkTuning {
        bandwidth_bps: 200e6,
        rtt: Duration::from_millis(10),
        congestion: atoll_link::Congestion::Provisioned,
        ..LinkTuning::default()
    };
    let QuicFixture { _dir, tls, ca, rt } = QuicFixture::new();
    let other_when_first_done = rt.block_on(async {
        let server = server_endpoint(loopback(), &tls, tuning).unwrap();
        let mut config = EmulatorConfig::new(loopback(), server.local_addr().unwrap());
        config.rate_bps = Some(200_000_000);
        config.rtt = Duration::from_millis(10);
        let emulator = Emulator::start(config).unwrap();
        let received = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let counts = received.clone();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (finished_tx, mut finished) = tokio::sync::mpsc::unbounded_channel();
            for _ in 0..2 {
                let mut stream = conn.accept_uni().await.unwrap();
                let (counts, finished_tx) = (counts.clone(), finished_tx.clone());
                tokio::spawn(async move {
                    let index = usize::try_from(stream.id().index()).unwrap();
                    while let Some(chunk) = stream.read_chunk(usize::MAX, false).await.unwrap() {
                        counts[index].fetch_add(chunk.bytes.len(), SeqCst);
                    }
                    finished_tx.send(index).unwrap();
                });
            }
            let first = finished.recv().await.unwrap();
            let other = counts[1 - first].load(SeqCst);
            finished.recv().await.unwrap();
            conn.close(0u32.into(), b"done");
            other
        });
        let client = client_endpoint(&ca, tuning, loopback()).unwrap();
        let conn = connect(&client, emulator.local_addr()).await.unwrap();
        let payload = vec![0x5au8; LEN];
        let (mut a, mut b) = (
            conn.open_uni().await.unwrap(),
            conn.open_uni().await.unwrap(),
        );
        let (ra, rb) = tokio::join!(a.write_all(&payload), b.write_all(&payload));
        ra.unwrap();
        rb.unwrap();
        a.finish().unwrap();
        b.finish().unwrap();
        let other = tokio::time::timeout(Duration::from_secs(60), accept)
            .await
            .expect("transfer within 60 s")
            .unwrap();
        assert_eq!(received[0].load(SeqCst), LEN);
        assert_eq!(received[1].load(SeqCst), LEN);
        emulator.stop();
        other
    });
    assert!(
        other_when_first_done < LEN / 2,
        "the second part had {other_when_first_done} of {LEN} bytes when the first was complete"
    );
}
