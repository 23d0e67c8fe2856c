//! QUIC endpoints for the data plane. Flow-control windows are sized from the link's
//! bandwidth-delay product: a 2 Gbps link with 40 ms RTT holds 10 MB in flight, far beyond
//! quinn's defaults, so a single stream would otherwise stall at a fraction of the rate.

use crate::provisioned::ProvisionedConfig;
use crate::tls::{client_config, JobTls, DATA_ALPN, SERVER_NAME};
use anyhow::{anyhow, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{congestion, Endpoint, MtuDiscoveryConfig, TransportConfig, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    Bbr,
    /// Sends at the configured rate: for dedicated links (see [`crate::provisioned`]).
    Provisioned,
}

/// What the transport is tuned for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkTuning {
    pub bandwidth_bps: f64,
    pub rtt: Duration,
    pub congestion: Congestion,
    /// A silent peer is dropped after this long.
    pub idle_timeout: Duration,
    /// Connections striped over one link: each provisioned-rate connection takes its share.
    pub connections: usize,
    /// The path's IP MTU in bytes. QUIC probes for datagrams up to it (RFC 8899, at most
    /// [`MAX_DATAGRAM`]), so a path carrying jumbo frames moves about four times fewer packets
    /// per byte, and per-packet work (system calls, packet protection, acknowledgements) is most
    /// of the data plane's CPU cost.
    pub mtu: u16,
}

/// Ethernet's MTU, what an Internet path carries.
pub const DEFAULT_MTU: u16 = 1500;
/// IPv6 (40) + UDP (8) headers: the datagram payload a path MTU leaves for either IP version.
const IP_UDP_HEADERS: u16 = 48;
/// QUIC's minimum datagram (RFC 9000 §14) plus those headers: the smallest MTU QUIC can run on.
pub const MIN_MTU: u16 = 1200 + IP_UDP_HEADERS;
/// The largest datagram the endpoints send, whatever the path carries: quinn hands the kernel up
/// to 10 datagrams in one segmentation-offload (GSO) send, and one send holds at most 65,507
/// bytes (IPv4's limit), so larger datagrams make every batched send fail and be lost. Measured:
/// 9000-byte MTU probing to 8952-byte datagrams lost 60% of packets; 6500 loses none.
pub const MAX_DATAGRAM: u16 = 6500;

/// Ack-eliciting packets the receiver may take in before it must send an ACK.
const ACK_EVERY_PACKETS: u32 = 10;

/// Refuses a path MTU QUIC cannot run on.
pub fn check_mtu(mtu: u16) -> Result<u16> {
    if mtu < MIN_MTU {
        return Err(anyhow!(
            "{mtu} is below QUIC's minimum path MTU of {MIN_MTU} bytes"
        ));
    }
    Ok(mtu)
}

impl Default for LinkTuning {
    fn default() -> Self {
        LinkTuning {
            bandwidth_bps: 2e9,
            rtt: Duration::from_millis(40),
            congestion: Congestion::Cubic,
            idle_timeout: Duration::from_secs(30),
            connections: 1,
            mtu: DEFAULT_MTU,
        }
    }
}

impl LinkTuning {
    /// Bytes in flight that fill the link: bandwidth × RTT.
    pub fn bdp_bytes(&self) -> u64 {
        (self.bandwidth_bps / 8.0 * self.rtt.as_secs_f64()) as u64
    }

    /// The largest QUIC datagram to use on this path: what MTU discovery searches up to.
    pub fn max_udp_payload(&self) -> u16 {
        (self.mtu.max(MIN_MTU) - IP_UDP_HEADERS).min(MAX_DATAGRAM)
    }

