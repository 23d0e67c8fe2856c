//! The start-up check that every rank runs the same recipe and model config.

use sha2::{Digest, Sha256};

use crate::error::{CollectiveError, Result};
use crate::Collective;

/// The hex sha256 of `bytes`.
pub fn config_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks that every rank passed the same `bytes` (e.g. the resolved recipe and model config,
/// serialized the same way on every rank); `what` names them in the error. Every rank gets the
/// same [`CollectiveError::ConfigMismatch`], naming the ranks whose digest differs from rank 0's.
pub fn verify_same_config(collective: &mut dyn Collective, what: &str, bytes: &[u8]) -> Result<()> {
    let digest = config_digest(bytes);
    let all = collective.all_gather_bytes(digest.as_bytes())?;
    let digests: Vec<String> = all
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect();
    let ranks: Vec<usize> = (1..digests.len())
        .filter(|&r| digests[r] != digests[0])
        .collect();
    if ranks.is_empty() {
        tracing::debug!(what, digest, "every rank has the same config");
        Ok(())
    } else {
        Err(CollectiveError::ConfigMismatch {
            what: what.to_string(),
            ranks,
            digests,
        })
    }
}
