//! `atoll finetune`: LoRA fine-tuning of a Hugging Face Gemma checkpoint on JSONL instruction
//! data, writing a PEFT adapter (and optionally the merged model).
//!
//! The run directory holds what `atoll train` writes (`recipe.yaml`, `metrics.jsonl`,
//! `summary.json`, `finetune.log`), plus `adapter/` (adapter_config.json,
//! adapter_model.safetensors, tokenizer.json) and, with `--merge`, `merged/` (a full checkpoint).
//! Checkpoints (adapter, optimizer state, trainer state) go to `checkpoint.url` in the background
//! and `--resume` continues one exactly.

pub mod data;
pub mod memory;
pub mod peft;

use crate::checkpoint::{
    load_weights_into, save_model, tensors_from_bytes, write_json_atomic, DEFAULT_MAX_SHARD_BYTES,
};
use crate::config::GemmaConfig;
use crate::data::Batcher;
use crate::models::lora::{LoraSet, LoraSpec};
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::finetune::{FinetuneSection, LoraSection};
use crate::recipe::{ParamDtype, Recipe};
use crate::train::{
    device_name, dtype_name, metrics_file_resumed_at, resolve_device, Progress, StepMetrics,
    TrainerState, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use anyhow::{anyhow, bail, Context, Result};
use atoll_store::{BackgroundWriter, CheckpointStore, ResumeFrom, Snapshot};
use data::{PackedRows, Record};
use serde::Serialize;
use serde_json::json;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    pub name: String,
    pub base: PathBuf,
    pub architecture: String,
    pub base_parameters: u64,
    pub adapter_parameters: u64,
    pub adapted_modules: usize,
    pub device: String,
    /// Data-parallel ranks (one per device of `train.devices`).
    pub ranks: usize,
    pub dtype: String,
    pub seed: u64,
    pub checkpointing: bool,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub truncated_examples: usize,
    pub steps: usize,
    pub tokens: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub initial_eval_loss: f64,
    pub final_eval_loss: f64,
    pub wall_clock_s: f64,
    pub tokens_per_s: f64,
    pub adapter: PathBuf,
    pub merged: Option<PathBuf>,
    pub resumed_from: Option<usize>,
    pub checkpoints: usize,
    pub checkpoint_failures: usize,
}

/// The recipe's fine-tuning sections, checked: the base checkpoint, the data, the adapters.
pub struct FinetunePlan<'a> {
    pub base: &'a Path,
    pub section: &'a FinetuneSection,
    pub lora: LoraSection,
}

pub fn plan(recipe: &Recipe) -> Result<FinetunePlan<'_>> {
    let base = recipe.model.init_from.as_deref().ok_or_else(|| {
        anyhow!("model.init_from: atoll finetune needs the base checkpoint directory to adapt")
    })?;
    let section = recipe.finetune.as_ref().ok_or_else(|| {
        anyhow!("finetune: the recipe needs a finetune section with finetune.data (a JSONL file)")
    })?;
    let lora = recipe.lora.clone().unwrap_or_default();
    lora.validate()?;
    Ok(FinetunePlan {
        base,
        section,
        lora,
    })
}

/// The base model in the recipe's dtype, allocated in that dtype and filled from the
/// checkpoint's memory-mapped files tensor by tensor (no f32 copy of a bf16 base).
pub fn load_base(dir: &Path, device: Device, dtype: ParamDtype) -> Result<GemmaModel> {
    let kind = match dtype {
        ParamDtype::F32 => Kind::Float,
        ParamDtype::Bf16 => Kind::BFloat16,
    };
    if !dir.is_dir() {
        bail!("model.init_from: {} is not a directory", dir.display());
    }
    let config = GemmaConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("model.init_from: {}", dir.display()))?;
    let model = GemmaModel::new_for_loading(config, device, kind)?;
    load_weights_into(&model, dir)
        .with_context(|| format!("model.init_from: {}", dir.display()))?;
    Ok(model)
}

/// The tokenizer: `data.tokenizer.path`, else the checkpoint's own `tokenizer.json`.
pub fn load_checkpoint_tokenizer(recipe: &Recipe, base: &Path) -> Result<Tokenizer> {
    let path = recipe
        .data
        .tokenizer
        .path
        .clone()
        .unwrap_or_else(|| base.join("tokenizer.json"));
    if !path.exists() {
        bail!(
            "{}: no tokenizer.json (copy the checkpoint's tokenizer there or set data.tokenizer.path)",
            path.display()
        );
    }
    crate::data::load_tokenizer(&path)
}

