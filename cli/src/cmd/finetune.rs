//! `atoll finetune`, the LoRA flags of `atoll model info` and `atoll logits --adapter`, and
//! `atoll bench lora-step`.

use anyhow::{anyhow, bail, Context, Result};
use atoll_store::ResumeFrom;
use atoll_trainer::checkpoint::write_tensors;
use atoll_trainer::finetune::{self, memory, peft};
use atoll_trainer::models::lora::{LoraSet, LoraSpec, DEFAULT_TARGETS};
use atoll_trainer::models::recompute::TokenBatch;
use atoll_trainer::optim::{AdamW, AdamWConfig};
use atoll_trainer::presets::preset;
use atoll_trainer::recipe::{ParamDtype, Recipe};
use atoll_trainer::{logging, train, GemmaConfig, GemmaModel};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct FinetuneArgs {
    /// Recipe YAML with model.init_from, a `finetune` section and optionally `lora` (see
    /// recipes/lora-tiny.yaml and docs/finetune.md).
    pub recipe: PathBuf,
    /// Override a recipe field, e.g. --set lora.r=8 (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in `run.dir` (default runs/<name>) from a checkpoint: `latest` or `step-N`.
    #[arg(long, value_name = "latest|step-N")]
    pub resume: Option<ResumeFrom>,
    /// Also write the base with the adapters merged in, as a full checkpoint under `<run>/merged`.
    #[arg(long)]
    pub merge: bool,
    /// Serve Prometheus metrics (loss, tokens) on this address while fine-tuning, e.g.
    /// 127.0.0.1:9464 (port 0 picks a free one, named in the log).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let recipe = Recipe::from_file(&args.recipe, &args.overrides)?;
    finetune::plan(&recipe)?; // recipe errors before a run directory is made
    let run_dir = match args.resume {
        Some(_) => train::existing_run_dir(&recipe)?,
        None => train::fresh_run_dir(&recipe)?,
    };
    logging::log_to_file(&run_dir.join("finetune.log"))
        .with_context(|| format!("cannot write {}", run_dir.join("finetune.log").display()))?;
    tracing::info!("run directory {}", run_dir.display());
    let _metrics = super::metrics_endpoint(args.metrics)?;
    let summary = finetune::finetune(&recipe, &run_dir, args.resume, args.merge)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `--lora r=16[,alpha=..,targets=q_proj+v_proj]`: the rank and targets of a memory estimate.
pub fn parse_lora_flag(flag: &str) -> Result<(u64, Vec<String>)> {
    let mut rank = None;
    let mut targets: Vec<String> = DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect();
    for part in flag.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("--lora {flag}: expected r=N[,targets=q_proj+v_proj]"))?;
        match key {
            "r" => {
                let r: i64 = value
                    .parse()
                    .map_err(|_| anyhow!("--lora: r must be a positive integer, got `{value}`"))?;
                if r <= 0 {
                    bail!("--lora: r must be a positive integer, got {r}");
                }
                rank = Some(r as u64);
            }
            "targets" => targets = value.split('+').map(str::to_string).collect(),
            other => bail!("--lora: unknown key `{other}` (use r and targets)"),
        }
    }
    Ok((
        rank.ok_or_else(|| anyhow!("--lora {flag}: give the rank, e.g. --lora r=16"))?,
        targets,
    ))
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// The LoRA part of `atoll model info`: memory of a fine-tune with a bf16 base.
pub fn print_lora_memory(config: &GemmaConfig, flag: &str, seq: u64, batch: u64) -> Result<()> {
    let (rank, targets) = parse_lora_flag(flag)?;
    let names: Vec<String> = config
        .tensor_specs()
        .into_iter()
        .filter_map(|s| s.name.strip_suffix(".weight").map(str::to_string))
        .collect();
    for t in &targets {
        if !names
            .iter()
            .any(|n| n.contains(".layers.") && atoll_trainer::models::lora::target_matches(n, t))
        {
            bail!("--lora: target `{t}` matches no linear layer of this model");
        }
    }
    println!(
        "LoRA r={rank} on {} (bf16 base, f32 adapters + AdamW), micro-batch {batch} × seq {seq}:",
        targets.join(",")
    );
    for checkpointing in [true, false] {
        let m = memory::estimate(config, rank, &targets, seq, batch, 2.0, checkpointing);
        let label = if checkpointing {
            "with per-layer checkpointing"
        } else {
            "without checkpointing"
        };
        println!("  {label}:");
        println!("    base weights (bf16): {}", gib(m.base_weights));
        println!(
            "    adapters: {} parameters; with gradients and AdamW moments (f32): {}",
            m.adapter_parameters,
            gib(m.adapter_state)
        );
        if checkpointing {
            println!("    one hidden state per layer: {}", gib(m.checkpoints));
            println!(
                "    one layer's recomputed activations: {}",
                gib(m.layer_activations)
            );
        } else {
            println!(
                "    activations of all layers: {}",
                gib(m.layer_activations)
            );
        }
        println!(
            "    logits of the fused loss (f32, three blocks of at most 512 rows): {}",
            gib(m.logits)
        );
        println!(
            "    total: {} ({:.1} GB) — {} one 80 GB GPU (plus the CUDA context, ~1 GiB)",
            gib(m.total),
            m.total / 1e9,
            if m.total < 79e9 {
                "fits"
            } else {
                "does not fit"
            }
        );
    }
    Ok(())
}

