//! `atoll learner`: one region's learner against a coordinator.

use super::node_process;
use anyhow::{bail, Result};
use atoll_store::ResumeFrom;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct LearnerArgs {
    recipe: PathBuf,
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<String>,
    /// Region name (one learner per region).
    #[arg(long)]
    region: String,
    /// Coordinator address HOST:PORT.
    #[arg(long)]
    coordinator: String,
    /// The job CA certificate (the coordinator's <run dir>/tls/ca.pem); nothing else is trusted.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    run_dir: PathBuf,
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Prometheus endpoint; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics: SocketAddr,
    /// Give up when the coordinator stays unreachable this many seconds.
    #[arg(long, default_value_t = 600)]
    give_up_after_s: u64,
    /// Start from the global model of the coordinator's checkpoint in `checkpoint.url`
    /// (`latest` or `step-N`): only fragments changed since are downloaded at join.
    #[arg(long, value_name = "latest|step-N")]
    resume: Option<ResumeFrom>,
    /// Send the QUIC data plane through this address (e.g. an `atoll link-emulator`)
    /// instead of straight to the coordinator.
    #[arg(long, value_name = "HOST:PORT")]
    data_via: Option<SocketAddr>,
    /// Processes (ranks) this learner's model is sharded over, one per GPU; default: the
    /// recipe's `deploy.regions.<region>.ranks` (1). Without a launcher's RANK/WORLD_SIZE, rank 0
    /// starts the others on this host (docs/scale.md).
    #[arg(long)]
    ranks: Option<usize>,
}

pub fn run(args: LearnerArgs) -> Result<()> {
    if args.ranks == Some(0) {
        bail!("--ranks 0: a learner has at least one rank");
    }
    // Ranks 1.. log to stderr only: the launcher's output of the task, or `rank-<r>.log` when
    // rank 0 started them.
    let rank = atoll_collective::RankConfig::from_env()?.map_or(0, |r| r.rank);
    let (recipe, secret) = node_process(
        &args.recipe,
        &args.overrides,
        args.secret_file.as_deref(),
        &args.run_dir,
        (rank == 0).then_some("learner.log"),
    )?;
    let ranks = args
        .ranks
        .unwrap_or_else(|| recipe.deploy.region(&args.region).ranks.0);
    let ranks = atoll_node::ranks::resolve(ranks)?;
    // Rank 0 without a launcher starts the others here; they end with it.
    let _local_ranks = match &ranks {
        Some(config) if config.rank == 0 && std::env::var_os("RANK").is_none() => {
            atoll_node::ranks::LocalRanks::spawn(config, &args.run_dir)?
        }
        _ => Default::default(),
    };
    atoll_node::learner::run(atoll_node::learner::LearnerOptions {
        recipe,
        region: args.region,
        coordinator: args.coordinator,
        ca: args.ca,
        secret,
        run_dir: args.run_dir,
        metrics: Some(args.metrics),
        max_frame_bytes: None,
        give_up_after: std::time::Duration::from_secs(args.give_up_after_s),
        resume: args.resume,
        data_via: args.data_via,
        ranks,
    })
}
