//! The single-learner training loop behind `atoll train`.
//!
//! Writes into the run directory: `recipe.yaml` (resolved), `tokenizer.json`, `metrics.jsonl` (one
//! object per step; eval steps add `eval_loss`), `summary.json`, and `final/` (a Hugging Face
//! checkpoint) when `run.save_final` is set. Logs go to `train.log` through `tracing` (set up by
//! the caller).

use crate::checkpoint::{load_model, save_model, write_json_atomic, DEFAULT_MAX_SHARD_BYTES};
use crate::data::{self, Batcher, PackedSequences};
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::presets::preset;
use crate::recipe::{DeviceChoice, ParamDtype, Recipe};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub model: String,
    pub architecture: String,
    pub parameters: u64,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
    pub steps: usize,
    pub tokens: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub initial_eval_loss: f64,
    pub final_eval_loss: f64,
    pub wall_clock_s: f64,
    pub tokens_per_s: f64,
    pub final_checkpoint: Option<PathBuf>,
}

pub fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => {
            bail!("train.device: cuda requested but no CUDA device is visible to libtorch")
        }
    }
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Double => "f64",
        _ => "f32",
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Picks `runs/<name>` (or `run.dir`), adding `-2`, `-3`, … instead of touching an existing run.
pub fn fresh_run_dir(recipe: &Recipe) -> Result<PathBuf> {
    let base = recipe
        .run
        .dir
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(recipe.name()));
    let is_free = |p: &Path| {
        !p.exists()
            || p.read_dir()
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
    };
    let mut candidate = base.clone();
    let mut n = 2;
    while !is_free(&candidate) {
        candidate = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    std::fs::create_dir_all(&candidate)
        .with_context(|| format!("cannot create run directory {}", candidate.display()))?;
    Ok(candidate)
}

/// The data side of a run: tokenizer and packed train/eval sequences.
pub struct PreparedData {
    pub tokenizer: tokenizers::Tokenizer,
    pub train: PackedSequences,
    pub eval: PackedSequences,
}

pub fn prepare_data(recipe: &Recipe, bos: i64, eos: i64) -> Result<PreparedData> {
    let text = data::load_corpus(&recipe.data.corpus)?;
    let docs = data::split_documents(&text);
    let (train_docs, eval_docs) = data::train_eval_split(&docs, recipe.data.eval_fraction.0)?;
    let tokenizer = match &recipe.data.tokenizer.path {
        Some(path) => data::load_tokenizer(path)?,
        None => {
            tracing::info!(
                "training a byte-level BPE tokenizer (vocab {}) on {} documents",
                recipe.data.tokenizer.vocab_size.0,
                train_docs.len()
            );
            data::train_tokenizer(&train_docs, recipe.data.tokenizer.vocab_size.0)?
        }
    };
    let seq_len = recipe.data.seq_len.0;
    let train = PackedSequences::new(
        data::pack_documents(&tokenizer, &train_docs, bos, eos)?,
        seq_len,
        "train",
    )?;
    let eval = PackedSequences::new(
        data::pack_documents(&tokenizer, &eval_docs, bos, eos)?,
        seq_len,
        "eval",
    )?;
    tracing::info!(
        "data: {} train tokens ({} sequences of {seq_len}), {} eval tokens",
        train.num_tokens(),
        train.len(),
        eval.num_tokens()
    );
    Ok(PreparedData {
        tokenizer,
        train,
        eval,
    })
}

/// Builds the model a recipe asks for; a preset's vocabulary is sized to the tokenizer.
pub fn build_model(recipe: &Recipe, tokenizer_vocab: usize, device: Device) -> Result<GemmaModel> {
    // Weights of a fresh model depend on the recipe seed only.
    let kind = match recipe.model.dtype {
        ParamDtype::F32 => Kind::Float,
        ParamDtype::Bf16 => Kind::BFloat16,
    };
    if let Some(dir) = &recipe.model.init_from {
        let model = load_model(dir, device, kind)
            .with_context(|| format!("model.init_from: {}", dir.display()))?;
        if tokenizer_vocab > model.config.vocab_size {
            bail!(
                "the tokenizer has {tokenizer_vocab} tokens but the checkpoint's vocabulary has {}",
                model.config.vocab_size
            );
        }
        return Ok(model);
    }
    let name = recipe.model.preset.as_deref().unwrap_or_default();
    let mut config = preset(name)?.config;
    config.vocab_size = tokenizer_vocab;
    GemmaModel::new_seeded(config, device, kind, recipe.seed)
}

