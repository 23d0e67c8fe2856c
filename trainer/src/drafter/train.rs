//! `atoll train` with `model.drafter`: trains only the drafter's parameters against the frozen
//! base of `model.init_from`.
//!
//! The loss is the multi-token one transformers' draft loop implies. For every anchor c of a
//! packed sequence (the base has seen x_0..x_{c-1}; x_c is the newest token), the drafter runs k
//! chained steps at position id c over the base's K/V of positions < c: step 0 reads
//! concat(E(x_c), h_{c-1}), step s reads concat(E(x_{c+s}), projected state of step s-1)
//! (teacher forcing on the text's tokens, gradients through the chain). Step s is trained towards
//! the base's own next-token distribution at position c+s, softmax(z_{c+s}), by cross-entropy
//! (distillation: greedy verification accepts a draft when it equals the base's argmax there).
//! The loss is the mean over steps and anchors. The base's hidden states, K/V and embeddings are
//! computed once per batch under no_grad; the base's logits and the drafter's are never whole
//! tensors: `head_loss::lm_head_distillation` makes them a block of rows at a time, each block
//! of the base's once for all k steps.

use super::{drafter_recipe, export::write_drafter_dir, initial_drafter, run_drafter_dir};
use crate::checkpoint::{load_model, write_json_atomic};
use crate::data::{Batcher, PackedSequences};
use crate::models::gemma4_assistant::Gemma4Assistant;
use crate::models::head_loss::lm_head_distillation;
use crate::models::GemmaModel;
use crate::optim::AdamW;
use crate::recipe::{ParamDtype, Recipe};
use crate::train::{dtype_name, prepare_data, resolve_device, Progress, StepMetrics, Summary};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

/// The mean k-step distillation loss of `drafter` on token sequences `tokens` [B, T] (T > k).
pub fn drafter_loss(
    base: &GemmaModel,
    drafter: &Gemma4Assistant,
    tokens: &Tensor,
    k: usize,
) -> Result<Tensor> {
    let t = tokens.size()[1];
    let k = k as i64;
    if t <= k {
        bail!("sequences of {t} tokens are too short to train a {k}-token drafter (data.seq_len must exceed model.drafter.num_assistant_tokens)");
    }
    let anchors = t - k; // c = 1..=T-k
    let (hidden, kv, embeds) = tch::no_grad(|| -> Result<_> {
        let (hidden, kv) = base.hidden_states_and_shared_kv(tokens)?;
        let embeds = base.input_embeddings(tokens);
        Ok((hidden, kv, embeds))
    })?;
    // The drafter computes in f32 whatever dtype the frozen base is held in.
    let (kv, embeds) = (kv.to_kind(Kind::Float), embeds.to_kind(Kind::Float));
    let positions = Tensor::arange_start(1, anchors + 1, (Kind::Int64, tokens.device()));
    // The chain first (its steps feed on projected states, not on logits), then every step's
    // loss at once, so that each block of the base's logits is made once for all k steps.
    let mut state = hidden.narrow(1, 0, anchors).to_kind(Kind::Float);
    let mut students = Vec::with_capacity(k as usize);
    for s in 0..k {
        let inputs = Tensor::cat(&[embeds.narrow(1, 1 + s, anchors), state], -1);
        let step = drafter.step_states(&inputs, &positions, &kv);
        students.push(step.hidden);
        state = step.projected;
    }
    // Step s of anchor c is trained towards the base's distribution at position c + s.
    let offsets: Vec<i64> = (1..=k).collect();
    lm_head_distillation(
        &students,
        &offsets,
        drafter.lm_head(),
        &hidden,
        base.lm_head(),
    )
}

/// The sequences of some windows with their final target token: [B, seq_len + 1].
fn sequences(data: &PackedSequences, windows: &[usize], device: tch::Device) -> Tensor {
    let (x, y) = data.batch(windows, device);
    let t = y.size()[1];
    Tensor::cat(&[x, y.narrow(1, t - 1, 1)], 1)
}

fn evaluate(
    base: &GemmaModel,
    drafter: &Gemma4Assistant,
    eval: &PackedSequences,
    batch_size: usize,
    batches: usize,
    k: usize,
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let windows: Vec<usize> = (0..eval.len()).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in windows.chunks(batch_size).take(batches) {
        let loss = drafter_loss(base, drafter, &sequences(eval, chunk, base.device()), k)?;
        total += loss.double_value(&[]) * chunk.len() as f64;
        count += chunk.len();
    }
    Ok(total / count.max(1) as f64)
}

/// The tokenizer a drafter run uses: `data.tokenizer.path`, else the base checkpoint's own
/// `tokenizer.json` (the drafter must see the base's token ids).
pub fn with_base_tokenizer(recipe: &Recipe, base_dir: &Path) -> Result<Recipe> {
    let mut recipe = recipe.clone();
    if recipe.data.tokenizer.path.is_none() {
        let path = base_dir.join("tokenizer.json");
        if !path.exists() {
            bail!(
                "model.drafter: set data.tokenizer.path to the base model's tokenizer.json ({} has none)",
                base_dir.display()
            );
        }
        recipe.data.tokenizer.path = Some(path);
    }
    Ok(recipe)
}

