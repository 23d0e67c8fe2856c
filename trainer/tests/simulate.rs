//! `atoll simulate` end to end on a tiny setup: every mode runs, and one seed gives one result.

use atoll_trainer::recipe::Recipe;
use atoll_trainer::simulate::simulate;

fn recipe(dir: &std::path::Path, sets: &[&str]) -> Recipe {
    let text = format!(
        "seed: 3\n\
         model: {{preset: gemma3-tiny}}\n\
         data: {{tokenizer: {{vocab_size: 400}}, seq_len: 32}}\n\
         train: {{max_steps: 16, batch_size: 2, lr: 3.0e-3, warmup_steps: 2, eval_batches: 2, device: cpu}}\n\
         run: {{dir: {}, save_final: false}}\n\
         sync: {{learners: 2, fragments: 3, h: 4, tau: 1, codec: e3m0, link: {{bandwidth_gbps: 0.02, latency_ms: 30}}}}\n",
        dir.display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Recipe::from_yaml(&text, "sim recipe", &sets).unwrap()
}

fn run(sets: &[&str]) -> (atoll_trainer::simulate::SimSummary, String) {
    let dir = tempfile::tempdir().unwrap();
    let summary = simulate(&recipe(dir.path(), sets), dir.path()).unwrap();
    (
        summary,
        std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
    )
}

#[test]
fn one_seed_gives_a_bit_identical_summary() {
    let (a, text_a) = run(&[
        "sync.speeds=[1.0, 0.5]",
        "sync.failures.mtbf_s=6",
        "sync.failures.recovery_s=2",
    ]);
    let (_, text_b) = run(&[
        "sync.speeds=[1.0, 0.5]",
        "sync.failures.mtbf_s=6",
        "sync.failures.recovery_s=2",
    ]);
    assert_eq!(text_a, text_b);
    assert!(a.failures > 0, "the failure model fired: {a:?}");
    for key in [
        "mode",
        "learners",
        "final_eval_loss",
        "tokens",
        "bytes_up",
        "bytes_down",
        "sim_wall_clock_s",
        "goodput",
        "compute_utilization",
        "rejected_contributions",
    ] {
        assert!(
            text_a.contains(&format!("\"{key}\"")),
            "summary lacks {key}"
        );
    }
}

#[test]
fn every_mode_trains_and_decoupled_sends_far_fewer_bytes_than_ddp() {
    let (ddp, _) = run(&["sync.mode=ddp"]);
    let (decoupled, _) = run(&["sync.mode=decoupled"]);
    let (diloco, _) = run(&["sync.mode=diloco", "sync.codec=f32"]);
    let (streaming, _) = run(&["sync.mode=streaming"]);
    for s in [&ddp, &decoupled, &diloco, &streaming] {
        assert!(
            s.final_eval_loss < s.initial_eval_loss - 0.3,
            "{} did not learn: {s:?}",
            s.mode
        );
        assert!(s.merges > 0);
    }
    assert!(
        decoupled.bytes_per_learner * 20.0 < ddp.bytes_per_learner,
        "{} vs {}",
        decoupled.bytes_per_learner,
        ddp.bytes_per_learner
    );
    // On a 20 Mbps link DP spends most of its time communicating; Decoupled keeps computing.
    assert!(
        ddp.compute_utilization < 0.5 && decoupled.compute_utilization > 0.9,
        "{ddp:?} {decoupled:?}"
    );
}

/// zstd is lossless: the same trajectory, bit for bit, and fewer bytes counted both ways, the
/// broadcasts as `atoll run` frames them (one compressed frame per tensor of the update).
#[test]
fn zstd_changes_the_bytes_both_ways_and_nothing_else() {
    let wire = [
        "sync.codec=int2",
        "sync.error_feedback=true",
        "sync.down_error_feedback=true",
    ];
    let (plain, _) = run(&wire);
    let (zstd, _) = run(&[&wire[..], &["sync.zstd_level=3"]].concat());
    assert_eq!(plain.final_eval_loss, zstd.final_eval_loss);
    assert_eq!(plain.merged_tokens, zstd.merged_tokens);
    assert!(zstd.bytes_up < plain.bytes_up, "{zstd:?} vs {plain:?}");
    assert!(zstd.bytes_down < plain.bytes_down, "{zstd:?} vs {plain:?}");
}

/// The sanity check of the DiLoCo family: one learner that syncs every fragment every step with
/// plain averaging (outer lr 1, no momentum) and an exact wire is plain training. With `rebase`
/// the steps taken while a fragment is in flight survive the broadcast, so the global model
/// tracks a single learner trained alone; `overwrite` (the paper's rule) throws those steps away,
/// which at H = 1 is most of them.
#[test]
fn one_learner_syncing_every_step_tracks_plain_training_under_rebase() {
    let sanity = [
        "sync.learners=1",
        "sync.h=1",
        "sync.outer_lr=1.0",
        "sync.outer_momentum=0.0",
        "sync.merge=mean",
        "sync.codec=f32",
    ];
    let with = |extra: &str| {
        let mut sets = sanity.to_vec();
        sets.push(extra);
        run(&sets).0.final_eval_loss
    };
    let (plain, _) = run(&["sync.mode=ddp", "sync.learners=1"]);
    let rebase = with("sync.apply=rebase");
    let overwrite = with("sync.apply=overwrite");
    let plain = plain.final_eval_loss;
    assert!(
        (rebase - plain).abs() < 2e-3 * plain,
        "rebase {rebase} vs plain training {plain}"
    );
    assert!(
        overwrite - plain > 10.0 * (rebase - plain).abs(),
        "overwrite {overwrite} should lag plain training {plain} (rebase {rebase})"
    );
}

/// Under `apply: rebase` no inner step is lost or counted twice: each one reaches the global
/// model in exactly one contribution per fragment, including the steps taken while a fragment
/// was in flight (their progress carries over the apply) and the last ones (the final flush
/// measures them from the newest applied version, not a stale one). A slow learner makes some
/// rounds close without it.
#[test]
fn rebase_merges_every_step_exactly_once() {
    let (s, _) = run(&[
        "sync.apply=rebase",
        "sync.merge=mean",
        "sync.speeds=[1.0, 0.5]",
    ]);
    assert_eq!(s.merged_tokens, s.tokens, "{s:?}");
    assert!(s.final_eval_loss < s.initial_eval_loss - 0.3, "{s:?}");
}

/// The eval curve (`train.eval_every`) evaluates the model a job would ship: DP's model, or the
/// syncer's global Θ; its last point is the final evaluation and the summary names its minimum.
#[test]
fn eval_curve_ends_at_the_final_eval_and_names_its_best_point() {
    for mode in ["sync.mode=ddp", "sync.mode=decoupled"] {
        let dir = tempfile::tempdir().unwrap();
        let summary = simulate(
            &recipe(dir.path(), &[mode, "train.eval_every=4"]),
            dir.path(),
        )
        .unwrap();
        let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let curve: Vec<(u64, f64)> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| Some((v["step"].as_u64()?, v.get("eval_loss")?.as_f64()?)))
            .collect();
        let steps: Vec<u64> = curve.iter().map(|c| c.0).collect();
        assert_eq!(steps, [4, 8, 12, 16], "{mode}: {curve:?}");
        assert_eq!(curve[3].1, summary.final_eval_loss, "{mode}");
        // Θ moves only as fragments merge (every h = 4 steps, staggered), so look at step 12.
        assert!(
            curve[2].1 < summary.initial_eval_loss - 0.3,
            "{mode}: the model at step 12 has learned: {curve:?}"
        );
        let (best_step, best) =
            curve.iter().fold(
                (0, f64::INFINITY),
                |b, &(s, l)| if l < b.1 { (s, l) } else { b },
            );
        assert_eq!(
            (summary.best_eval_step as u64, summary.best_eval_loss),
            (best_step, best),
            "{mode}"
        );
    }
}