/// Forward and backward over the micro-batches (lists of window indices) of one optimizer step:
/// gradients accumulate as the mean over all of them. Returns the step's mean loss.
pub fn backward_micro_batches(
    model: &GemmaModel,
    data: &PackedSequences,
    micro_batches: &[Vec<usize>],
) -> f64 {
    let mut loss_sum = 0.0;
    for windows in micro_batches {
        let (x, y) = data.batch(windows, model.device());
        let loss = model.loss(&x, &y) / micro_batches.len() as f64;
        loss.backward();
        loss_sum += loss.double_value(&[]);
    }
    loss_sum
}

/// Mean loss over the first `batches` eval batches (fixed, so evals are comparable across steps).
pub fn evaluate(
    model: &GemmaModel,
    eval: &PackedSequences,
    batch_size: usize,
    batches: usize,
) -> f64 {
    let _guard = tch::no_grad_guard();
    let windows: Vec<usize> = (0..eval.len()).collect();
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in windows.chunks(batch_size).take(batches) {
        let (x, y) = eval.batch(chunk, model.device());
        total += model.loss(&x, &y).double_value(&[]) * chunk.len() as f64;
        count += chunk.len();
    }
    total / count.max(1) as f64
}

/// How training reports progress: a bar in a terminal, log lines otherwise.
enum Progress {
    Bar(ProgressBar),
    Lines { every: usize },
}

