//! `atoll bench`: micro-benchmarks (see benchmarks/).

use anyhow::{anyhow, bail, Context, Result};
use atoll_trainer::presets::preset;
use atoll_trainer::GemmaModel;
use clap::{Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Each wire codec's error and its encode and decode throughput on one core, in GB/s of f32
    /// input; with zstd, what it saves and what whole frames then cost.
    Codecs {
        /// Values per tensor (f32).
        #[arg(long, default_value_t = 16 << 20)]
        values: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// zstd level for the frame columns (0 leaves them out; 1 saves as much as 3 on real
        /// outer gradients for less CPU, see benchmarks/README.md).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=22))]
        zstd_level: i32,
        /// Real outer-gradient values instead of synthetic ones: FROM − TO over every tensor the
        /// two checkpoints share (`model.safetensors` files or directories holding one), for
        /// example two checkpoints of `atoll train` H steps apart.
        #[arg(long, value_name = "FROM,TO", value_delimiter = ',')]
        outer_gradient: Option<Vec<PathBuf>>,
    },
    /// The syncer's merge of one fragment (RDA over each learner's outer gradient, the outer
    /// Nesterov step, the broadcast's quantisation with error feedback) on each thread count:
    /// seconds per merge and what a fragment of a larger model would take; then one round
    /// through the syncer, split into its own thread's time and the merge job's.
    Merge {
        /// Values in the fragment (f32).
        #[arg(long, default_value_t = 16 << 20)]
        values: usize,
        /// Contributions merged (learners in the round).
        #[arg(long, default_value_t = 4)]
        learners: usize,
        /// Broadcast codec (f32 sends the exact step).
        #[arg(long, default_value = "e3m0")]
        codec: String,
        /// Thread counts to time (default: 1 and every core).
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
        #[arg(long, default_value_t = 3)]
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
    /// The LM head and cross-entropy, forward and backward, fused in blocks of rows (what
    /// training runs) against whole logits through autograd, alternating; f32 on CPU.
    LmHead {
        /// Positions (batch × sequence).
        #[arg(long, default_value_t = 2048)]
        rows: i64,
        #[arg(long, default_value_t = 256)]
        hidden: i64,
        #[arg(long, default_value_t = 8192)]
        vocab: i64,
        /// cap·tanh(logits/cap) before the softmax, as Gemma 4 does (cap 30).
        #[arg(long)]
        softcap: Option<f64>,
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        #[arg(long)]
        threads: Option<i32>,
    },
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
        BenchCommand::LmHead {
            rows,
            hidden,
            vocab,
            softcap,
            repeats,
            threads,
        } => {
            if rows <= 0 || hidden <= 0 || vocab <= 0 || repeats == 0 {
                bail!("--rows, --hidden, --vocab and --repeats must be positive");
            }
            if let Some(t) = threads {
                if t <= 0 {
                    bail!("--threads must be positive");
                }
                tch::set_num_threads(t);
            }
            bench_lm_head(rows, hidden, vocab, softcap, repeats)
        }
        BenchCommand::Codecs {
            values,
            repeats,
            zstd_level,
            outer_gradient,
        } => {
            let values = match outer_gradient.as_deref() {
                Some([from, to]) => checkpoint_difference(from, to)?,
                Some(_) => bail!("--outer-gradient takes two checkpoints: FROM,TO"),
                None if values == 0 => bail!("--values must be positive"),
                None => atoll_wire::synthetic_outer_gradient(values, 0x2545_f491_4f6c_dd1d),
            };
            bench_codecs(&values, repeats, zstd_level)
        }
        BenchCommand::Merge {
            values,
            learners,
            codec,
            threads,
            repeats,
        } => {
            let codec = atoll_wire::Codec::from_name(&codec)
                .ok_or_else(|| anyhow!("unknown codec {codec:?} (f32, bf16, int8, e3m0, int2)"))?;
            if values == 0 || learners == 0 {
                bail!("--values and --learners must be positive");
            }
            let threads = if threads.is_empty() {
                let all = atoll_coordinator::parallel::available_threads();
                if all > 1 {
                    vec![1, all]
                } else {
                    vec![1]
                }
            } else if threads.contains(&0) {
                bail!("--threads takes positive thread counts");
            } else {
                threads
            };
            bench_merge(values, learners, codec, &threads, repeats)
        }
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

/// Median milliseconds of forward + backward through the head and the loss, fused and unfused,
/// the two alternating so the machine's drift reaches both alike.
fn bench_lm_head(
    rows: i64,
    hidden: i64,
    vocab: i64,
    softcap: Option<f64>,
    repeats: usize,
) -> Result<()> {
    use atoll_trainer::models::head_loss::{lm_head_cross_entropy, LmHead, Reduction};
    use atoll_trainer::models::layers::lm_logits;
    let options = (Kind::Float, Device::Cpu);
    let states = Tensor::randn([rows, hidden], options);
    let head = (Tensor::randn([vocab, hidden], options) * 0.02).set_requires_grad(true);
    let labels = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
    let mut times = [Vec::new(), Vec::new()];
    let warmup = 2;
    for i in 0..warmup + repeats {
        for (fused, times) in times.iter_mut().enumerate() {
            let h = states.copy().set_requires_grad(true);
            let start = std::time::Instant::now();
            let loss = if fused == 1 {
                lm_head_cross_entropy(
                    &h,
                    LmHead {
                        weights: &head,
                        softcap,
                    },
                    &labels,
                    Reduction::Mean,
                )
            } else {
                lm_logits(&h, &head, softcap).cross_entropy_for_logits(&labels)
            };
            loss.backward();
            let _ = h.grad().sum(Kind::Float).double_value(&[]);
            if i >= warmup {
                times.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = head.grad().zero_();
        }
    }
    let median = |t: &mut Vec<f64>| {
        t.sort_by(|a, b| a.total_cmp(b));
        t[t.len() / 2]
    };
    let (unfused, fused) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "LM head + cross-entropy, forward and backward: {rows} rows x hidden {hidden} x vocabulary {vocab}{}, {} threads, median of {repeats}",
        softcap.map(|c| format!(", softcap {c}")).unwrap_or_default(),
        tch::get_num_threads()
    );
    println!("  implementation                        ms    logits held (MiB)");
    let whole = (rows * vocab * 4) as f64 / (1 << 20) as f64;
    println!(
        "  whole logits through autograd  {unfused:>10.1}  {:>10.1}",
        3.0 * whole
    );
    let block = atoll_trainer::models::head_loss::block_rows(Device::Cpu, vocab).min(rows);
    let held = (block * vocab * 4) as f64 / (1 << 20) as f64;
    let blocks = atoll_trainer::models::head_loss::logits_blocks_held(softcap.is_some());
    println!(
        "  fused, blocks of {block:>5} rows   {fused:>10.1}  {:>10.1}",
        blocks * held
    );
    println!("  ratio (unfused / fused): {:.2}", unfused / fused);
    Ok(())
}

/// FROM − TO, tensor by tensor in name order, over the floating-point tensors both checkpoints
/// hold with the same shape. Each is a safetensors file or a Hugging Face checkpoint directory
/// (single file or shards).
fn checkpoint_difference(from: &Path, to: &Path) -> Result<Vec<f32>> {
    use atoll_trainer::checkpoint::{read_tensors, weight_files};
    let load = |path: &Path| -> Result<std::collections::BTreeMap<String, Tensor>> {
        let files = if path.is_dir() {
            weight_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let mut tensors = std::collections::BTreeMap::new();
        for file in files {
            tensors.extend(read_tensors(&file)?);
        }
        Ok(tensors)
    };
    let (from_tensors, to_tensors) = (load(from)?, load(to)?);
    let mut values = Vec::new();
    for (name, a) in &from_tensors {
        let Some(b) = to_tensors.get(name) else {
            continue;
        };
        if a.size() != b.size() || !a.is_floating_point() {
            continue;
        }
        let delta = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).flatten(0, -1);
        values.extend(Vec::<f32>::try_from(&delta)?);
    }
    if values.is_empty() {
        bail!(
            "{} and {} share no floating-point tensor of equal shape",
            from.display(),
            to.display()
        );
    }
    if values.iter().all(|v| *v == 0.0) {
        bail!(
            "{} and {} hold the same weights",
            from.display(),
            to.display()
        );
    }
    Ok(values)
}

fn bench_merge(
    n: usize,
    learners: usize,
    codec: atoll_wire::Codec,
    threads: &[usize],
    repeats: usize,
) -> Result<()> {
    use atoll_coordinator::merge::{
        learner_weight, merge_tensor, BroadcastCodec, MergeRule, OuterOptimizer, OuterStep,
        TensorMerge,
    };
    let outer_gradients: Vec<Vec<f32>> = (0..learners)
        .map(|i| atoll_wire::synthetic_outer_gradient(n, 0x9e37_79b9_7f4a_7c15 + i as u64))
        .collect();
    let deltas: Vec<&[f32]> = outer_gradients.iter().map(Vec::as_slice).collect();
    let weights = vec![learner_weight(16 * 1024, 16); learners];
    let theta = atoll_wire::synthetic_outer_gradient(n, 7);
    let mut momentum = vec![0.0f32; n];
    let mut residual = vec![0.0f32; n];
    let round = TensorMerge {
        deltas: &deltas,
        weights: &weights,
        rule: MergeRule::Rda,
    };
    // A 12B model's fragment with the recipe default of 4 fragments.
    let fragment_12b = 12e9 / 4.0;
    println!(
        "merge of {n} values from {learners} learners, {} broadcast with error feedback (best of {repeats})",
        codec.name()
    );
    println!(
        "{:>7} {:>10} {:>9} {:>14} {:>22}",
        "threads", "s/merge", "ns/value", "GB/s of Δ in", "12B fragment (P=4), s"
    );
    for &t in threads {
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let start = std::time::Instant::now();
            let merged = merge_tensor(
                &round,
                &theta,
                OuterStep::Nesterov {
                    optimizer: OuterOptimizer {
                        lr: 0.7,
                        momentum: 0.5,
                    },
                    momentum: &mut momentum,
                },
                (codec != atoll_wire::Codec::F32).then(|| BroadcastCodec {
                    codec,
                    residual: Some(&mut residual),
                }),
                t,
            );
            best = best.min(start.elapsed().as_secs_f64());
            std::hint::black_box(merged);
        }
        let per_value = best / n as f64;
        println!(
            "{t:>7} {best:>10.3} {:>9.2} {:>14.2} {:>22.1}",
            per_value * 1e9,
            (n * learners * 4) as f64 / best / 1e9,
            per_value * fragment_12b
        );
    }
    let (actor, job) = bench_syncer_round(&theta, &outer_gradients, codec, repeats)?;
    println!(
        "one round through the syncer as the coordinator runs it ({learners} contributions, one \
         measured against the version before; history full; median of {} rounds):",
        repeats.max(1)
    );
    println!("  syncer's own thread (the coordinator's actor): {actor:>8.3} s");
    println!("  merge job on a blocking thread, every core:    {job:>8.3} s");
    Ok(())
}

/// Rounds of one fragment of `n` values through the syncer, once its version history is full:
/// the median time its own thread (the coordinator's actor) spends on a round's contributions,
/// one of them measured against the version before (so re-anchored), and on the merge's result,
/// against the median time of the merge job the round hands out (re-anchoring, merge, outer
/// step, broadcast encoding, the history's rebuild).
fn bench_syncer_round(
    theta: &[f32],
    deltas: &[Vec<f32>],
    codec: atoll_wire::Codec,
    repeats: usize,
) -> Result<(f64, f64)> {
    use atoll_coordinator::{
        Action, Contribution, Event, FragmentPlan, MergeRule, OuterOptimizer, Progress, Syncer,
        SyncerConfig, TensorInfo,
    };
    let (n, learners) = (theta.len(), deltas.len());
    let h = 4;
    let config = SyncerConfig {
        h,
        quorum: learners,
        grace_gamma: 0.0,
        outer: OuterOptimizer {
            lr: 0.7,
            momentum: 0.5,
        },
        merge: MergeRule::Rda,
        broadcast_codec: (codec != atoll_wire::Codec::F32).then_some(codec),
        broadcast_error_feedback: true,
        ..SyncerConfig::default()
    };
    let history = config.version_history as u64;
    let plan = FragmentPlan::new(
        vec![TensorInfo::new(
            "model.layers.0.mlp.up_proj.weight",
            &[n as u64],
        )],
        1,
    )?;
    let mut syncer = Syncer::new(config, plan, &[theta.to_vec()]);
    let ids = 0..learners as u32;
    for learner in ids.clone() {
        syncer.handle(0.0, Event::Join { learner });
    }
    let progress = vec![Progress {
        c_steps: h,
        c_tokens: h * 1024,
    }];
    let (mut actor, mut job_s) = (Vec::new(), Vec::new());
    for round in 1..=history + 1 + repeats.max(1) as u64 {
        for step in (round - 1) * h + 1..=round * h {
            for learner in ids.clone() {
                let event = Event::Report {
                    learner,
                    step,
                    progress: progress.clone(),
                    applied: Vec::new(),
                };
                syncer.handle(step as f64, event);
            }
        }
        let version = syncer.version(0);
        let contributions: Vec<Contribution> = ids
            .clone()
            .map(|learner| {
                // Against the version before for one learner: its merge re-anchors.
                let base = if learner == 0 {
                    version.saturating_sub(1)
                } else {
                    version
                };
                let delta = vec![deltas[learner as usize].clone()];
                Contribution::new(learner, 0, round, base, progress[0], delta)
            })
            .collect();
        let now = (round * h) as f64;
        let start = std::time::Instant::now();
        let mut merge = None;
        for c in contributions {
            for action in syncer.handle(now, Event::Contribution(c)) {
                match action {
                    Action::Merge(job) => merge = Some(job),
                    Action::Rejected { reason, .. } => {
                        bail!("internal: the bench's contribution was rejected ({reason:?})")
                    }
                    _ => {}
                }
            }
        }
        let mut on_actor = start.elapsed().as_secs_f64();
        let job = merge.ok_or_else(|| anyhow!("internal: round {round} asked for no merge"))?;
        let start = std::time::Instant::now();
        let merged = job.run();
        let merge_time = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        syncer.handle(now, Event::Merged(merged));
        on_actor += start.elapsed().as_secs_f64();
        if round > history + 1 {
            actor.push(on_actor);
            job_s.push(merge_time);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut actor), median(&mut job_s)))
}

