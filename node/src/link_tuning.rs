//! The QUIC tuning both ends of a job's data plane take from the recipe's `sync.link` section:
//! the coordinator's server endpoint and every learner's client endpoint.

use atoll_link::LinkTuning;
use atoll_recipe::{CongestionChoice, Recipe};
use std::time::Duration;

pub fn link_tuning(recipe: &Recipe) -> LinkTuning {
    let l = &recipe.sync.link;
    LinkTuning {
        bandwidth_bps: l.bandwidth_gbps.0 * 1e9,
        rtt: Duration::from_secs_f64((2.0 * l.latency_ms.0 / 1000.0).max(0.001)),
        congestion: match l.congestion {
            CongestionChoice::Cubic => atoll_link::Congestion::Cubic,
            CongestionChoice::Bbr => atoll_link::Congestion::Bbr,
            CongestionChoice::Provisioned => atoll_link::Congestion::Provisioned,
        },
        idle_timeout: Duration::from_secs_f64(recipe.sync.heartbeat_timeout_s.0.max(5.0)),
        connections: l.connections.0,
        mtu: l.mtu,
    }
}
