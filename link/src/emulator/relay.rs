//! The I/O around [`LinkModel`]: one OS thread per direction moves datagrams between sockets.
//!
//! Why threads and not tokio tasks: at 2–5 Gbps a direction handles 170–430 k datagrams per
//! second, and its timing needs sub-millisecond precision (tokio's timer wheel ticks in whole
//! milliseconds, which would release a 5 Gbps link's traffic in 600 KB bursts and overflow the
//! receivers' socket buffers). A thread blocked in `ppoll` with a nanosecond timeout and a small
//! timer slack wakes within tens of microseconds, and needs no runtime from its caller.
//!
//! Per wake-up a thread (1) reads every datagram waiting, in batches (`recvmmsg`, and UDP GRO
//! where the kernel coalesced a sender's GSO burst), decides each one's fate with the model and
//! appends survivors to the FIFO delay line; (2) sends everything due, coalescing consecutive
//! packets to the same peer into one GSO `sendmsg`; (3) sleeps until the next packet is due, but
//! at least `tick`: timers are batched, so a busy link costs one wake-up per tick, not per packet.

use super::model::{Counters, DelayLine, LinkModel, Verdict};
use quinn_udp::{EcnCodepoint, RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Receive slots per `recvmmsg`, each large enough for a GRO-coalesced 64 KB burst.
const SLOTS: usize = 8;
const SLOT_BYTES: usize = 1 << 16;
/// Largest GSO send: the kernel's limit is a 64 KB UDP payload.
const MAX_GSO_BYTES: usize = 65_000;
/// Receive batches per wake-up before due packets are sent, so a flood cannot starve releases.
const MAX_RECV_BATCHES: usize = 16;
/// Free packet buffers kept for reuse.
const POOL_MAX: usize = 1 << 14;

/// Live counters of one direction, written by its thread, read by [`super::Emulator::stats`].
#[derive(Default)]
pub(crate) struct SharedCounters {
    offered_packets: AtomicU64,
    offered_bytes: AtomicU64,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_mtu: AtomicU64,
    dropped_outage: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_send: AtomicU64,
    in_flight_bytes: AtomicU64,
    cpu_ns: AtomicU64,
}

/// A snapshot of one direction's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams (and their payload bytes) that entered the link.
    pub offered_packets: u64,
    pub offered_bytes: u64,
    /// Datagrams sent on to the far end.
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// Datagrams larger than the path MTU (QUIC's MTU probes beyond it).
    pub dropped_mtu: u64,
    pub dropped_outage: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
    /// Datagrams the host refused to send (a full socket buffer, an unreachable peer).
    pub dropped_send: u64,
    /// Bytes accepted and not yet forwarded (in the bottleneck queue or propagating).
    pub in_flight_bytes: u64,
    /// CPU time of this direction's thread (Linux; zero elsewhere).
    pub cpu_time: Duration,
}

impl SharedCounters {
    pub(crate) fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            offered_packets: self.offered_packets.load(Relaxed),
            offered_bytes: self.offered_bytes.load(Relaxed),
            forwarded_packets: self.forwarded_packets.load(Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Relaxed),
            dropped_mtu: self.dropped_mtu.load(Relaxed),
            dropped_outage: self.dropped_outage.load(Relaxed),
            dropped_queue: self.dropped_queue.load(Relaxed),
            dropped_loss: self.dropped_loss.load(Relaxed),
            dropped_send: self.dropped_send.load(Relaxed),
            in_flight_bytes: self.in_flight_bytes.load(Relaxed),
            cpu_time: Duration::from_nanos(self.cpu_ns.load(Relaxed)),
        }
    }

    fn publish(&self, model: &Counters, local: &LocalCounters, in_flight: u64) {
        self.offered_packets.store(model.offered_packets, Relaxed);
        self.offered_bytes.store(model.offered_bytes, Relaxed);
        self.dropped_mtu.store(model.dropped_mtu, Relaxed);
        self.dropped_outage.store(model.dropped_outage, Relaxed);
        self.dropped_queue.store(model.dropped_queue, Relaxed);
        self.dropped_loss.store(model.dropped_loss, Relaxed);
        self.forwarded_packets
            .store(local.forwarded_packets, Relaxed);
        self.forwarded_bytes.store(local.forwarded_bytes, Relaxed);
        self.dropped_send.store(local.dropped_send, Relaxed);
        self.in_flight_bytes.store(in_flight, Relaxed);
    }
}

