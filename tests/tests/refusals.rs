//! A coordinator refuses a learner with the wrong secret, one with another model, a data
//! connection speaking garbage and, from an authenticated learner, a frame whose checksum fails,
//! each with a clear reason, while a good learner keeps training and the job finishes.

use atoll_system_tests::{free_port, stderr, wait_until, Processes};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "refusals-secret-0123456789";

fn recipe(dir: &Path) -> String {
    let path = dir.join("job.yaml");
    std::fs::write(
        &path,
        "name: refusals
seed: 3
model: {preset: gemma3-tiny}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 512}, seq_len: 32}
train: {max_steps: 1200, batch_size: 4, lr: 3.0e-3, eval_batches: 2, threads: 1, device: cpu}
run: {save_final: false}
sync: {learners: 2, fragments: 2, h: 8, heartbeat_timeout_s: 5}
",
    )
    .unwrap();
    path.display().to_string()
}

fn learner(recipe: &str, port: u16, dir: &Path, region: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "learner",
        recipe,
        "--region",
        region,
        "--coordinator",
        &format!("127.0.0.1:{port}"),
        "--ca",
        &dir.join("coordinator/tls/ca.pem").display().to_string(),
        "--run-dir",
        &dir.join(format!("learner-{region}")).display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_learner(args: &[String], secret: &str) -> std::process::Output {
    std::process::Command::new(atoll_system_tests::atoll_bin())
        .args(args)
        .env("ATOLL_SECRET", secret)
        .output()
        .expect("atoll runs")
}

fn bad_data_count(metrics: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with("atoll_bad_data_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn wrong_secret_wrong_model_and_garbage_are_refused_while_a_good_learner_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = recipe(d);
    let port = free_port();
    let mut procs = Processes::default();
    let coordinator: Vec<String> = [
        "coordinator",
        &recipe,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--run-dir",
        &d.join("coordinator").display().to_string(),
        "--metrics",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    procs.start(
        "coordinator",
        &coordinator,
        SECRET,
        &d.join("coordinator.log"),
    );
    let endpoint = d.join("coordinator/coordinator.json");
    wait_until("the coordinator to serve", Duration::from_secs(120), || {
        endpoint.exists()
    });
    let endpoint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&endpoint).unwrap()).unwrap();
    let metrics = endpoint["metrics"].as_str().unwrap().to_string();

    procs.start(
        "good",
        &learner(&recipe, port, d, "good", &[]),
        SECRET,
        &d.join("good.log"),
    );
    let progress = d.join("learner-good/metrics.jsonl");
    wait_until(
        "the good learner to train",
        Duration::from_secs(120),
        || atoll_system_tests::count_lines(&progress) >= 1,
    );

    let o = run_learner(
        &learner(&recipe, port, d, "intruder", &[]),
        "not-the-secret-at-all",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("wrong job secret"), "{}", stderr(&o));

    let o = run_learner(
        &learner(
            &recipe,
            port,
            d,
            "other",
            &["--set", "data.tokenizer.vocab_size=1024"],
        ),
        SECRET,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model mismatch"), "{}", stderr(&o));
    // The refusal names the job's model hash: a well-behaved rogue below uses it to get in.
    let job_hash = stderr(&o)
        .split("but the job's is ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("the refusal names the job's model hash")
        .to_string();

    // Garbage on the QUIC data plane: refused, counted, connection closed.
    let before = bad_data_count(&metrics);
    let ca = std::fs::read(d.join("coordinator/tls/ca.pem")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = rt.block_on(async {
        atoll_link::tls::install_crypto_provider();
        let endpoint = atoll_link::quic::client_endpoint(
            &ca,
            atoll_link::LinkTuning::default(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let conn =
            atoll_link::quic::connect(&endpoint, format!("127.0.0.1:{port}").parse().unwrap())
                .await
                .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"GARBAGE-NOT-A-HELLO").await.unwrap();
        send.finish().unwrap();
        let _ = recv.read_to_end(64).await;
        tokio::time::timeout(Duration::from_secs(10), conn.closed()).await
    });
    assert!(
        closed.is_ok(),
        "the coordinator kept a garbage connection open"
    );
    wait_until("the refusal to be counted", Duration::from_secs(10), || {
        bad_data_count(&metrics) > before
    });

    // An authenticated learner whose contribution frame fails its checksum: refused, counted,
    // its data connection closed; it can still leave cleanly over the control plane.
    let before = bad_data_count(&metrics);
    let ca_path = d.join("coordinator/tls/ca.pem");
    let closed = rt.block_on(async {
        let mut control = atoll_proto::client::connect(&format!("127.0.0.1:{port}"), &ca_path)
            .await
            .unwrap();
        // A learner of the previous protocol (every tensor one part) is refused by name.
        let old = control
            .join(atoll_proto::v1::JoinRequest {
                protocol_version: atoll_proto::PROTOCOL_VERSION - 1,
                secret: SECRET.into(),
                region: "old".into(),
                model_hash: job_hash.clone(),
                held_versions: vec![],
            })
            .await
            .expect_err("an older protocol is refused");
        assert!(
            old.message().contains("incompatible protocol version 1"),
            "{old:?}"
        );
        let joined = control
            .join(atoll_proto::v1::JoinRequest {
                protocol_version: atoll_proto::PROTOCOL_VERSION,
                secret: SECRET.into(),
                region: "rogue".into(),
                model_hash: job_hash,
                held_versions: vec![],
            })
            .await
            .expect("the right secret and model are admitted")
            .into_inner();
        let endpoint = atoll_link::quic::client_endpoint(
            &ca,
            atoll_link::LinkTuning::default(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let conn =
            atoll_link::quic::connect(&endpoint, format!("127.0.0.1:{port}").parse().unwrap())
                .await
                .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let hello = atoll_link::Hello {
            session: joined.session.clone(),
        };
        send.write_all(&hello.encode().unwrap()).await.unwrap();
        send.finish().unwrap();
        assert_eq!(
            recv.read_to_end(64).await.unwrap(),
            vec![0],
            "hello accepted"
        );

        let values = vec![0.25f32; 64];
        let mut frame =
            atoll_wire::encode_frame(atoll_wire::Codec::F32, 256, &[64], &values, 0).unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 0x5a; // a payload byte: the CRC no longer matches
        let header = atoll_link::PartHeader {
            kind: atoll_link::PartKind::Contribution,
            fragment: 0,
            round_or_version: 1,
            base_version: 0,
            steps: 8,
            tokens: 1024,
            part: 0,
            parts: 1,
            frame_len: frame.len() as u32,
        };
        let mut part = conn.open_uni().await.unwrap();
        part.write_all(&header.encode()).await.unwrap();
        part.write_all(&frame).await.unwrap();
        let _ = part.finish();
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        control
            .leave(atoll_proto::v1::LeaveRequest {
                session: joined.session,
            })
            .await
            .unwrap();
        closed
    });
    assert!(
        closed.is_ok(),
        "the coordinator kept a connection open after a bad frame"
    );
    wait_until(
        "the bad frame to be counted",
        Duration::from_secs(10),
        || bad_data_count(&metrics) > before,
    );

    // The good learner was never disturbed: it and the job finish.
    assert!(procs
        .wait("coordinator", Duration::from_secs(300))
        .success());
    assert!(procs.wait("good", Duration::from_secs(60)).success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("coordinator/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["learner_steps"]["good"], 1200, "{summary}");
}
