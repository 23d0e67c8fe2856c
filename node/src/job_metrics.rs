//! Metrics the job's dashboard (`deploy/grafana/atoll-job.json`) reads, recorded where the
//! processes learn them. Series that only move on rare events (rejections) are registered at
//! zero on start, so a panel shows 0 rather than "no data" and a query is never silently wrong.

use atoll_coordinator::syncer::RejectReason;
use atoll_coordinator::MergeRecord;

/// Every reason a contribution can be rejected for; the match keeps the list complete.
fn reject_reasons() -> [RejectReason; 7] {
    let all = [
        RejectReason::Duplicate,
        RejectReason::Late,
        RejectReason::NotRequested,
        RejectReason::NonFinite,
        RejectReason::WrongShape,
        RejectReason::StaleBase,
        RejectReason::UnknownFragment,
    ];
    for r in &all {
        match r {
            RejectReason::Duplicate
            | RejectReason::Late
            | RejectReason::NotRequested
            | RejectReason::NonFinite
            | RejectReason::WrongShape
            | RejectReason::StaleBase
            | RejectReason::UnknownFragment => {}
        }
    }
    all
}

/// The coordinator's series that exist from its start: rejections, refused joins and malformed
/// data at zero, the global fragment versions it resumes with.
pub fn coordinator_started(versions: &[u64]) {
    metrics::counter!("atoll_refused_joins_total", "reason" => "secret").increment(0);
    metrics::counter!("atoll_bad_data_total").increment(0);
    for reason in reject_reasons() {
        metrics::counter!("atoll_rejected_contributions_total", "reason" => format!("{reason:?}"))
            .increment(0);
    }
    for (p, v) in versions.iter().enumerate() {
        metrics::gauge!("atoll_fragment_version", "fragment" => p.to_string()).set(*v as f64);
    }
}

/// A merge: the fragment's new version, how many versions behind each contribution's base was
/// (0: built on the version just replaced), and the tokens it merged.
pub fn merged(record: &MergeRecord, tokens_merged: u64) {
    metrics::gauge!("atoll_fragment_version", "fragment" => record.fragment.to_string())
        .set(record.version as f64);
    for staleness in record.staleness() {
        metrics::histogram!("atoll_contribution_staleness_versions").record(staleness as f64);
    }
    metrics::counter!("atoll_tokens_merged_total").increment(tokens_merged);
}

/// A learner's inner step.
pub fn learner_step(step: u64, loss: f64, tokens_per_s: f64) {
    metrics::gauge!("atoll_learner_step").set(step as f64);
    metrics::gauge!("atoll_learner_loss").set(loss);
    metrics::gauge!("atoll_learner_tokens_per_s").set(tokens_per_s);
}

/// The fragment versions a learner holds.
pub fn learner_versions(versions: &[u64]) {
    for (p, v) in versions.iter().enumerate() {
        metrics::gauge!("atoll_learner_fragment_version", "fragment" => p.to_string())
            .set(*v as f64);
    }
}
