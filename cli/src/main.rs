//! `atoll`: train, inspect and probe Gemma models.

mod cmd;

use anyhow::{anyhow, bail, Context, Result};
use atoll_store::{CheckpointStore, ResumeFrom, StoreOptions};
use atoll_trainer::checkpoint::{load_model, save_model, write_tensors, DEFAULT_MAX_SHARD_BYTES};
use atoll_trainer::presets::{preset, MultimodalExtras, PRESET_NAMES};
use atoll_trainer::recipe::Recipe;
use atoll_trainer::{logging, train, GemmaConfig, GemmaModel};
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(
    name = "atoll",
    version,
    about = "Train and fine-tune Gemma models across regions with Decoupled DiLoCo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on one learner from a recipe.
    Train {
        /// Recipe YAML file (see recipes/).
        recipe: PathBuf,
        /// Override a recipe field, e.g. --set train.lr=1e-3 (repeatable).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// Continue the run in `run.dir` (default runs/<name>) from a checkpoint of
        /// `checkpoint.url`: `latest` (newest intact) or `step-N`.
        #[arg(long, value_name = "latest|step-N")]
        resume: Option<ResumeFrom>,
    },
    /// Simulate a multi-learner run (DP, DiLoCo, Streaming or Decoupled DiLoCo) in one process on
    /// a virtual clock; deterministic for a given seed.
    Simulate {
        /// Recipe YAML file with a `sync` section.
        recipe: PathBuf,
        /// Override a recipe field, e.g. --set sync.learners=2 (repeatable).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
    },
    /// Run the coordinator of a multi-region job: the syncer behind gRPC (TLS) and QUIC.
    Coordinator {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// Address for gRPC (TCP) and the QUIC data plane (UDP, same port).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// State, TLS material, logs and the final model; an existing state is resumed.
        #[arg(long)]
        run_dir: PathBuf,
        /// File holding the job secret (else ATOLL_SECRET, else sync.secret).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Prometheus endpoint; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics: SocketAddr,
        /// Extra host names or addresses for the server certificate (repeatable), for learners
        /// that dial it by a name other than the listen address.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Largest data-plane frame accepted, in MiB.
        #[arg(long, default_value_t = 1024)]
        max_frame_mib: u64,
        /// Start from a checkpoint of `checkpoint.url` (default <run dir>/checkpoints):
        /// `latest` (newest intact) or `step-N`, instead of the run directory's own state.
        #[arg(long, value_name = "latest|step-N")]
        resume: Option<ResumeFrom>,
    },
    /// Run one region's learner against a coordinator.
    Learner {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// Region name (one learner per region).
        #[arg(long)]
        region: String,
        /// Coordinator address HOST:PORT.
        #[arg(long)]
        coordinator: String,
        /// The job CA certificate (the coordinator's <run dir>/tls/ca.pem); nothing else is trusted.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        run_dir: PathBuf,
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Prometheus endpoint; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:0")]
        metrics: SocketAddr,
        /// Give up when the coordinator stays unreachable this many seconds.
        #[arg(long, default_value_t = 600)]
        give_up_after_s: u64,
        /// Start from the global model of the coordinator's checkpoint in `checkpoint.url`
        /// (`latest` or `step-N`): only fragments changed since are downloaded at join.
        #[arg(long, value_name = "latest|step-N")]
        resume: Option<ResumeFrom>,
        /// Send the QUIC data plane through this address (e.g. an `atoll link-emulator`)
        /// instead of straight to the coordinator.
        #[arg(long, value_name = "HOST:PORT")]
        data_via: Option<SocketAddr>,
    },
    /// Relay UDP traffic (QUIC) through an emulated WAN link: rate, delay, jitter, loss, a
    /// bottleneck queue and scheduled outages, in user space. Runs until Ctrl-C.
    LinkEmulator {
        /// Where clients send (127.0.0.1 unless asked).
        #[arg(long)]
        listen: SocketAddr,
        /// The server the traffic goes to.
        #[arg(long)]
        forward: SocketAddr,
        /// Per direction, e.g. 2gbps, 200mbps (default: unlimited).
        #[arg(long)]
        rate: Option<String>,
        /// Round-trip delay, e.g. 40ms.
        #[arg(long, default_value = "0")]
        rtt: String,
        /// One-way delay variation, e.g. 2ms.
        #[arg(long, default_value = "0")]
        jitter: String,
        /// Loss per packet and direction, e.g. 0.1%.
        #[arg(long, default_value = "0")]
        loss: String,
        /// Bottleneck queue per direction, e.g. 4MB (default: one bandwidth-delay product).
        #[arg(long)]
        queue: Option<String>,
        /// An outage AT:FOR, e.g. 120s:30s (repeatable): every packet dropped meanwhile.
        #[arg(long = "outage", value_name = "AT:FOR")]
        outages: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print counters every this many seconds (0: only at the end).
        #[arg(long, default_value_t = 5)]
        report_every_s: u64,
    },
    /// Show a running job: membership, steps, fragment versions, bytes per link, goodput.
    Status {
        #[arg(long)]
        coordinator: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Run a whole multi-region job on this machine: a coordinator and one learner process per
    /// region, with a live display; every process is stopped at the end or on Ctrl-C.
    Run {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// Continue the job in `run.dir` (default runs/<name>): the coordinator starts from its
        /// checkpoint (`latest` or `step-N`); learners rejoin and receive the global model.
        #[arg(long, value_name = "latest|step-N")]
        resume: Option<ResumeFrom>,
    },
    /// Inspect model configurations.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Write the logits of a checkpoint for given token ids (a numerics probe).
    Logits {
        /// Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 2,651,1234.
        #[arg(long)]
        ids: String,
        /// Output safetensors file with one f32 tensor `logits` of shape [T, vocab].
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// Measurements on held-out text (`atoll eval drafter`: MTP drafter acceptance rate).
    Eval {
        #[command(subcommand)]
        command: cmd::eval::EvalCommand,
    },
    /// Gemma 4 MTP drafters: export for transformers, numerics probe (docs/drafter.md).
    Drafter {
        #[command(subcommand)]
        command: cmd::drafter::DrafterCommand,
    },
    /// Micro-benchmarks (see benchmarks/).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Project DP, classic DiLoCo, Streaming and Decoupled DiLoCo at scale (no tensors): wall
    /// clock, utilisation, goodput, bytes and bandwidth per link; writes plan.json and plan.svg.
    /// From a recipe (its model, sync and link settings), flags, or both (flags win). See
    /// docs/planning.md.
    Plan {
        /// A training recipe to take the model, learners, P/H/τ, codec and link from.
        recipe: Option<PathBuf>,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// A planner preset (gemma4-12b, gemma3-12b, ...) or any `atoll model presets` name.
        #[arg(long)]
        model: Option<String>,
        /// Parameter count instead of a model name.
        #[arg(long)]
        params: Option<u64>,
        #[arg(long)]
        learners: Option<u32>,
        #[arg(long)]
        gpus_per_learner: Option<u32>,
        /// Per-region link rate, e.g. 2gbps, 500mbps.
        #[arg(long)]
        link_rate: Option<String>,
        /// Round-trip time, e.g. 40ms.
        #[arg(long)]
        link_rtt: Option<String>,
        #[arg(long)]
        codec: Option<String>,
        #[arg(long)]
        fragments: Option<u32>,
        #[arg(long)]
        h: Option<u32>,
        #[arg(long)]
        tau: Option<u32>,
        /// Model FLOPs utilisation of the chips, e.g. 0.4.
        #[arg(long)]
        mfu: Option<f64>,
        /// Global batch in tokens per step.
        #[arg(long)]
        batch_tokens: Option<u64>,
        /// Tokens to train on, e.g. 1e12.
        #[arg(long)]
        token_budget: Option<f64>,
        /// Measured (or simulated) seconds per inner step instead of FLOPs / MFU.
        #[arg(long)]
        step_time: Option<String>,
        /// Mean time between interruptions of one chip, e.g. 1y, 30d; `none` for no failures.
        #[arg(long)]
        mtbi: Option<String>,
        /// Syncer time to merge one fragment and take the outer step, e.g. 20ms (default 100ms).
        #[arg(long)]
        merge_time: Option<String>,
        /// Where plan.json and plan.svg go.
        #[arg(long, default_value = "runs/plan")]
        out: PathBuf,
    },
    /// List and verify checkpoints in a checkpoint location (see docs/checkpoint.md).
    Checkpoints {
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// Every checkpoint folder with its state, file count and size.
    List {
        /// A directory, file://, s3://bucket/prefix, gs://… or az://…
        url: String,
    },
    /// Check every file of every committed checkpoint (or of URL/step-N) against its manifest's
    /// size and sha256; exits non-zero when anything is missing or corrupt.
    Verify {
        /// A checkpoint location, or one checkpoint in it: URL/step-N.
        url: String,
    },
    /// Download one checkpoint (URL/step-N, or URL/latest for the newest intact one) into a
    /// local directory, verifying every file: a Hugging Face model directory plus Atoll's state.
    Fetch { url: String, dir: PathBuf },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameter count, shapes and training memory of a preset or checkpoint directory.
    Info {
        /// A preset name (see `atoll model presets`) or a checkpoint directory.
        model: String,
    },
    /// List the built-in presets.
    Presets,
    /// Write a randomly initialised checkpoint of a preset (Hugging Face layout).
    Init {
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
        dtype: DtypeArg,
        /// Override the preset's vocabulary size.
        #[arg(long)]
        vocab_size: Option<usize>,
        /// Split the weights into shards of at most this many bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
        max_shard_bytes: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Encode and decode throughput of each wire codec on one core, in GB/s of f32 input.
    Codecs {
        /// Values per tensor (f32).
        #[arg(long, default_value_t = 16 << 20)]
        values: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// The data plane through the userspace WAN emulator: achieved vs configured rate and CPU
    /// per GB for every combination of the lists given (see benchmarks/README.md).
    Link {
        #[arg(long, value_delimiter = ',', default_value = "1gbps,2gbps,5gbps")]
        rates: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "20ms,40ms,70ms")]
        rtts: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "0,0.1%,1%")]
        losses: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "cubic,bbr,provisioned")]
        congestion: Vec<CongestionArg>,
        /// QUIC connections striped over the link (`sync.link.connections`).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        connections: Vec<usize>,
        /// Time to leave slow start before measuring.
        #[arg(long, default_value = "1.5s")]
        warmup: String,
        #[arg(long, default_value = "3s")]
        measure: String,
        /// Also write every case's figures here, one JSON object per line.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Time forward + backward + AdamW steps on a random batch; prints JSON.
    TrainStep {
        #[arg(long, default_value = "gemma3-bench")]
        preset: String,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 256)]
        seq: i64,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long)]
        threads: Option<i32>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CongestionArg {
    Cubic,
    Bbr,
    Provisioned,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    fn kind(self) -> Kind {
        match self {
            DtypeArg::F32 => Kind::Float,
            DtypeArg::Bf16 => Kind::BFloat16,
        }
    }
}

fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceArg::Cuda => bail!("--device cuda: no CUDA device is visible to libtorch"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train {
            recipe,
            overrides,
            resume,
        } => {
            let recipe = Recipe::from_file(&recipe, &overrides)?;
            let run_dir = match resume {
                Some(_) => train::existing_run_dir(&recipe)?,
                None => train::fresh_run_dir(&recipe)?,
            };
            logging::log_to_file(&run_dir.join("train.log"))
                .with_context(|| format!("cannot write {}", run_dir.join("train.log").display()))?;
            tracing::info!("run directory {}", run_dir.display());
            let summary = train::train_resumable(&recipe, &run_dir, resume)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Simulate { recipe, overrides } => {
            let recipe = Recipe::from_file(&recipe, &overrides)?;
            let run_dir = train::fresh_run_dir(&recipe)?;
            logging::log_to_file(&run_dir.join("simulate.log")).with_context(|| {
                format!("cannot write {}", run_dir.join("simulate.log").display())
            })?;
            tracing::info!("run directory {}", run_dir.display());
            let summary = atoll_trainer::simulate::simulate(&recipe, &run_dir)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Coordinator {
            recipe,
            overrides,
            listen,
            run_dir,
            secret_file,
            metrics,
            hosts,
            max_frame_mib,
            resume,
        } => {
            let (recipe, secret) = node_process(
                &recipe,
                &overrides,
                secret_file.as_deref(),
                &run_dir,
                "coordinator.log",
            )?;
            runtime()?.block_on(atoll_node::coordinator::run(
                atoll_node::coordinator::CoordinatorOptions {
                    recipe,
                    listen,
                    run_dir,
                    secret,
                    metrics: Some(metrics),
                    hosts,
                    max_frame_bytes: max_frame_mib << 20,
                    resume,
                },
            ))
        }
        Command::Learner {
            recipe,
            overrides,
            region,
            coordinator,
            ca,
            run_dir,
            secret_file,
            metrics,
            give_up_after_s,
            resume,
            data_via,
        } => {
            let (recipe, secret) = node_process(
                &recipe,
                &overrides,
                secret_file.as_deref(),
                &run_dir,
                "learner.log",
            )?;
            atoll_node::learner::run(atoll_node::learner::LearnerOptions {
                recipe,
                region,
                coordinator,
                ca,
                secret,
                run_dir,
                metrics: Some(metrics),
                max_frame_bytes: 1 << 30,
                give_up_after: std::time::Duration::from_secs(give_up_after_s),
                resume,
                data_via,
            })
        }
        Command::Status {
            coordinator,
            ca,
            secret_file,
        } => {
            atoll_link::tls::install_crypto_provider();
            let secret = atoll_node::resolve_secret(None, secret_file.as_deref())?;
            let status =
                runtime()?.block_on(atoll_node::status::fetch(&coordinator, &ca, &secret))?;
            println!("{}", atoll_node::status::headline(&status));
            for line in atoll_node::status::learner_lines(&status) {
                println!("  {line}");
            }
            Ok(())
        }
        Command::Run {
            recipe: path,
            overrides,
            resume,
        } => {
            let recipe = Recipe::from_file(&path, &overrides)?;
            let run_dir = match resume {
                Some(_) => train::existing_run_dir(&recipe)?,
                None => train::fresh_run_dir(&recipe)?,
            };
            std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;
            let exe = std::env::current_exe().context("locating the atoll executable")?;
            let summary = runtime()?.block_on(atoll_node::launcher::run(
                atoll_node::launcher::LaunchOptions {
                    recipe_path: std::fs::canonicalize(&path)?,
                    overrides,
                    recipe,
                    run_dir,
                    exe,
                    resume: resume.map(|r| match r {
                        ResumeFrom::Latest => "latest".to_string(),
                        ResumeFrom::Step(n) => format!("step-{n}"),
                    }),
                },
            ))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Plan {
            recipe,
            overrides,
            model,
            params,
            learners,
            gpus_per_learner,
            link_rate,
            link_rtt,
            codec,
            fragments,
            h,
            tau,
            mfu,
            batch_tokens,
            token_budget,
            step_time,
            mtbi,
            merge_time,
            out,
        } => {
            use atoll_planner::{parse_duration_s, parse_rate_gbps, Codec as PlanCodec, PlanInput};
            let mut input = match &recipe {
                Some(path) => plan_input_from_recipe(&Recipe::from_file(path, &overrides)?)?,
                None => PlanInput::default(),
            };
            if let Some(m) = model {
                match atoll_planner::model_preset(&m) {
                    Some(_) => {
                        input.model = Some(m);
                        input.params = None;
                    }
                    None => {
                        let config = preset(&m).map_err(|_| {
                            anyhow!("--model {m:?}: unknown model (planner presets: {}; or any of `atoll model presets`)",
                                atoll_planner::MODEL_PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
                        })?;
                        input.model = Some(m);
                        input.params = Some(config.config.num_parameters());
                    }
                }
            }
            if let Some(p) = params {
                input.model = None;
                input.params = Some(p);
            }
            let plan_err = |e: atoll_planner::PlanError| anyhow!("{e}");
            let flag_err = |flag: &'static str| move |e| anyhow!("--{flag}: {}", plan_err(e));
            if let Some(v) = learners {
                input.learners = v;
            }
            if let Some(v) = gpus_per_learner {
                input.gpus_per_learner = v;
            }
            if let Some(v) = link_rate {
                input.link_rate_gbps = parse_rate_gbps(&v).map_err(flag_err("link-rate"))?;
            }
            if let Some(v) = link_rtt {
                input.link_rtt_ms = parse_duration_s(&v).map_err(flag_err("link-rtt"))? * 1e3;
            }
            if let Some(v) = codec {
                input.codec = PlanCodec::parse(&v).map_err(flag_err("codec"))?;
            }
            if let Some(v) = fragments {
                input.fragments = v;
            }
            if let Some(v) = h {
                input.h = v;
            }
            if let Some(v) = tau {
                input.tau = v;
            }
            if let Some(v) = mfu {
                input.mfu = v;
            }
            if let Some(v) = batch_tokens {
                input.batch_tokens = v;
            }
            if let Some(v) = token_budget {
                input.token_budget = v;
            }
            if let Some(v) = step_time {
                input.step_time_s = Some(parse_duration_s(&v).map_err(flag_err("step-time"))?);
            }
            if let Some(v) = merge_time {
                input.merge_s = parse_duration_s(&v).map_err(flag_err("merge-time"))?;
            }
            if let Some(v) = mtbi {
                input.mtbi_chip_years = match v.as_str() {
                    "none" | "never" => None,
                    _ => Some(
                        parse_duration_s(&v).map_err(flag_err("mtbi"))?
                            / atoll_planner::SECONDS_PER_YEAR,
                    ),
                };
            }
            let plan = atoll_planner::write_plan(&out, &input).map_err(plan_err)?;
            print_plan(&plan);
            println!(
                "wrote {} and {}",
                out.join("plan.json").display(),
                out.join("plan.svg").display()
            );
            Ok(())
        }
        Command::LinkEmulator {
            listen,
            forward,
            rate,
            rtt,
            jitter,
            loss,
            queue,
            outages,
            seed,
            report_every_s,
        } => {
            use atoll_link::emulator::{
                parse_bytes, parse_duration, parse_percent, parse_rate, Emulator, EmulatorConfig,
                Outage,
            };
            let mut config = EmulatorConfig::new(listen, forward);
            config.rate_bps = rate.as_deref().map(parse_rate).transpose()?;
            config.rtt = parse_duration(&rtt)?;
            config.jitter = parse_duration(&jitter)?;
            config.loss = parse_percent(&loss)?;
            config.queue_limit_bytes = queue.as_deref().map(parse_bytes).transpose()?;
            config.seed = seed;
            for o in &outages {
                let (at, dur) = o
                    .split_once(':')
                    .ok_or_else(|| anyhow!("--outage {o:?}: expected AT:FOR, e.g. 120s:30s"))?;
                config.outages.push(Outage {
                    at: parse_duration(at)?,
                    duration: parse_duration(dur)?,
                });
            }
            let emulator = Emulator::start(config)?;
            eprintln!(
                "link emulator on udp/{} -> {forward}; Ctrl-C to stop",
                emulator.local_addr()
            );
            runtime()?.block_on(async {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(
                    report_every_s.max(1),
                ));
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = tick.tick(), if report_every_s > 0 => {
                            eprintln!("{}", atoll_node::wan::stats_line(&emulator.stats(), emulator.elapsed()));
                        }
                    }
                }
            });
            let elapsed = emulator.elapsed();
            let stats = emulator.stop();
            println!("{}", atoll_node::wan::stats_line(&stats, elapsed));
            Ok(())
        }
        Command::Checkpoints { command } => match command {
            CheckpointsCommand::List { url } => checkpoints_list(&url),
            CheckpointsCommand::Verify { url } => checkpoints_verify(&url),
            CheckpointsCommand::Fetch { url, dir } => checkpoints_fetch(&url, &dir),
        },
        Command::Model { command } => match command {
            ModelCommand::Info { model } => model_info(&model),
            ModelCommand::Presets => {
                for name in PRESET_NAMES {
                    let p = preset(name)?;
                    println!(
                        "{name:<14} {:>15} parameters  {}",
                        p.config.num_parameters() + p.extras.vision + p.extras.audio,
                        p.description
                    );
                }
                Ok(())
            }
            ModelCommand::Init {
                preset: name,
                out,
                seed,
                dtype,
                vocab_size,
                max_shard_bytes,
            } => {
                let mut config = preset(&name)?.config;
                if let Some(v) = vocab_size {
                    config.vocab_size = v;
                }
                let model = GemmaModel::new_seeded(config, Device::Cpu, Kind::Float, seed)?;
                save_model(&model, &out, dtype.kind(), max_shard_bytes)?;
                println!("wrote {}", out.display());
                Ok(())
            }
        },
        Command::Eval { command } => cmd::eval::run(command),
        Command::Drafter { command } => cmd::drafter::run(command),
        Command::Logits {
            model,
            ids,
            out,
            device: dev,
        } => logits(&model, &ids, &out, device(dev)?),
        Command::Bench {
            command:
                BenchCommand::TrainStep {
                    preset: name,
                    batch,
                    seq,
                    warmup,
                    steps,
                    threads,
                },
        } => bench_train_step(&name, batch, seq, warmup, steps, threads),
        Command::Bench {
            command: BenchCommand::Codecs { values, repeats },
        } => bench_codecs(values, repeats),
        Command::Bench {
            command:
                BenchCommand::Link {
                    rates,
                    rtts,
                    losses,
                    congestion,
                    connections,
                    warmup,
                    measure,
                    json,
                },
        } => bench_link(
            &rates,
            &rtts,
            &losses,
            &congestion,
            &connections,
            (&warmup, &measure),
            json.as_deref(),
        ),
    }
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

fn model_info(model: &str) -> Result<()> {
    let path = Path::new(model);
    let (label, config, extras) = if path.is_dir() {
        let config = GemmaConfig::from_file(&path.join("config.json"))?;
        (
            path.display().to_string(),
            config,
            MultimodalExtras::default(),
        )
    } else if PRESET_NAMES.contains(&model) {
        let p = preset(model)?;
        (
            format!("{} ({})", p.name, p.description),
            p.config,
            p.extras,
        )
    } else {
        bail!(
            "`{model}` is neither a checkpoint directory nor a preset (presets: {})",
            PRESET_NAMES.join(", ")
        );
    };
    let text = config.num_parameters();
    let total = text + extras.vision + extras.audio;
    let embedding = (config.vocab_size * config.hidden_size) as u64;
    let full = config
        .layer_types
        .iter()
        .filter(|t| **t == atoll_trainer::config::LayerType::Full)
        .count();
    println!("model: {label}");
    println!("architecture: {}", config.architecture.name());
    println!("parameters: {total}");
    println!("  text stack: {text} (embedding {embedding})");
    if extras.vision + extras.audio > 0 {
        println!("  vision front end: {}", extras.vision);
        println!("  audio front end: {}", extras.audio);
    }
    println!(
        "layers: {} ({} sliding, window {}; {} full), hidden {}, ffn {}, heads {} (kv {}), head_dim {}",
        config.num_hidden_layers,
        config.num_hidden_layers - full,
        config.sliding_window,
        full,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim
    );
    if config.architecture == atoll_trainer::Architecture::Gemma4 && full > 0 {
        println!(
            "full layers: head_dim {}, kv heads {}, K=V {}",
            config.global_head_dim, config.num_global_key_value_heads, config.attention_k_eq_v
        );
    }
    let n = total as f64;
    println!("memory, bf16 weights: {}", gib(2.0 * n));
    println!("memory, bf16 gradients: {}", gib(2.0 * n));
    println!("memory, AdamW state (f32 moments ×2): {}", gib(8.0 * n));
    println!(
        "memory, f32 master weights (bf16 training): {}",
        gib(4.0 * n)
    );
    println!(
        "memory, total for bf16 AdamW training (before activations): {}",
        gib(16.0 * n)
    );
    Ok(())
}

fn parse_ids(ids: &str) -> Result<Vec<i64>> {
    let parsed = ids
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| anyhow!("--ids: `{s}` is not an integer token id"))
        })
        .collect::<Result<Vec<_>>>()?;
    if parsed.is_empty() {
        bail!("--ids: give at least one token id, e.g. --ids 2,651,1234");
    }
    Ok(parsed)
}

