//! The ranks of a sharded learner: taken from the cluster launcher's `RANK` / `WORLD_SIZE` /
//! `MASTER_ADDR` / `MASTER_PORT` variables, or started here as child processes of rank 0 when
//! the learner is given several ranks on one host (`--ranks R` or `deploy.regions.<r>.ranks`).

use anyhow::{anyhow, bail, Context, Result};
use atoll_collective::RankConfig;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// This process's place in its learner: from the environment when a launcher set it, else rank 0
/// of `ranks` (whose other ranks [`LocalRanks::spawn`] starts). `None` for a one-process learner.
pub fn resolve(ranks: usize) -> Result<Option<RankConfig>> {
    if let Some(config) = RankConfig::from_env()? {
        if config.world_size != ranks {
            bail!(
                "WORLD_SIZE={} but the learner has {ranks} rank(s) (--ranks or \
                 deploy.regions.<region>.ranks): set them equal",
                config.world_size
            );
        }
        return Ok((config.world_size > 1).then_some(config));
    }
    if ranks <= 1 {
        return Ok(None);
    }
    // Rank 0 listens here for its own children only: loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(Some(RankConfig::new(0, ranks, "127.0.0.1", port)?))
}

/// Ranks 1.. of a learner started on this host by its rank 0: each is this same command with
/// `RANK` etc. set, logging to `<run dir>/rank-<r>.log`. Dropping it ends every one still running,
/// by process id.
#[derive(Default)]
pub struct LocalRanks {
    children: Vec<Child>,
}

impl LocalRanks {
    /// Starts ranks 1.. of `config` (rank 0's own config, from [`resolve`] without a launcher).
    pub fn spawn(config: &RankConfig, run_dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the atoll executable")?;
        let mut ranks = LocalRanks::default();
        for rank in 1..config.world_size {
            let log = run_dir.join(format!("rank-{rank}.log"));
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let child = Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", config.world_size.to_string())
                .env("MASTER_ADDR", &config.master_addr)
                .env("MASTER_PORT", config.master_port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(|e| anyhow!("starting rank {rank} ({}): {e}", exe.display()))?;
            tracing::info!(
                "started rank {rank} of {} (pid {})",
                config.world_size,
                child.id()
            );
            ranks.children.push(child);
        }
        Ok(ranks)
    }
}

impl Drop for LocalRanks {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                tracing::debug!("stopping rank process {}", child.id());
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