    pub fn transport(&self) -> TransportConfig {
        // Twice the BDP so a loss does not immediately close the window; at least quinn's default.
        let window = (2 * self.bdp_bytes()).clamp(1 << 20, (1 << 31) - 1);
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(window as u32))
            .receive_window(VarInt::from_u32(
                window.saturating_mul(2).min((1 << 31) - 1) as u32,
            ))
            .send_window(window.saturating_mul(2))
            .initial_rtt(self.rtt)
            .max_concurrent_uni_streams(VarInt::from_u32(1024))
            .keep_alive_interval(Some(self.idle_timeout / 4));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload());
        t.mtu_discovery_config(Some(mtu));
        // The peer acknowledges every tenth packet rather than every second one (QUIC's
        // ACK-frequency extension): below saturation each ACK costs both endpoints a wake-up,
        // and at 1–2 Gbit/s with jumbo frames that cut their CPU per GB by 20–35%
        // (benchmarks/README.md). Losses and reordering are still acknowledged at once.
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(ACK_EVERY_PACKETS - 1));
        t.ack_frequency_config(Some(ack));
        // Parts go out in the order they were written rather than round-robin: each part within
        // a stream's flow-control window then arrives whole as early as it can (and is decoded
        // while the next is on the wire), and packets carry one stream's data, which cut the
        // endpoints' CPU per GB by 7–20%.
        t.send_fairness(false);
        if let Ok(idle) = self.idle_timeout.try_into() {
            t.max_idle_timeout(Some(idle));
        }
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(congestion::CubicConfig::default()))
            }
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(congestion::BbrConfig::default()))
            }
            Congestion::Provisioned => {
                t.congestion_controller_factory(Arc::new(ProvisionedConfig {
                    rate_bps: self.bandwidth_bps,
                    initial_rtt: self.rtt,
                }))
            }
        };
        t
    }
}

/// Requested socket buffers of both endpoints. The kernel's default (~200 KB) is under a
/// millisecond of traffic at 2–5 Gbit/s: one scheduling hiccup overflows it, and every packet
/// the kernel drops there reads to the sender as congestion. Capped by `net.core.rmem_max` /
/// `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A UDP socket on `addr` with [`SOCKET_BUFFER_BYTES`] of buffers where the kernel allows.
fn bind_socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn_udp::UdpSocketState::new((&socket).into())?;
    let (recv, send) = (
        state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES),
        state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES),
    );
    let got = state.recv_buffer_size((&socket).into()).unwrap_or(0);
    if recv.is_err() || send.is_err() || got < SOCKET_BUFFER_BYTES / 2 {
        tracing::debug!(
            "UDP receive buffer on {addr} is {} KiB (raise net.core.rmem_max / wmem_max for multi-Gbit/s links)",
            got / 1024
        );
    }
    Ok(socket)
}

fn endpoint(
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
    tuning: &LinkTuning,
) -> Result<Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
    let mut config = quinn::EndpointConfig::default();
    // What this endpoint accepts; quinn's default (1472) would refuse a jumbo-frame peer's packets.
    config
        .max_udp_payload_size(tuning.max_udp_payload().max(1472))
        .map_err(|e| anyhow!("QUIC endpoint: {e}"))?;
    Ok(Endpoint::new(config, server, bind_socket(addr)?, runtime)?)
}

/// The coordinator's endpoint, serving the data plane on `addr` (UDP).
pub fn server_endpoint(addr: SocketAddr, tls: &JobTls, tuning: LinkTuning) -> Result<Endpoint> {
    let crypto = QuicServerConfig::try_from(tls.server_config(&[DATA_ALPN])?)
        .map_err(|e| anyhow!("QUIC server TLS: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport()));
    endpoint(Some(config), addr, &tuning)
        .map_err(|e| anyhow!("binding the data plane on udp/{addr}: {e}"))
}

/// A learner's endpoint: it trusts only the job CA in `ca_pem`.
pub fn client_endpoint(ca_pem: &[u8], tuning: LinkTuning, bind: SocketAddr) -> Result<Endpoint> {
    let crypto = QuicClientConfig::try_from(client_config(ca_pem, &[DATA_ALPN])?)
        .map_err(|e| anyhow!("QUIC client TLS: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport()));
    let mut endpoint = endpoint(None, bind, &tuning)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Dials the coordinator's data plane, checking its certificate against the job CA.
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr) -> Result<quinn::Connection> {
    let connecting = endpoint.connect(addr, SERVER_NAME)?;
    Ok(connecting.await?)
}