fn logits(model_dir: &Path, ids: &str, out: &Path, device: Device) -> Result<()> {
    let ids = parse_ids(ids)?;
    let model = load_model(model_dir, device, Kind::Float)?;
    model.check_ids(&ids).map_err(|e| anyhow!("--ids: {e}"))?;
    let input = Tensor::from_slice(&ids).unsqueeze(0).to_device(device);
    let logits = tch::no_grad(|| model.forward(&input))
        .squeeze_dim(0)
        .to_device(Device::Cpu);
    write_tensors(out, &[("logits", &logits)])?;
    println!("wrote logits {:?} to {}", logits.size(), out.display());
    Ok(())
}

fn bench_train_step(
    name: &str,
    batch: i64,
    seq: i64,
    warmup: usize,
    steps: usize,
    threads: Option<i32>,
) -> Result<()> {
    use atoll_trainer::optim::{AdamW, AdamWConfig};
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    let config = preset(name)?.config;
    let vocab = config.vocab_size as i64;
    let model = GemmaModel::new_seeded(config, Device::Cpu, Kind::Float, 0)?;
    let params = model.trainable_parameters();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    );
    let tokens = Tensor::randint(vocab, [batch, seq + 1], (Kind::Int64, Device::Cpu));
    let (x, y) = (tokens.narrow(1, 0, seq), tokens.narrow(1, 1, seq));
    let mut times = Vec::new();
    let mut phases = [0.0f64; 3];
    for i in 0..warmup + steps {
        let start = std::time::Instant::now();
        let loss = model.loss(&x, &y);
        let _ = loss.double_value(&[]);
        let forward = start.elapsed().as_secs_f64();
        loss.backward();
        let backward = start.elapsed().as_secs_f64();
        opt.clipped_step(1e-3, Some(1.0));
        let total = start.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(total * 1000.0);
            phases[0] += forward * 1000.0 / steps as f64;
            phases[1] += (backward - forward) * 1000.0 / steps as f64;
            phases[2] += (total - backward) * 1000.0 / steps as f64;
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "atoll", "preset": name, "batch": batch, "seq": seq, "steps": steps,
            "threads": tch::get_num_threads(), "median_ms": median,
            "mean_forward_ms": phases[0], "mean_backward_ms": phases[1], "mean_optimizer_ms": phases[2],
            "tokens_per_s": (batch * seq) as f64 / (median / 1000.0),
        })
    );
    Ok(())
}