/// On links too slow for a broadcast to arrive before the fragment's next pull (2 Mbit/s here),
/// a learner sends several contributions from one anchor, each holding the steps of the one
/// before: the merge counts those steps once (before, this run reported 4138 tokens merged of
/// 2048 trained). Fragments whose last round the job's end cut short keep their last steps out.
#[test]
fn steps_reported_again_from_a_stale_anchor_are_merged_once() {
    let (s, _) = run(&[
        "sync.apply=rebase",
        "sync.merge=mean",
        "sync.link.bandwidth_gbps=0.002",
    ]);
    assert!(s.merged_tokens <= s.tokens, "{s:?}");
    assert!(s.merged_tokens as f64 >= 0.85 * s.tokens as f64, "{s:?}");
}

/// The run directory holds the merge log in `atoll run`'s format. Under `final_step: average`
/// the job ends with one average round per fragment, every learner in it (also for fragments
/// whose work was all merged already); under `outer` no round is an average.
#[test]
fn the_merge_log_ends_with_an_average_of_every_fragment() {
    for (final_step, averaged) in [("average", 3), ("outer", 0)] {
        let dir = tempfile::tempdir().unwrap();
        let sets = [format!("sync.final_step={final_step}")];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let summary = simulate(&recipe(dir.path(), &sets), dir.path()).unwrap();
        let log = std::fs::read_to_string(dir.path().join("merges.jsonl")).unwrap();
        let records: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len() as u64, summary.merges, "{log}");
        let averages: Vec<&serde_json::Value> =
            records.iter().filter(|r| r["average"] == true).collect();
        assert_eq!(averages.len(), averaged, "{final_step}: {log}");
        let mut fragments: Vec<u64> = averages
            .iter()
            .map(|r| r["fragment"].as_u64().unwrap())
            .collect();
        fragments.sort();
        fragments.dedup();
        assert_eq!(fragments.len(), averaged, "{log}");
        for r in &averages {
            assert_eq!(r["contributors"].as_array().unwrap().len(), 2, "{r}");
        }
        // They are the job's last rounds.
        assert!(records[records.len() - averaged..]
            .iter()
            .all(|r| r["average"] == true));
    }
}