/// Packed train and held-out rows.
pub struct FinetuneData {
    pub train: PackedRows,
    pub eval: PackedRows,
    pub train_examples: usize,
    pub eval_examples: usize,
}

pub fn prepare(
    recipe: &Recipe,
    section: &FinetuneSection,
    tokenizer: &Tokenizer,
    config: &GemmaConfig,
) -> Result<FinetuneData> {
    data::check_tokenizer(
        tokenizer,
        config.vocab_size,
        config.bos_token_id,
        config.eos_token_id,
    )?;
    let records = data::read_jsonl(&section.data)?;
    let chats = records
        .iter()
        .filter(|r| matches!(r, Record::Chat(_)))
        .count();
    let examples = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            data::encode_record(tokenizer, r, config.bos_token_id, config.eos_token_id)
                .map_err(|e| anyhow!("{}: example {}: {e}", section.data.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let (train, eval) = data::split_examples(examples, section.eval_fraction.0, recipe.seed)?;
    let (train_examples, eval_examples) = (train.len(), eval.len());
    let seq_len = recipe.data.seq_len.0;
    let pad = config.pad_token_id;
    let train = PackedRows::pack(&train, seq_len, pad)?;
    let eval = PackedRows::pack(&eval, seq_len, pad)?;
    let truncated = train.truncated + eval.truncated;
    if truncated > 0 {
        tracing::warn!(
            "{truncated} examples are longer than data.seq_len = {seq_len} tokens and were truncated"
        );
    }
    tracing::info!(
        "data: {} examples ({chats} chat), {train_examples} train in {} rows of {seq_len}, {eval_examples} held out in {} rows",
        records.len(),
        train.len(),
        eval.len()
    );
    Ok(FinetuneData {
        train,
        eval,
        train_examples,
        eval_examples,
    })
}

/// Mean loss per labelled token over the first `batches` held-out batches.
pub fn evaluate(
    model: &GemmaModel,
    set: &LoraSet,
    eval: &PackedRows,
    batch_size: usize,
    batches: usize,
) -> f64 {
    set.set_training(false);
    let rows: Vec<usize> = (0..eval.len()).collect();
    let (mut total, mut count) = (0.0, 0i64);
    for chunk in rows.chunks(batch_size).take(batches) {
        let batch = eval.batch(chunk, model.device());
        total += model.packed_loss_sum(&batch);
        count += eval.target_count(chunk);
    }
    total / count.max(1) as f64
}

/// Forward and backward of one rank's micro-batches, each a list of rows. The loss is a sum
/// over labelled tokens divided by `step_targets`, the labelled tokens of the whole optimizer
/// step (all micro-batches of all ranks), so gradients summed over ranks equal those of one
/// rank running the whole batch. Returns this rank's summed (unscaled) loss.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_gradients(
    model: &GemmaModel,
    set: &LoraSet,
    rows: &PackedRows,
    micro_batches: &[Vec<usize>],
    step_targets: i64,
    recompute: bool,
    dropout_seed: Option<u64>,
) -> f64 {
    set.set_training(true);
    let scale = 1.0 / step_targets.max(1) as f64;
    let mut loss_sum = 0.0;
    for (m, micro) in micro_batches.iter().enumerate() {
        let batch = rows.batch(micro, model.device());
        let seed = dropout_seed.map(|s| s ^ (m as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        loss_sum += model.packed_loss_backward(&batch, scale, recompute, seed);
    }
    loss_sum
}

/// Copies adapter values saved by [`peft::adapter_files`] into `set` (names and shapes must match).
pub fn restore_adapter_values(set: &LoraSet, bytes: &[u8], origin: &str) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut vars = set.vs.variables();
    let saved = tensors_from_bytes(bytes, origin)?;
    if saved.len() != vars.len() {
        bail!(
            "{origin}: {} adapter tensors, this recipe's adapters have {}",
            saved.len(),
            vars.len()
        );
    }
    for (key, t) in saved {
        let name = key.strip_prefix("base_model.model.").unwrap_or(&key);
        let var = vars
            .get_mut(name)
            .ok_or_else(|| anyhow!("{origin}: `{key}` is not an adapter of this recipe"))?;
        if var.size() != t.size() {
            bail!(
                "{origin}: `{key}` has shape {:?}, this recipe's adapter {:?}",
                t.size(),
                var.size()
            );
        }
        var.copy_(&t.to_kind(var.kind()).to_device(var.device()));
    }
    Ok(())
}

fn snapshot(
    set: &LoraSet,
    base: &str,
    optimizer: &AdamW,
    tokenizer_json: &str,
    state: &TrainerState,
) -> Result<Snapshot> {
    let mut snap = Snapshot::new(state.step as u64, "finetune");
    for (name, bytes) in peft::adapter_files(set, base)? {
        snap.add(&name, bytes);
    }
    crate::train::add_resume_state(&mut snap, optimizer, tokenizer_json, state)?;
    Ok(snap)
}

/// The adapters of a run: loaded from `finetune.adapter`, or fresh from the `lora:` section.
pub fn build_adapters(model: &mut GemmaModel, plan: &FinetunePlan, seed: u64) -> Result<LoraSet> {
    match &plan.section.adapter {
        Some(dir) => peft::load_adapter(model, dir)
            .with_context(|| format!("finetune.adapter: {}", dir.display())),
        None => LoraSet::attach(model, &LoraSpec::from_section(&plan.lora), seed)
            .map_err(|e| anyhow!("lora: {e}")),
    }
}

/// Sums tensors over the data-parallel ranks in place (one rank: nothing to do).
pub type SumOverRanks<'a> = &'a mut dyn FnMut(&mut [tch::Tensor]) -> Result<()>;

/// One data-parallel rank: its index, the rank count and its device.
#[derive(Debug, Clone, Copy)]
pub struct RankPlace {
    pub rank: usize,
    pub world: usize,
    pub device: Device,
}

/// What every rank of a run shares: the recipe, the prepared data and what it resumes from.
pub struct RunShared<'a> {
    pub recipe: &'a Recipe,
    pub plan: FinetunePlan<'a>,
    pub run_dir: &'a Path,
    pub data: FinetuneData,
    pub tokenizer_json: String,
    pub resume: Option<atoll_store::Loaded>,
    pub merge: bool,
    pub started: Instant,
}

/// The devices of the run's ranks: `train.devices` (CUDA indices, or ranks on the CPU), else the
/// one `train.device`.
pub fn rank_devices(recipe: &Recipe) -> Result<Vec<Device>> {
    let device = resolve_device(recipe.train.device)?;
    match &recipe.train.devices {
        None => Ok(vec![device]),
        Some(list) if list.is_empty() => bail!("train.devices: list at least one device"),
        Some(list) => {
            let mut seen = std::collections::BTreeSet::new();
            for &d in list {
                if !seen.insert(d) {
                    bail!("train.devices: device {d} is listed twice");
                }
            }
            match device {
                Device::Cpu => Ok(vec![Device::Cpu; list.len()]),
                Device::Cuda(_) => {
                    let visible = tch::Cuda::device_count() as usize;
                    list.iter()
                        .map(|&d| {
                            if d >= visible {
                                bail!("train.devices: CUDA device {d} does not exist ({visible} visible)");
                            }
                            Ok(Device::Cuda(d))
                        })
                        .collect()
                }
                other => bail!("train.devices: unsupported device {other:?}"),
            }
        }
    }
}

/// Runs a fine-tuning recipe in `run_dir`, optionally resuming and writing the merged model.
pub fn finetune(
    recipe: &Recipe,
    run_dir: &Path,
    resume: Option<ResumeFrom>,
    merge: bool,
) -> Result<FinetuneSummary> {
    let started = Instant::now();
    let plan = plan(recipe)?;
    if let Some(threads) = recipe.train.threads {
        tch::set_num_threads(threads.0 as i32);
    }
    let devices = rank_devices(recipe)?;
    std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;

    let config = GemmaConfig::from_file(&plan.base.join("config.json"))
        .with_context(|| format!("model.init_from: {}", plan.base.display()))?;
    let tokenizer = load_checkpoint_tokenizer(recipe, plan.base)?;
    let data = prepare(recipe, plan.section, &tokenizer, &config)?;
    let tokenizer_json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?;
    let ckpt = &recipe.checkpoint;
    let loaded = match resume {
        None => None,
        Some(from) => {
            let store = CheckpointStore::open(&ckpt.location(run_dir), ckpt.store_options())?;
            Some(
                atoll_store::block_on(store.load_resume(from))??.ok_or_else(|| {
                    anyhow!(
                        "--resume: no intact checkpoint in {} (nothing to resume)",
                        store.url()
                    )
                })?,
            )
        }
    };
    let shared = RunShared {
        recipe,
        plan,
        run_dir,
        data,
        tokenizer_json,
        resume: loaded,
        merge,
        started,
    };
    let world = devices.len();
    if world == 1 {
        let place = RankPlace {
            rank: 0,
            world,
            device: devices[0],
        };
        let summary = run_rank(&shared, place, &mut |_| Ok(()))?;
        return summary.ok_or_else(|| anyhow!("rank 0 returned no summary"));
    }
    run_data_parallel(&shared, &devices)
}

/// One rank's training loop. Every rank draws the same global batch (the seeded batcher) and
/// trains on its share of each micro-batch; `sum_over_ranks` adds the adapters' gradients and the
/// loss over the ranks, so every rank takes the same AdamW step. Rank 0 evaluates, logs,
/// checkpoints and writes the adapter, and returns the summary.
pub fn run_rank(
    shared: &RunShared,
    place: RankPlace,
    sum_over_ranks: SumOverRanks,
) -> Result<Option<FinetuneSummary>> {
    let RunShared {
        recipe,
        plan,
        run_dir,
        data,
        tokenizer_json,
        ..
    } = shared;
    let main = place.rank == 0;
    let device = place.device;
    let mut model = load_base(plan.base, device, recipe.model.dtype)?;
    let set = build_adapters(&mut model, plan, recipe.seed)?;
    let base_label = plan.base.display().to_string();
    if main {
        tracing::info!(
            "base {} ({}, {} parameters, {} on {}{}); LoRA r={} alpha={} on {} modules: {} trainable parameters{}",
            base_label,
            model.config.architecture.name(),
            model.config.num_parameters(),
            dtype_name(model.kind()),
            device_name(device),
            if place.world > 1 { format!(", {} data-parallel ranks", place.world) } else { String::new() },
            set.spec.rank,
            set.spec.alpha,
            set.modules.len(),
            set.num_parameters(),
            if plan.section.checkpointing { ", activation checkpointing" } else { "" }
        );
    }

    let t = &recipe.train;
    let mut optimizer = AdamW::new(set.parameters(), t.adamw());
    let mut batcher = Batcher::new(data.train.len(), recipe.seed);
    let total_steps = t.max_steps.0;
    let (batch, accum) = (t.batch_size.0, t.grad_accum.0);
    let tokens_per_step = (batch * accum * place.world * data.train.seq_len()) as u64;
    let recompute = plan.section.checkpointing;

    let ckpt = &recipe.checkpoint;
    let resumed = match &shared.resume {
        None => None,
        Some(loaded) => {
            let step = loaded.manifest.step;
            let state: TrainerState = serde_json::from_slice(loaded.file(TRAINER_STATE_FILE)?)
                .with_context(|| {
                    format!("checkpoint step-{step}: {TRAINER_STATE_FILE} is not valid")
                })?;
            restore_adapter_values(
                &set,
                loaded.file(peft::ADAPTER_WEIGHTS)?,
                &format!("checkpoint step-{step}/{}", peft::ADAPTER_WEIGHTS),
            )?;
            let opt = tensors_from_bytes(loaded.file(OPTIMIZER_FILE)?, OPTIMIZER_FILE)?;
            optimizer
                .load_state(state.optimizer_steps, opt)
                .with_context(|| format!("checkpoint step-{step}: {OPTIMIZER_FILE}"))?;
            if state.seed != recipe.seed {
                bail!(
                    "checkpoint step-{step} was trained with seed {}, the recipe says {}: resuming would not continue the same run",
                    state.seed,
                    recipe.seed
                );
            }
            if state.step >= total_steps {
                bail!(
                    "checkpoint step-{step} is already at or past train.max_steps = {total_steps}; raise train.max_steps to train further"
                );
            }
            batcher.restore(state.data_cursor);
            if main {
                tracing::info!("resumed from step-{step}");
            }
            Some(state)
        }
    };
    let start_step = resumed.as_ref().map_or(0, |s| s.step);
    let eval_now = || evaluate(&model, &set, &data.eval, batch, t.eval_batches.0);
    let initial_eval = match &resumed {
        Some(s) => s.initial_eval_loss,
        None if main => eval_now(),
        None => f64::NAN,
    };
    let mut io = if main {
        tracing::info!("initial held-out loss {initial_eval:.4}");
        let metrics_path = run_dir.join("metrics.jsonl");
        let metrics_file = BufWriter::new(match resumed {
            Some(_) => metrics_file_resumed_at(&metrics_path, start_step)?,
            None => File::create(&metrics_path).context("cannot create metrics.jsonl")?,
        });
        let store = CheckpointStore::open(&ckpt.location(run_dir), ckpt.store_options())?;
        let writer = (ckpt.every > 0)
            .then(|| {
                BackgroundWriter::start(
                    store,
                    ckpt.keep_last.0,
                    ckpt.keep_every.map(|k| k.0 as u64),
                )
            })
            .transpose()?;
        Some((
            metrics_file,
            writer,
            Progress::new(total_steps, t.log_every.0),
        ))
    } else {
        None
    };
    let loop_start = Instant::now();
    let (mut tokens, mut first_loss) = match &resumed {
        Some(s) => (s.tokens, s.first_loss),
        None => (0u64, f64::NAN),
    };
    let start_tokens = tokens;
    let mut final_eval = initial_eval;
    let mut last: Option<StepMetrics> = None;

    for step in start_step..total_steps {
        let lr = t.lr_at(step);
        // The global micro-batches (the same on every rank), and this rank's share of each.
        let global: Vec<Vec<usize>> = (0..accum)
            .map(|_| batcher.next_windows(batch * place.world))
            .collect();
        let step_targets: i64 = global.iter().map(|m| data.train.target_count(m)).sum();
        let mine: Vec<Vec<usize>> = global
            .iter()
            .map(|m| m[place.rank * batch..(place.rank + 1) * batch].to_vec())
            .collect();
        let dropout_seed = (set.spec.dropout > 0.0).then(|| {
            recipe.seed
                ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (place.rank as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        });
        let rank_loss = accumulate_gradients(
            &model,
            &set,
            &data.train,
            &mine,
            step_targets,
            recompute,
            dropout_seed,
        );
        let mut summed: Vec<tch::Tensor> = set.parameters().iter().map(|p| p.grad()).collect();
        summed.push(tch::Tensor::from_slice(&[rank_loss]).to_device(device));
        sum_over_ranks(&mut summed)?;
        let loss_sum = summed
            .pop()
            .expect("the loss was pushed")
            .double_value(&[0]);
        let loss = loss_sum / step_targets.max(1) as f64;
        if !loss.is_finite() {
            if let Some((_, _, progress)) = &io {
                progress.finish();
            }
            bail!(
                "fine-tuning diverged at step {}: loss is {loss}; lower train.lr",
                step + 1
            );
        }
        let grad_norm = optimizer.clipped_step(lr, t.clip());
        tokens += tokens_per_step;
        if step == 0 {
            first_loss = loss;
        }
        let done = step + 1;
        let Some((metrics_file, writer, progress)) = io.as_mut() else {
            continue;
        };
        let eval_loss = t.eval_due(done, total_steps).then(eval_now);
        if let Some(e) = eval_loss {
            final_eval = e;
        }
        let elapsed = loop_start.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: done,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: (tokens - start_tokens) as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eval_loss,
        };
        serde_json::to_writer(&mut *metrics_file, &m)?;
        metrics_file.write_all(b"\n")?;
        metrics_file.flush()?;
        metrics::gauge!("atoll_finetune_loss").set(m.loss);
        metrics::counter!("atoll_finetune_tokens_total").increment(tokens_per_step);
        progress.update(&m, total_steps);
        last = Some(m);
        if let Some(writer) = writer.as_mut().filter(|_| done % ckpt.every == 0) {
            let state = TrainerState {
                step: done,
                optimizer_steps: optimizer.steps_taken(),
                data_cursor: batcher.cursor(),
                tokens,
                first_loss,
                initial_eval_loss: initial_eval,
                seed: recipe.seed,
            };
            writer.submit(snapshot(
                &set,
                &base_label,
                &optimizer,
                tokenizer_json,
                &state,
            )?)?;
        }
    }
    let Some((_, writer, progress)) = io else {
        return Ok(None);
    };
    progress.finish();
    let outcomes = writer.map(BackgroundWriter::finish).unwrap_or_default();
    let checkpoint_failures = outcomes.iter().filter(|o| o.error.is_some()).count();

    let adapter_dir = run_dir.join("adapter");
    peft::save_adapter(&set, &adapter_dir, &base_label)?;
    std::fs::write(adapter_dir.join("tokenizer.json"), tokenizer_json).with_context(|| {
        format!(
            "cannot write {}",
            adapter_dir.join("tokenizer.json").display()
        )
    })?;
    let merged = if shared.merge {
        let dir = run_dir.join("merged");
        set.merge(&mut model)?;
        save_model(&model, &dir, model.kind(), DEFAULT_MAX_SHARD_BYTES)?;
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json)
            .with_context(|| format!("cannot write {}", dir.join("tokenizer.json").display()))?;
        set.unmerge(&mut model)?;
        Some(dir)
    } else {
        None
    };
    let last = last.ok_or_else(|| anyhow!("no step was run"))?;
    let summary = FinetuneSummary {
        name: recipe.name().to_string(),
        base: plan.base.to_path_buf(),
        architecture: model.config.architecture.name().into(),
        base_parameters: model.config.num_parameters(),
        adapter_parameters: set.num_parameters(),
        adapted_modules: set.modules.len(),
        device: device_name(device),
        ranks: place.world,
        dtype: dtype_name(model.kind()).to_string(),
        seed: recipe.seed,
        checkpointing: recompute,
        train_examples: data.train_examples,
        eval_examples: data.eval_examples,
        truncated_examples: data.train.truncated + data.eval.truncated,
        steps: last.step,
        tokens,
        first_loss,
        final_loss: last.loss,
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        wall_clock_s: shared.started.elapsed().as_secs_f64(),
        tokens_per_s: last.tokens_per_s,
        adapter: adapter_dir,
        merged,
        resumed_from: resumed.map(|s| s.step),
        checkpoints: outcomes.len() - checkpoint_failures,
        checkpoint_failures,
    };
    write_json_atomic(&run_dir.join("summary.json"), &json!(summary))?;
    tracing::info!(
        "done: {} steps, loss {:.4} -> {:.4}, held-out {:.4} -> {:.4}, {:.0} tok/s; adapter in {}",
        summary.steps,
        summary.first_loss,
        summary.final_loss,
        summary.initial_eval_loss,
        summary.final_eval_loss,
        summary.tokens_per_s,
        summary.adapter.display()
    );
    if let Some(o) = outcomes.iter().find(|o| o.error.is_some()) {
        bail!(
            "{checkpoint_failures} of {} checkpoints were not written (the first, step-{}: {}); the adapter is in the run directory",
            outcomes.len(),
            o.step,
            o.error.clone().unwrap_or_default()
        );
    }
    Ok(Some(summary))
}

