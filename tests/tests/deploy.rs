//! Launch material as a user meets it: `atoll deploy k8s` renders Kubernetes objects that
//! kubernetes-validate accepts for a pinned Kubernetes release, `atoll deploy slurm` renders
//! batch scripts that parse and that run a real job (with `srun` standing in for SLURM's),
//! bad recipes get one error naming the field, and every metric the Grafana dashboard queries is
//! exported by a running job.

use atoll_system_tests::{
    assert_clean_error, atoll, count_lines, exposes, free_port, kubernetes_validate, repo_root,
    scrape, stderr, stdout, wait_until, Processes, KUBERNETES_VERSION,
};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "deploy-test-secret-0123456789";

const JOB: &str = "name: four-regions
seed: 1
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 40, batch_size: 4, eval_batches: 2, threads: 1, device: auto}
run: {save_final: false}
checkpoint: {url: 's3://atoll-ckpt/four-regions', every: 100}
sync:
  learners: 4
  regions: [us-east, us-west, eu_central, asia-south]
  fragments: 2
  h: 8
  link: {bandwidth_gbps: 2.0, latency_ms: 40, congestion: provisioned}
deploy:
  image: registry.example.com/atoll:0.1.0-cuda
  coordinator: {address: 'atoll.example.com:7070', port: 7070}
  regions:
    us-west: {gpus: 1, cpus: 16, memory_gb: 96, partition: gpu, account: ml}
    eu_central: {image: 'registry.example.com/atoll:0.1.0-cpu', coordinator: '10.8.0.1:7070'}
  k8s: {namespace: training, store_secret: atoll-s3, storage_class: fast-ssd}
  slurm: {time: '2-00:00:00'}
";

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    name.to_string()
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

fn yaml_documents(path: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn get<'a>(v: &'a serde_yaml::Value, path: &str) -> &'a serde_yaml::Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn str_list(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Every object of one region's kustomization, by kind.
fn region_objects(region_dir: &Path) -> Vec<serde_yaml::Value> {
    let kustomization = &yaml_documents(&region_dir.join("kustomization.yaml"))[0];
    str_list(&kustomization["resources"])
        .iter()
        .flat_map(|f| yaml_documents(&region_dir.join(f)))
        .collect()
}

