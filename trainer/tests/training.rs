//! The single-learner loop on real text: the loss falls, and one seed gives one loss curve.

use atoll_trainer::recipe::Recipe;
use atoll_trainer::train::train;

fn recipe(seed: u64, dir: &std::path::Path) -> Recipe {
    let text = format!(
        "seed: {seed}\n\
         model: {{preset: gemma3-tiny}}\n\
         data: {{tokenizer: {{vocab_size: 512}}, seq_len: 64}}\n\
         train: {{max_steps: 30, batch_size: 8, lr: 3.0e-3, warmup_steps: 5, eval_every: 15, eval_batches: 4, device: cpu}}\n\
         run: {{dir: {}, save_final: false}}\n",
        dir.display()
    );
    Recipe::from_yaml(&text, "test recipe", &[]).unwrap()
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn thirty_steps_reduce_the_loss_and_one_seed_gives_one_curve() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    for d in [&a, &b, &c] {
        std::fs::create_dir_all(d).unwrap();
    }
    let summary = train(&recipe(7, &a), &a).unwrap();
    let curve = losses(&a);
    assert_eq!(curve.len(), 30);
    let head: f64 = curve[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = curve[25..].iter().sum::<f64>() / 5.0;
    assert!(
        tail < head - 0.8,
        "loss did not fall enough: first five {head:.3}, last five {tail:.3}"
    );
    assert!(
        summary.final_eval_loss < summary.initial_eval_loss - 0.8,
        "{summary:?}"
    );

    train(&recipe(7, &b), &b).unwrap();
    assert_eq!(
        curve,
        losses(&b),
        "same seed must give bit-identical losses"
    );

    train(&recipe(8, &c), &c).unwrap();
    assert_ne!(
        curve,
        losses(&c),
        "a different seed should change the curve"
    );

    for file in [
        "recipe.yaml",
        "tokenizer.json",
        "summary.json",
        "metrics.jsonl",
    ] {
        assert!(a.join(file).exists(), "{file} missing");
    }
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(a.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .nth(14)
            .unwrap(),
    )
    .unwrap();
    for key in ["step", "loss", "lr", "tokens", "tokens_per_s", "eval_loss"] {
        assert!(
            first.get(key).is_some(),
            "metrics line lacks {key}: {first}"
        );
    }
}

#[test]
fn bf16_parameters_train_with_f32_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "model: {{preset: gemma4-tiny, dtype: bf16}}\n\
         data: {{tokenizer: {{vocab_size: 300}}, seq_len: 32}}\n\
         train: {{max_steps: 4, batch_size: 2, warmup_steps: 1, eval_batches: 1, device: cpu}}\n\
         run: {{dir: {}, save_final: true}}\n",
        dir.path().display()
    );
    let recipe = Recipe::from_yaml(&text, "bf16 recipe", &[]).unwrap();
    let summary = train(&recipe, dir.path()).unwrap();
    assert_eq!(summary.dtype, "bf16");
    assert!(losses(dir.path()).iter().all(|l| l.is_finite()));
    let config = std::fs::read_to_string(dir.path().join("final/config.json")).unwrap();
    assert!(config.contains("\"dtype\": \"bfloat16\""), "{config}");
}
