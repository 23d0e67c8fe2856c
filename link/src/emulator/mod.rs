//! A userspace WAN link emulator for UDP (QUIC) traffic. The kernels Atoll is developed and
//! tested on have no netem, so rate, delay, jitter, loss, queueing and outages are emulated by a
//! relay between a client and a server:
//!
//! ```text
//! learner ──udp──▶ [listen] emulator [per-client socket] ──udp──▶ coordinator (forward)
//!         ◀──────────────────────────────────────────────────────
//! ```
//!
//! Each direction is an independent link with the same parameters: a token-bucket bottleneck at
//! `rate` with a drop-tail queue (one bandwidth-delay product by default), `rtt / 2` of one-way
//! delay with `± jitter`, random loss, and scheduled outages during which nothing passes. The
//! behaviour lives in the sans-IO [`model`]; the [`Emulator`] runs it on real sockets.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use atoll_link::emulator::{Emulator, EmulatorConfig, LinkSpec};
//! let spec: LinkSpec = serde_yaml::from_str("{rate: 2gbps, rtt: 40ms, loss: 0.1%}")?;
//! let emulator = Emulator::start(EmulatorConfig::from_spec(
//!     "127.0.0.1:0".parse()?,  // where learners connect
//!     "127.0.0.1:4433".parse()?, // the coordinator
//!     &spec,
//! ))?;
//! println!("dial {}", emulator.local_addr());
//! let stats = emulator.stop();
//! # Ok(()) }
//! ```

pub mod model;
mod relay;
pub mod spec;

pub use model::{DropReason, LinkModel, LinkParams, Verdict};
pub use relay::{process_cpu_time, DirectionStats};
pub use spec::{
    parse_bytes, parse_duration, parse_percent, parse_rate, LinkSpec, Outage, ParseError,
};

use anyhow::{anyhow, Context, Result};
use quinn_udp::{UdpSockRef, UdpSocketState};
use relay::{Relay, Shared, Side};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The smallest default queue: below a few GSO bursts a low-rate link would drop for lack of
/// buffer rather than for congestion.
const MIN_DEFAULT_QUEUE: u64 = 256 * 1024;

/// Everything an emulator needs. Build it with [`EmulatorConfig::new`] (a perfect link) or
/// [`EmulatorConfig::from_spec`] (a recipe's `link:` section) and adjust fields.
#[derive(Debug, Clone, PartialEq)]
pub struct EmulatorConfig {
    /// Where clients send (port 0: any free port, see [`Emulator::local_addr`]).
    pub listen: SocketAddr,
    /// The server everything is relayed to.
    pub forward: SocketAddr,
    /// Bits per second in each direction; `None`: unlimited.
    pub rate_bps: Option<u64>,
    /// Round-trip delay: each direction delays packets by `rtt / 2`.
    pub rtt: Duration,
    /// Each direction's delay varies uniformly within ± `jitter` (without reordering).
    pub jitter: Duration,
    /// Loss probability per packet and direction, in [0, 1].
    pub loss: f64,
    /// Bottleneck queue per direction; `None`: one bandwidth-delay product (rate × rtt), at least
    /// 256 KiB.
    pub queue_limit_bytes: Option<u64>,
    /// Token-bucket depth; 0 (the default) makes the bottleneck a link serialising at `rate`.
    pub burst_bytes: u64,
    /// Times are counted from [`Emulator::start`].
    pub outages: Vec<Outage>,
    /// Seed of loss and jitter draws (the two directions draw independently from it).
    pub seed: u64,
    /// Timer granularity: a direction sleeps at least this long between releases, sending what
    /// fell due meanwhile in one batch. Packets are late by at most about this much.
    pub tick: Duration,
    /// Requested SO_RCVBUF/SO_SNDBUF of the relay's sockets (capped by the kernel).
    pub socket_buffer_bytes: usize,
    /// The path MTU in bytes: larger datagrams are dropped (see [`model`]).
    pub mtu: u16,
}

impl EmulatorConfig {
    /// A perfect link from `listen` to `forward`: no rate limit, delay or loss.
    pub fn new(listen: SocketAddr, forward: SocketAddr) -> Self {
        EmulatorConfig {
            listen,
            forward,
            rate_bps: None,
            rtt: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            queue_limit_bytes: None,
            burst_bytes: 0,
            outages: Vec::new(),
            seed: 0,
            tick: Duration::from_micros(100),
            socket_buffer_bytes: 16 << 20,
            mtu: crate::quic::DEFAULT_MTU,
        }
    }

    pub fn from_spec(listen: SocketAddr, forward: SocketAddr, spec: &LinkSpec) -> Self {
        EmulatorConfig {
            rate_bps: spec.rate_bps,
            rtt: spec.rtt,
            jitter: spec.jitter,
            loss: spec.loss,
            queue_limit_bytes: spec.queue_bytes,
            outages: spec.outages.clone(),
            seed: spec.seed.unwrap_or(0),
            mtu: spec.mtu.unwrap_or(crate::quic::DEFAULT_MTU),
            ..EmulatorConfig::new(listen, forward)
        }
    }