#[derive(Default)]
struct LocalCounters {
    forwarded_packets: u64,
    forwarded_bytes: u64,
    dropped_send: u64,
}

/// One client (source address) and the socket that stands for it towards the server, as a NAT
/// would: the server sees each client as a distinct address, so several learners or connections
/// can share one emulated link.
pub(crate) struct Flow {
    client: SocketAddr,
    socket: UdpSocket,
    state: UdpSocketState,
}

pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    pub(crate) epoch: Instant,
    pub(crate) up: SharedCounters,
    pub(crate) down: SharedCounters,
    flows: Mutex<Vec<Arc<Flow>>>,
    flows_version: AtomicU64,
}

impl Shared {
    pub(crate) fn new(epoch: Instant) -> Self {
        Shared {
            stop: AtomicBool::new(false),
            epoch,
            up: SharedCounters::default(),
            down: SharedCounters::default(),
            flows: Mutex::new(Vec::new()),
            flows_version: AtomicU64::new(0),
        }
    }

    pub(crate) fn flow_count(&self) -> usize {
        self.flows.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// Which way a thread moves packets.
pub(crate) enum Side {
    /// Client → server: reads the listening socket, writes each client's upstream socket.
    Up {
        forward: SocketAddr,
        /// Wakes the down thread when a flow is added.
        wake_down: UnixDatagram,
    },
    /// Server → client: reads the upstream sockets, writes the listening socket.
    Down,
}

pub(crate) struct Relay {
    pub(crate) shared: Arc<Shared>,
    pub(crate) side: Side,
    pub(crate) listen: Arc<UdpSocket>,
    pub(crate) listen_state: Arc<UdpSocketState>,
    pub(crate) model: LinkModel,
    pub(crate) wake: UnixDatagram,
    pub(crate) tick: Duration,
    pub(crate) socket_buffer_bytes: usize,
}

struct Packet {
    flow: Arc<Flow>,
    ecn: Option<EcnCodepoint>,
    data: Vec<u8>,
}

impl Relay {
    fn counters(&self) -> &SharedCounters {
        match self.side {
            Side::Up { .. } => &self.shared.up,
            Side::Down => &self.shared.down,
        }
    }

    pub(crate) fn run(mut self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack. The
        // default 50 µs slack would stretch every tick; 1 µs keeps releases on time.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
        }
        if let Err(e) = self.pump() {
            tracing::error!("link emulator relay stopped: {e}");
        }
        self.counters().cpu_ns.store(thread_cpu_ns(), Relaxed);
    }

    fn pump(&mut self) -> io::Result<()> {
        let mut line: DelayLine<Packet> = DelayLine::default();
        let mut local = LocalCounters::default();
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut recv_buf = vec![0u8; SLOTS * SLOT_BYTES];
        let mut metas = [RecvMeta::default(); SLOTS];
        let mut gso_buf: Vec<u8> = Vec::with_capacity(MAX_GSO_BYTES);
        // Up: client address → flow. Down: the flows to read from, refreshed when one is added.
        let mut by_client: HashMap<SocketAddr, Arc<Flow>> = HashMap::new();
        let mut sources: Vec<Arc<Flow>> = Vec::new();
        let mut sources_version = u64::MAX;
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut retry_send = false;
        let mut iterations = 0u64;

        while !self.shared.stop.load(Relaxed) {
            if matches!(self.side, Side::Down) {
                let version = self.shared.flows_version.load(Relaxed);
                if version != sources_version {
                    sources_version = version;
                    if let Ok(flows) = self.shared.flows.lock() {
                        sources = flows.clone();
                    }
                }
            }
            fds.clear();
            fds.push(pollin(self.wake.as_raw_fd()));
            match self.side {
                Side::Up { .. } => fds.push(pollin(self.listen.as_raw_fd())),
                Side::Down => fds.extend(sources.iter().map(|f| pollin(f.socket.as_raw_fd()))),
            }
            let now = self.shared.epoch.elapsed();
            let timeout = if retry_send {
                Some(self.tick)
            } else {
                line.next_due()
                    .map(|due| due.saturating_sub(now).max(self.tick))
            };
            wait(&mut fds, timeout)?;
            if fds[0].revents != 0 {
                let mut b = [0u8; 16];
                while self.wake.recv(&mut b).is_ok() {}
            }
            if self.shared.stop.load(Relaxed) {
                break;
            }

            // (1) Everything waiting, in batches.
            for (i, fd) in fds.iter().enumerate().skip(1) {
                if fd.revents == 0 {
                    continue;
                }
                for _ in 0..MAX_RECV_BATCHES {
                    let (socket, state): (&UdpSocket, &UdpSocketState) = match self.side {
                        Side::Up { .. } => (&self.listen, &self.listen_state),
                        Side::Down => (&sources[i - 1].socket, &sources[i - 1].state),
                    };
                    let n = {
                        let mut slices: Vec<IoSliceMut> = recv_buf
                            .chunks_mut(SLOT_BYTES)
                            .map(IoSliceMut::new)
                            .collect();
                        match state.recv(UdpSockRef::from(socket), &mut slices, &mut metas) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // ICMP errors (a peer's port closed) surface here; they are not
                            // the relay's problem.
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        }
                    };
                    let now = self.shared.epoch.elapsed();
                    for (meta, slot) in metas[..n].iter().zip(recv_buf.chunks(SLOT_BYTES)) {
                        let flow = match &self.side {
                            Side::Up { forward, wake_down } => {
                                match by_client.get(&meta.addr) {
                                    Some(f) => f.clone(),
                                    None => {
                                        let flow = match self.open_flow(meta.addr, *forward) {
                                            Ok(flow) => flow,
                                            Err(e) => {
                                                tracing::warn!(
                                                    "link emulator: no upstream socket for {}: {e}",
                                                    meta.addr
                                                );
                                                continue;
                                            }
                                        };
                                        by_client.insert(meta.addr, flow.clone());
                                        // The down thread must start reading the new socket.
                                        let _ = wake_down.send(&[1]);
                                        flow
                                    }
                                }
                            }
                            Side::Down => sources[i - 1].clone(),
                        };
                        let stride = if meta.stride == 0 {
                            meta.len
                        } else {
                            meta.stride
                        };
                        for segment in slot[..meta.len.min(SLOT_BYTES)].chunks(stride.max(1)) {
                            if let Verdict::Deliver(at) = self.model.offer(now, segment.len()) {
                                let mut data = pool.pop().unwrap_or_default();
                                data.clear();
                                data.extend_from_slice(segment);
                                line.push(
                                    at,
                                    segment.len(),
                                    Packet {
                                        flow: flow.clone(),
                                        ecn: meta.ecn,
                                        data,
                                    },
                                );
                            }
                        }
                    }
                }
            }

            // (2) Everything due.
            let now = self.shared.epoch.elapsed();
            retry_send = false;
            while let Some(first) = line.peek_due(now, 0) {
                let seg = first.data.len();
                gso_buf.clear();
                gso_buf.extend_from_slice(&first.data);
                let (socket, state, destination) = match &self.side {
                    Side::Up { forward, .. } => (&first.flow.socket, &first.flow.state, *forward),
                    Side::Down => (&*self.listen, &*self.listen_state, first.flow.client),
                };
                let max_segments = state.max_gso_segments().min(MAX_GSO_BYTES / seg.max(1));
                let mut count = 1;
                // Coalesce while the next packet goes the same way, with the same size (the
                // last one of a GSO batch may be shorter) and ECN marks.
                while count < max_segments && gso_buf.len() == seg * count {
                    match line.peek_due(now, count) {
                        Some(p)
                            if Arc::ptr_eq(&p.flow, &first.flow)
                                && p.ecn == first.ecn
                                && p.data.len() <= seg =>
                        {
                            gso_buf.extend_from_slice(&p.data);
                            count += 1;
                        }
                        _ => break,
                    }
                }
                let transmit = Transmit {
                    destination,
                    ecn: first.ecn,
                    contents: &gso_buf,
                    segment_size: (count > 1).then_some(seg),
                    src_ip: None,
                };
                match state.send(UdpSockRef::from(socket), &transmit) {
                    Ok(()) => {
                        local.forwarded_packets += count as u64;
                        local.forwarded_bytes += gso_buf.len() as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The socket buffer is full: keep the packets and try again shortly.
                        retry_send = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!("link emulator: sending to {destination}: {e}");
                        local.dropped_send += count as u64;
                    }
                }
                for _ in 0..count {
                    if let Some(p) = line.pop_due(now, |p| p.data.len()) {
                        if pool.len() < POOL_MAX {
                            pool.push(p.data);
                        }
                    }
                }
            }

            self.counters()
                .publish(&self.model.counters(), &local, line.bytes());
            iterations += 1;
            if iterations & 0xff == 0 {
                self.counters().cpu_ns.store(thread_cpu_ns(), Relaxed);
            }
        }
        Ok(())
    }