/// Several ranks in this process, one thread each, connected by `atoll-collective` (TCP over
/// loopback on the CPU, NCCL on CUDA devices). Returns rank 0's summary, or the first error (a
/// rank that fails makes the others' next all-reduce fail instead of hanging).
fn run_data_parallel(shared: &RunShared, devices: &[Device]) -> Result<FinetuneSummary> {
    use atoll_collective::{
        all_reduce_tensors, local_group, CollectiveOptions, ReduceOp, DEFAULT_BUCKET_BYTES,
    };
    let group = local_group(devices, &CollectiveOptions::default())
        .map_err(|e| anyhow!("train.devices: {e}"))?;
    let world = devices.len();
    let results: Vec<Result<Option<FinetuneSummary>>> = std::thread::scope(|scope| {
        let ranks: Vec<_> = group
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (mut collective, &device))| {
                scope.spawn(move || {
                    let place = RankPlace {
                        rank,
                        world,
                        device,
                    };
                    run_rank(shared, place, &mut |tensors| {
                        all_reduce_tensors(
                            collective.as_mut(),
                            tensors,
                            ReduceOp::Sum,
                            DEFAULT_BUCKET_BYTES,
                        )
                        .map_err(|e| anyhow!("rank {rank}: gradient all-reduce failed: {e}"))
                    })
                })
            })
            .collect();
        ranks
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(anyhow!("a data-parallel rank panicked")))
            })
            .collect()
    });
    let mut summary = None;
    let mut first_error = None;
    for result in results {
        match result {
            Ok(Some(s)) => summary = Some(s),
            Ok(None) => {}
            Err(e) if first_error.is_none() => first_error = Some(e),
            Err(_) => {}
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    summary.ok_or_else(|| anyhow!("rank 0 returned no summary"))
}
