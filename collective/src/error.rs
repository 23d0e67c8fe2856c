use std::time::Duration;

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A bad rank configuration (environment variable, argument).
    #[error("{0}")]
    InvalidConfig(String),

    /// A tensor the operation cannot take (kind, shape, device).
    #[error("{0}")]
    InvalidTensor(String),

    #[error("rank {rank}: {op} timed out after {:.1} s waiting for rank {peer} (is it still running? the limit is CollectiveOptions::timeout)", .after.as_secs_f64())]
    Timeout {
        rank: usize,
        peer: usize,
        op: &'static str,
        after: Duration,
    },

    #[error("rank {rank}: rank {peer} closed its connection during {op} (it exited or failed)")]
    PeerClosed {
        rank: usize,
        peer: usize,
        op: &'static str,
    },

    /// Ranks called different operations, or the same one with different shapes or kinds.
    #[error("ranks disagree on {op}: {detail}")]
    Mismatch { op: &'static str, detail: String },

    /// [`crate::verify_same_config`] found ranks whose config digest differs from rank 0's.
    #[error("{}", config_mismatch_message(.what, .ranks, .digests))]
    ConfigMismatch {
        what: String,
        /// The ranks whose digest differs from rank 0's.
        ranks: Vec<usize>,
        /// Every rank's digest (hex), in rank order.
        digests: Vec<String>,
    },

    /// Rank 0 failed the operation and told this rank why.
    #[error("rank {rank}: rank 0 reported: {message}")]
    Remote { rank: usize, message: String },

    /// An earlier error left the group unusable.
    #[error("the collective is unusable after an earlier error: {0}")]
    Broken(String),

    /// CUDA or NCCL is asked for but not present.
    #[error("{0}")]
    Unavailable(String),

    #[error("NCCL {op} failed: {detail}")]
    Nccl { op: &'static str, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

fn config_mismatch_message(what: &str, ranks: &[usize], digests: &[String]) -> String {
    let list = ranks
        .iter()
        .map(|r| format!("rank {r} has sha256 {}", short(&digests[*r])))
        .collect::<Vec<_>>()
        .join(", ");
    let rank0 = digests.first().map(|d| short(d)).unwrap_or("?");
    format!(
        "ranks disagree on the {what}: rank 0 has sha256 {rank0}, {list}; every rank must start \
         from the same recipe and model config"
    )
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(16)]
}

impl CollectiveError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CollectiveError::Io {
            context: context.into(),
            source,
        }
    }
}