    fn open_flow(&self, client: SocketAddr, forward: SocketAddr) -> io::Result<Arc<Flow>> {
        let bind: SocketAddr = match forward.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(ip) if ip.is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(forward)?;
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        size_buffers(&socket, &state, self.socket_buffer_bytes);
        tracing::debug!(
            "link emulator: new flow {client} via {}",
            socket.local_addr()?
        );
        let flow = Arc::new(Flow {
            client,
            socket,
            state,
        });
        if let Ok(mut flows) = self.shared.flows.lock() {
            flows.push(flow.clone());
        }
        self.shared.flows_version.fetch_add(1, Relaxed);
        Ok(flow)
    }
}

/// Asks for large socket buffers: a relay that falls behind for a millisecond at 5 Gbps has
/// 600 KB waiting. The kernel caps the request at `net.core.{r,w}mem_max`; that is not an error.
pub(crate) fn size_buffers(socket: &UdpSocket, state: &UdpSocketState, bytes: usize) {
    if let Err(e) = state.set_recv_buffer_size(UdpSockRef::from(socket), bytes) {
        tracing::debug!("link emulator: SO_RCVBUF: {e}");
    }
    if let Err(e) = state.set_send_buffer_size(UdpSockRef::from(socket), bytes) {
        tracing::debug!("link emulator: SO_SNDBUF: {e}");
    }
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Blocks until a descriptor is readable or `timeout` passes (`None`: no timeout).
fn wait(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let r = {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd; the timespec outlives
        // the call; a null signal mask leaves the mask unchanged.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                std::ptr::null(),
            )
        }
    };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let r = {
        // Millisecond resolution only; round up so a due packet is never polled for early.
        let ms = timeout.map_or(-1, |d| {
            d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        // SAFETY: as above.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        fds.iter_mut().for_each(|f| f.revents = 0);
    }
    Ok(())
}

fn thread_cpu_ns() -> u64 {
    cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of this process (all its threads) so far.
pub fn process_cpu_time() -> std::time::Duration {
    std::time::Duration::from_nanos(cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID))
}

/// A CPU-time clock in nanoseconds; 0 where it cannot be read.
fn cpu_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        0
    }
}
