//! A Decoupled DiLoCo job whose learners are each sharded over two ranks: `atoll run` on a
//! recipe with `deploy.regions.<r>.ranks: 2` starts two learner processes, each of which starts
//! its second rank; the coordinator sees two learners. Every process is real and on loopback.

use atoll_system_tests::{
    atoll, coordinator_args, free_port, learner_args, stderr, wait_until, Processes,
};
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "test-secret-0123456789abcdef";

#[test]
fn two_learners_of_two_ranks_each_train_a_decoupled_job_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("sharded.yaml"),
        "name: sharded-job
seed: 3
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 32, batch_size: 4, lr: 3.0e-3, warmup_steps: 4, eval_batches: 2, threads: 1, device: cpu}
run: {save_final: false, dir: job}
sync: {learners: 2, regions: [east, west], fragments: 2, h: 8, apply: rebase}
deploy:
  regions:
    east: {ranks: 2}
    west: {ranks: 2}
",
    )
    .unwrap();
    let o = atoll(&["run", "sharded.yaml"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("job/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["learners"], 2, "{summary}");
    for region in ["east", "west"] {
        assert_eq!(summary["learner_steps"][region], 32, "{summary}");
        let dir = d.join(format!("job/learner-{region}"));
        let leader = std::fs::read_to_string(dir.join("learner.log")).unwrap();
        assert!(leader.contains("sharded over 2 ranks"), "{leader}");
        let follower = std::fs::read_to_string(dir.join("rank-1.log")).unwrap();
        assert!(
            follower.contains(&format!("rank 1 of 2: following rank 0 of region {region}")),
            "{follower}"
        );
    }
    let (merged, trained) = (
        summary["tokens_merged"].as_f64().unwrap(),
        summary["tokens"].as_f64().unwrap(),
    );
    assert!(merged >= 0.8 * trained, "{summary}");
    // Under `rebase` a learner is pulled only once it holds the newest version.
    assert_eq!(summary["stale_contributions"], 0, "{summary}");
    // ln(512) = 6.24 is the untrained model's loss; 32 steps of two sharded learners go below.
    let eval = summary["final_eval_loss"].as_f64().unwrap();
    assert!(
        eval < 5.9,
        "final eval loss {eval}: {summary}\n{}",
        job_record(&d.join("job"))
    );
}

/// What a failed assertion on a finished job shows: its merge log and every process's log.
fn job_record(job: &std::path::Path) -> String {
    let mut record = String::new();
    for file in [
        "coordinator/merges.jsonl",
        "coordinator.log",
        "learner-east.log",
        "learner-west.log",
        "learner-east/learner.log",
        "learner-east/rank-1.log",
        "learner-west/learner.log",
        "learner-west/rank-1.log",
        "learner-east/summary.json",
        "learner-west/summary.json",
    ] {
        let text = std::fs::read_to_string(job.join(file)).unwrap_or_else(|e| e.to_string());
        record.push_str(&format!("--- {file}\n{text}\n"));
    }
    record
}

/// One rank of a two-rank learner is SIGKILLed mid-job: the learner (rank 0) exits with an error
/// instead of hanging, the coordinator marks it absent, and the learner started again with both
/// ranks rejoins and trains on.
#[test]
fn a_learner_whose_rank_dies_leaves_the_job_and_rejoins_with_all_its_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = d.join("job.yaml");
    std::fs::write(
        &recipe,
        "name: rank-dies
seed: 5
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 100000, batch_size: 4, lr: 3.0e-3, eval_batches: 2, threads: 1, device: cpu}
run: {save_final: false}
sync: {learners: 1, regions: [east], fragments: 2, h: 8, heartbeat_timeout_s: 2}
deploy: {regions: {east: {ranks: 2}}}
",
    )
    .unwrap();
    let recipe = recipe.display().to_string();
    let port = free_port();
    let mut procs = Processes::default();
    let coord_log = d.join("coordinator.log");
    procs.start(
        "coordinator",
        &coordinator_args(&recipe, port, d),
        SECRET,
        &coord_log,
    );
    let endpoint = d.join("coordinator/coordinator.json");
    wait_until("the coordinator to serve", Duration::from_secs(120), || {
        endpoint.exists()
    });
    let learner = learner_args(&recipe, port, d, "east");
    let log = d.join("east.log");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    procs.start("east", &learner, SECRET, &log);
    wait_until(
        "the sharded learner to train",
        Duration::from_secs(120),
        || read(&log).contains("step 20/"),
    );
    let text = read(&log);
    let pid = text
        .split("started rank 1 of 2 (pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no rank 1 pid in\n{text}"))
        .to_string();
    let killed = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(killed.success());
    let status = procs.wait("east", Duration::from_secs(60));
    assert!(!status.success(), "the learner must fail when a rank dies");
    let text = read(&log);
    assert!(
        text.contains("the sharded learner lost a rank") && text.contains("rank 1"),
        "{text}"
    );
    wait_until("east marked absent", Duration::from_secs(60), || {
        read(&coord_log).contains("missed its heartbeat")
    });

    // Started again, it brings up both ranks and rejoins.
    let before = read(&log)
        .matches("caught up with the global model")
        .count();
    procs.start("east", &learner, SECRET, &log);
    wait_until(
        "east to rejoin with two ranks",
        Duration::from_secs(120),
        || {
            let text = read(&log);
            text.matches("caught up with the global model").count() > before
                && text
                    .matches("rank 0 of 2: the model is sharded over 2 ranks")
                    .count()
                    == 2
        },
    );
    let steps_before = read(&log).matches(" loss ").count();
    wait_until(
        "east to train after rejoining",
        Duration::from_secs(60),
        || read(&log).matches(" loss ").count() >= steps_before + 2,
    );
}