fn find<'a>(objects: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn kubernetes_objects_render_from_a_recipe_and_validate_against_the_pinned_release() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = write(d, "job.yaml", JOB);
    let o = atoll(&["deploy", "k8s", &recipe, "--out", "out"], d);
    ok(&o);
    assert!(
        stdout(&o).contains("kubectl apply -k out/REGION"),
        "{}",
        stdout(&o)
    );
    let out = d.join("out");

    // Every object of every region passes the API schemas of the pinned release, strictly (an
    // unknown field is an error), and none is of a kind the schemas do not know.
    let mut files = Vec::new();
    for region in ["us-east", "us-west", "eu-central", "asia-south"] {
        let kustomization = &yaml_documents(&out.join(region).join("kustomization.yaml"))[0];
        for f in str_list(&kustomization["resources"]) {
            files.push(out.join(region).join(f));
        }
    }
    let v = Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let report = format!("{}{}", stdout(&v), stderr(&v));
    assert!(v.status.success(), "{report}");
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "{report}"
    );
    assert_eq!(
        report.matches("INFO").count(),
        files.iter().map(|f| yaml_documents(f).len()).sum::<usize>(),
        "one validated object per document: {report}"
    );

    // The coordinator lives in the first region's cluster only; learners elsewhere dial its
    // public address (or the region's own), those beside it its Service.
    let east = region_objects(&out.join("us-east"));
    let west = region_objects(&out.join("us-west"));
    let eu = region_objects(&out.join("eu-central"));
    assert!(west
        .iter()
        .all(|o| o["metadata"]["name"] != "atoll-four-regions-coordinator"));
    let coordinator = find(&east, "Job", "atoll-four-regions-coordinator");
    let c = get(coordinator, "spec.template.spec.containers.0");
    assert_eq!(
        str_list(&c["args"])[..8],
        [
            "coordinator",
            "/etc/atoll/recipe/recipe.yaml",
            "--listen",
            "0.0.0.0:7070",
            "--run-dir",
            "/var/lib/atoll/run",
            "--metrics",
            "0.0.0.0:9464"
        ]
    );
    let service = find(&east, "Service", "atoll-four-regions-coordinator");
    assert_eq!(get(service, "spec.type"), "LoadBalancer");
    let protocols: BTreeSet<(String, u64)> = get(service, "spec.ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["protocol"].as_str().unwrap().into(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        protocols,
        BTreeSet::from([("TCP".into(), 7070), ("UDP".into(), 7070)])
    );
    let learner_args = |objects: &[serde_yaml::Value], region: &str| {
        let job = find(
            objects,
            "Job",
            &format!("atoll-four-regions-learner-{region}"),
        );
        str_list(get(job, "spec.template.spec.containers.0.args"))
    };
    let args = learner_args(&east, "us-east");
    assert!(args.windows(2).any(|w| w
        == [
            "--coordinator",
            "atoll-four-regions-coordinator.training.svc:7070"
        ]));
    let args = learner_args(&west, "us-west");
    assert!(args.windows(2).any(|w| w == ["--region", "us-west"]));
    assert!(args
        .windows(2)
        .any(|w| w == ["--coordinator", "atoll.example.com:7070"]));
    let args = learner_args(&eu, "eu-central");
    assert!(args.windows(2).any(|w| w == ["--region", "eu_central"]));
    assert!(args
        .windows(2)
        .any(|w| w == ["--coordinator", "10.8.0.1:7070"]));
    let eu_job = find(&eu, "Job", "atoll-four-regions-learner-eu-central");
    assert_eq!(
        get(eu_job, "spec.template.spec.containers.0.image"),
        "registry.example.com/atoll:0.1.0-cpu"
    );

    // GPUs, probes on the metrics port, scrape annotations, a non-root pod.
    let west_job = find(&west, "Job", "atoll-four-regions-learner-us-west");
    let pod = get(west_job, "spec.template.spec");
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(c["resources"]["requests"]["cpu"], "16");
    assert_eq!(c["resources"]["requests"]["memory"], "96Gi");
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
        assert_eq!(c[probe]["httpGet"]["path"], "/metrics", "{probe}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 9465);
    assert_eq!(
        get(west_job, "spec.template.metadata.annotations")["prometheus.io/port"],
        "9465"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["restartPolicy"], "OnFailure");

    // The secret, the TLS material and the store credentials are referenced, never inlined.
    assert_eq!(
        c["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        "atoll-job-secret"
    );
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], "atoll-s3");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            !text.contains("BEGIN"),
            "{}: key material inlined",
            f.display()
        );
        for o in yaml_documents(f) {
            assert_ne!(o["kind"], "Secret", "{}", f.display());
        }
    }

    // The recipe travels whole in a ConfigMap: rendering it again gives the same objects.
    let config_map = find(&east, "ConfigMap", "atoll-four-regions-recipe");
    write(
        d,
        "from-configmap.yaml",
        config_map["data"]["recipe.yaml"].as_str().unwrap(),
    );
    ok(&atoll(
        &["deploy", "k8s", "from-configmap.yaml", "--out", "again"],
        d,
    ));
    for region in ["us-east", "us-west", "eu-central", "asia-south"] {
        for f in ["coordinator.yaml", "learner.yaml", "recipe-configmap.yaml"] {
            let a = std::fs::read_to_string(out.join(region).join(f)).ok();
            let b = std::fs::read_to_string(d.join("again").join(region).join(f)).ok();
            assert_eq!(a, b, "{region}/{f}");
        }
    }

    // The ServiceMonitor (a Prometheus Operator CRD: no schema in kubernetes-validate, so it is
    // kept out of the kustomization and checked here) selects the metrics Service by its labels
    // and scrapes the port it names.
    let monitor = &yaml_documents(&out.join("us-east/monitoring/servicemonitor.yaml"))[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let metrics = find(&east, "Service", "atoll-four-regions-metrics");
    let selector = get(monitor, "spec.selector.matchLabels")
        .as_mapping()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(&metrics["metadata"]["labels"][k.as_str().unwrap()], v);
    }
    assert_eq!(
        get(monitor, "spec.endpoints.0.port"),
        get(metrics, "spec.ports.0.name")
    );
    assert_eq!(get(metrics, "spec.ports.0.targetPort"), "metrics");
}

