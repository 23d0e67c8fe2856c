//! `atoll run`: a whole job on this machine. It starts the coordinator and one learner process
//! per region, shows a live line per learner, and stops every process it started (by id) when
//! the job ends, when one fails, or on Ctrl-C.

use anyhow::{anyhow, Context, Result};
use atoll_link::emulator::{Emulator, EmulatorConfig};
use atoll_link::JobTls;
use atoll_recipe::Recipe;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// What a coordinator publishes about itself in its run directory once it is serving.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EndpointFile {
    pub address: SocketAddr,
    pub ca: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub pid: u32,
}

pub fn write_endpoint_file(
    run_dir: &Path,
    address: SocketAddr,
    tls: &JobTls,
    metrics: Option<SocketAddr>,
) -> Result<()> {
    let file = EndpointFile {
        address,
        ca: std::fs::canonicalize(&tls.ca_cert)?,
        metrics,
        pid: std::process::id(),
    };
    atoll_trainer::checkpoint::write_json_atomic(
        &run_dir.join("coordinator.json"),
        &serde_json::to_value(file)?,
    )
}

pub struct LaunchOptions {
    pub recipe_path: PathBuf,
    pub overrides: Vec<String>,
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    /// The `atoll` executable to start the processes with.
    pub exe: PathBuf,
    /// Passed to the coordinator as `--resume`.
    pub resume: Option<String>,
}

struct Proc {
    name: String,
    child: Child,
}

fn spawn(exe: &Path, args: &[String], log: &Path, secret: &str, name: &str) -> Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .args(args)
        .env("ATOLL_SECRET", secret)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    tracing::debug!("started {name} (pid {:?})", child.id());
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

