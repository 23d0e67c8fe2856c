//! Emulated WAN links for `atoll run` (`sync.wan` in the recipe) and the counters of
//! `atoll link-emulator`: one userspace relay per learner between it and the coordinator's
//! QUIC data plane (the gRPC control plane goes direct).

use anyhow::{anyhow, Result};
use atoll_link::emulator::{DirectionStats, EmulatorStats, LinkSpec};
use atoll_recipe::Recipe;
use std::collections::BTreeMap;
use std::time::Duration;

/// Each region's link: its own `sync.wan` entry, else `sync.wan.all`; regions without either
/// are not emulated. Unset seeds and MTUs are filled in from the recipe.
pub fn links(recipe: &Recipe) -> Result<BTreeMap<String, LinkSpec>> {
    let parse = |key: &str, value: &serde_yaml::Value| -> Result<LinkSpec> {
        let mut spec: LinkSpec =
            serde_yaml::from_value(value.clone()).map_err(|e| anyhow!("sync.wan.{key}: {e}"))?;
        if spec.seed.is_none() {
            // Different regions draw different losses; the same recipe draws the same ones.
            let region_hash = key
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            spec.seed = Some(recipe.seed ^ region_hash);
        }
        // The path QUIC is tuned for, unless the link says otherwise.
        spec.mtu.get_or_insert(recipe.sync.link.mtu);
        Ok(spec)
    };
    let wan = &recipe.sync.wan;
    let mut out = BTreeMap::new();
    for region in recipe.sync.region_names() {
        if let Some(v) = wan.get(&region) {
            out.insert(region.clone(), parse(&region, v)?);
        } else if let Some(v) = wan.get("all") {
            out.insert(region.clone(), parse(&region, v)?);
        }
    }
    Ok(out)
}

fn direction_json(d: &DirectionStats) -> serde_json::Value {
    serde_json::json!({
        "offered_bytes": d.offered_bytes,
        "forwarded_bytes": d.forwarded_bytes,
        "forwarded_packets": d.forwarded_packets,
        "dropped_loss": d.dropped_loss,
        "dropped_queue": d.dropped_queue,
        "dropped_outage": d.dropped_outage,
        "dropped_mtu": d.dropped_mtu,
        "dropped_send": d.dropped_send,
        "cpu_s": d.cpu_time.as_secs_f64(),
    })
}

pub fn stats_json(s: &EmulatorStats) -> serde_json::Value {
    serde_json::json!({"up": direction_json(&s.up), "down": direction_json(&s.down), "flows": s.flows})
}

/// One line of counters: throughput and drops per direction.
pub fn stats_line(s: &EmulatorStats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let dir = |name: &str, d: &DirectionStats| {
        format!(
            "{name} {:.1} MB ({:.1} Mbit/s), dropped loss/queue/outage/mtu {}/{}/{}/{}",
            d.forwarded_bytes as f64 / 1e6,
            d.forwarded_bytes as f64 * 8.0 / secs / 1e6,
            d.dropped_loss,
            d.dropped_queue,
            d.dropped_outage,
            d.dropped_mtu
        )
    };
    format!(
        "{:.0}s, {} flows | {} | {}",
        secs,
        s.flows,
        dir("up", &s.up),
        dir("down", &s.down)
    )
}