/// Runs a drafter recipe in `run_dir`; the drafter lands in `<run_dir>/final/drafter/`.
pub fn train(recipe: &Recipe, run_dir: &Path, resuming: bool) -> Result<Summary> {
    let started = Instant::now();
    let (section, base_dir) = drafter_recipe(recipe)?;
    if resuming {
        bail!("--resume: drafter training does not write resumable checkpoints; start a new run");
    }
    if recipe.checkpoint.every > 0 {
        bail!("checkpoint.every: drafter training writes only the final drafter; set checkpoint.every to 0");
    }
    if let Some(threads) = recipe.train.threads {
        tch::set_num_threads(threads.0 as i32);
    }
    let device = resolve_device(recipe.train.device)?;
    std::fs::write(run_dir.join("recipe.yaml"), recipe.to_yaml()?)?;
    // The base is frozen, so it may be held in bf16 (half its memory, and a GPU runs its forward
    // at bf16 speed); the drafter always trains in f32.
    let base_kind = match recipe.model.dtype {
        ParamDtype::F32 => Kind::Float,
        ParamDtype::Bf16 => Kind::BFloat16,
    };
    let base = load_model(base_dir, device, base_kind)
        .with_context(|| format!("model.init_from: {}", base_dir.display()))?;
    let data_recipe = with_base_tokenizer(recipe, base_dir)?;
    let prepared = prepare_data(
        &data_recipe,
        base.config.bos_token_id,
        base.config.eos_token_id,
    )?;
    prepared
        .tokenizer
        .save(run_dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    if prepared.tokenizer.get_vocab_size(true) > base.config.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the base model's vocabulary has {}",
            prepared.tokenizer.get_vocab_size(true),
            base.config.vocab_size
        );
    }
    let drafter = initial_drafter(recipe, section, &base, device)?;
    let k = section.num_assistant_tokens.0;
    let params = drafter.config.num_parameters();
    tracing::info!(
        "drafter: {params} parameters, {} layers, hidden {}, k = {k}, against the frozen base {} ({} parameters, held in {}) on {}",
        drafter.config.text.num_hidden_layers,
        drafter.config.text.hidden_size,
        base_dir.display(),
        base.config.num_parameters(),
        dtype_name(base_kind),
        crate::train::device_name(device)
    );

    let t = &recipe.train;
    let mut optimizer = AdamW::new(drafter.trainable_parameters(), t.adamw());
    let mut batcher = Batcher::new(prepared.train.len(), recipe.seed);
    let total_steps = t.max_steps.0;
    let (batch, accum) = (t.batch_size.0, t.grad_accum.0);
    let tokens_per_step = (batch * accum * (recipe.data.seq_len.0 + 1)) as u64;
    let initial_eval = evaluate(&base, &drafter, &prepared.eval, batch, t.eval_batches.0, k)?;
    tracing::info!("initial drafter eval loss {initial_eval:.4}");
    let mut metrics_file = BufWriter::new(
        File::create(run_dir.join("metrics.jsonl")).context("cannot create metrics.jsonl")?,
    );
    let progress = Progress::new(total_steps, t.log_every.0);
    let loop_start = Instant::now();
    let (mut tokens, mut first_loss, mut final_eval) = (0u64, f64::NAN, initial_eval);
    let mut last = None;
    for step in 0..total_steps {
        let lr = t.lr_at(step);
        let mut loss_sum = 0.0;
        for _ in 0..accum {
            let windows = batcher.next_windows(batch);
            let seqs = sequences(&prepared.train, &windows, device);
            let loss = drafter_loss(&base, &drafter, &seqs, k)? / accum as f64;
            loss.backward();
            loss_sum += loss.double_value(&[]);
        }
        if !loss_sum.is_finite() {
            progress.finish();
            bail!(
                "drafter training diverged at step {}: loss is {loss_sum}; lower train.lr",
                step + 1
            );
        }
        let grad_norm = optimizer.clipped_step(lr, t.clip());
        tokens += tokens_per_step;
        if step == 0 {
            first_loss = loss_sum;
        }
        let done = step + 1;
        let eval_loss = t
            .eval_due(done, total_steps)
            .then(|| evaluate(&base, &drafter, &prepared.eval, batch, t.eval_batches.0, k))
            .transpose()?;
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
        metrics::gauge!("atoll_drafter_train_loss").set(m.loss);
        progress.update(&m, total_steps);
        last = Some(m);
    }
    progress.finish();
    let loop_s = loop_start.elapsed().as_secs_f64();

    let final_dir: Option<PathBuf> = if recipe.run.save_final {
        let dir = run_drafter_dir(run_dir);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_drafter_dir(&drafter, &dir, Kind::Float, k, None)?;
        Some(dir)
    } else {
        None
    };
    let last = last.expect("max_steps is positive");
    let summary = Summary {
        name: recipe.name().to_string(),
        model: format!("drafter for {}", base_dir.display()),
        architecture: crate::models::gemma4_assistant::MODEL_TYPE.into(),
        parameters: params,
        device: crate::train::device_name(device),
        dtype: dtype_name(Kind::Float).to_string(),
        seed: recipe.seed,
        steps: last.step,
        tokens,
        first_loss,
        final_loss: last.loss,
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        wall_clock_s: started.elapsed().as_secs_f64(),
        tokens_per_s: last.tokens_per_s,
        final_checkpoint: final_dir,
        resumed_from: None,
        checkpoints: 0,
        checkpoint_failures: 0,
        checkpoint_stall_s: 0.0,
        checkpoint_stall_share: 0.0,
        checkpoint_stall_per_checkpoint_s: 0.0,
        step_time_s: loop_s / total_steps as f64,
        checkpoint_upload_mb_per_s: 0.0,
    };
    write_json_atomic(&run_dir.join("summary.json"), &json!(summary))?;
    tracing::info!(
        "done: {} steps, drafter loss {:.4} -> {:.4}, eval {:.4} -> {:.4}; drafter in {}",
        summary.steps,
        summary.first_loss,
        summary.final_loss,
        summary.initial_eval_loss,
        summary.final_eval_loss,
        run_drafter_dir(run_dir).display()
    );
    Ok(summary)
}