/// `atoll logits --adapter DIR`: the logits of a base checkpoint with a PEFT adapter on it.
pub fn logits_with_adapter(
    model_dir: &Path,
    adapter: &Path,
    ids: &[i64],
    out: &Path,
    device: Device,
) -> Result<()> {
    let mut model = finetune::load_base(model_dir, device, ParamDtype::F32)?;
    model.check_ids(ids).map_err(|e| anyhow!("--ids: {e}"))?;
    peft::load_adapter(&mut model, adapter)
        .with_context(|| format!("--adapter {}", adapter.display()))?;
    let input = Tensor::from_slice(ids).unsqueeze(0).to_device(device);
    let logits = tch::no_grad(|| model.forward(&input))
        .squeeze_dim(0)
        .to_device(Device::Cpu);
    // The ids travel with the logits, so a checker can recompute them.
    write_tensors(
        out,
        &[("input_ids", &Tensor::from_slice(ids)), ("logits", &logits)],
    )?;
    println!("wrote logits {:?} to {}", logits.size(), out.display());
    Ok(())
}

#[derive(Args)]
pub struct LoraStepArgs {
    #[arg(long, default_value = "gemma3-bench")]
    pub preset: String,
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    #[arg(long, default_value_t = 256)]
    pub seq: i64,
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long)]
    pub threads: Option<i32>,
    /// Per-layer activation checkpointing.
    #[arg(long)]
    pub checkpointing: bool,
}

/// `atoll bench lora-step`: median time of one LoRA training step (forward, backward, AdamW on
/// the adapters) of a randomly initialised preset on random tokens, as one JSON line.
pub fn bench_lora_step(args: LoraStepArgs) -> Result<()> {
    let LoraStepArgs {
        preset: name,
        batch,
        seq,
        rank,
        warmup,
        steps,
        threads,
        checkpointing,
    } = args;
    if rank <= 0 {
        bail!("--rank must be a positive integer, got {rank}");
    }
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    let config = preset(&name)?.config;
    let vocab = config.vocab_size as i64;
    let mut model = GemmaModel::new_seeded(config, Device::Cpu, Kind::Float, 0)?;
    let spec = LoraSpec {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        rslora: false,
        targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
    };
    let set = LoraSet::attach(&mut model, &spec, 0)?;
    set.set_training(true);
    let mut opt = AdamW::new(
        set.parameters(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    let batch_tensors = TokenBatch::from_rows(&Tensor::randint(
        vocab,
        [batch, seq + 1],
        (Kind::Int64, Device::Cpu),
    ));
    let targets = (batch * seq) as f64;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let start = std::time::Instant::now();
        model.packed_loss_backward(&batch_tensors, 1.0 / targets, checkpointing, None);
        opt.clipped_step(1e-4, Some(1.0));
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "atoll", "preset": name, "batch": batch, "seq": seq, "rank": rank,
            "steps": steps, "threads": tch::get_num_threads(), "checkpointing": checkpointing,
            "median_ms": median, "tokens_per_s": (batch * seq) as f64 / (median / 1000.0),
        })
    );
    Ok(())
}
