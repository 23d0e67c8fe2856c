//! `atoll logits`: the logits of a checkpoint for given token ids (a numerics probe).

use anyhow::{anyhow, bail, Result};
use atoll_trainer::checkpoint::{load_model, write_tensors};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct LogitsArgs {
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
    /// A PEFT LoRA adapter directory to apply to the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceArg::Cuda => bail!("--device cuda: no CUDA device is visible to libtorch"),
    }
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let LogitsArgs {
        model,
        ids,
        out,
        device: dev,
        adapter,
    } = args;
    match adapter {
        Some(adapter) => super::finetune::logits_with_adapter(
            &model,
            &adapter,
            &parse_ids(&ids)?,
            &out,
            device(dev)?,
        ),
        None => logits(&model, &ids, &out, device(dev)?),
    }
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
