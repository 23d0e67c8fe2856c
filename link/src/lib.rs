//! Atoll's links between learners and the coordinator:
//! - [`tls`]: the per-job certificate authority and the TLS configurations that pin it;
//! - [`quic`]: QUIC endpoints whose flow-control windows fit a 2–5 Gbps, 20–80 ms WAN link;
//! - [`provisioned`]: a congestion controller that sends at a dedicated link's rate;
//! - [`data`]: the data-plane messages (a fixed header in front of one ATF1 frame), parsed with
//!   limits before anything is allocated;
//! - [`emulator`]: a userspace WAN link emulator (rate, delay, jitter, loss, queue, outages) for
//!   UDP, to run jobs and benchmarks over emulated 2–5 Gbps inter-region links.

pub mod data;
pub mod emulator;
pub mod provisioned;
pub mod quic;
pub mod tls;

pub use data::{DataError, Hello, PartHeader, PartKind, HELLO_MAGIC, PART_MAGIC};
pub use quic::{Congestion, LinkTuning};
pub use tls::{JobTls, SERVER_NAME};
