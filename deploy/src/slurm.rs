//! SLURM batch scripts for a job: one per region (`sbatch REGION.sbatch` on that region's
//! cluster), running the region's learner ranks with `srun`. The coordinator runs on the head
//! node of the coordinator region's allocation, started by that region's script, or on a host
//! of the user's choosing (`deploy.slurm.coordinator_host`) with `coordinator.sh`.
//!
//! Every cluster holds the job directory (`deploy.slurm.dir`): `recipe.yaml` (written beside the
//! scripts), `job.secret` and `tls/` (from `atoll deploy tls`). The scripts read them from
//! there and check they exist before starting anything.

use crate::{shell_quote, Launch, RegionLaunch, RenderedFile};
use anyhow::{bail, Result};
use std::fmt::Write;

/// Where rank 0 of a sharded learner listens for its other ranks (torch.distributed's default).
const RANK_PORT: u16 = 29500;

pub fn render(launch: &Launch) -> Result<Vec<RenderedFile>> {
    check_words(launch)?;
    let mut files = vec![RenderedFile {
        path: "recipe.yaml".into(),
        contents: launch.recipe_yaml.clone(),
        executable: false,
    }];
    let s = &launch.deploy.slurm;
    for (i, region) in launch.regions.iter().enumerate() {
        let hosts_coordinator = i == launch.coordinator_region && s.coordinator_host.is_none();
        files.push(RenderedFile {
            path: format!("{}.sbatch", region.label).into(),
            contents: region_script(launch, region, hosts_coordinator)?,
            executable: true,
        });
    }
    if let Some(host) = &s.coordinator_host {
        files.push(RenderedFile {
            path: "coordinator.sh".into(),
            contents: coordinator_script(launch, host)?,
            executable: true,
        });
    }
    Ok(files)
}

/// Values that go into `#SBATCH` lines and command lines as they are.
fn check_words(launch: &Launch) -> Result<()> {
    let s = &launch.deploy.slurm;
    let mut words: Vec<(String, &str)> = Vec::new();
    if let Some(t) = &s.time {
        words.push(("deploy.slurm.time".into(), t));
    }
    for r in &launch.regions {
        if let Some(p) = &r.partition {
            words.push((format!("deploy.regions.{}.partition", r.name), p));
        }
        if let Some(a) = &r.account {
            words.push((format!("deploy.regions.{}.account", r.name), a));
        }
    }
    for (field, value) in words {
        if value.is_empty()
            || value.contains(|c: char| c.is_whitespace() || "'\"`$\\;&|<>".contains(c))
        {
            bail!("{field}: {value:?} is not a SLURM name (no spaces or shell characters)");
        }
    }
    if s.atoll.trim().is_empty() || s.atoll.contains(['\n', '`']) {
        bail!("deploy.slurm.atoll: {:?} is not a command line", s.atoll);
    }
    Ok(())
}

/// The job directory on the cluster, overridable at submission with `ATOLL_JOB_DIR`. It is
/// expanded by the shell there (`$HOME/atoll/job` works), inside double quotes.
fn job_dir(launch: &Launch) -> Result<String> {
    let dir = match &launch.deploy.slurm.dir {
        Some(dir) => {
            if dir.is_empty() || dir.contains(['"', '`', '\\', '}', '\n']) {
                bail!(
                    "deploy.slurm.dir: {dir:?} cannot be written into a batch script (no quotes, \
                     backquotes, backslashes, braces or newlines)"
                );
            }
            dir.clone()
        }
        None => format!("$HOME/atoll/{}", launch.job),
    };
    Ok(format!("JOB_DIR=\"${{ATOLL_JOB_DIR:-{dir}}}\""))
}

/// The shared opening: strict mode, the job directory, the files every process needs.
fn preamble(launch: &Launch, out: &mut String) -> Result<()> {
    let _ = writeln!(out, "set -euo pipefail");
    let _ = writeln!(out, "{}", job_dir(launch)?);
    let _ = writeln!(
        out,
        r#"RECIPE="$JOB_DIR/recipe.yaml"
SECRET_FILE="$JOB_DIR/job.secret"
CA="$JOB_DIR/tls/ca.pem"
for f in "$RECIPE" "$SECRET_FILE" "$CA"; do
  if [ ! -r "$f" ]; then
    echo "error: $f is missing: copy recipe.yaml, job.secret and tls/ into $JOB_DIR first (docs/deploy.md)" >&2
    exit 1
  fi
done"#
    );
    Ok(())
}