#[test]
fn bad_deploy_sections_get_one_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let without_image = JOB.replace("  image: registry.example.com/atoll:0.1.0-cuda\n", "");
    let without_address = JOB.replace("address: 'atoll.example.com:7070', ", "");
    // (recipe, --set, the error's start)
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            &without_image,
            None,
            "deploy.image: no container image for region us-east",
        ),
        (
            JOB,
            Some("deploy.image=registry.example.com/atoll"),
            "deploy.image: \"registry.example.com/atoll\" has no tag",
        ),
        (
            &without_address,
            None,
            "deploy.coordinator.address: region us-west runs away from the coordinator",
        ),
        (
            JOB,
            Some("deploy.learner_metrics_port=7070"),
            "deploy.learner_metrics_port: port 7070 clashes with deploy.coordinator.port",
        ),
        (
            JOB,
            Some("deploy.coordinator.address=atoll.example.com:443"),
            "deploy.coordinator.address: port 443 differs from deploy.coordinator.port",
        ),
        (
            JOB,
            Some("sync.secret=0123456789abcdef0123"),
            "sync.secret: rendered material carries the recipe",
        ),
        (
            JOB,
            Some("deploy.regions.mars.gpus=1"),
            "deploy.regions.mars: not a region of this job",
        ),
    ];
    for (i, (text, set, needle)) in cases.iter().enumerate() {
        let recipe = write(d, &format!("case{i}.yaml"), text);
        let out = format!("out{i}");
        let mut args = vec!["deploy", "k8s", &recipe, "--out", &out];
        if let Some(set) = set {
            args.extend(["--set", set]);
        }
        let o = atoll(&args, d);
        assert_clean_error(&o, needle);
        assert!(!d.join(&out).exists(), "case {i} wrote files");
    }
    // A directory of someone else's files is left alone.
    std::fs::create_dir(d.join("mine")).unwrap();
    std::fs::write(d.join("mine/notes.txt"), "keep").unwrap();
    let recipe = write(d, "ok.yaml", JOB);
    let o = atoll(&["deploy", "slurm", &recipe, "--out", "mine"], d);
    assert_clean_error(
        &o,
        "--out mine: the directory holds files that are not a previous render",
    );
    assert_eq!(
        std::fs::read_to_string(d.join("mine/notes.txt")).unwrap(),
        "keep"
    );
    // TLS material is never replaced.
    ok(&atoll(&["deploy", "tls", &recipe, "--out", "tls"], d));
    let ca = std::fs::read(d.join("tls/ca.pem")).unwrap();
    let o = atoll(&["deploy", "tls", &recipe, "--out", "tls"], d);
    assert_clean_error(&o, "--out tls: not empty");
    assert_eq!(std::fs::read(d.join("tls/ca.pem")).unwrap(), ca);
}