fn bench_codecs(n: usize, repeats: usize) -> Result<()> {
    use atoll_wire::{decode, encode, ALL_CODECS, DEFAULT_BLOCK};
    let values = atoll_wire::synthetic_outer_gradient(n, 0x2545_f491_4f6c_dd1d);
    let gb = (n * 4) as f64 / 1e9;
    println!(
        "{:<6} {:>10} {:>14} {:>14}",
        "codec", "bits/value", "encode GB/s", "decode GB/s"
    );
    for codec in ALL_CODECS {
        let mut buf = Vec::new();
        let mut out = vec![0.0f32; n];
        let (mut enc, mut dec) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..repeats.max(1) {
            buf.clear();
            let start = std::time::Instant::now();
            encode(codec, &values, DEFAULT_BLOCK, &mut buf)?;
            enc = enc.min(start.elapsed().as_secs_f64());
            let start = std::time::Instant::now();
            decode(codec, &buf, DEFAULT_BLOCK, &mut out)?;
            dec = dec.min(start.elapsed().as_secs_f64());
        }
        println!(
            "{:<6} {:>10.3} {:>14.2} {:>14.2}",
            codec.name(),
            codec.bits_per_value(DEFAULT_BLOCK),
            gb / enc,
            gb / dec
        );
    }
    Ok(())
}

