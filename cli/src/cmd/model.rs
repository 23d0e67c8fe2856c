//! `atoll model`: inspect model configurations, list presets, write random checkpoints.

use anyhow::{bail, Result};
use atoll_trainer::checkpoint::{save_model, DEFAULT_MAX_SHARD_BYTES};
use atoll_trainer::presets::{preset, MultimodalExtras, PRESET_NAMES};
use atoll_trainer::{GemmaConfig, GemmaModel};
use clap::{Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Parameter count, shapes and training memory of a preset or checkpoint directory.
    Info {
        /// A preset name (see `atoll model presets`) or a checkpoint directory.
        model: String,
        /// Also estimate LoRA fine-tuning memory: r=N[,targets=q_proj+v_proj].
        #[arg(long, value_name = "r=N")]
        lora: Option<String>,
        /// Also estimate per-rank memory of sharded data parallel (ZeRO-3 style) over R ranks.
        #[arg(long, value_name = "R")]
        ranks: Option<usize>,
        /// Sequence length of the LoRA and sharded estimates.
        #[arg(long, default_value_t = 4096)]
        seq: u64,
        /// Sequences per micro-batch (per rank, with --ranks) of the LoRA and sharded estimates.
        #[arg(long, default_value_t = 1)]
        batch: u64,
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

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
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

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Info {
            model,
            lora,
            ranks,
            seq,
            batch,
        } => {
            if ranks == Some(0) {
                bail!("--ranks: give at least 1 rank");
            }
            let config = model_info(&model)?;
            if let Some(ranks) = ranks {
                print_sharded_memory(&config, ranks, seq, batch)?;
            }
            match lora {
                Some(flag) => super::finetune::print_lora_memory(&config, &flag, seq, batch),
                None => Ok(()),
            }
        }
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
    }
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// Per-rank memory of a sharded data-parallel step (atoll_trainer::sharded::memory).
pub fn print_sharded_memory(
    config: &GemmaConfig,
    ranks: usize,
    seq: u64,
    batch: u64,
) -> Result<()> {
    let m = atoll_trainer::sharded::memory::estimate(config, ranks, seq, batch, 2.0)?;
    println!(
        "sharded data parallel over {ranks} ranks (bf16 compute, f32 master shards + AdamW, \
         per-layer checkpointing), {batch} × seq {seq} per rank; per rank:"
    );
    println!(
        "  weights: {} (f32 master shard of {} parameters {} + one gathered unit in bf16 {})",
        gib(m.weights()),
        m.shard_parameters,
        gib(m.master_shards),
        gib(m.gathered_unit)
    );
    println!(
        "  gradients: {} (f32 shard {} + one unit's full gradient before its reduce-scatter {} \
         + the head's gradient the fused loss holds until then {})",
        gib(m.gradients()),
        gib(m.gradient_shards),
        gib(m.unit_gradient),
        gib(m.head_gradient)
    );
    println!(
        "  optimizer (f32 AdamW moments of the shard): {}",
        gib(m.optimizer)
    );
    println!(
        "  activations: {} (one hidden state per layer {} + one layer's graph {} + the fused loss's logits blocks {})",
        gib(m.activations()),
        gib(m.checkpoints),
        gib(m.layer_activations),
        gib(m.logits)
    );
    println!("  total: {}", gib(m.total));
    Ok(())
}

fn model_info(model: &str) -> Result<GemmaConfig> {
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
    // A trainable tensor travels as data-plane parts of at most `sync.link.part_values` values.
    let largest = config
        .tensor_specs()
        .into_iter()
        .filter(|t| t.trainable)
        .map(|t| (t.shape.iter().product::<i64>() as u64, t.name))
        .max();
    if let Some((values, name)) = largest {
        let part_values = atoll_coordinator::plan::DEFAULT_PART_VALUES;
        let parts = atoll_coordinator::plan::parts_of(values, part_values);
        let f32_size = |values: u64| match 4.0 * values as f64 {
            b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
            b => format!("{:.1} MB", b / 1e6),
        };
        println!(
            "data plane: the largest tensor ({name}, {} as f32) travels as {parts} part{} of up to {} as f32 (sync.link.part_values)",
            f32_size(values),
            if parts == 1 { "" } else { "s" },
            f32_size(values.min(part_values)),
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
    Ok(config)
}
