//! `atoll bench`: micro-benchmarks (see benchmarks/).

use anyhow::{anyhow, bail, Context, Result};
use atoll_trainer::presets::preset;
use atoll_trainer::GemmaModel;
use clap::{Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
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
        /// Path MTUs in bytes (`sync.link.mtu`): the emulator drops larger datagrams, QUIC probes
        /// up to it. 9000 for jumbo frames.
        #[arg(long, value_delimiter = ',', default_value = "1500")]
        mtus: Vec<u16>,
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
    /// One LoRA training step (adapters on every projection, AdamW) of a preset on CPU.
    LoraStep(super::finetune::LoraStepArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CongestionArg {
    Cubic,
    Bbr,
    Provisioned,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::TrainStep {
            preset: name,
            batch,
            seq,
            warmup,
            steps,
            threads,
        } => bench_train_step(&name, batch, seq, warmup, steps, threads),
        BenchCommand::LoraStep(args) => super::finetune::bench_lora_step(args),
        BenchCommand::Codecs { values, repeats } => bench_codecs(values, repeats),
        BenchCommand::Link {
            rates,
            rtts,
            losses,
            congestion,
            connections,
            mtus,
            warmup,
            measure,
            json,
        } => bench_link(
            &rates,
            &rtts,
            &losses,
            &congestion,
            (&connections, &mtus),
            (&warmup, &measure),
            json.as_deref(),
        ),
    }
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
    (connections, mtus): (&[usize], &[u16]),
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
    for &mtu in mtus {
        atoll_link::quic::check_mtu(mtu).map_err(|e| anyhow!("--mtus: {e}"))?;
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
                        for &mtu in mtus {
                            cases.push(Case {
                                rate_bps,
                                rtt,
                                loss,
                                congestion: match cc {
                                    CongestionArg::Cubic => atoll_link::Congestion::Cubic,
                                    CongestionArg::Bbr => atoll_link::Congestion::Bbr,
                                    CongestionArg::Provisioned => {
                                        atoll_link::Congestion::Provisioned
                                    }
                                },
                                connections: conns,
                                mtu,
                            });
                        }
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
