//! The single-learner training loop behind `atoll train`.
//!
//! Writes into the run directory: `recipe.yaml` (resolved), `tokenizer.json`, `metrics.jsonl` (one
//! object per step; eval steps add `eval_loss`), `summary.json`, and `final/` (a Hugging Face
//! checkpoint) when `run.save_final` is set. Logs go to `train.log` through `tracing` (set up by
//! the caller). With `checkpoint.every`, checkpoints go to `checkpoint.url` in the background;
//! `resume` continues one bit for bit (see docs/checkpoint.md).

use crate::checkpoint::{
    load_model, load_weights_into, save_model, serialize_host, tensors_from_bytes,
    write_json_atomic, HostModel, HostTensor, DEFAULT_MAX_SHARD_BYTES,
};
use crate::data::{self, Batcher, DataCursor, PackedSequences};
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::presets::preset;
use crate::recipe::{DeviceChoice, ParamDtype, Recipe};
use anyhow::{anyhow, bail, Context, Result};
use atoll_store::{BackgroundWriter, CheckpointStore, ResumeFrom, Snapshot};
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
    /// Step this run resumed from, if any.
    pub resumed_from: Option<usize>,
    /// Checkpoints committed during the run, and those that failed.
    pub checkpoints: usize,
    pub checkpoint_failures: usize,
    /// Time the training loop spent on checkpoints (snapshot to host memory plus any wait for a
    /// previous upload), and as a share of the loop's time.
    pub checkpoint_stall_s: f64,
    pub checkpoint_stall_share: f64,
    /// Mean stall of one checkpoint and mean training step time, for the stall benchmark.
    pub checkpoint_stall_per_checkpoint_s: f64,
    pub step_time_s: f64,
    /// Bytes committed per second of background upload.
    pub checkpoint_upload_mb_per_s: f64,
}

/// Where a single-learner run stands, saved as `trainer_state.json` in each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub optimizer_steps: u64,
    pub data_cursor: DataCursor,
    pub tokens: u64,
    pub first_loss: f64,
    pub initial_eval_loss: f64,
    pub seed: u64,
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Copies everything a resumed run needs into host memory: the model as a Hugging Face
/// checkpoint (weights, `config.json`), the tokenizer, optimizer state and `trainer_state.json`.
pub fn snapshot(
    model: &GemmaModel,
    optimizer: &AdamW,
    tokenizer_json: &str,
    state: &TrainerState,
) -> Result<Snapshot> {
    let mut snap = Snapshot::new(state.step as u64, "trainer");
    // Only the copies happen here; serialisation runs on the checkpoint writer's thread.
    let weights = HostModel::copy_of(model, model.kind(), DEFAULT_MAX_SHARD_BYTES)?;
    for build in weights.into_builders() {
        snap.defer(build);
    }
    add_resume_state(&mut snap, optimizer, tokenizer_json, state)?;
    Ok(snap)
}

/// What every resumable run adds to its checkpoint besides its weights: the optimizer state,
/// the tokenizer and `trainer_state.json` (`atoll train` and `atoll finetune`).
pub(crate) fn add_resume_state(
    snap: &mut Snapshot,
    optimizer: &AdamW,
    tokenizer_json: &str,
    state: &TrainerState,
) -> Result<()> {
    let opt = optimizer
        .state_tensors()
        .iter()
        .map(|(n, t)| HostTensor::copy_of(n, t))
        .collect::<Result<Vec<_>>>()?;
    snap.defer(move || {
        Ok(vec![(
            OPTIMIZER_FILE.to_string(),
            serialize_host(&opt, None)?,
        )])
    });
    snap.add("tokenizer.json", tokenizer_json.as_bytes().to_vec());
    snap.add(TRAINER_STATE_FILE, serde_json::to_vec_pretty(state)?);
    Ok(())
}