fn bench_codecs(values: &[f32], repeats: usize, zstd_level: i32) -> Result<()> {
    use atoll_wire::{
        decode, decode_frame, encode, encode_frame, FrameLimits, ALL_CODECS, DEFAULT_BLOCK,
    };
    let n = values.len();
    let gb = (n * 4) as f64 / 1e9;
    let best_of = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let start = std::time::Instant::now();
            f()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let energy: f64 = values.iter().map(|v| (*v as f64).powi(2)).sum();
    print!(
        "{:<6} {:>10} {:>10} {:>12} {:>12}",
        "codec", "bits/value", "rel. error", "encode GB/s", "decode GB/s"
    );
    if zstd_level > 0 {
        print!(
            " {:>16} {:>18} {:>18}",
            format!("zstd {zstd_level} bits/val"),
            "frame+zstd enc GB/s",
            "frame+zstd dec GB/s"
        );
    }
    println!();
    for codec in ALL_CODECS {
        let mut buf = Vec::new();
        let mut out = vec![0.0f32; n];
        let enc = best_of(&mut || {
            buf.clear();
            Ok(encode(codec, values, DEFAULT_BLOCK, &mut buf)?)
        })?;
        let dec = best_of(&mut || Ok(decode(codec, &buf, DEFAULT_BLOCK, &mut out)?))?;
        let error: f64 = out
            .iter()
            .zip(values)
            .map(|(o, v)| ((o - v) as f64).powi(2))
            .sum();
        print!(
            "{:<6} {:>10.3} {:>10.4} {:>12.2} {:>12.2}",
            codec.name(),
            codec.bits_per_value(DEFAULT_BLOCK),
            (error / energy).sqrt(),
            gb / enc,
            gb / dec
        );
        if zstd_level > 0 {
            let shape = [n as u64];
            let mut frame = Vec::new();
            let frame_enc = best_of(&mut || {
                frame = encode_frame(codec, DEFAULT_BLOCK as u32, &shape, values, zstd_level)?;
                Ok(())
            })?;
            let limits = FrameLimits::default();
            let frame_dec =
                best_of(&mut || decode_frame(&frame, limits).map(drop).map_err(Into::into))?;
            print!(
                " {:>16.3} {:>18.2} {:>18.2}",
                8.0 * frame.len() as f64 / n as f64,
                gb / frame_enc,
                gb / frame_dec
            );
        }
        println!();
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
