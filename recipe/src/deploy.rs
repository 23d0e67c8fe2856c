//! The recipe's `deploy` section: what `atoll deploy k8s|slurm` needs to render launch material
//! for real clusters (docs/deploy.md). The training processes read only `regions.<r>.ranks`;
//! every field has a default, so a recipe without the section parses as before, and the renderer
//! names the fields it still needs.

use crate::{Count, PositiveInt};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySection {
    /// Container image with the `atoll` binary (`deploy/Dockerfile`), with a tag or digest,
    /// e.g. `registry.example.com/atoll:0.1.0-cuda`.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub coordinator: CoordinatorDeploy,
    /// Port of every learner's Prometheus endpoint.
    #[serde(default = "defaults::learner_metrics_port")]
    pub learner_metrics_port: u16,
    /// Per-region settings, keyed by a region of `sync.regions`; regions not listed get the
    /// defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, RegionDeploy>,
    #[serde(default)]
    pub k8s: K8sDeploy,
    #[serde(default)]
    pub slurm: SlurmDeploy,
}

impl Default for DeploySection {
    fn default() -> Self {
        field_defaults()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorDeploy {
    /// HOST:PORT the learners dial: the coordinator's public name or address, TCP (gRPC) and
    /// UDP (QUIC) on the same port.
    #[serde(default)]
    pub address: Option<String>,
    /// The region whose cluster runs the coordinator; default: the first region.
    #[serde(default)]
    pub region: Option<String>,
    /// Port the coordinator listens on (TCP and UDP) where it runs.
    #[serde(default = "defaults::coordinator_port")]
    pub port: u16,
    /// Port of the coordinator's Prometheus endpoint.
    #[serde(default = "defaults::coordinator_metrics_port")]
    pub metrics_port: u16,
    #[serde(default = "defaults::coordinator_cpus")]
    pub cpus: PositiveInt,
    #[serde(default = "defaults::memory_gb")]
    pub memory_gb: PositiveInt,
}

impl Default for CoordinatorDeploy {
    fn default() -> Self {
        field_defaults()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionDeploy {
    /// Processes (ranks) of this region's learner, its model sharded over them: read by
    /// `atoll learner` (rank 0 starts the others), `atoll run`, `atoll plan` and the renderers.
    #[serde(default = "defaults::ranks")]
    pub ranks: PositiveInt,
    /// GPUs per rank (`nvidia.com/gpu`, `--gpus-per-task`); 0 trains on CPUs.
    #[serde(default = "defaults::gpus")]
    pub gpus: Count,
    /// CPU cores per rank.
    #[serde(default = "defaults::learner_cpus")]
    pub cpus: PositiveInt,
    /// Memory per rank, GiB.
    #[serde(default = "defaults::memory_gb")]
    pub memory_gb: PositiveInt,
    /// HOST:PORT this region's learners dial, where it differs from `deploy.coordinator.address`
    /// (a private link, a VPN address).
    #[serde(default)]
    pub coordinator: Option<String>,
    /// This region's image, where it differs from `deploy.image` (e.g. a CPU build).
    #[serde(default)]
    pub image: Option<String>,
    /// SLURM partition (`--partition`).
    #[serde(default)]
    pub partition: Option<String>,
    /// SLURM account (`--account`).
    #[serde(default)]
    pub account: Option<String>,
}

impl Default for RegionDeploy {
    fn default() -> Self {
        field_defaults()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ServiceType {
    /// A cloud load balancer with a public address (TCP and UDP on one port).
    #[default]
    LoadBalancer,
    NodePort,
    /// Reached through the user's own gateway or a VPN.
    ClusterIP,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sDeploy {
    #[serde(default = "defaults::namespace")]
    pub namespace: String,
    /// Secret holding the job secret under the key `secret` (in every cluster).
    #[serde(default = "defaults::secret_name")]
    pub secret: String,
    /// Secret with the job's TLS material (`atoll deploy tls`): `ca.pem` in every cluster, plus
    /// `ca.key`, `server.pem` and `server.key` in the coordinator's.
    #[serde(default = "defaults::tls_secret_name")]
    pub tls_secret: String,
    /// Secret whose keys become the processes' environment: object-store credentials
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`) for `checkpoint.url`.
    #[serde(default)]
    pub store_secret: Option<String>,
    /// How the coordinator's Service is exposed.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Size of the coordinator's volume (state, merges, checkpoints when `checkpoint.url` is
    /// local, the final model), GiB.
    #[serde(default = "defaults::storage_gb")]
    pub storage_gb: PositiveInt,
    /// Storage class of that volume; absent: the cluster's default.
    #[serde(default)]
    pub storage_class: Option<String>,
    /// Restarts of a failing process before Kubernetes gives the job up.
    #[serde(default = "defaults::backoff_limit")]
    pub backoff_limit: Count,
}

impl Default for K8sDeploy {
    fn default() -> Self {
        field_defaults()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmDeploy {
    /// Directory of the job on every cluster (shared by the nodes): the recipe, `job.secret`,
    /// `tls/` and the run directories. Default `$HOME/atoll/<recipe name>`.
    #[serde(default)]
    pub dir: Option<String>,
    /// The command that runs `atoll` on the nodes, e.g. `/opt/atoll/bin/atoll` or
    /// `apptainer exec --nv atoll.sif atoll`.
    #[serde(default = "defaults::atoll_command")]
    pub atoll: String,
    /// Run the coordinator on this host (`coordinator.sh`) instead of on the head node of the
    /// coordinator region's allocation.
    #[serde(default)]
    pub coordinator_host: Option<String>,
    /// Wall-clock limit of each allocation (`--time`), e.g. `2-00:00:00`.
    #[serde(default)]
    pub time: Option<String>,
}

impl Default for SlurmDeploy {
    fn default() -> Self {
        field_defaults()
    }
}

impl DeploySection {
    /// A recipe without the section writes none back (`Recipe::to_yaml`).
    pub fn is_default(&self) -> bool {
        *self == DeploySection::default()
    }

    /// The settings of `region` (the defaults where the recipe names none).
    pub fn region(&self, region: &str) -> RegionDeploy {
        self.regions.get(region).cloned().unwrap_or_default()
    }

    /// Checks what a recipe can get wrong without rendering anything: the keys name regions of
    /// the job.
    pub fn validate(&self, regions: &[String]) -> Result<()> {
        for key in self.regions.keys() {
            if !regions.contains(key) {
                bail!(
                    "deploy.regions.{key}: not a region of this job (regions: {})",
                    regions.join(", ")
                );
            }
        }
        if let Some(r) = &self.coordinator.region {
            if !regions.contains(r) {
                bail!(
                    "deploy.coordinator.region: {r:?} is not a region of this job (regions: {})",
                    regions.join(", ")
                );
            }
        }
        Ok(())
    }
}

fn field_defaults<T: serde::de::DeserializeOwned>() -> T {
    serde_yaml::from_value(serde_yaml::Value::Mapping(serde_yaml::Mapping::new()))
        .expect("every field has a default")
}

mod defaults {
    use super::*;
    pub fn learner_metrics_port() -> u16 {
        9465
    }
    pub fn coordinator_port() -> u16 {
        7070
    }
    pub fn coordinator_metrics_port() -> u16 {
        9464
    }
    pub fn coordinator_cpus() -> PositiveInt {
        PositiveInt(4)
    }
    pub fn learner_cpus() -> PositiveInt {
        PositiveInt(8)
    }
    pub fn memory_gb() -> PositiveInt {
        PositiveInt(16)
    }
    pub fn gpus() -> Count {
        Count(0)
    }
    pub fn ranks() -> PositiveInt {
        PositiveInt(1)
    }
    pub fn namespace() -> String {
        "atoll".into()
    }
    pub fn secret_name() -> String {
        "atoll-job-secret".into()
    }
    pub fn tls_secret_name() -> String {
        "atoll-tls".into()
    }
    pub fn storage_gb() -> PositiveInt {
        PositiveInt(50)
    }
    pub fn backoff_limit() -> Count {
        Count(20)
    }
    pub fn atoll_command() -> String {
        "atoll".into()
    }
}

#[cfg(test)]
mod tests {
    use crate::Recipe;

    fn parse(deploy: &str) -> anyhow::Result<Recipe> {
        Recipe::from_yaml(
            &format!(
                "model: {{preset: gemma3-tiny}}\nsync: {{learners: 2, regions: [east, west]}}\n{deploy}"
            ),
            "r.yaml",
            &[],
        )
    }

    #[test]
    fn the_section_is_optional_and_defaults_every_field() {
        let r = parse("").unwrap();
        assert_eq!(r.deploy.coordinator.port, 7070);
        assert_eq!(r.deploy.region("east").ranks.0, 1);
        assert_eq!(r.deploy.k8s.namespace, "atoll");
        let r = parse("deploy: {regions: {west: {gpus: 2}}}").unwrap();
        assert_eq!(r.deploy.region("west").gpus.0, 2);
        assert_eq!(r.deploy.region("east").gpus.0, 0);
    }

    #[test]
    fn unknown_regions_and_fields_are_named() {
        let e = format!(
            "{:#}",
            parse("deploy: {regions: {north: {gpus: 1}}}").unwrap_err()
        );
        assert!(
            e.contains("deploy.regions.north: not a region of this job"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse("deploy: {coordinator: {region: x}}").unwrap_err()
        );
        assert!(e.contains("deploy.coordinator.region"), "{e}");
        let e = format!("{:#}", parse("deploy: {k8s: {namespce: a}}").unwrap_err());
        assert!(e.contains("deploy.k8s.namespce: unknown field"), "{e}");
        let e = format!(
            "{:#}",
            parse("deploy: {regions: {east: {ranks: 0}}}").unwrap_err()
        );
        assert!(
            e.contains("deploy.regions.east.ranks: expected a positive integer, got 0"),
            "{e}"
        );
    }
}
