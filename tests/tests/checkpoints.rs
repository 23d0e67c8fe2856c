//! Checkpoints as a user meets them: `atoll train` writing to a directory and to a real
//! S3-protocol server (moto) behind a proxy that fails requests, bit-identical resume, `atoll
//! checkpoints list/verify`, and corruption fallback.

use atoll_system_tests::{atoll, stderr, stdout, Flakiness, FlakyProxy, S3Server};
use std::path::Path;
use std::process::{Command, Output};

const RECIPE: &str = "name: ckpt
seed: 3
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 20, batch_size: 4, lr: 3.0e-3, eval_batches: 2, threads: 1, device: cpu}
run: {save_final: false}
checkpoint: {every: 10}
";

fn recipe(dir: &Path) -> String {
    let path = dir.join("job.yaml");
    std::fs::write(&path, RECIPE).unwrap();
    path.display().to_string()
}

/// (step, loss) of every line of a run's metrics.jsonl: bit-exact, as printed.
fn losses(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

fn atoll_s3(args: &[&str], cwd: &Path, endpoint_port: u16) -> Output {
    Command::new(atoll_system_tests::atoll_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{endpoint_port}"),
        )
        .env("AWS_ACCESS_KEY_ID", "atoll-test")
        .env("AWS_SECRET_ACCESS_KEY", "atoll-test-secret")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("atoll runs")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

#[test]
fn resume_from_a_local_directory_is_bit_identical_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = recipe(d);

    ok(&atoll(&["train", &r, "--set", "run.dir=straight"], d));
    ok(&atoll(
        &[
            "train",
            &r,
            "--set",
            "run.dir=split",
            "--set",
            "train.max_steps=10",
        ],
        d,
    ));
    let o = atoll(
        &["train", &r, "--set", "run.dir=split", "--resume", "latest"],
        d,
    );
    ok(&o);
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));

    // 20 steps straight == 10 steps, stop, resume, 10 steps: every loss, the final eval, the
    // weights and the optimizer state, bit for bit.
    let (straight, split) = (d.join("straight"), d.join("split"));
    assert_eq!(losses(&straight), losses(&split));
    assert_eq!(losses(&split).len(), 20);
    assert_eq!(
        summary(&straight)["final_eval_loss"],
        summary(&split)["final_eval_loss"]
    );
    assert_eq!(summary(&split)["resumed_from"], 10);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join("checkpoints/step-20").join(file)).unwrap();
        let b = std::fs::read(split.join("checkpoints/step-20").join(file)).unwrap();
        assert!(a == b, "{file} differs after resume");
    }
    // A checkpoint is a Hugging Face model directory.
    let index = split.join("checkpoints/step-20");
    for file in [
        "config.json",
        "tokenizer.json",
        "trainer_state.json",
        "manifest.json",
    ] {
        assert!(index.join(file).exists(), "{file}");
    }

    // list / verify.
    let url = split.join("checkpoints").display().to_string();
    let o = atoll(&["checkpoints", "list", &url], d);
    ok(&o);
    assert!(
        stdout(&o).contains("step-10") && stdout(&o).contains("committed"),
        "{}",
        stdout(&o)
    );
    ok(&atoll(&["checkpoints", "verify", &url], d));

    // Corrupt one byte of step-20's weights: verify fails naming the file; --resume latest
    // falls back to step-10 with a warning naming it; a half-written step-30 is ignored.
    let victim = split.join("checkpoints/step-20/model.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    std::fs::create_dir_all(split.join("checkpoints/step-30")).unwrap();
    std::fs::write(split.join("checkpoints/step-30/model.safetensors"), b"half").unwrap();
    let o = atoll(&["checkpoints", "verify", &url], d);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("step-20: model.safetensors: sha256"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("step-30: incomplete"), "{}", stdout(&o));
    let o = atoll(&["checkpoints", "verify", &format!("{url}/step-10")], d);
    ok(&o);

    let o = atoll(
        &[
            "train",
            &r,
            "--set",
            "run.dir=split",
            "--set",
            "train.max_steps=15",
            "--set",
            "checkpoint.every=0",
            "--resume",
            "latest",
        ],
        d,
    );
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("skipping checkpoint step-20") && err.contains("step-20/model.safetensors"),
        "{err}"
    );
    assert_eq!(summary(&split)["resumed_from"], 10);
    assert_eq!(losses(&split)[..15], losses(&straight)[..15]);

    // Asking for the corrupt one by name is an error naming the file.
    let o = atoll(
        &["train", &r, "--set", "run.dir=split", "--resume", "step-20"],
        d,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("model.safetensors: sha256"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn s3_checkpoints_survive_a_flaky_server_resume_exactly_and_a_dead_server_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = recipe(d);
    let s3 = S3Server::start(&d.join("moto.log"));
    s3.create_bucket("atoll-ckpt");
    let proxy = FlakyProxy::start(s3.port);
    let url = "s3://atoll-ckpt/runs/split";
    let s3_set = format!("checkpoint.url={url}");
    // 5 MiB parts: the 8.4 MB optimizer state goes up as a multipart upload.
    let part = "checkpoint.part_size_mib=5";

    ok(&atoll(&["train", &r, "--set", "run.dir=straight"], d));

    // Every third request fails with 503: retries carry the checkpoints through.
    proxy.set(Flakiness::FailEvery(3));
    ok(&atoll_s3(
        &[
            "train",
            &r,
            "--set",
            "run.dir=split",
            "--set",
            "train.max_steps=10",
            "--set",
            &s3_set,
            "--set",
            part,
        ],
        d,
        proxy.port,
    ));
    let o = atoll_s3(
        &[
            "train",
            &r,
            "--set",
            "run.dir=split",
            "--set",
            &s3_set,
            "--set",
            part,
            "--resume",
            "latest",
        ],
        d,
        proxy.port,
    );
    ok(&o);
    assert!(
        proxy.failed.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the proxy failed no request"
    );
    assert_eq!(losses(&d.join("straight")), losses(&d.join("split")));
    proxy.set(Flakiness::Healthy);

    // What the server holds is exactly what a local run wrote: fetched and verified back.
    let fetched = d.join("fetched");
    let o = atoll_s3(
        &[
            "checkpoints",
            "fetch",
            &format!("{url}/latest"),
            fetched.to_str().unwrap(),
        ],
        d,
        proxy.port,
    );
    ok(&o);
    assert!(stdout(&o).contains("step-20"), "{}", stdout(&o));
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        let a = std::fs::read(d.join("straight/checkpoints/step-20").join(file)).unwrap();
        assert!(a == std::fs::read(fetched.join(file)).unwrap(), "{file}");
    }
    let o = atoll_s3(&["checkpoints", "list", url], d, proxy.port);
    ok(&o);
    assert!(stdout(&o).contains("step-20"), "{}", stdout(&o));
    ok(&atoll_s3(&["checkpoints", "verify", url], d, proxy.port));

    // The server goes down: the new checkpoint fails after bounded retries with a clear error,
    // and nothing already committed is touched.
    proxy.set(Flakiness::Down);
    let o = atoll_s3(
        &[
            "train",
            &r,
            "--set",
            "run.dir=down",
            "--set",
            "train.max_steps=5",
            "--set",
            "checkpoint.every=5",
            "--set",
            &s3_set,
            "--set",
            "checkpoint.retry_timeout_s=2",
        ],
        d,
        proxy.port,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("step-5 was NOT written") && err.contains("earlier checkpoints are intact"),
        "{err}"
    );
    proxy.set(Flakiness::Healthy);
    let o = atoll_s3(&["checkpoints", "verify", url], d, proxy.port);
    ok(&o);
    assert!(
        stdout(&o).contains("step-10: ok") && stdout(&o).contains("step-20: ok"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("step-5: ok"), "{}", stdout(&o));
}

#[test]
fn atoll_run_resumes_its_coordinator_from_a_checkpoint_without_merging_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = d.join("job.yaml");
    std::fs::write(
        &path,
        "name: resume-run
seed: 5
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 40, batch_size: 4, lr: 3.0e-3, eval_batches: 2, threads: 1, device: cpu}
run: {save_final: false, dir: job}
sync: {learners: 2, regions: [east, west], fragments: 2, h: 8}
checkpoint: {every: 16}
",
    )
    .unwrap();
    let r = path.display().to_string();
    ok(&atoll(&["run", &r], d));
    let url = d.join("job/coordinator/checkpoints").display().to_string();
    let o = atoll(&["checkpoints", "list", &url], d);
    ok(&o);
    assert!(stdout(&o).contains("coordinator"), "{}", stdout(&o));
    let merges_before = atoll_system_tests::count_lines(&d.join("job/coordinator/merges.jsonl"));

    // Continue the same job to 64 steps from its newest checkpoint.
    let o = atoll(
        &[
            "run",
            &r,
            "--set",
            "train.max_steps=64",
            "--set",
            "run.save_final=true",
            "--resume",
            "latest",
        ],
        d,
    );
    ok(&o);
    // The job's last checkpoint holds the final global model: its weights (built from the
    // syncer's fragments) equal, byte for byte, those the coordinator saves from its own model
    // set to the same Θ.
    let newest = std::fs::read_dir(d.join("job/coordinator/checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("step-")?.parse::<u64>().ok()
        })
        .max()
        .unwrap();
    assert_eq!(newest, 64);
    let checkpointed =
        std::fs::read(d.join("job/coordinator/checkpoints/step-64/model.safetensors")).unwrap();
    let saved = std::fs::read(d.join("job/coordinator/final/model.safetensors")).unwrap();
    assert!(
        checkpointed == saved,
        "the last checkpoint's weights differ from the final model"
    );
    let log = std::fs::read_to_string(d.join("job/coordinator.log")).unwrap();
    assert!(log.contains("resuming from checkpoint"), "{log}");
    // Learners start from the same checkpoint's global model, so their join downloads nothing.
    for region in ["east", "west"] {
        let log = std::fs::read_to_string(d.join(format!("job/learner-{region}.log"))).unwrap();
        assert!(log.contains("starting from the global model of"), "{log}");
    }
    let summary = summary(&d.join("job/coordinator"));
    assert_eq!(summary["learner_steps"]["east"], 64, "{summary}");
    assert_eq!(summary["learner_steps"]["west"], 64, "{summary}");

    // The merge log continues the checkpoint's: more merges, each (fragment, round) once.
    let text = std::fs::read_to_string(d.join("job/coordinator/merges.jsonl")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (v["fragment"].to_string(), v["round"].to_string());
        assert!(seen.insert(key.clone()), "merged twice: {key:?}");
    }
    assert!(
        seen.len() > merges_before,
        "{} <= {merges_before}",
        seen.len()
    );
}
