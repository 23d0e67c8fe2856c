//! `atoll deploy k8s|slurm|tls`: launch material for real clusters from a recipe
//! (docs/deploy.md). The rendering is `atoll_deploy`'s; this file only reads the recipe, writes
//! the files and says what to do next.

use anyhow::{bail, Context, Result};
use atoll_deploy::{k8s, slurm, write_files, Launch};
use atoll_trainer::recipe::Recipe;
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DeployCommand {
    /// Kubernetes objects, one directory per region (`kubectl apply -k OUT/REGION` in that
    /// region's cluster): the coordinator's Job, volume and Service in its region, a learner Job
    /// per region, the recipe as a ConfigMap, metrics Services and a ServiceMonitor.
    K8s {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// Output directory (new, empty, or a previous render's).
        #[arg(long)]
        out: PathBuf,
    },
    /// A SLURM batch script per region (srun of the learner ranks; the coordinator on the
    /// coordinator region's head node or on `deploy.slurm.coordinator_host`), and the recipe.
    Slurm {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// The job's TLS material made ahead of time, for clusters where the coordinator cannot
    /// hand its CA to the learners itself: ca.pem (every region), ca.key, server.pem, server.key
    /// (the coordinator only). Private keys are written owner-only.
    Tls {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// A new or empty directory.
        #[arg(long)]
        out: PathBuf,
        /// Extra names or addresses for the server certificate (repeatable). Learners check
        /// the name `atoll-coordinator` whatever address they dial, so none is needed.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

pub fn run(command: DeployCommand) -> Result<()> {
    match command {
        DeployCommand::K8s {
            recipe,
            overrides,
            out,
        } => {
            let launch = launch(&recipe, &overrides)?;
            write_files(&out, &k8s::render(&launch)?)?;
            let k = &launch.deploy.k8s;
            println!(
                "wrote Kubernetes objects for job {} to {} (one directory per region)",
                launch.job,
                out.display()
            );
            println!("in each region's cluster (docs/deploy.md):");
            println!("  kubectl apply -f {}/REGION/namespace.yaml", out.display());
            println!(
                "  kubectl -n {} create secret generic {} --from-file=secret=job.secret",
                k.namespace, k.secret
            );
            println!(
                "  kubectl -n {} create secret generic {} --from-file=tls/          # {}'s cluster (atoll deploy tls --out tls/)",
                k.namespace,
                k.tls_secret,
                launch.coordinator_region().name
            );
            println!(
                "  kubectl -n {} create secret generic {} --from-file=tls/ca.pem    # every other cluster",
                k.namespace, k.tls_secret,
            );
            println!("  kubectl apply -k {}/REGION", out.display());
            Ok(())
        }
        DeployCommand::Slurm {
            recipe,
            overrides,
            out,
        } => {
            let launch = launch(&recipe, &overrides)?;
            write_files(&out, &slurm::render(&launch)?)?;
            println!(
                "wrote a batch script per region and recipe.yaml for job {} to {}",
                launch.job,
                out.display()
            );
            println!(
                "copy recipe.yaml, job.secret and the TLS material (tls/) into the job directory \
                 of every cluster, then sbatch REGION.sbatch there (docs/deploy.md)"
            );
            Ok(())
        }
        DeployCommand::Tls {
            recipe,
            overrides,
            out,
            mut hosts,
        } => {
            let launch = launch(&recipe, &overrides)?;
            refuse_non_empty(&out)?;
            hosts.extend(launch.coordinator_public_host());
            if let Some(h) = &launch.deploy.slurm.coordinator_host {
                hosts.push(h.clone());
            }
            hosts.sort();
            hosts.dedup();
            atoll_link::JobTls::load_or_create(&out, &launch.job, &hosts)?;
            println!(
                "wrote the TLS material of job {} to {}: ca.pem goes to every region; ca.key, \
                 server.pem and server.key only to the coordinator's",
                launch.job,
                out.display()
            );
            Ok(())
        }
    }
}

fn launch(path: &Path, overrides: &[String]) -> Result<Launch> {
    let recipe = Recipe::from_file(path, overrides)?;
    Launch::from_recipe(&recipe).with_context(|| path.display().to_string())
}

/// TLS material is never replaced: a new CA would lock out every learner holding the old one.
fn refuse_non_empty(dir: &Path) -> Result<()> {
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("--out {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "--out {}: not empty; TLS material is never overwritten (learners trust the CA \
                 already there), choose a new directory",
                dir.display()
            );
        }
    }
    Ok(())
}