fn free_port() -> Result<u16> {
    // The port must be free for TCP (gRPC) and UDP (QUIC) alike.
    for _ in 0..20 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(anyhow!("no free port on 127.0.0.1 for both TCP and UDP"))
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub async fn run(opts: LaunchOptions) -> Result<serde_json::Value> {
    let secret_file = opts.run_dir.join("secret");
    let secret = match crate::resolve_secret(opts.recipe.sync.secret.as_deref(), None) {
        Ok(s) => s,
        Err(_) => {
            // A local job gets a fresh secret of its own, kept (owner-only) for `atoll status`.
            let s = crate::random_token();
            atoll_link::tls::write_private(&secret_file, &s)?;
            s
        }
    };
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let coordinator_dir = opts.run_dir.join("coordinator");
    std::fs::create_dir_all(&coordinator_dir)?;
    let mut common = vec![opts.recipe_path.display().to_string()];
    for o in &opts.overrides {
        common.push("--set".into());
        common.push(o.clone());
    }
    let mut coordinator_args = vec!["coordinator".to_string()];
    coordinator_args.extend(common.clone());
    coordinator_args.extend([
        "--listen".into(),
        address.clone(),
        "--run-dir".into(),
        coordinator_dir.display().to_string(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ]);
    if let Some(r) = &opts.resume {
        coordinator_args.extend(["--resume".into(), r.clone()]);
    }
    let mut procs = vec![spawn(
        &opts.exe,
        &coordinator_args,
        &opts.run_dir.join("coordinator.log"),
        &secret,
        "coordinator",
    )?];
    let result = drive(
        &opts,
        &mut procs,
        &address,
        &coordinator_dir,
        &common,
        &secret,
    )
    .await;
    for p in procs.iter_mut() {
        if let Ok(None) = p.child.try_wait() {
            if let Some(pid) = p.child.id() {
                tracing::debug!("stopping {} (pid {pid})", p.name);
            }
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
    result
}

async fn drive(
    opts: &LaunchOptions,
    procs: &mut Vec<Proc>,
    address: &str,
    coordinator_dir: &Path,
    common: &[String],
    secret: &str,
) -> Result<serde_json::Value> {
    // The coordinator publishes coordinator.json once it serves; it builds the model first.
    let endpoint_file = coordinator_dir.join("coordinator.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !endpoint_file.exists() {
        if let Ok(Some(status)) = procs[0].child.try_wait() {
            return Err(anyhow!(
                "the coordinator exited ({status}) before serving:\n{}",
                last_lines(&opts.run_dir.join("coordinator.log"), 10)
            ));
        }
        if Instant::now() > deadline {
            return Err(anyhow!("the coordinator did not start within 300 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let endpoint: EndpointFile = serde_json::from_slice(&std::fs::read(&endpoint_file)?)?;
    let regions = opts.recipe.sync.region_names();
    // One emulated link per region that has one: the learner's QUIC goes through it.
    let data_port: SocketAddr = address.parse()?;
    let mut emulators = BTreeMap::new();
    for (region, spec) in crate::wan::links(&opts.recipe)? {
        let config = EmulatorConfig::from_spec("127.0.0.1:0".parse()?, data_port, &spec);
        let emulator = Emulator::start(config)
            .with_context(|| format!("starting the emulated link of region {region}"))?;
        emulators.insert(region, emulator);
    }
    for region in &regions {
        let dir = opts.run_dir.join(format!("learner-{region}"));
        let mut args = vec!["learner".to_string()];
        args.extend(common.iter().cloned());
        args.extend([
            "--region".into(),
            region.clone(),
            "--coordinator".into(),
            address.to_string(),
            "--ca".into(),
            endpoint.ca.display().to_string(),
            "--run-dir".into(),
            dir.display().to_string(),
            "--metrics".into(),
            "127.0.0.1:0".into(),
        ]);
        if let Some(e) = emulators.get(region) {
            args.extend(["--data-via".into(), e.local_addr().to_string()]);
        }
        if let Some(r) = &opts.resume {
            // Start from the same checkpoint as the coordinator: nothing to download at join.
            args.extend(["--resume".into(), r.clone()]);
            if opts.recipe.checkpoint.url.is_none() {
                let url = coordinator_dir.join("checkpoints").display().to_string();
                args.extend(["--set".into(), format!("checkpoint.url={url}")]);
            }
        }
        procs.push(spawn(
            &opts.exe,
            &args,
            &opts.run_dir.join(format!("learner-{region}.log")),
            secret,
            &format!("learner {region}"),
        )?);
    }
    eprintln!(
        "job {:?}: coordinator on {address}, {} learners ({}); logs and results in {}",
        opts.recipe.name(),
        regions.len(),
        regions.join(", "),
        opts.run_dir.display()
    );
    if let Some(m) = endpoint.metrics {
        eprintln!("coordinator metrics: http://{m}/metrics");
    }
    let secret_hint = if opts.run_dir.join("secret").exists() {
        format!(" --secret-file {}", opts.run_dir.join("secret").display())
    } else {
        String::new()
    };
    eprintln!(
        "status from another terminal: atoll status --coordinator {address} --ca {}{secret_hint}",
        endpoint.ca.display()
    );

    let multi =
        MultiProgress::with_draw_target(if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
    let style = ProgressStyle::with_template("{msg}").expect("template");
    let header = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
    let lines: Vec<ProgressBar> = regions
        .iter()
        .map(|_| multi.add(ProgressBar::new_spinner().with_style(style.clone())))
        .collect();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_logged = Instant::now();
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                multi.clear().ok();
                return Err(anyhow!("interrupted: every process of the job was stopped"));
            }
            _ = tick.tick() => {}
        }
        if let Ok(status) = crate::status::fetch(address, &endpoint.ca, secret).await {
            header.set_message(crate::status::headline(&status));
            let rendered = crate::status::learner_lines(&status);
            for (line, text) in lines.iter().zip(&rendered) {
                line.set_message(text.clone());
            }
            if multi.is_hidden() && last_logged.elapsed() > Duration::from_secs(10) {
                last_logged = Instant::now();
                eprintln!("{}", crate::status::headline(&status));
                for l in &rendered {
                    eprintln!("  {l}");
                }
            }
        }
        if let Ok(Some(status)) = procs[0].child.try_wait() {
            multi.clear().ok();
            if !status.success() {
                return Err(anyhow!(
                    "the coordinator failed ({status}):\n{}",
                    last_lines(&opts.run_dir.join("coordinator.log"), 10)
                ));
            }
            break;
        }
        for (i, p) in procs.iter_mut().enumerate().skip(1) {
            if let Ok(Some(status)) = p.child.try_wait() {
                if !status.success() {
                    multi.clear().ok();
                    let region = &regions[i - 1];
                    return Err(anyhow!(
                        "{} failed ({status}):\n{}",
                        p.name,
                        last_lines(&opts.run_dir.join(format!("learner-{region}.log")), 10)
                    ));
                }
            }
        }
    }
    // The learners exit once told the job is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in procs.iter_mut().skip(1) {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, p.child.wait()).await;
    }
    let mut wan = serde_json::Map::new();
    for (region, emulator) in emulators {
        let elapsed = emulator.elapsed();
        let stats = emulator.stop();
        eprintln!("link {region}: {}", crate::wan::stats_line(&stats, elapsed));
        wan.insert(region, crate::wan::stats_json(&stats));
    }
    let summary_path = coordinator_dir.join("summary.json");
    let mut summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&summary_path)
            .with_context(|| format!("reading {}", summary_path.display()))?,
    )?;
    if !wan.is_empty() {
        summary["wan"] = serde_json::Value::Object(wan);
    }
    atoll_trainer::checkpoint::write_json_atomic(&opts.run_dir.join("summary.json"), &summary)?;
    if coordinator_dir.join("merges.jsonl").exists() {
        std::fs::copy(
            coordinator_dir.join("merges.jsonl"),
            opts.run_dir.join("metrics.jsonl"),
        )?;
    }
    Ok(summary)
}