impl Progress {
    fn new(total: usize, log_every: usize) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            crate::logging::set_active_bar(Some(bar.clone()));
            Progress::Bar(bar)
        } else {
            Progress::Lines { every: log_every }
        }
    }

    fn update(&self, m: &StepMetrics, total: usize) {
        let eval = m
            .eval_loss
            .map(|e| format!(" eval {e:.4}"))
            .unwrap_or_default();
        match self {
            Progress::Bar(bar) => {
                bar.set_position(m.step as u64);
                bar.set_message(format!(
                    "loss {:.4}{eval} {:.0} tok/s",
                    m.loss, m.tokens_per_s
                ));
            }
            Progress::Lines { every } => {
                if m.step.is_multiple_of(*every) || m.step == total || m.eval_loss.is_some() {
                    tracing::info!(
                        "step {}/{total} loss {:.4}{eval} lr {:.2e} {:.0} tok/s",
                        m.step,
                        m.loss,
                        m.lr,
                        m.tokens_per_s
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            // The summary line that follows repeats the final figures.
            bar.finish_and_clear();
            crate::logging::set_active_bar(None);
        }
    }
}

/// Runs a recipe to completion in `run_dir` (which must exist and be empty).
pub fn train(recipe: &Recipe, run_dir: &Path) -> Result<Summary> {
    let started = Instant::now();
    if let Some(threads) = recipe.train.threads {
        tch::set_num_threads(threads.0 as i32);
    }
    let device = resolve_device(recipe.train.device)?;
    std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;

    let (bos, eos) = match &recipe.model.init_from {
        Some(dir) => {
            let cfg = crate::config::GemmaConfig::from_file(&dir.join("config.json"))?;
            (cfg.bos_token_id, cfg.eos_token_id)
        }
        None => (data::BOS_ID, data::EOS_ID),
    };
    let prepared = prepare_data(recipe, bos, eos)?;
    prepared
        .tokenizer
        .save(run_dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let model = build_model(recipe, prepared.tokenizer.get_vocab_size(true), device)?;
    let params = model.config.num_parameters();
    tracing::info!(
        "model: {} ({}), {params} parameters, {} on {}",
        recipe
            .model
            .preset
            .clone()
            .unwrap_or_else(|| "checkpoint".into()),
        model.config.architecture.name(),
        dtype_name(model.kind()),
        device_name(device)
    );

    let t = &recipe.train;
    let mut optimizer = AdamW::new(model.trainable_parameters(), t.adamw());
    let mut batcher = Batcher::new(prepared.train.len(), recipe.seed);
    let total_steps = t.max_steps.0;
    let (batch, accum) = (t.batch_size.0, t.grad_accum.0);
    let tokens_per_step = (batch * accum * recipe.data.seq_len.0) as u64;

    let initial_eval = evaluate(&model, &prepared.eval, batch, t.eval_batches.0);
    tracing::info!("initial eval loss {initial_eval:.4}");
    let mut metrics_file = BufWriter::new(
        File::create(run_dir.join("metrics.jsonl")).context("cannot create metrics.jsonl")?,
    );
    let progress = Progress::new(total_steps, t.log_every.0);
    let loop_start = Instant::now();
    let (mut tokens, mut first_loss, mut last) = (0u64, f64::NAN, None::<StepMetrics>);
    let mut final_eval = initial_eval;

    for step in 0..total_steps {
        let lr = t.lr_at(step);
        let micro_batches: Vec<Vec<usize>> =
            (0..accum).map(|_| batcher.next_windows(batch)).collect();
        let loss_sum = backward_micro_batches(&model, &prepared.train, &micro_batches);
        if !loss_sum.is_finite() {
            progress.finish();
            bail!("training diverged at step {}: loss is {loss_sum}; lower train.lr or set train.grad_clip", step + 1);
        }
        let grad_norm = optimizer.clipped_step(lr, t.clip());
        tokens += tokens_per_step;
        if step == 0 {
            first_loss = loss_sum;
        }

        let done = step + 1;
        let eval_loss = ((t.eval_every.0 > 0 && done % t.eval_every.0 == 0) || done == total_steps)
            .then(|| evaluate(&model, &prepared.eval, batch, t.eval_batches.0));
        if let Some(e) = eval_loss {
            final_eval = e;
        }
        let elapsed = loop_start.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: done,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eval_loss,
        };
        serde_json::to_writer(&mut metrics_file, &m)?;
        metrics_file.write_all(b"\n")?;
        metrics_file.flush()?;
        metrics::gauge!("atoll_train_loss").set(m.loss);
        metrics::counter!("atoll_train_tokens_total").increment(tokens_per_step);
        progress.update(&m, total_steps);
        last = Some(m);
    }
    progress.finish();

    let final_checkpoint = if recipe.run.save_final {
        let dir = run_dir.join("final");
        save_model(&model, &dir, model.kind(), DEFAULT_MAX_SHARD_BYTES)?;
        prepared
            .tokenizer
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
        Some(dir)
    } else {
        None
    };
    let last = last.expect("max_steps is positive");
    let summary = Summary {
        name: recipe.name().to_string(),
        model: recipe.model.preset.clone().unwrap_or_else(|| {
            recipe
                .model
                .init_from
                .clone()
                .unwrap_or_default()
                .display()
                .to_string()
        }),
        architecture: model.config.architecture.name().into(),
        parameters: params,
        device: device_name(device),
        dtype: dtype_name(model.kind()).to_string(),
        seed: recipe.seed,
        steps: last.step,
        tokens,
        first_loss,
        final_loss: last.loss,
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        wall_clock_s: started.elapsed().as_secs_f64(),
        tokens_per_s: last.tokens_per_s,
        final_checkpoint,
    };
    write_json_atomic(&run_dir.join("summary.json"), &json!(summary))?;
    tracing::info!(
        "done: {} steps, loss {:.4} -> {:.4}, eval {:.4} -> {:.4}, {:.0} tok/s; run directory {}",
        summary.steps,
        summary.first_loss,
        summary.final_loss,
        summary.initial_eval_loss,
        summary.final_eval_loss,
        summary.tokens_per_s,
        run_dir.display()
    );
    Ok(summary)
}