/// Starting the coordinator: the job's TLS material into its run directory (it then creates
/// none of its own), the process itself.
fn coordinator_start(launch: &Launch, host: &str, background: bool) -> String {
    let c = &launch.deploy.coordinator;
    let mut hosts = format!("--host {host}");
    if let Some(public) = launch.coordinator_public_host() {
        let _ = write!(hosts, " --host {}", shell_quote(&public));
    }
    let command = format!(
        "{atoll} coordinator \"$RECIPE\" --listen 0.0.0.0:{port} --run-dir \"$COORDINATOR_DIR\" \
         --metrics 0.0.0.0:{metrics} --secret-file \"$SECRET_FILE\" {hosts}",
        atoll = launch.deploy.slurm.atoll,
        port = c.port,
        metrics = c.metrics_port,
    );
    let mut out = String::from(
        r#"COORDINATOR_DIR="$JOB_DIR/runs/coordinator"
mkdir -p "$COORDINATOR_DIR/tls"
for f in ca.pem ca.key server.pem server.key; do
  if [ ! -r "$JOB_DIR/tls/$f" ]; then
    echo "error: $JOB_DIR/tls/$f is missing: the coordinator needs the whole output of atoll deploy tls" >&2
    exit 1
  fi
  [ -e "$COORDINATOR_DIR/tls/$f" ] || install -m 600 "$JOB_DIR/tls/$f" "$COORDINATOR_DIR/tls/$f"
done
"#,
    );
    if background {
        let _ = write!(
            out,
            r#"# An existing state in $COORDINATOR_DIR is resumed (a requeued or resubmitted job).
rm -f "$COORDINATOR_DIR/coordinator.json"
{command} >> "$JOB_DIR/runs/coordinator.log" 2>&1 &
COORDINATOR_PID=$!
trap 'kill "$COORDINATOR_PID" 2>/dev/null || true' EXIT
# It publishes coordinator.json once it serves (after building the model).
until [ -e "$COORDINATOR_DIR/coordinator.json" ]; do
  if ! kill -0 "$COORDINATOR_PID" 2>/dev/null; then
    echo "error: the coordinator exited before serving; see $JOB_DIR/runs/coordinator.log" >&2
    exit 1
  fi
  sleep 2
done
"#
        );
    } else {
        let _ = writeln!(out, "exec {command}");
    }
    out
}

fn region_script(
    launch: &Launch,
    region: &RegionLaunch,
    hosts_coordinator: bool,
) -> Result<String> {
    let d = &launch.deploy;
    let s = &d.slurm;
    let mut out = String::from("#!/bin/bash\n");
    let _ = writeln!(
        out,
        "# Rendered by `atoll deploy slurm`: region {}'s learner of job {}{}.\n\
         # Submit it on that region's cluster: sbatch {}.sbatch (docs/deploy.md).",
        region.name,
        launch.job,
        if hosts_coordinator {
            ", and the job's coordinator on the allocation's head node"
        } else {
            ""
        },
        region.label
    );
    let mut directive = |line: String| {
        let _ = writeln!(out, "#SBATCH {line}");
    };
    directive(format!("--job-name=atoll-{}-{}", launch.job, region.label));
    if let Some(p) = &region.partition {
        directive(format!("--partition={p}"));
    }
    if let Some(a) = &region.account {
        directive(format!("--account={a}"));
    }
    directive("--nodes=1".into());
    directive(format!("--ntasks={}", region.ranks));
    directive(format!("--cpus-per-task={}", region.cpus));
    if region.gpus > 0 {
        directive(format!("--gpus-per-task={}", region.gpus));
    }
    directive(format!("--mem={}G", region.memory_gb * region.ranks));
    if let Some(t) = &s.time {
        directive(format!("--time={t}"));
    }
    directive(format!(
        "--output=atoll-{}-{}-%j.out",
        launch.job, region.label
    ));
    preamble(launch, &mut out)?;
    let _ = writeln!(
        out,
        "RUN_DIR=\"$JOB_DIR/runs/{}\"\nmkdir -p \"$RUN_DIR\"",
        region.label
    );
    let address = if hosts_coordinator {
        out.push_str(&coordinator_start(launch, "\"$(hostname)\"", true));
        match &region.own_coordinator_address {
            Some(a) => shell_quote(a),
            None => format!("\"$(hostname):{}\"", d.coordinator.port),
        }
    } else if launch.regions[launch.coordinator_region].name == region.name {
        // The coordinator runs on `coordinator_host`.
        match (&region.own_coordinator_address, &s.coordinator_host) {
            (Some(a), _) => shell_quote(a),
            (None, Some(host)) => shell_quote(&format!("{host}:{}", d.coordinator.port)),
            (None, None) => shell_quote(launch.address_for(region)?),
        }
    } else {
        shell_quote(launch.address_for(region)?)
    };
    // Each task is one rank of the learner: srun numbers them, the learner reads RANK etc. The
    // ranks share the allocation's one node, so they meet on loopback (the collective between
    // them is neither authenticated nor encrypted).
    let rank_env = if region.ranks > 1 {
        let _ = writeln!(out, "export MASTER_ADDR=127.0.0.1 MASTER_PORT={RANK_PORT}");
        "bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec \"$0\" \"$@\"' "
    } else {
        ""
    };
    let learner = format!(
        "srun --ntasks={ranks} --kill-on-bad-exit=1 {rank_env}{atoll} learner \"$RECIPE\" --region {region} \
         --coordinator {address} --ca \"$CA\" --run-dir \"$RUN_DIR\" --secret-file \"$SECRET_FILE\" \
         --metrics 0.0.0.0:{metrics} --ranks {ranks}",
        ranks = region.ranks,
        atoll = s.atoll,
        region = shell_quote(&region.name),
        metrics = d.learner_metrics_port,
    );
    if hosts_coordinator {
        let _ = write!(
            out,
            r#"# A failed learner here must not take the coordinator away from the other regions.
if ! {learner}; then
  echo "warning: region {name}'s learner failed; the coordinator keeps serving the other regions" >&2
fi
wait "$COORDINATOR_PID"
trap - EXIT
"#,
            name = region.name
        );
    } else {
        let _ = writeln!(out, "{learner}");
    }
    Ok(out)
}

fn coordinator_script(launch: &Launch, host: &str) -> Result<String> {
    let mut out = format!(
        "#!/bin/bash\n# Rendered by `atoll deploy slurm`: the coordinator of job {}. Run it on {host}\n\
         # (under nohup, tmux or a service manager); the regions' learners dial it.\n",
        launch.job
    );
    preamble(launch, &mut out)?;
    out.push_str(&coordinator_start(launch, &shell_quote(host), false));
    Ok(out)
}