#[test]
fn slurm_scripts_parse_and_carry_the_recipe_s_regions_resources_and_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = write(d, "job.yaml", JOB);
    ok(&atoll(&["deploy", "slurm", &recipe, "--out", "out"], d));
    let out = d.join("out");
    for region in ["us-east", "us-west", "eu-central", "asia-south"] {
        let script = out.join(format!("{region}.sbatch"));
        let n = Command::new("bash")
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap();
        assert!(n.status.success(), "{region}: {}", stderr(&n));
    }
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let east = read("us-east.sbatch");
    assert!(east.contains("--listen 0.0.0.0:7070"), "{east}");
    assert!(east.contains("--host atoll.example.com"), "{east}");
    assert!(
        east.contains("--coordinator \"$(hostname):7070\""),
        "{east}"
    );
    assert!(east.contains("#SBATCH --time=2-00:00:00"), "{east}");
    let west = read("us-west.sbatch");
    assert!(!west.contains(" coordinator \"$RECIPE\""), "{west}");
    for line in [
        "#SBATCH --job-name=atoll-four-regions-us-west",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=ml",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --mem=96G",
    ] {
        assert!(west.lines().any(|l| l == line), "{line} in\n{west}");
    }
    assert!(west.contains("srun --ntasks=1"), "{west}");
    assert!(
        west.contains("--region us-west --coordinator atoll.example.com:7070"),
        "{west}"
    );
    let eu = read("eu-central.sbatch");
    assert!(
        eu.contains("--region eu_central --coordinator 10.8.0.1:7070"),
        "{eu}"
    );
    assert!(!eu.contains("--gpus-per-task"), "{eu}");
    assert!(read("recipe.yaml").contains("eu_central"));

    // A learner sharded over 4 ranks: 4 tasks, each told its rank by srun's numbering.
    ok(&atoll(
        &[
            "deploy",
            "slurm",
            &recipe,
            "--out",
            "sharded",
            "--set",
            "deploy.regions.us-west.ranks=4",
        ],
        d,
    ));
    let sharded = d.join("sharded/us-west.sbatch");
    let n = Command::new("bash")
        .arg("-n")
        .arg(&sharded)
        .output()
        .unwrap();
    assert!(n.status.success(), "{}", stderr(&n));
    let west = std::fs::read_to_string(&sharded).unwrap();
    for needle in [
        "#SBATCH --ntasks=4",
        "#SBATCH --gpus-per-task=1",
        "export MASTER_ADDR=127.0.0.1 MASTER_PORT=29500",
        "srun --ntasks=4 --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID \
         WORLD_SIZE=$SLURM_NTASKS exec \"$0\" \"$@\"' atoll learner",
        "--ranks 4",
    ] {
        assert!(west.contains(needle), "{needle} in\n{west}");
    }

    // The coordinator on a host of its own: coordinator.sh, and no region starts one.
    let o = atoll(
        &[
            "deploy",
            "slurm",
            &recipe,
            "--out",
            "own-host",
            "--set",
            "deploy.slurm.coordinator_host=login1.example.com",
        ],
        d,
    );
    ok(&o);
    let own = d.join("own-host");
    let n = Command::new("bash")
        .arg("-n")
        .arg(own.join("coordinator.sh"))
        .output()
        .unwrap();
    assert!(n.status.success(), "{}", stderr(&n));
    let coordinator = std::fs::read_to_string(own.join("coordinator.sh")).unwrap();
    assert!(
        coordinator.contains("exec atoll coordinator"),
        "{coordinator}"
    );
    let east = std::fs::read_to_string(own.join("us-east.sbatch")).unwrap();
    assert!(!east.contains(" coordinator \"$RECIPE\""), "{east}");
    assert!(
        east.contains("--coordinator login1.example.com:7070"),
        "{east}"
    );
}

