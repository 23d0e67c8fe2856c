//! The userspace emulator against the kernel's token bucket: a veth pair between two network
//! namespaces this test creates (and removes), shaped with `tc tbf`, and the emulator on
//! loopback, both at 100 Mbit/s and offered 200 Mbit/s of UDP, must deliver the same rate
//! within 10%. Needs root and iproute2; elsewhere it says so and checks nothing.

use atoll_system_tests::{atoll_bin, free_port, repo_root};
use std::process::{Command, Output, Stdio};

const RATE_BPS: f64 = 100e6;
const SECONDS: &str = "2";

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Namespaces removed on drop (their veth ends go with them).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

fn can_make_namespaces(probe: &str) -> bool {
    let works = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !works(&["tc", "-V"]) || !works(&["python3", "-V"]) {
        return false;
    }
    let made = works(&["ip", "netns", "add", probe]);
    if made {
        let _ = run(&["ip", "netns", "del", probe]);
    }
    made
}

/// Offers twice the rate from `send_ns` to `host:port` for 3 s while a sink in `sink_ns`
/// measures what arrives for 2 s; returns bits per second.
fn measure(
    send_ns: Option<&str>,
    sink_ns: Option<&str>,
    send_to: (&str, u16),
    sink_at: (&str, u16),
) -> f64 {
    let script = repo_root().join("tests/scripts/udp_rate.py");
    let script = script.to_str().unwrap();
    let in_ns = |ns: Option<&str>, args: Vec<String>| {
        let mut all: Vec<String> = match ns {
            Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
            None => Vec::new(),
        };
        all.extend(args);
        let mut c = Command::new(&all[0]);
        c.args(&all[1..]);
        c
    };
    let sink = in_ns(
        sink_ns,
        vec![
            "python3".into(),
            script.into(),
            "sink".into(),
            sink_at.0.into(),
            sink_at.1.to_string(),
            SECONDS.into(),
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    // The sink is bound once it answers nothing for a moment; the sender starts after it and
    // the sink only starts its clock at the first datagram, so the order is not a race.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = in_ns(
        send_ns,
        vec![
            "python3".into(),
            script.into(),
            "send".into(),
            send_to.0.into(),
            send_to.1.to_string(),
            format!("{}", 2.0 * RATE_BPS),
            "3".into(),
        ],
    )
    .status()
    .unwrap();
    assert!(sent.success());
    let out = sink.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_emulator_and_a_kernel_token_bucket_deliver_the_same_rate() {
    let id = std::process::id();
    if !can_make_namespaces(&format!("atoll-probe-{id}")) {
        eprintln!("kernel cross-check not run: it needs root, iproute2 and network namespaces");
        return;
    }
    let (a, b) = (format!("atoll-a-{id}"), format!("atoll-b-{id}"));
    let _cleanup = Namespaces(vec![a.clone(), b.clone()]);
    let (va, vb) = (
        format!("atv{}a", id % 100_000),
        format!("atv{}b", id % 100_000),
    );
    ok(&["ip", "netns", "add", &a]);
    ok(&["ip", "netns", "add", &b]);
    ok(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ]);
    ok(&["ip", "link", "set", &va, "netns", &a]);
    ok(&["ip", "link", "set", &vb, "netns", &b]);
    ok(&["ip", "-n", &a, "addr", "add", "10.213.0.1/24", "dev", &va]);
    ok(&["ip", "-n", &b, "addr", "add", "10.213.0.2/24", "dev", &vb]);
    for (ns, dev) in [(&a, &va), (&b, &vb)] {
        ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    ok(&[
        "ip", "netns", "exec", &a, "tc", "qdisc", "add", "dev", &va, "root", "tbf", "rate",
        "100mbit", "burst", "64kb", "latency", "100ms",
    ]);
    let kernel = measure(
        Some(&a),
        Some(&b),
        ("10.213.0.2", 47_001),
        ("10.213.0.2", 47_001),
    );

    let (listen, forward) = (free_port(), free_port());
    let mut emulator = Command::new(atoll_bin())
        .args([
            "link-emulator",
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--forward",
            &format!("127.0.0.1:{forward}"),
            "--rate",
            "100mbps",
            "--report-every-s",
            "0",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let emulated = measure(None, None, ("127.0.0.1", listen), ("127.0.0.1", forward));
    let _ = emulator.kill();
    let _ = emulator.wait();

    eprintln!(
        "100 Mbit/s offered 200: kernel tbf {:.1} Mbit/s, emulator {:.1} Mbit/s",
        kernel / 1e6,
        emulated / 1e6
    );
    // tbf counts Ethernet, IP and UDP headers (42 of every 1,242 bytes), the emulator only the
    // datagram: about 3.4% apart by construction.
    assert!(
        kernel > 0.8 * RATE_BPS && kernel < 1.05 * RATE_BPS,
        "kernel {kernel}"
    );
    assert!(
        (emulated - kernel).abs() / kernel < 0.10,
        "kernel {kernel}, emulator {emulated}"
    );
}
