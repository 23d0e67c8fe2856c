//! A learner on 2 CPU ranks (one thread each, TCP collective), its model sharded or replicated,
//! as the learner process drives it (`InnerLoop`): rank 0 leads, rank 1 follows its commands.
//! Against a one-process `Worker` on the same recipe: the same losses step by step, the same
//! fragment values, and broadcasts applied (overwrite, rebase) to the same weights.

use atoll_collective::{local_group, CollectiveOptions};
use atoll_coordinator::ApplyRule;
use atoll_trainer::recipe::Recipe;
use atoll_trainer::sharded::worker::RankedWorker;
use atoll_trainer::worker::{InnerLoop, Worker};
use std::time::Duration;
use tch::Device;

fn recipe() -> Recipe {
    recipe_with(&[])
}

fn recipe_with(sets: &[String]) -> Recipe {
    let text = "name: sharded-learner
seed: 11
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 20, batch_size: 4, lr: 3.0e-3, warmup_steps: 2, threads: 1, device: cpu}
sync: {learners: 2, fragments: 2}
";
    Recipe::from_yaml(text, "sharded-learner.yaml", sets).unwrap()
}

/// Rank 0 of a two-rank learner on `recipe`, and the thread running `rank1` on rank 1.
fn two_ranks(
    recipe: &Recipe,
    rank1: impl FnOnce(RankedWorker) -> anyhow::Result<()> + Send + 'static,
) -> (RankedWorker, std::thread::JoinHandle<anyhow::Result<()>>) {
    let mut group = local_group(
        &[Device::Cpu, Device::Cpu],
        &CollectiveOptions::with_timeout(Duration::from_secs(120)),
    )
    .unwrap();
    let follower_collective = group.pop().unwrap();
    let leader_collective = group.pop().unwrap();
    let follower_recipe = recipe.clone();
    let follower = std::thread::spawn(move || {
        rank1(RankedWorker::new(&follower_recipe, follower_collective, 1)?)
    });
    (
        RankedWorker::new(recipe, leader_collective, 0).unwrap(),
        follower,
    )
}

