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
