use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::error::{CollectiveError, Result};

/// torch.distributed's default, so launchers configured for PyTorch work unchanged.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// This process's place in a group of ranks and where rank 0 listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Host name or address of rank 0 (which listens there; the others connect).
    pub master_addr: String,
    pub master_port: u16,
    /// The rank's index among the ranks of its machine (`LOCAL_RANK`), which picks its GPU;
    /// equal to `rank` when not given.
    pub local_rank: usize,
}

impl RankConfig {
    /// An explicit configuration; `rank` must be below `world_size`.
    pub fn new(
        rank: usize,
        world_size: usize,
        master_addr: impl Into<String>,
        master_port: u16,
    ) -> Result<Self> {
        let config = RankConfig {
            rank,
            world_size,
            master_addr: master_addr.into(),
            master_port,
            local_rank: rank,
        };
        config.validate()?;
        Ok(config)
    }

    /// A group of one (rank 0 of 1): every collective is the identity.
    pub fn single() -> Self {
        RankConfig {
            rank: 0,
            world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            local_rank: 0,
        }
    }

    /// From the process environment: `RANK`, `WORLD_SIZE` (both required once either is set),
    /// `MASTER_ADDR` (default 127.0.0.1), `MASTER_PORT` (default 29500), `LOCAL_RANK` (default
    /// `RANK`). `Ok(None)` when neither `RANK` nor `WORLD_SIZE` is set (not launched as a rank).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`RankConfig::from_env`] with the variables looked up through `var` (for tests and for
    /// launchers that pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let rank = var("RANK");
        let world = var("WORLD_SIZE");
        let (rank, world) = match (rank, world) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(CollectiveError::InvalidConfig(
                    "RANK is set but WORLD_SIZE is not; set both (or neither)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(CollectiveError::InvalidConfig(
                    "WORLD_SIZE is set but RANK is not; set both (or neither)".into(),
                ))
            }
            (Some(r), Some(w)) => (r, w),
        };
        let rank = parse_var("RANK", &rank)?;
        let world_size = parse_var("WORLD_SIZE", &world)?;
        let master_addr = match var("MASTER_ADDR") {
            Some(a) if a.trim().is_empty() => {
                return Err(CollectiveError::InvalidConfig(
                    "MASTER_ADDR is empty; set it to rank 0's host name or address".into(),
                ))
            }
            Some(a) => a.trim().to_string(),
            None => "127.0.0.1".into(),
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().map_err(|_| {
                CollectiveError::InvalidConfig(format!(
                    "MASTER_PORT={p:?} is not a port number (1-65535)"
                ))
            })?,
            None => DEFAULT_MASTER_PORT,
        };
        if master_port == 0 {
            return Err(CollectiveError::InvalidConfig(
                "MASTER_PORT=0: rank 0 must listen on a fixed port the others know".into(),
            ));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(l) => parse_var("LOCAL_RANK", &l)?,
            None => rank,
        };
        let config = RankConfig {
            rank,
            world_size,
            master_addr,
            master_port,
            local_rank,
        };
        config.validate()?;
        Ok(Some(config))
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(CollectiveError::InvalidConfig(
                "WORLD_SIZE must be at least 1".into(),
            ));
        }
        if self.rank >= self.world_size {
            return Err(CollectiveError::InvalidConfig(format!(
                "RANK={} is out of range for WORLD_SIZE={} (ranks are 0..{})",
                self.rank,
                self.world_size,
                self.world_size - 1
            )));
        }
        Ok(())
    }

    /// Rank 0's socket address (resolving `master_addr`).
    pub fn master_socket_addr(&self) -> Result<SocketAddr> {
        (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| {
                CollectiveError::io(
                    format!("cannot resolve MASTER_ADDR {:?}", self.master_addr),
                    e,
                )
            })?
            .next()
            .ok_or_else(|| {
                CollectiveError::InvalidConfig(format!(
                    "MASTER_ADDR {:?} resolves to no address",
                    self.master_addr
                ))
            })
    }
}

fn parse_var(name: &str, value: &str) -> Result<usize> {
    value.trim().parse::<usize>().map_err(|_| {
        CollectiveError::InvalidConfig(format!("{name}={value:?} is not a non-negative integer"))
    })
}

/// Limits on the waits of a collective group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectiveOptions {
    /// The longest any one operation waits for a peer (the slowest rank's step between two
    /// collectives must fit in it).
    pub timeout: Duration,
    /// The longest start-up waits for every rank to join.
    pub connect_timeout: Duration,
}

impl Default for CollectiveOptions {
    fn default() -> Self {
        CollectiveOptions {
            timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(300),
        }
    }
}

impl CollectiveOptions {
    /// Both limits set to `limit` (tests use short ones).
    pub fn with_timeout(limit: Duration) -> Self {
        CollectiveOptions {
            timeout: limit,
            connect_timeout: limit,
        }
    }
}