fn bench_link(
    rates: &[String],
    rtts: &[String],
    losses: &[String],
    congestion: &[CongestionArg],
    connections: &[usize],
    (warmup, measure): (&str, &str),
    json: Option<&Path>,
) -> Result<()> {
    use atoll_link::emulator::{parse_duration, parse_percent, parse_rate};
    use atoll_node::link_bench::{run_all, Case, Options};
    let rates: Vec<u64> = rates
        .iter()
        .map(|r| parse_rate(r).map_err(|e| anyhow!("--rates: {e}")))
        .collect::<Result<_>>()?;
    let rtts: Vec<_> = rtts
        .iter()
        .map(|r| parse_duration(r).map_err(|e| anyhow!("--rtts: {e}")))
        .collect::<Result<_>>()?;
    let losses: Vec<f64> = losses
        .iter()
        .map(|l| parse_percent(l).map_err(|e| anyhow!("--losses: {e}")))
        .collect::<Result<_>>()?;
    if let Some(bad) = losses.iter().find(|l| !(0.0..1.0).contains(*l)) {
        bail!("--losses: {}% is not a loss rate below 100%", bad * 100.0);
    }
    if connections.contains(&0) {
        bail!("--connections: at least one connection");
    }
    let opts = Options {
        warmup: parse_duration(warmup).map_err(|e| anyhow!("--warmup: {e}"))?,
        measure: parse_duration(measure).map_err(|e| anyhow!("--measure: {e}"))?,
        ..Options::default()
    };
    if opts.measure.is_zero() {
        bail!("--measure must be positive");
    }
    let mut cases = Vec::new();
    for &rate_bps in &rates {
        for &rtt in &rtts {
            for &loss in &losses {
                for cc in congestion {
                    for &conns in connections {
                        cases.push(Case {
                            rate_bps,
                            rtt,
                            loss,
                            congestion: match cc {
                                CongestionArg::Cubic => atoll_link::Congestion::Cubic,
                                CongestionArg::Bbr => atoll_link::Congestion::Bbr,
                                CongestionArg::Provisioned => atoll_link::Congestion::Provisioned,
                            },
                            connections: conns,
                        });
                    }
                }
            }
        }
    }
    let outcomes = run_all(&cases, &opts)?;
    if let Some(path) = json {
        let lines: Vec<String> = outcomes.iter().map(|o| o.to_json().to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn checkpoints_list(url: &str) -> Result<()> {
    let store = CheckpointStore::open(url, StoreOptions::default())?;
    let listed = atoll_store::block_on(store.list())??;
    if listed.is_empty() {
        println!("no checkpoints in {url}");
        return Ok(());
    }
    println!(
        "{:<14} {:<11} {:>6} {:>12}  kind",
        "checkpoint", "state", "files", "bytes"
    );
    for l in listed {
        match l.manifest {
            Some(m) => println!(
                "{:<14} {:<11} {:>6} {:>12}  {}",
                atoll_store::step_folder(l.step),
                "committed",
                m.files.len(),
                m.total_bytes(),
                m.kind
            ),
            None => println!(
                "{:<14} {:<11} {:>6} {:>12}  (no manifest: never used by --resume)",
                atoll_store::step_folder(l.step),
                "incomplete",
                "-",
                "-"
            ),
        }
    }
    Ok(())
}

/// Splits `URL/step-N` or `URL/latest` into the location and the checkpoint; a bare location
/// gives None.
fn split_checkpoint_url(url: &str) -> Result<(&str, Option<ResumeFrom>)> {
    let trimmed = url.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((base, last)) if last.starts_with("step-") || last == "latest" => {
            let which = last
                .parse::<ResumeFrom>()
                .map_err(|_| anyhow!("{url}: {last:?} is not step-N"))?;
            Ok((base, Some(which)))
        }
        _ => Ok((trimmed, None)),
    }
}

fn checkpoints_fetch(url: &str, dir: &Path) -> Result<()> {
    let (location, which) = split_checkpoint_url(url)?;
    let which =
        which.ok_or_else(|| anyhow!("{url}: name a checkpoint, URL/step-N or URL/latest"))?;
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty; fetch into a new directory",
            dir.display()
        );
    }
    let store = CheckpointStore::open(location, StoreOptions::default())?;
    let loaded = atoll_store::block_on(store.load_resume(which))??
        .ok_or_else(|| anyhow!("no intact checkpoint in {location}"))?;
    loaded.write_to(dir)?;
    println!(
        "step-{}: {} files, {} bytes verified and written to {}",
        loaded.manifest.step,
        loaded.files.len(),
        loaded.manifest.total_bytes(),
        dir.display()
    );
    Ok(())
}

