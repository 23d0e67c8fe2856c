//! The gRPC client side shared by learners, `atoll status` and the launcher: TLS pinned to the
//! job CA, the coordinator's name checked as [`atoll_link::SERVER_NAME`].

use crate::v1::coordinator_client::CoordinatorClient;
use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub async fn connect(coordinator: &str, ca: &Path) -> Result<CoordinatorClient<Channel>> {
    let ca_pem =
        std::fs::read(ca).with_context(|| format!("reading the job CA {}", ca.display()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(atoll_link::SERVER_NAME);
    let endpoint = Endpoint::from_shared(format!("https://{coordinator}"))
        .map_err(|e| anyhow!("--coordinator {coordinator:?}: {e}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the coordinator at {coordinator}: {e}"))?;
    Ok(CoordinatorClient::new(channel).max_decoding_message_size(16 << 20))
}
