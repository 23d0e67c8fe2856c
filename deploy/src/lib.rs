//! Launch material for real clusters, rendered from a recipe (docs/deploy.md):
//! - [`k8s`]: Kubernetes objects, one directory per region (one cluster per region);
//! - [`slurm`]: a batch script per region.
//!
//! Both start from a [`Launch`]: the recipe's `deploy` section checked and resolved (images,
//! addresses, ports, names), so every missing or clashing field is reported once, by name,
//! before anything is written. Nothing rendered carries the job secret or a private key: they are
//! referenced (a Kubernetes Secret, a file on the cluster), never inlined.

pub mod k8s;
pub mod slurm;

use anyhow::{anyhow, bail, Context, Result};
use atoll_recipe::deploy::DeploySection;
use atoll_recipe::Recipe;
use std::path::{Path, PathBuf};

/// One region's learner, resolved.
#[derive(Debug, Clone)]
pub struct RegionLaunch {
    /// The region's name in the recipe (what `atoll learner --region` takes).
    pub name: String,
    /// The name as a DNS label, for object names.
    pub label: String,
    pub image: Option<String>,
    /// HOST:PORT its learners dial when it runs away from the coordinator: its own
    /// `deploy.regions.R.coordinator`, else `deploy.coordinator.address`.
    pub coordinator_address: Option<String>,
    /// Its own `deploy.regions.R.coordinator` alone: in the coordinator's region, learners reach
    /// it locally unless this says otherwise.
    pub own_coordinator_address: Option<String>,
    pub ranks: usize,
    pub gpus: usize,
    pub cpus: usize,
    pub memory_gb: usize,
    pub partition: Option<String>,
    pub account: Option<String>,
}

/// A recipe's launch, checked: what both renderers take.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job's name as a DNS label (object names, job names).
    pub job: String,
    /// The resolved recipe every process reads, as YAML.
    pub recipe_yaml: String,
    pub deploy: DeploySection,
    /// Index into `regions` of the region that runs the coordinator.
    pub coordinator_region: usize,
    pub regions: Vec<RegionLaunch>,
}

/// A rendered file, its path relative to the output directory.
#[derive(Debug, Clone)]
pub struct RenderedFile {
    pub path: PathBuf,
    pub contents: String,
    pub executable: bool,
}

/// Written into every output directory: a later render may replace what is there.
const MARKER: &str = ".atoll-deploy";

impl Launch {
    /// Checks the recipe's `deploy` section (and what it depends on) and resolves it.
    pub fn from_recipe(recipe: &Recipe) -> Result<Launch> {
        let d = &recipe.deploy;
        if recipe.sync.secret.is_some() {
            bail!(
                "sync.secret: rendered material carries the recipe, and the job secret must not be \
                 in it; remove sync.secret and keep the secret in the Secret named by \
                 deploy.k8s.secret (Kubernetes) or in <deploy.slurm.dir>/job.secret (SLURM)"
            );
        }
        let job = dns_label(recipe.name(), "name")?;
        check_ports(d)?;
        let names = recipe.sync.region_names();
        let coordinator_region = match &d.coordinator.region {
            Some(r) => names.iter().position(|n| n == r).ok_or_else(|| {
                anyhow!("deploy.coordinator.region: {r:?} is not a region of this job")
            })?,
            None => 0,
        };
        if let Some(a) = &d.coordinator.address {
            let port = check_address(a, "deploy.coordinator.address")?;
            if port != d.coordinator.port {
                bail!(
                    "deploy.coordinator.address: port {port} differs from deploy.coordinator.port \
                     ({}); the coordinator announces its own port for the QUIC data plane, so the \
                     address learners dial must use the same port",
                    d.coordinator.port
                );
            }
        }
        let mut regions = Vec::new();
        let mut labels = std::collections::BTreeMap::new();
        for name in &names {
            let r = d.region(name);
            let field = |f: &str| format!("deploy.regions.{name}.{f}");
            let label = dns_label(name, "sync.regions")?;
            if let Some(other) = labels.insert(label.clone(), name.clone()) {
                bail!(
                    "sync.regions: {other:?} and {name:?} both become {label:?} in object names; \
                     rename one"
                );
            }
            if r.gpus.0 > 0 && recipe.train.device == atoll_recipe::DeviceChoice::Cpu {
                bail!(
                    "{}: {} GPUs per rank requested but train.device is cpu; set train.device to \
                     cuda (or auto) or gpus to 0",
                    field("gpus"),
                    r.gpus.0
                );
            }
            let image: Option<String> = match r.image.clone().or_else(|| d.image.clone()) {
                Some(image) => {
                    let f = if r.image.is_some() {
                        field("image")
                    } else {
                        "deploy.image".to_string()
                    };
                    check_image(&image, &f)?;
                    Some(image)
                }
                None => None,
            };
            let own_coordinator_address = match &r.coordinator {
                Some(a) => {
                    let port = check_address(a, &field("coordinator"))?;
                    if port != d.coordinator.port {
                        bail!(
                            "{}: port {port} differs from deploy.coordinator.port ({}); the \
                             coordinator announces its own port for the QUIC data plane",
                            field("coordinator"),
                            d.coordinator.port
                        );
                    }
                    Some(a.clone())
                }
                None => None,
            };
            let coordinator_address = own_coordinator_address
                .clone()
                .or_else(|| d.coordinator.address.clone());
            regions.push(RegionLaunch {
                name: name.clone(),
                label,
                image,
                coordinator_address,
                own_coordinator_address,
                ranks: r.ranks.0,
                gpus: r.gpus.0,
                cpus: r.cpus.0,
                memory_gb: r.memory_gb.0,
                partition: r.partition.clone(),
                account: r.account.clone(),
            });
        }
        Ok(Launch {
            job,
            recipe_yaml: recipe.to_yaml()?,
            deploy: d.clone(),
            coordinator_region,
            regions,
        })
    }

