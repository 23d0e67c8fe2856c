//! `atoll status` and the launcher's live display: one Status call, rendered as lines.

use anyhow::{anyhow, Result};
use atoll_proto::v1::{StatusReply, StatusRequest};
use std::path::Path;

pub async fn fetch(coordinator: &str, ca: &Path, secret: &str) -> Result<StatusReply> {
    let mut client = atoll_proto::client::connect(coordinator, ca).await?;
    let reply = client
        .status(StatusRequest {
            secret: secret.to_string(),
        })
        .await
        .map_err(|s| anyhow!("status refused: {}", s.message()))?;
    Ok(reply.into_inner())
}

fn megabytes(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// The header line of a job.
pub fn headline(s: &StatusReply) -> String {
    format!(
        "job {} | up {:.0}s | fragment versions {:?} | merges {} | rejected {} | goodput {:.2}{}",
        s.job,
        s.uptime_s,
        s.fragment_versions,
        s.merges,
        s.rejected,
        s.goodput,
        if s.job_done { " | done" } else { "" }
    )
}

/// One line per learner.
pub fn learner_lines(s: &StatusReply) -> Vec<String> {
    s.learners
        .iter()
        .map(|l| {
            format!(
                "{:<12} {:<9} step {:>6}/{} loss {:>7.4} {:>8.0} tok/s  up {:>9} down {:>9}  last report {:.1}s ago",
                l.region,
                l.state,
                l.step,
                s.max_steps,
                l.loss,
                l.tokens_per_s,
                megabytes(l.bytes_up),
                megabytes(l.bytes_down),
                l.last_report_age_s
            )
        })
        .collect()
}