fn checkpoints_verify(url: &str) -> Result<()> {
    let (location, only) = split_checkpoint_url(url)?;
    let store = CheckpointStore::open(location, StoreOptions::default())?;
    let steps = match only {
        Some(ResumeFrom::Step(step)) => vec![step],
        Some(ResumeFrom::Latest) => bail!("{url}: verify takes a location or URL/step-N"),
        None => {
            let listed = atoll_store::block_on(store.list())??;
            for l in listed.iter().filter(|l| l.manifest.is_none()) {
                println!(
                    "step-{}: incomplete (no manifest), ignored by --resume",
                    l.step
                );
            }
            let committed: Vec<u64> = listed
                .iter()
                .filter(|l| l.manifest.is_some())
                .map(|l| l.step)
                .collect();
            if committed.is_empty() {
                bail!("no committed checkpoint in {location}");
            }
            committed
        }
    };
    let mut bad = 0;
    for step in steps {
        let problems = atoll_store::block_on(store.verify(step))??;
        if problems.is_empty() {
            println!("step-{step}: ok");
        } else {
            bad += 1;
            for p in problems {
                println!("step-{step}: {p}");
            }
        }
    }
    if bad > 0 {
        bail!("{bad} checkpoint(s) in {location} are missing files or corrupt");
    }
    Ok(())
}