    pub fn coordinator_region(&self) -> &RegionLaunch {
        &self.regions[self.coordinator_region]
    }

    /// The address `region` dials, required where it runs away from the coordinator.
    pub fn address_for<'a>(&self, region: &'a RegionLaunch) -> Result<&'a str> {
        region.coordinator_address.as_deref().ok_or_else(|| {
            anyhow!(
                "deploy.coordinator.address: region {} runs away from the coordinator (region \
                 {}) and needs the HOST:PORT it can reach it at; set deploy.coordinator.address \
                 or deploy.regions.{}.coordinator",
                region.name,
                self.coordinator_region().name,
                region.name
            )
        })
    }

    /// The image of `region`, required for containers.
    pub fn image_for<'a>(&self, region: &'a RegionLaunch) -> Result<&'a str> {
        region.image.as_deref().ok_or_else(|| {
            anyhow!(
                "deploy.image: no container image for region {}; set deploy.image (e.g. \
                 registry.example.com/atoll:0.1.0-cuda, built from deploy/Dockerfile) or \
                 deploy.regions.{}.image",
                region.name,
                region.name
            )
        })
    }

    /// The host part of the coordinator's public address, if one was given (for the server
    /// certificate's names).
    pub fn coordinator_public_host(&self) -> Option<String> {
        self.deploy
            .coordinator
            .address
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
    }
}

/// Ports of the processes: non-zero and apart (the coordinator and a learner share a host on
/// SLURM's head node, and a pod's ports must differ).
fn check_ports(d: &DeploySection) -> Result<()> {
    let ports = [
        ("deploy.coordinator.port", d.coordinator.port),
        (
            "deploy.coordinator.metrics_port",
            d.coordinator.metrics_port,
        ),
        ("deploy.learner_metrics_port", d.learner_metrics_port),
    ];
    for (i, (field, port)) in ports.iter().enumerate() {
        if *port == 0 {
            bail!("{field}: expected a port in 1-65535, got 0");
        }
        for (other, other_port) in &ports[..i] {
            if other_port == port {
                bail!("{field}: port {port} clashes with {other}; give each its own port");
            }
        }
    }
    Ok(())
}

/// HOST:PORT (`[v6]:PORT` too); returns the port.
fn check_address(address: &str, field: &str) -> Result<u16> {
    let bad =
        || anyhow!("{field}: expected HOST:PORT (e.g. atoll.example.com:7070), got {address:?}");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad()),
    }
}

/// An image reference pinned by a tag or a digest: `NAME:TAG` or `NAME@sha256:...`.
fn check_image(image: &str, field: &str) -> Result<()> {
    if image.is_empty() || image.contains(char::is_whitespace) {
        bail!("{field}: {image:?} is not an image reference");
    }
    let digest = image.contains('@');
    // A registry port (`host:5000/atoll`) is not a tag: only the last path component counts.
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = last.split_once(':').map(|(_, t)| t);
    match (digest, tag) {
        (true, _) => Ok(()),
        (false, Some(t)) if !t.is_empty() => Ok(()),
        _ => bail!(
            "{field}: {image:?} has no tag; pin one (e.g. {image}:0.1.0-cuda) or a digest, so \
             every region runs the same build"
        ),
    }
}

/// `name` as a DNS-1123 label (lower case; `_` and `.` become `-`).
fn dns_label(name: &str, field: &str) -> Result<String> {
    let label: String = name
        .chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    let valid = !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if !valid {
        bail!(
            "{field}: {name:?} cannot name Kubernetes objects or SLURM jobs (letters, digits, \
             '-', '_', '.'; starting and ending with a letter or digit)"
        );
    }
    Ok(label)
}

