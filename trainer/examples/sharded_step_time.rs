//! Step time of sharded data parallel against one process at the same rows per rank, on CPU
//! ranks (threads over the TCP collective), one libtorch thread per rank:
//!
//! `scripts/with-libtorch.sh cargo run --release -p atoll-trainer --example sharded_step_time --
//!  [PRESET] [RANKS] [ROWS_PER_RANK] [SEQ] [STEPS]` (defaults gemma3-tiny 2 4 128 10).
//!
//! Prints the mean step time (after 2 warm-up steps) of: the plain single-process step
//! (whole model, one backward, AdamW), the sharded step on 1 rank, and on RANKS ranks with
//! RANKS × ROWS_PER_RANK rows per global batch.

use anyhow::{Context, Result};
use atoll_collective::{local_group, CollectiveOptions};
use atoll_trainer::models::recompute::TokenBatch;
use atoll_trainer::optim::{AdamW, AdamWConfig};
use atoll_trainer::presets::preset;
use atoll_trainer::sharded::ShardedModel;
use atoll_trainer::{GemmaConfig, GemmaModel};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const WARMUP: usize = 2;

fn adamw() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

fn batch(cfg: &GemmaConfig, rows: i64, seq: i64, step: usize) -> TokenBatch {
    let ids: Vec<i64> = (0..rows * (seq + 1))
        .map(|i| (i * 7919 + step as i64 * 104_729) % cfg.vocab_size as i64)
        .collect();
    TokenBatch::from_rows(&Tensor::from_slice(&ids).view([rows, seq + 1]))
}

fn mean_after_warmup(times: &[f64]) -> f64 {
    let timed = &times[WARMUP..];
    timed.iter().sum::<f64>() / timed.len() as f64
}

fn plain(cfg: &GemmaConfig, rows: i64, seq: i64, steps: usize) -> Result<f64> {
    let model = GemmaModel::new_seeded(cfg.clone(), Device::Cpu, Kind::Float, 0)?;
    let mut optimizer = AdamW::new(model.trainable_parameters(), adamw());
    let mut times = Vec::new();
    for step in 0..steps {
        let b = batch(cfg, rows, seq, step);
        let start = Instant::now();
        model.loss(&b.ids, &b.labels).backward();
        optimizer.clipped_step(1e-3, Some(1.0));
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(mean_after_warmup(&times))
}

fn sharded(cfg: &GemmaConfig, ranks: usize, rows: i64, seq: i64, steps: usize) -> Result<f64> {
    let group = local_group(&vec![Device::Cpu; ranks], &CollectiveOptions::default())?;
    let results: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut collective| {
                scope.spawn(move || -> Result<f64> {
                    let model = GemmaModel::new_seeded(cfg.clone(), Device::Cpu, Kind::Float, 0)?;
                    let mut model =
                        ShardedModel::new(model, collective.as_mut(), Kind::Float, adamw())?;
                    let mut times = Vec::new();
                    for step in 0..steps {
                        let b = batch(cfg, rows * ranks as i64, seq, step);
                        let start = Instant::now();
                        model.train_step(collective.as_mut(), &b, 1e-3, Some(1.0))?;
                        times.push(start.elapsed().as_secs_f64());
                    }
                    Ok(mean_after_warmup(&times))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
            })
            .collect()
    });
    let times = results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(times.into_iter().fold(0.0, f64::max))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let name = arg(0, "gemma3-tiny");
    let ranks: usize = arg(1, "2").parse().context("RANKS")?;
    let rows: i64 = arg(2, "4").parse().context("ROWS_PER_RANK")?;
    let seq: i64 = arg(3, "128").parse().context("SEQ")?;
    let steps: usize = arg(4, "10").parse().context("STEPS")?;
    anyhow::ensure!(
        steps > WARMUP,
        "STEPS must exceed the {WARMUP} warm-up steps"
    );
    tch::set_num_threads(1);
    let cfg = preset(&name)?.config;
    let one = plain(&cfg, rows, seq, steps)?;
    println!("{name}, {rows} rows × {seq} tokens per rank, 1 libtorch thread per rank");
    println!("plain step (one process, whole model): {:.1} ms", one * 1e3);
    let s1 = sharded(&cfg, 1, rows, seq, steps)?;
    println!(
        "sharded step, 1 rank: {:.1} ms ({:.2}x plain)",
        s1 * 1e3,
        s1 / one
    );
    let sr = sharded(&cfg, ranks, rows, seq, steps)?;
    println!(
        "sharded step, {ranks} ranks ({} rows global): {:.1} ms ({:.2}x plain)",
        rows * ranks as i64,
        sr * 1e3,
        sr / one
    );
    Ok(())
}