/// Restores a checkpoint written by [`snapshot`] into a freshly built model and optimizer.
pub fn restore(
    loaded: &atoll_store::Loaded,
    model: &GemmaModel,
    optimizer: &mut AdamW,
    scratch: &Path,
) -> Result<TrainerState> {
    let step = loaded.manifest.step;
    let state: TrainerState = serde_json::from_slice(loaded.file(TRAINER_STATE_FILE)?)
        .with_context(|| format!("checkpoint step-{step}: {TRAINER_STATE_FILE} is not valid"))?;
    // The weight loader reads directories (sharded or not, with name checks): hand it one.
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    loaded.write_to(scratch)?;
    let weights = load_weights_into(model, scratch)
        .with_context(|| format!("checkpoint step-{step}: weights do not fit this recipe's model"));
    std::fs::remove_dir_all(scratch)?;
    weights?;
    let opt = tensors_from_bytes(loaded.file(OPTIMIZER_FILE)?, OPTIMIZER_FILE)?;
    optimizer
        .load_state(state.optimizer_steps, opt)
        .with_context(|| format!("checkpoint step-{step}: {OPTIMIZER_FILE}"))?;
    Ok(state)
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

pub fn device_name(d: Device) -> String {
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
pub(crate) enum Progress {
    Bar(ProgressBar),
    Lines { every: usize },
}

impl Progress {
    pub(crate) fn new(total: usize, log_every: usize) -> Self {
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

    pub(crate) fn update(&self, m: &StepMetrics, total: usize) {
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

    pub(crate) fn finish(&self) {
        if let Progress::Bar(bar) = self {
            // The summary line that follows repeats the final figures.
            bar.finish_and_clear();
            crate::logging::set_active_bar(None);
        }
    }
}

/// The run directory `atoll train --resume` continues: `run.dir`, or `runs/<name>`.
pub fn existing_run_dir(recipe: &Recipe) -> Result<PathBuf> {
    let dir = recipe
        .run
        .dir
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(recipe.name()));
    if !dir.is_dir() {
        bail!(
            "--resume: run directory {} does not exist (set run.dir to the run to continue)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Keeps the first `step` lines of a run's `metrics.jsonl` (the steps a resumed run does not
/// redo) and opens it for appending.
pub(crate) fn metrics_file_resumed_at(path: &Path, step: usize) -> Result<File> {
    let kept: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(String::from)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot rewrite {}", path.display()))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Runs a recipe to completion in `run_dir` (which must exist and be empty unless resuming).
pub fn train(recipe: &Recipe, run_dir: &Path) -> Result<Summary> {
    train_resumable(recipe, run_dir, None)
}

/// [`train`], optionally continuing from a checkpoint of `checkpoint.url`.
pub fn train_resumable(
    recipe: &Recipe,
    run_dir: &Path,
    resume: Option<ResumeFrom>,
) -> Result<Summary> {
    if recipe.model.drafter.is_some() {
        return crate::drafter::train::train(recipe, run_dir, resume.is_some());
    }
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

    let ckpt = &recipe.checkpoint;
    let store = CheckpointStore::open(&ckpt.location(run_dir), ckpt.store_options())?;
    let tokenizer_json = prepared
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?;
    let resumed = match resume {
        None => None,
        Some(from) => {
            let loaded = atoll_store::block_on(store.load_resume(from))??.ok_or_else(|| {
                anyhow!(
                    "--resume latest: no intact checkpoint in {} (nothing to resume)",
                    store.url()
                )
            })?;
            let state = restore(&loaded, &model, &mut optimizer, &run_dir.join(".resume"))?;
            if state.seed != recipe.seed {
                bail!(
                    "checkpoint step-{} was trained with seed {}, the recipe says {}: resuming would not continue the same run",
                    state.step,
                    state.seed,
                    recipe.seed
                );
            }
            if state.step >= total_steps {
                bail!(
                    "checkpoint step-{} is already at or past train.max_steps = {total_steps}; raise train.max_steps to train further",
                    state.step
                );
            }
            batcher.restore(state.data_cursor);
            tracing::info!("resumed from {}/step-{}", store.url(), state.step);
            Some(state)
        }
    };
    let start_step = resumed.as_ref().map_or(0, |s| s.step);

    let initial_eval = match &resumed {
        Some(s) => s.initial_eval_loss,
        None => evaluate(&model, &prepared.eval, batch, t.eval_batches.0),
    };
    tracing::info!("initial eval loss {initial_eval:.4}");
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics_file = BufWriter::new(match resumed {
        Some(_) => metrics_file_resumed_at(&metrics_path, start_step)?,
        None => File::create(&metrics_path).context("cannot create metrics.jsonl")?,
    });
    let mut writer = (ckpt.every > 0)
        .then(|| {
            BackgroundWriter::start(
                store.clone(),
                ckpt.keep_last.0,
                ckpt.keep_every.map(|k| k.0 as u64),
            )
        })
        .transpose()?;
    let mut stall_s = 0.0f64;
    let progress = Progress::new(total_steps, t.log_every.0);
    let loop_start = Instant::now();
    let (mut tokens, mut first_loss, mut last) = match &resumed {
        Some(s) => (s.tokens, s.first_loss, None::<StepMetrics>),
        None => (0u64, f64::NAN, None::<StepMetrics>),
    };
    let start_tokens = tokens;
    let mut final_eval = initial_eval;

    for step in start_step..total_steps {
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
        let eval_loss = t
            .eval_due(done, total_steps)
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
            tokens_per_s: (tokens - start_tokens) as f64 / elapsed.max(1e-9),
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

        if let Some(writer) = writer.as_mut().filter(|_| done % ckpt.every == 0) {
            let started = Instant::now();
            let state = TrainerState {
                step: done,
                optimizer_steps: optimizer.steps_taken(),
                data_cursor: batcher.cursor(),
                tokens,
                first_loss,
                initial_eval_loss: initial_eval,
                seed: recipe.seed,
            };
            let snap = snapshot(&model, &optimizer, &tokenizer_json, &state)?;
            writer.submit(snap)?;
            let stalled = started.elapsed().as_secs_f64();
            stall_s += stalled;
            metrics::histogram!("atoll_checkpoint_stall_seconds").record(stalled);
        }
    }
    progress.finish();
    let loop_s = loop_start.elapsed().as_secs_f64();
    let outcomes = writer.map(BackgroundWriter::finish).unwrap_or_default();
    let checkpoint_failures = outcomes.iter().filter(|o| o.error.is_some()).count();
    let first_failure = outcomes
        .iter()
        .find_map(|o| o.error.as_ref().map(|e| (o.step, e.clone())));

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
        resumed_from: resumed.map(|s| s.step),
        checkpoints: outcomes.len() - checkpoint_failures,
        checkpoint_failures,
        checkpoint_stall_s: stall_s,
        checkpoint_stall_share: stall_s / loop_s.max(1e-9),
        checkpoint_stall_per_checkpoint_s: stall_s / outcomes.len().max(1) as f64,
        step_time_s: (loop_s - stall_s) / (total_steps - start_step).max(1) as f64,
        checkpoint_upload_mb_per_s: {
            let ok = outcomes.iter().filter(|o| o.error.is_none());
            let (bytes, secs) = ok.fold((0u64, 0f64), |(b, s), o| (b + o.bytes, s + o.upload_s));
            if secs > 0.0 {
                bytes as f64 / 1e6 / secs
            } else {
                0.0
            }
        },
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
    if let Some((step, error)) = first_failure {
        bail!(
            "{checkpoint_failures} of {} checkpoints were not written (the first, step-{step}: {error}); the earlier checkpoints are intact and the final weights are in the run directory",
            outcomes.len()
        );
    }
    Ok(summary)
}