/// Writes `files` under `out`, which must be empty, absent, or a previous render's.
pub fn write_files(out: &Path, files: &[RenderedFile]) -> Result<()> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out)
            .with_context(|| format!("--out {}: cannot read it", out.display()))?;
        if entries.next().is_some() && !out.join(MARKER).exists() {
            bail!(
                "--out {}: the directory holds files that are not a previous render; choose an \
                 empty or new directory",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join(MARKER),
        "rendered by `atoll deploy`; a later render replaces the files it wrote\n",
    )?;
    for f in files {
        let path = out.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &f.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        #[cfg(unix)]
        if f.executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// Quotes a value for a POSIX shell (single quotes; a `'` inside becomes `'\''`).
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(deploy: &str) -> Recipe {
        let mut r = Recipe::from_yaml(
            &format!(
                "name: job\nmodel: {{preset: gemma3-tiny}}\ntrain: {{device: auto}}\n\
                 sync: {{learners: 2, regions: [east, west]}}\n{deploy}"
            ),
            "r.yaml",
            &[],
        )
        .unwrap();
        r.name = Some("job".into());
        r
    }

    fn error(deploy: &str) -> String {
        format!("{:#}", Launch::from_recipe(&recipe(deploy)).unwrap_err())
    }

    #[test]
    fn image_references_need_a_tag_or_digest() {
        assert!(check_image("r.io/atoll:1.0", "f").is_ok());
        assert!(check_image("r.io:5000/atoll:1.0", "f").is_ok());
        assert!(check_image("r.io/atoll@sha256:abcd", "f").is_ok());
        let e = check_image("r.io:5000/atoll", "deploy.image")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("deploy.image: \"r.io:5000/atoll\" has no tag"),
            "{e}"
        );
        assert!(check_image("atoll:", "f").is_err());
        let e = error("deploy: {image: atoll, coordinator: {address: 'c.example:7070'}}");
        assert!(e.starts_with("deploy.image: \"atoll\" has no tag"), "{e}");
        let e = error("deploy: {regions: {west: {image: 'x y:1'}}}");
        assert!(e.starts_with("deploy.regions.west.image:"), "{e}");
    }

    #[test]
    fn ports_must_be_apart_and_the_public_port_the_listen_port() {
        let e = error("deploy: {learner_metrics_port: 9464}");
        assert!(
            e.contains("deploy.learner_metrics_port: port 9464 clashes with deploy.coordinator.metrics_port"),
            "{e}"
        );
        let e = error("deploy: {coordinator: {port: 9464}}");
        assert!(
            e.starts_with(
                "deploy.coordinator.metrics_port: port 9464 clashes with deploy.coordinator.port"
            ),
            "{e}"
        );
        let e = error("deploy: {coordinator: {address: 'c.example:443'}}");
        assert!(
            e.starts_with("deploy.coordinator.address: port 443 differs"),
            "{e}"
        );
        let e = error("deploy: {coordinator: {address: 'c.example'}}");
        assert!(
            e.starts_with("deploy.coordinator.address: expected HOST:PORT"),
            "{e}"
        );
        let e = error("deploy: {regions: {west: {coordinator: '10.0.0.1:80'}}}");
        assert!(
            e.starts_with("deploy.regions.west.coordinator: port 80 differs"),
            "{e}"
        );
    }

    #[test]
    fn missing_addresses_images_and_refused_settings_name_their_field() {
        let launch = Launch::from_recipe(&recipe("")).unwrap();
        let west = &launch.regions[1];
        let e = launch.address_for(west).unwrap_err().to_string();
        assert!(
            e.starts_with("deploy.coordinator.address: region west runs away"),
            "{e}"
        );
        let e = launch.image_for(west).unwrap_err().to_string();
        assert!(
            e.starts_with("deploy.image: no container image for region west"),
            "{e}"
        );
        let mut with_secret = recipe("");
        with_secret.sync.secret = Some("abcdefabcdefabcdef".into());
        let e = format!("{:#}", Launch::from_recipe(&with_secret).unwrap_err());
        assert!(e.starts_with("sync.secret:"), "{e}");
        let e = format!(
            "{:#}",
            Launch::from_recipe(&{
                let mut r = recipe("deploy: {regions: {east: {gpus: 1}}}");
                r.train.device = atoll_recipe::DeviceChoice::Cpu;
                r
            })
            .unwrap_err()
        );
        assert!(
            e.starts_with("deploy.regions.east.gpus: 1 GPUs per rank"),
            "{e}"
        );
    }

    #[test]
    fn region_names_become_distinct_dns_labels() {
        assert_eq!(dns_label("US_East", "f").unwrap(), "us-east");
        assert!(dns_label("-x", "f").is_err());
        let mut r = recipe("");
        r.sync.regions = vec!["us_east".into(), "us-east".into()];
        let e = format!("{:#}", Launch::from_recipe(&r).unwrap_err());
        assert!(
            e.starts_with("sync.regions: \"us_east\" and \"us-east\" both become"),
            "{e}"
        );
    }

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("abc/d:1"), "abc/d:1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn an_output_directory_with_other_files_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.txt"), "x").unwrap();
        let files = [RenderedFile {
            path: "a/b.yaml".into(),
            contents: "k: v\n".into(),
            executable: false,
        }];
        let e = write_files(dir.path(), &files).unwrap_err().to_string();
        assert!(e.contains("not a previous render"), "{e}");
        let out = dir.path().join("out");
        write_files(&out, &files).unwrap();
        write_files(&out, &files).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("a/b.yaml")).unwrap(),
            "k: v\n"
        );
    }
}