/// The planner's view of a training recipe: its model, learners, fragments, H, τ, codec, link
/// (one-way latency → RTT), batch and token budget; one accelerator per learner, the recipe's
/// simulated step time, f32 DP gradients without overlap (as `atoll simulate` runs DP), no
/// failures unless the recipe injects them.
fn plan_input_from_recipe(recipe: &Recipe) -> Result<atoll_planner::PlanInput> {
    let s = &recipe.sync;
    let model = recipe
        .model
        .preset
        .clone()
        .ok_or_else(|| anyhow!("atoll plan needs a recipe with model.preset"))?;
    let config = preset(&model)?;
    let learners = s.learners.0 as u64;
    let tokens_per_learner_step =
        (recipe.train.batch_size.0 * recipe.train.grad_accum.0 * recipe.data.seq_len.0) as u64;
    let codec = atoll_planner::Codec::parse(s.codec.codec().name()).map_err(|e| anyhow!("{e}"))?;
    Ok(atoll_planner::PlanInput {
        model: Some(model),
        params: Some(config.config.num_parameters()),
        learners: s.learners.0 as u32,
        gpus_per_learner: 1,
        link_rate_gbps: s.link.bandwidth_gbps.0,
        link_rtt_ms: 2.0 * s.link.latency_ms.0,
        codec,
        dp_codec: atoll_planner::Codec::F32,
        // `atoll simulate` and the coordinator do not overlap DP's all-reduce with compute.
        dp_overlap: 0.0,
        fragments: s.fragments.0 as u32,
        h: s.h.0 as u32,
        tau: s.tau.0 as u32,
        batch_tokens: tokens_per_learner_step * learners,
        token_budget: (tokens_per_learner_step * learners * recipe.train.max_steps.0 as u64) as f64,
        step_time_s: Some(s.step_time_s.0),
        mtbi_chip_years: s
            .failures
            .mtbf_s
            .map(|m| m.0 / atoll_planner::SECONDS_PER_YEAR),
        reconfigure_s: s.failures.recovery_s.0,
        ..atoll_planner::PlanInput::default()
    })
}

