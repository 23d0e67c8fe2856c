//! A Decoupled DiLoCo job whose learners are each sharded over two ranks: `atoll run` on a
//! recipe with `deploy.regions.<r>.ranks: 2` starts two learner processes, each of which starts
//! its second rank; the coordinator sees two learners. Every process is real and on loopback.

use atoll_system_tests::{atoll, stderr};

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
    // ln(512) = 6.24 is the untrained model's loss; 32 steps of two sharded learners go below.
    let eval = summary["final_eval_loss"].as_f64().unwrap();
    assert!(eval < 5.9, "final eval loss {eval}: {summary}");
}
