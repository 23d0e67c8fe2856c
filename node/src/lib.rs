//! Atoll's long-running processes. All protocol decisions stay in the sans-IO
//! [`atoll_coordinator::Syncer`] and [`atoll_coordinator::LearnerProtocol`]; this crate only
//! carries events and actions over gRPC (control plane) and QUIC (data plane).
//! - [`coordinator`]: `atoll coordinator`, the service hosting the syncer;
//! - [`learner`]: `atoll learner`, one region's inner loop and its background network tasks;
//! - [`launcher`]: `atoll run`, a whole job on this machine;
//! - [`link_bench`]: `atoll bench link`, the data plane through an emulated WAN link;
//! - [`link_tuning`]: the QUIC tuning both ends take from the recipe's `sync.link`;
//! - [`parts`]: data-plane parts over QUIC, sent and received alike on both ends;
//! - [`ranks`]: the ranks of a sharded learner, from a cluster launcher or started here;
//! - [`serial_worker`]: a thread doing jobs in the order sent (the learner's encoder and joiner);
//! - [`status`]: `atoll status` and the launcher's live display.

pub mod contribution;
pub mod coordinator;
pub mod job_metrics;
pub mod launcher;
pub mod learner;
pub mod link_bench;
pub mod link_tuning;
pub mod metrics_endpoint;
pub mod parts;
pub mod ranks;
pub mod serial_worker;
pub mod state;
pub mod status;
pub mod step_rate;
pub mod wan;

use anyhow::{anyhow, Result};
use std::path::Path;

/// The job secret: `ATOLL_SECRET`, else the file given, else `sync.secret` in the recipe.
pub fn resolve_secret(recipe_secret: Option<&str>, file: Option<&Path>) -> Result<String> {
    let secret = if let Ok(s) = std::env::var("ATOLL_SECRET") {
        s
    } else if let Some(path) = file {
        std::fs::read_to_string(path)
            .map_err(|e| anyhow!("--secret-file {}: {e}", path.display()))?
            .trim()
            .to_string()
    } else if let Some(s) = recipe_secret {
        s.to_string()
    } else {
        return Err(anyhow!(
            "no job secret: set ATOLL_SECRET, pass --secret-file FILE, or set sync.secret in the recipe"
        ));
    };
    if secret.len() < 16 {
        return Err(anyhow!(
            "the job secret is {} characters long; use at least 16 (e.g. `openssl rand -hex 16`)",
            secret.len()
        ));
    }
    Ok(secret)
}

/// A random hex token (sessions, generated secrets).
pub fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// Equal-time comparison, so a wrong secret's timing reveals nothing about the right one.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
