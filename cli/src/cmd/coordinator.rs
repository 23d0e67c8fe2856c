//! `atoll coordinator`: the syncer of a multi-region job behind gRPC (TLS) and QUIC.

use super::{node_process, runtime};
use anyhow::Result;
use atoll_store::ResumeFrom;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct CoordinatorArgs {
    recipe: PathBuf,
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
    /// Address for gRPC (TCP) and the QUIC data plane (UDP, same port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// State, TLS material, logs and the final model; an existing state is resumed.
    #[arg(long)]
    run_dir: PathBuf,
    /// File holding the job secret (ATOLL_SECRET, when set, comes first; sync.secret last).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Prometheus endpoint; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: SocketAddr,
    /// Extra host names or addresses for the server certificate (repeatable), for learners
    /// that dial it by a name other than the listen address.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Largest data-plane frame this coordinator accepts from learners, in MiB, 1 to 4096
    /// (default: what the plan's largest part needs as f32, at least 1024); below what the
    /// largest contribution part needs in `sync.codec`, the coordinator refuses to start.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_frame_mib: Option<u64>,
    /// Start from a checkpoint of `checkpoint.url` (default <run dir>/checkpoints):
    /// `latest` (newest intact) or `step-N`, instead of the run directory's own state.
    #[arg(long, value_name = "latest|step-N")]
    resume: Option<ResumeFrom>,
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let (recipe, secret) = node_process(
        &args.recipe,
        &args.overrides,
        args.secret_file.as_deref(),
        &args.run_dir,
        Some("coordinator.log"),
    )?;
    runtime()?.block_on(atoll_node::coordinator::run(
        atoll_node::coordinator::CoordinatorOptions {
            recipe,
            listen: args.listen,
            run_dir: args.run_dir,
            secret,
            metrics: Some(args.metrics),
            hosts: args.hosts,
            max_frame_bytes: args.max_frame_mib.map(|mib| mib << 20),
            resume: args.resume,
        },
    ))
}
