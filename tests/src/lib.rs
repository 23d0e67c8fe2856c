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

pub fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}
