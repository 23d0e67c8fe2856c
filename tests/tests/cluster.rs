//! A real job on loopback: a coordinator and three learners as separate processes, a learner
//! SIGKILLed and restarted, the coordinator SIGKILLed and restarted, and the job still finishing
//! consistently, with zstd on the wire (each broadcast is framed once for all learners). Every
//! wait is bounded; every process is killed by id at the end.

use atoll_system_tests::{
    coordinator_args, count_lines, free_port, learner_args, wait_until, Processes,
};
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "test-secret-0123456789abcdef";
const MAX_STEPS: u64 = 1500;

fn write_recipe(dir: &Path, learners: usize) -> String {
    let path = dir.join("job.yaml");
    std::fs::write(
        &path,
        format!(
            "name: cluster-test
seed: 7
model: {{preset: gemma3-tiny}}
data: {{corpus: builtin:tinyshakespeare, tokenizer: {{vocab_size: 512}}, seq_len: 32}}
train: {{max_steps: {MAX_STEPS}, batch_size: 4, lr: 3.0e-3, warmup_steps: 10, eval_batches: 2, threads: 1, device: cpu}}
run: {{save_final: false}}
sync: {{learners: {learners}, fragments: 2, h: 8, tau: 2, quorum: 1, outer_lr: 1.0, outer_momentum: 0.5, codec: e3m0, down_error_feedback: true, zstd_level: 3, heartbeat_timeout_s: 2}}
"
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[test]
fn learners_and_coordinator_survive_sigkill_and_the_job_finishes_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = write_recipe(d, 3);
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
    let regions = ["east", "west", "south"];
    for r in regions {
        procs.start(
            r,
            &learner_args(&recipe, port, d, r),
            SECRET,
            &d.join(format!("{r}.log")),
        );
    }
    let merges = d.join("coordinator/merges.jsonl");
    wait_until("a few merges", Duration::from_secs(180), || {
        count_lines(&merges) >= 4
    });

    // A learner dies: it is marked absent after the heartbeat timeout, the others keep merging.
    procs.kill("west");
    wait_until("west marked absent", Duration::from_secs(60), || {
        std::fs::read_to_string(&coord_log)
            .unwrap_or_default()
            .contains("missed its heartbeat")
    });
    let before = count_lines(&merges);
    wait_until("merges without west", Duration::from_secs(60), || {
        count_lines(&merges) >= before + 2
    });
    // It comes back, rejoins and continues from its last reported step.
    procs.start(
        "west",
        &learner_args(&recipe, port, d, "west"),
        SECRET,
        &d.join("west.log"),
    );
    wait_until("west to rejoin", Duration::from_secs(120), || {
        std::fs::read_to_string(d.join("west.log"))
            .unwrap_or_default()
            .contains("caught up with the global model")
    });
    let before = count_lines(&merges);
    wait_until("merges after the rejoin", Duration::from_secs(60), || {
        count_lines(&merges) >= before + 2
    });

    // The coordinator dies and comes back on the same port from its saved state; the learners
    // reconnect on their own.
    procs.kill("coordinator");
    let restarted_log = d.join("coordinator-2.log");
    procs.start(
        "coordinator",
        &coordinator_args(&recipe, port, d),
        SECRET,
        &restarted_log,
    );

    let status = procs.wait("coordinator", Duration::from_secs(300));
    assert!(
        status.success(),
        "coordinator: {}",
        std::fs::read_to_string(&restarted_log).unwrap()
    );
    for r in regions {
        let status = procs.wait(r, Duration::from_secs(60));
        assert!(
            status.success(),
            "learner {r}: {}",
            std::fs::read_to_string(d.join(format!("{r}.log"))).unwrap()
        );
    }
    let log2 = std::fs::read_to_string(&restarted_log).unwrap();
    assert!(log2.contains("resuming from the saved state"), "{log2}");

    let summary = json(&d.join("coordinator/summary.json"));
    let versions = summary["fragment_versions"].clone();
    for r in regions {
        assert_eq!(summary["learner_steps"][r], MAX_STEPS, "{summary}");
        let learner = json(&d.join(format!("learner-{r}/summary.json")));
        assert_eq!(learner["final_step"], MAX_STEPS, "{r}: {learner}");
        assert_eq!(
            learner["fragment_versions"], versions,
            "{r} ends holding the global model"
        );
    }
    // Nothing merged twice: each (fragment, version) once, each (learner, fragment, round) once.
    let mut seen_versions = std::collections::BTreeSet::new();
    let mut seen_contributions = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(&merges).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            seen_versions.insert((m["fragment"].as_u64(), m["version"].as_u64())),
            "{line}"
        );
        // Merges run off the coordinator's actor; each record says how long its merge took.
        assert!(m["merge_s"].as_f64().is_some_and(|s| s >= 0.0), "{line}");
        for c in m["contributors"].as_array().unwrap() {
            assert!(
                seen_contributions.insert((
                    c[0].as_u64(),
                    m["fragment"].as_u64(),
                    m["round"].as_u64()
                )),
                "{line}"
            );
        }
    }
    let last: Vec<u64> = (0..2)
        .map(|p| {
            seen_versions
                .iter()
                .filter(|(f, _)| *f == Some(p))
                .filter_map(|(_, v)| *v)
                .max()
                .unwrap()
        })
        .collect();
    assert_eq!(serde_json::json!(last), versions);
}
