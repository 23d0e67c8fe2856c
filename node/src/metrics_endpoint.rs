//! A Prometheus endpoint: the `metrics` recorder rendered on every HTTP GET. Served by hand on a
//! tokio listener so an address with port 0 works and the bound port can be reported.

use anyhow::{anyhow, Result};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Installs the global recorder and serves it on `addr`; returns the bound address. `labels` go
/// on every series (a learner's region, so dashboards can tell learners apart).
pub async fn serve(addr: SocketAddr, labels: &[(&str, &str)]) -> Result<SocketAddr> {
    let mut builder = PrometheusBuilder::new();
    for (k, v) in labels {
        builder = builder.add_global_label(*k, *v);
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow!("installing the metrics recorder: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow!("binding the metrics endpoint on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                // One request per connection; its content does not matter.
                let _ = stream.read(&mut buf).await;
                let body = handle.render();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(bound)
}