/// A one-region job through its SLURM script on this machine: `srun` is a stand-in that runs the
/// task once, `deploy.slurm.atoll` the built binary, the job directory holds the recipe, the
/// secret and `atoll deploy tls`'s material. The script starts the coordinator on the "head
/// node", waits for it, runs the learner and waits for the job to end.
#[test]
fn a_slurm_script_runs_a_job_to_the_end_with_srun_standing_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let atoll_bin = atoll_system_tests::atoll_bin();
    let ports = [free_port(), free_port(), free_port()];
    let recipe = write(
        d,
        "one.yaml",
        &format!(
            "name: one-region
seed: 3
model: {{preset: gemma3-tiny}}
data: {{corpus: builtin:tinyshakespeare, tokenizer: {{vocab_size: 512}}, seq_len: 32}}
train: {{max_steps: 16, batch_size: 2, eval_batches: 1, threads: 1, device: cpu}}
run: {{save_final: false}}
sync: {{learners: 1, regions: [solo], fragments: 2, h: 4, heartbeat_timeout_s: 5}}
deploy:
  coordinator: {{port: {}, metrics_port: {}}}
  learner_metrics_port: {}
  slurm: {{atoll: '{}', dir: '{}'}}
",
            ports[0],
            ports[1],
            ports[2],
            atoll_bin.display(),
            d.join("job").display()
        ),
    );
    ok(&atoll(&["deploy", "slurm", &recipe, "--out", "out"], d));
    let job = d.join("job");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::copy(d.join("out/recipe.yaml"), job.join("recipe.yaml")).unwrap();
    std::fs::write(job.join("job.secret"), SECRET).unwrap();
    ok(&atoll(&["deploy", "tls", &recipe, "--out", "job/tls"], d));
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    // srun OPTIONS... COMMAND ARGS...: drop the options, run the task once.
    std::fs::write(
        bin.join("srun"),
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(bin.join("srun"))
        .status()
        .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run = Command::new("bash")
        .arg(d.join("out/solo.sbatch"))
        .env("PATH", path)
        .env("RUST_LOG", "info")
        .current_dir(d)
        .output()
        .unwrap();
    let coordinator_log =
        std::fs::read_to_string(job.join("runs/coordinator.log")).unwrap_or_default();
    assert!(
        run.status.success(),
        "{}\n{}\ncoordinator:\n{coordinator_log}",
        stdout(&run),
        stderr(&run)
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(job.join("runs/coordinator/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["learner_steps"]["solo"], 16, "{summary}");
    // The coordinator served with the CA made ahead of time, not one of its own.
    assert_eq!(
        std::fs::read(job.join("runs/coordinator/tls/ca.pem")).unwrap(),
        std::fs::read(job.join("tls/ca.pem")).unwrap()
    );
}

/// Series names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("atoll_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_a_running_job() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/grafana/atoll-job.json")).unwrap(),
    )
    .unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Long enough never to end while it is scraped; checkpoints often, so their upload time is
    // measured.
    let recipe = write(
        d,
        "job.yaml",
        "name: dashboard
seed: 9
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 100000, batch_size: 2, eval_batches: 1, threads: 1, device: cpu}
run: {save_final: false}
checkpoint: {every: 8, keep_last: 1}
sync: {learners: 2, regions: [east, west], fragments: 2, h: 4, tau: 1, heartbeat_timeout_s: 5}
",
    );
    // The coordinator serves with TLS material made ahead of time, as on a cluster.
    ok(&atoll(&["deploy", "tls", &recipe, "--out", "tls"], d));
    std::fs::create_dir_all(d.join("coordinator")).unwrap();
    std::fs::rename(d.join("tls"), d.join("coordinator/tls")).unwrap();
    // The processes run in the test's own directory: the recipe by its full path.
    let recipe = d.join(recipe).display().to_string();
    let port = free_port();
    let mut procs = Processes::default();
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let coordinator_dir = d.join("coordinator").display().to_string();
    procs.start(
        "coordinator",
        &args(&[
            "coordinator",
            &recipe,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--run-dir",
            &coordinator_dir,
            "--metrics",
            "127.0.0.1:0",
        ]),
        SECRET,
        &d.join("coordinator.log"),
    );
    let endpoint = d.join("coordinator/coordinator.json");
    wait_until("the coordinator to serve", Duration::from_secs(120), || {
        endpoint.exists()
    });
    let endpoint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&endpoint).unwrap()).unwrap();
    let mut addresses = vec![endpoint["metrics"].as_str().unwrap().to_string()];
    let ca = d.join("coordinator/tls/ca.pem").display().to_string();
    for region in ["east", "west"] {
        let run_dir = d.join(region).display().to_string();
        procs.start(
            region,
            &args(&[
                "learner",
                &recipe,
                "--region",
                region,
                "--coordinator",
                &format!("127.0.0.1:{port}"),
                "--ca",
                &ca,
                "--run-dir",
                &run_dir,
                "--metrics",
                "127.0.0.1:0",
            ]),
            SECRET,
            &d.join(format!("{region}.log")),
        );
    }
    for region in ["east", "west"] {
        let log = d.join(format!("{region}.log"));
        let mut address = None;
        wait_until(
            "the learner's metrics endpoint",
            Duration::from_secs(120),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                address = text
                    .split("metrics on http://")
                    .nth(1)
                    .and_then(|t| t.split('/').next())
                    .map(String::from);
                address.is_some()
            },
        );
        addresses.push(address.unwrap());
    }
    wait_until("a few merges", Duration::from_secs(240), || {
        count_lines(&d.join("coordinator/merges.jsonl")) >= 6
    });
    // Every series the dashboard reads, from some process of the job; the learners' carry
    // their region.
    let mut missing = wanted.clone();
    let mut text = String::new();
    // Each learner's own series appear with its first step: the merges above may all be one
    // learner's while the other is still catching up.
    let per_region = |text: &str| {
        ["east", "west"].into_iter().all(|region| {
            text.contains(&format!(
                "atoll_learner_tokens_per_s{{region=\"{region}\"}}"
            ))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while (!missing.is_empty() || !per_region(&text)) && std::time::Instant::now() < deadline {
        text = addresses.iter().map(|a| scrape(a)).collect();
        missing.retain(|name| !exposes(&text, name));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
    assert!(per_region(&text), "{text}");
    // The coordinator used the CA made ahead of time (it would have made one with a key of its
    // own otherwise, and the learners, pinned to this one, could not have joined).
    let log = std::fs::read_to_string(d.join("east.log")).unwrap();
    assert!(log.contains("caught up with the global model"), "{log}");
}