fn print_plan(plan: &atoll_planner::PlanOutput) {
    println!(
        "{}: {:.3e} parameters, {} chips, {} steps of {:.3} s compute",
        plan.model, plan.params, plan.chips, plan.total_steps, plan.step_compute_s
    );
    println!(
        "{:<22}{:>14}{:>10}{:>12}{:>10}{:>14}{:>12}",
        "mode", "wall clock", "vs DP", "compute", "goodput", "GB per link", "peak Gbps"
    );
    for m in &plan.modes {
        println!(
            "{:<22}{:>14}{:>9.1}x{:>11.1}%{:>9.1}%{:>14.1}{:>12.2}",
            m.label,
            atoll_planner::human_duration(m.wall_clock_s),
            m.speedup_vs_dp,
            100.0 * m.compute_utilization,
            100.0 * m.goodput,
            m.bytes_per_link / 1e9,
            m.peak_gbps_per_link
        );
        for w in &m.warnings {
            println!("  warning: {w}");
        }
    }
}

/// What the coordinator and learner commands share: the recipe, the job secret, the run
/// directory and its log file.
fn node_process(
    recipe: &Path,
    overrides: &[String],
    secret_file: Option<&Path>,
    run_dir: &Path,
    log: &str,
) -> Result<(Recipe, String)> {
    let recipe = Recipe::from_file(recipe, overrides)?;
    let secret = atoll_node::resolve_secret(recipe.sync.secret.as_deref(), secret_file)?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    logging::log_to_file(&run_dir.join(log))?;
    Ok((recipe, secret))
}
