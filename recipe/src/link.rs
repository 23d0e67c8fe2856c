//! `sync.link`: the link between each learner and the coordinator, as the simulator models it and
//! the QUIC endpoints are tuned for.

use crate::field_defaults;
use crate::value::{NonNegativeF64, PositiveF64, PositiveInt};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSection {
    #[serde(default = "defaults::bandwidth_gbps")]
    pub bandwidth_gbps: PositiveF64,
    #[serde(default = "defaults::latency_ms")]
    pub latency_ms: NonNegativeF64,
    /// QUIC connections per learner, striped tensor by tensor, for links one connection (one
    /// core) cannot fill.
    #[serde(default = "defaults::connections")]
    pub connections: PositiveInt,
    #[serde(default)]
    pub congestion: CongestionChoice,
    /// The path MTU in bytes (IP packet, headers included). QUIC probes for datagrams up to it:
    /// 9000 (or a cloud VPC's 8896) where the path carries jumbo frames cuts the data plane's
    /// datagrams about fourfold and its CPU per byte about in half. Too high costs nothing but a few lost
    /// probes; an emulated link (`sync.wan`) carries this MTU unless its own `mtu` says otherwise.
    #[serde(default = "defaults::mtu")]
    pub mtu: u16,
    /// Values one data-plane part carries at most: a larger tensor travels as several parts,
    /// each on a stream of its own (striped over the connections) and decoded as it arrives. A
    /// multiple of 256 (the codecs' block) up to 536870912 (a 2 GiB f32 frame); the default,
    /// 67108864, cuts only a 12B Gemma's embedding (into 15 or 16 parts).
    #[serde(default = "defaults::part_values")]
    pub part_values: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CongestionChoice {
    #[default]
    Cubic,
    Bbr,
    /// Send at `bandwidth_gbps`, ignoring sparse loss: for dedicated inter-region links.
    Provisioned,
}

impl Default for LinkSection {
    fn default() -> Self {
        field_defaults()
    }
}

mod defaults {
    use super::*;
    pub fn bandwidth_gbps() -> PositiveF64 {
        PositiveF64(2.0)
    }
    pub fn latency_ms() -> NonNegativeF64 {
        NonNegativeF64(20.0)
    }
    pub fn connections() -> PositiveInt {
        PositiveInt(1)
    }
    pub fn mtu() -> u16 {
        1500
    }
    pub fn part_values() -> u64 {
        atoll_coordinator::plan::DEFAULT_PART_VALUES
    }
}
