//! Checkpoint URLs to object stores.

use crate::StoreOptions;
use anyhow::{anyhow, bail, Context, Result};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use std::sync::Arc;

pub(crate) fn open(url: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, ObjPath)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return local(url);
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if scheme != "file" && bucket.is_empty() {
        bail!("checkpoint URL {url:?} names no bucket");
    }
    let root = ObjPath::parse(prefix.trim_matches('/'))
        .map_err(|e| anyhow!("checkpoint URL {url:?}: bad prefix: {e}"))?;
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: options.max_retries,
        retry_timeout: options.retry_timeout,
    };
    let store: Arc<dyn ObjectStore> = match scheme {
        "file" => return local(rest),
        "s3" => {
            let endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
            let plain_http_loopback = endpoint.as_deref().is_some_and(is_loopback_http);
            if let Some(e) = endpoint.as_deref() {
                if e.starts_with("http://") && !plain_http_loopback {
                    let allowed = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
                    if !allowed {
                        bail!("AWS_ENDPOINT_URL {e} is plain http on a non-loopback host; use https (or set AWS_ALLOW_HTTP=true knowingly)");
                    }
                }
            }
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            if plain_http_loopback {
                b = b.with_allow_http(true);
            }
            Arc::new(
                b.build()
                    .with_context(|| format!("cannot open {url} (AWS_* environment)"))?,
            )
        }
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .build()
                .with_context(|| format!("cannot open {url} (GOOGLE_* environment)"))?,
        ),
        "az" | "azure" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_retry(retry)
                .build()
                .with_context(|| format!("cannot open {url} (AZURE_* environment)"))?,
        ),
        other => bail!(
            "checkpoint URL {url:?}: unknown scheme {other:?} (use a directory, file://, s3://, gs:// or az://)"
        ),
    };
    Ok((store, root))
}

fn local(dir: &str) -> Result<(Arc<dyn ObjectStore>, ObjPath)> {
    if dir.is_empty() {
        bail!("checkpoint location is empty");
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint directory {dir}"))?;
    let store = LocalFileSystem::new_with_prefix(dir)
        .with_context(|| format!("cannot open checkpoint directory {dir}"))?
        // Empty step folders left by deletions would otherwise be listed as partial checkpoints.
        .with_automatic_cleanup(true);
    Ok((Arc::new(store), ObjPath::default()))
}

fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', ':']).next().unwrap_or("");
    let host = if rest.starts_with('[') {
        rest.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_endpoints_may_be_plain_http() {
        assert!(is_loopback_http("http://127.0.0.1:9000"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(is_loopback_http("http://[::1]:9000"));
        assert!(!is_loopback_http("http://10.0.0.5:9000"));
        assert!(!is_loopback_http("https://127.0.0.1:9000"));
    }

    #[test]
    fn unknown_schemes_and_empty_buckets_are_refused() {
        let o = StoreOptions::default();
        let e = open("ftp://x/y", &o)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown scheme"), "{e}");
        let e = open("s3:///prefix", &o)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no bucket"), "{e}");
    }
}