    /// The bottleneck queue in effect.
    pub fn queue_limit(&self) -> u64 {
        match (self.queue_limit_bytes, self.rate_bps) {
            (Some(q), _) => q,
            (None, Some(bps)) => {
                let bdp = bps as f64 / 8.0 * self.rtt.as_secs_f64();
                (bdp as u64).max(MIN_DEFAULT_QUEUE)
            }
            (None, None) => u64::MAX,
        }
    }

    /// The parameters each direction's [`LinkModel`] runs with.
    pub fn direction_params(&self) -> LinkParams {
        LinkParams {
            rate_bps: self.rate_bps,
            delay: self.rtt / 2,
            jitter: self.jitter,
            loss: self.loss,
            queue_limit_bytes: self.queue_limit(),
            burst_bytes: self.burst_bytes,
            outages: self.outages.clone(),
            mtu: self.mtu as u32,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(anyhow!("loss {} is not a probability in [0, 1]", self.loss));
        }
        if self.rate_bps == Some(0) {
            return Err(anyhow!(
                "a rate of 0 bit/s passes nothing; leave it unset for no limit"
            ));
        }
        if self.queue_limit_bytes == Some(0) {
            return Err(anyhow!(
                "a queue limit of 0 bytes; leave it unset for one BDP"
            ));
        }
        if self.tick.is_zero() {
            return Err(anyhow!("the timer tick must be positive"));
        }
        Ok(())
    }
}

/// Both directions' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmulatorStats {
    /// Client → server.
    pub up: DirectionStats,
    /// Server → client.
    pub down: DirectionStats,
    /// Client addresses seen (each got its own upstream socket).
    pub flows: usize,
}

/// A running emulator. Dropping it stops it, as [`Emulator::stop`] does.
pub struct Emulator {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    wakers: Vec<UnixDatagram>,
    threads: Vec<JoinHandle<()>>,
}

impl Emulator {
    /// Binds `config.listen` and starts relaying to `config.forward` on two threads (one per
    /// direction). Needs no async runtime; `stop` returns within a millisecond.
    pub fn start(config: EmulatorConfig) -> Result<Emulator> {
        config.validate()?;
        let socket = UdpSocket::bind(config.listen)
            .with_context(|| format!("binding the link emulator on udp/{}", config.listen))?;
        socket.set_nonblocking(true)?;
        let local_addr = socket.local_addr()?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        relay::size_buffers(&socket, &state, config.socket_buffer_bytes);
        let listen = Arc::new(socket);
        let listen_state = Arc::new(state);
        let shared = Arc::new(Shared::new(Instant::now()));
        let (up_wake_tx, up_wake_rx) = UnixDatagram::pair()?;
        let (down_wake_tx, down_wake_rx) = UnixDatagram::pair()?;
        for s in [&up_wake_tx, &up_wake_rx, &down_wake_tx, &down_wake_rx] {
            s.set_nonblocking(true)?;
        }
        let params = config.direction_params();
        let up = Relay {
            shared: shared.clone(),
            side: Side::Up {
                forward: config.forward,
                wake_down: down_wake_tx.try_clone()?,
            },
            listen: listen.clone(),
            listen_state: listen_state.clone(),
            model: LinkModel::new(params.clone(), config.seed),
            wake: up_wake_rx,
            tick: config.tick,
            socket_buffer_bytes: config.socket_buffer_bytes,
        };
        let down = Relay {
            shared: shared.clone(),
            side: Side::Down,
            listen,
            listen_state,
            // A different stream of draws for the other direction.
            model: LinkModel::new(params, config.seed ^ 0x9e37_79b9_7f4a_7c15),
            wake: down_wake_rx,
            tick: config.tick,
            socket_buffer_bytes: config.socket_buffer_bytes,
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("link-emu-up".into())
                .spawn(move || up.run())?,
            std::thread::Builder::new()
                .name("link-emu-down".into())
                .spawn(move || down.run())?,
        ];
        tracing::info!(
            "link emulator on udp/{local_addr} → {}: rate {}, rtt {:?}, jitter {:?}, loss {}%, queue {} B",
            config.forward,
            config
                .rate_bps
                .map_or("unlimited".to_string(), |r| format!("{} Mbit/s", r as f64 / 1e6)),
            config.rtt,
            config.jitter,
            config.loss * 100.0,
            config.queue_limit(),
        );
        Ok(Emulator {
            local_addr,
            shared,
            wakers: vec![up_wake_tx, down_wake_tx],
            threads,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Time since the start: the clock outages are scheduled on.
    pub fn elapsed(&self) -> Duration {
        self.shared.epoch.elapsed()
    }

    pub fn stats(&self) -> EmulatorStats {
        EmulatorStats {
            up: self.shared.up.snapshot(),
            down: self.shared.down.snapshot(),
            flows: self.shared.flow_count(),
        }
    }

    /// Stops both directions (packets still on their way are dropped) and returns the final
    /// counters.
    pub fn stop(mut self) -> EmulatorStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Relaxed);
        for w in &self.wakers {
            let _ = w.send(&[0]);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a link emulator thread panicked");
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}
