//! Helpers for the system tests in `tests/tests/`: they run the built `atoll` binary as a user
//! would (`make test` sets `ATOLL_BIN`; otherwise `target/release/atoll` is used).

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn atoll_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ATOLL_BIN") {
        return PathBuf::from(p);
    }
    let p = repo_root().join("target/release/atoll");
    assert!(
        p.exists(),
        "{} not found: run `make build` first (or set ATOLL_BIN)",
        p.display()
    );
    p
}

/// Runs `atoll ARGS` in `cwd` with a bounded environment; returns the finished process output.
pub fn atoll(args: &[&str], cwd: &std::path::Path) -> Output {
    Command::new(atoll_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("atoll runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A user error: non-zero exit, exactly one `error:` line naming the problem, no panic.
pub fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr:\n{err}"
    );
    assert_eq!(o.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "panic instead of an error:\n{err}"
    );
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "stderr:\n{err}");
    assert!(
        error_lines[0].contains(needle),
        "expected `{needle}` in: {}",
        error_lines[0]
    );
}

/// Processes a test started, killed (SIGKILL, by id) when dropped so a failing test leaves
/// nothing running.
#[derive(Default)]
pub struct Processes(pub Vec<(String, std::process::Child)>);

impl Processes {
    /// Starts `atoll ARGS` with the job secret, output appended to `log`.
    pub fn start(&mut self, name: &str, args: &[String], secret: &str, log: &std::path::Path) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(atoll_bin())
            .args(args)
            .env("ATOLL_SECRET", secret)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("atoll starts");
        self.0.push((name.to_string(), child));
    }

    pub fn child(&mut self, name: &str) -> &mut std::process::Child {
        &mut self
            .0
            .iter_mut()
            .rev()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"))
            .1
    }

    /// SIGKILL by process id.
    pub fn kill(&mut self, name: &str) {
        let child = self.child(name);
        child.kill().expect("kill");
        child.wait().expect("reaped");
    }

    /// Waits (bounded) for a process to exit; returns its status.
    pub fn wait(&mut self, name: &str, timeout: std::time::Duration) -> std::process::ExitStatus {
        let child = self.child(name);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} did not exit within {timeout:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `atoll coordinator` on 127.0.0.1:`port`, its run directory `dir/coordinator`.
pub fn coordinator_args(recipe: &str, port: u16, dir: &std::path::Path) -> Vec<String> {
    [
        "coordinator",
        recipe,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--run-dir",
        &dir.join("coordinator").display().to_string(),
        "--metrics",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec()
}

/// `atoll learner` for `region` against that coordinator, its run directory
/// `dir/learner-<region>`.
pub fn learner_args(recipe: &str, port: u16, dir: &std::path::Path, region: &str) -> Vec<String> {
    [
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
        "--give-up-after-s",
        "120",
    ]
    .map(String::from)
    .to_vec()
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A TCP+UDP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The text a Prometheus endpoint serves at `address`, or nothing if it does not answer.
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nhost: {address}\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// Whether a Prometheus text exposition holds a series of this exact name.
pub fn exposes(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

pub fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// The S3-protocol server the storage tests run against: moto's standalone server, installed by
/// `make test` into `~/.cache/atoll/s3-venv` (or `ATOLL_MOTO_SERVER`), on a loopback port,
/// killed by process id when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub port: u16,
}

impl S3Server {
    pub fn start(log: &std::path::Path) -> S3Server {
        let bin = std::env::var_os("ATOLL_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/atoll/s3-venv/bin/moto_server")
            });
        assert!(
            bin.exists(),
            "{} not found: `make test` installs it (make s3-server)",
            bin.display()
        );
        let port = free_port();
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("moto_server starts");
        let server = S3Server { child, port };
        wait_until(
            "the S3 server to listen",
            std::time::Duration::from_secs(60),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        server
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, _) = http_request(self.port, "PUT", &format!("/{bucket}"));
        assert!(status == 200, "creating bucket {bucket}: HTTP {status}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request without a body; returns the status and body.
fn http_request(port: u16, method: &str, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("response");
    let head_end = find(&response, b"\r\n\r\n").expect("a response head") + 4;
    let status = String::from_utf8_lossy(&response[..head_end])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let head = String::from_utf8_lossy(&response[..head_end]).to_lowercase();
    let body = response[head_end..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(b, b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..line_end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[line_end + 2..line_end + 2 + size]);
        b = &b[line_end + 2 + size + 2..];
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How [`FlakyProxy`] treats requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flakiness {
    /// Forward everything.
    Healthy,
    /// Answer every `n`-th request with 503 Service Unavailable, forward the rest.
    FailEvery(u32),
    /// Answer every request with 503.
    Down,
}

/// An HTTP proxy in front of a server that fails requests on demand: a storage server that is
/// unreliable part of the time, or down. One request per connection (it answers
/// `connection: close`), so clients reconnect for each.
pub struct FlakyProxy {
    pub port: u16,
    mode: std::sync::Arc<std::sync::Mutex<Flakiness>>,
    pub failed: std::sync::Arc<std::sync::atomic::AtomicU32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FlakyProxy {
    pub fn start(upstream: u16) -> FlakyProxy {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(Mutex::new(Flakiness::Healthy));
        let failed = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, f, st) = (mode.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let seen = AtomicU32::new(0);
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                let mode = *m.lock().expect("mode");
                let fail = match mode {
                    Flakiness::Healthy => false,
                    Flakiness::FailEvery(k) => n.is_multiple_of(k.max(1)),
                    Flakiness::Down => true,
                };
                if fail {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::spawn(move || proxy_one(conn, upstream, fail));
            }
        });
        FlakyProxy {
            port,
            mode,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, mode: Flakiness) {
        *self.mode.lock().expect("mode") = mode;
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the stop flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn proxy_one(mut client: std::net::TcpStream, upstream: u16, fail: bool) {
    use std::io::{Read, Write};
    let timeout = Some(std::time::Duration::from_secs(30));
    let _ = client.set_read_timeout(timeout);
    // Read the request head and its content-length body.
    let mut request = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = find(&request, b"\r\n\r\n") {
            break i + 4;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let body_len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while request.len() < head_end + body_len {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    if fail {
        let _ = client.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        return;
    }
    // Forward with `connection: close` so the upstream ends its response with EOF.
    let mut forwarded: Vec<u8> = Vec::with_capacity(request.len() + 32);
    for line in head[..head_end - 4].split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            forwarded.extend_from_slice(line.as_bytes());
            forwarded.extend_from_slice(b"\r\n");
        }
    }
    forwarded.extend_from_slice(b"connection: close\r\n\r\n");
    forwarded.extend_from_slice(&request[head_end..]);
    let Ok(mut up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let _ = up.set_read_timeout(timeout);
    if up.write_all(&forwarded).is_err() {
        return;
    }
    let mut response = Vec::new();
    if up.read_to_end(&mut response).is_err() {
        return;
    }
    // Tell the client this connection ends here.
    let Some(line_end) = find(&response, b"\r\n") else {
        return;
    };
    let rest = String::from_utf8_lossy(&response[line_end..]).to_ascii_lowercase();
    let mut out = response[..line_end + 2].to_vec();
    if !rest.contains("\r\nconnection: close") {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(&response[line_end + 2..]);
    let _ = client.write_all(&out);
}

/// The reference Python (torch, transformers, peft, gguf pinned in
/// `scripts/requirements-reference.txt`) that the export and fine-tuning system tests check
/// Atoll's files with: installed by `make test` into `~/.cache/atoll/reference-venv`, or
/// `ATOLL_REFERENCE_PYTHON`.
pub fn reference_python() -> PathBuf {
    let python = std::env::var_os("ATOLL_REFERENCE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/atoll/reference-venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} not found: `make test` installs the reference stack (`make reference`)",
        python.display()
    );
    python
}

/// Runs a Python script of the reference stack with arguments; panics with its output unless it
/// exits 0, and returns its standard output.
pub fn run_reference_python(script: &std::path::Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(reference_python())
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .expect("the reference python starts");
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Kubernetes release the objects `atoll deploy k8s` renders are validated against (the
/// oldest docs/deploy.md promises them for).
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// `kubernetes-validate` (pinned in `scripts/requirements-k8s.txt`): installed by `make test`
/// into `~/.cache/atoll/k8s-venv`, or `ATOLL_K8S_VALIDATE`.
pub fn kubernetes_validate() -> PathBuf {
    let bin = std::env::var_os("ATOLL_K8S_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/atoll/k8s-venv/bin/kubernetes-validate")
        });
    assert!(
        bin.exists(),
        "{} not found: `make test` installs it (`make k8s-validate`)",
        bin.display()
    );
    bin
}