/// What starting rank r with `recipes[r]` gives on each of two ranks: empty, or the error.
fn start_errors(recipes: [&Recipe; 2]) -> Vec<String> {
    let group = local_group(
        &[Device::Cpu, Device::Cpu],
        &CollectiveOptions::with_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(recipes)
            .enumerate()
            .map(|(rank, (c, recipe))| {
                s.spawn(move || match RankedWorker::new(recipe, c, rank) {
                    Ok(_) => String::new(),
                    Err(e) => format!("{e:#}"),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_sharded_two_rank_learner_trains_and_applies_fragments_like_one_process() {
    two_ranks_match_one_process(recipe());
}

#[test]
fn a_replicated_two_rank_learner_trains_and_applies_fragments_like_one_process() {
    two_ranks_match_one_process(recipe_with(&["train.parallel=replicated".to_string()]));
}

fn two_ranks_match_one_process(recipe: Recipe) {
    let (mut sharded, follower) = two_ranks(&recipe, |rank1| rank1.follow());
    let mut plain = Worker::new(&recipe).unwrap();

    // The coordinator sees the same model: same plan, same hash.
    assert_eq!(sharded.model_hash().unwrap(), plain.model_hash().unwrap());
    let plan = InnerLoop::plan(&sharded).unwrap();
    assert_eq!(plan.fingerprint(), plain.plan().unwrap().fingerprint());
    assert_eq!(
        InnerLoop::tokens_per_step(&sharded),
        plain.tokens_per_step()
    );

    // Learner 1 of 2 from step 3: both skip the same windows.
    InnerLoop::assign_shard(&mut sharded, 1, 2, 3).unwrap();
    plain.assign_shard(1, 2, 3).unwrap();
    for _ in 0..6 {
        let (a, b) = (
            InnerLoop::train_step(&mut sharded).unwrap(),
            plain.train_step().unwrap(),
        );
        // f32 on both sides; only the order of the sums differs (measured below 1e-6).
        assert!((a - b).abs() < 1e-4, "sharded loss {a} vs one process {b}");
    }
    assert_eq!(InnerLoop::step(&sharded), 9);

    for fragment in &plan.fragments {
        let t = &fragment.tensors;
        let (a, b) = (InnerLoop::values(&mut sharded, t).unwrap(), plain.values(t));
        assert_eq!(a.len(), t.len());
        assert!(max_abs_diff(&a, &b) < 1e-4, "fragment values differ");
    }

    // A broadcast overwrites fragment 0 exactly; a rebase of fragment 1 keeps the local work.
    let f0 = &plan.fragments[0].tensors;
    let global: Vec<Vec<f32>> = plain
        .values(f0)
        .iter()
        .map(|v| v.iter().map(|x| x * 0.5 + 0.01).collect())
        .collect();
    InnerLoop::overwrite(&mut sharded, f0, &global).unwrap();
    plain.overwrite(f0, &global);
    assert_eq!(InnerLoop::values(&mut sharded, f0).unwrap(), global);

    let f1 = &plan.fragments[1].tensors;
    let base: Vec<Vec<f32>> = plain
        .values(f1)
        .iter()
        .map(|v| v.iter().map(|x| x + 0.02).collect())
        .collect();
    let merged: Vec<Vec<f32>> = base
        .iter()
        .map(|v| v.iter().map(|x| x * 0.9).collect())
        .collect();
    InnerLoop::apply(&mut sharded, ApplyRule::Rebase, f1, &merged, Some(&base)).unwrap();
    InnerLoop::apply(&mut plain, ApplyRule::Rebase, f1, &merged, Some(&base)).unwrap();
    assert!(
        max_abs_diff(
            &InnerLoop::values(&mut sharded, f1).unwrap(),
            &plain.values(f1)
        ) < 1e-4
    );

    // Training goes on from the applied weights alike.
    let (a, b) = (
        InnerLoop::train_step(&mut sharded).unwrap(),
        plain.train_step().unwrap(),
    );
    assert!((a - b).abs() < 1e-4, "after applying: {a} vs {b}");

    // Rank 0 going away tells rank 1 to stop: it returns cleanly.
    drop(sharded);
    follower.join().unwrap().unwrap();
}

#[test]
fn ranks_that_do_not_split_the_batch_are_refused() {
    let recipe = Recipe::from_yaml(
        "name: odd
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 2, batch_size: 3, threads: 1, device: cpu}
",
        "odd.yaml",
        &[],
    )
    .unwrap();
    let errors = start_errors([&recipe, &recipe]);
    for e in errors {
        assert!(
            e.contains("3 rows per step do not split over 2 ranks"),
            "{e}"
        );
    }
}

/// Two ranks started with different recipes: both refuse to start, naming the recipe.
#[test]
fn ranks_with_different_recipes_are_refused_at_start() {
    let first = recipe();
    let second = recipe_with(&["train.lr=1.0e-3".to_string()]);
    let errors = start_errors([&first, &second]);
    for e in errors {
        assert!(e.contains("must share the recipe"), "{e}");
        assert!(e.contains("ranks disagree on the recipe"), "{e}");
    }
}

/// A follower that dies: rank 0's next operation fails with an error (no hang), so the learner
/// process exits and leaves the job as a killed learner does.
#[test]
fn a_dead_rank_turns_into_an_error_on_rank_zero() {
    // Rank 1 builds its share, then exits without following.
    let (mut sharded, follower) = two_ranks(&recipe(), |rank1| {
        drop(rank1);
        Ok(())
    });
    follower.join().unwrap().unwrap();
    let e = InnerLoop::train_step(&mut sharded).unwrap_err();
    assert!(
        format!("{e:#}").contains("the sharded learner lost a rank"),
        "{e:#}"
    );
}

/// The coordinator's worker holds the same model (same hash and plan as a learner's) without the
/// optimizer's state, and refuses to train rather than silently skipping the update.
#[test]
fn a_worker_without_optimizer_holds_the_same_model_and_refuses_to_train() {
    let recipe = recipe();
    let mut learner = Worker::new(&recipe).unwrap();
    let mut holder = Worker::without_optimizer(&recipe).unwrap();
    assert_eq!(holder.model_hash().unwrap(), learner.model_hash().unwrap());
    assert_eq!(holder.plan().unwrap(), learner.plan().unwrap());
    assert!(learner.train_step().is_ok());
    let err = holder.train_step().unwrap_err().to_string();
    assert!(err.contains("without an optimizer"), "{err}");
}
