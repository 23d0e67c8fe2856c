//! Logging through `tracing`: human-readable lines on stderr (drawn around an active progress
//! bar) and, for runs, a copy in `<run dir>/<name>.log`.

use indicatif::ProgressBar;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);
static LOG_FILE: OnceLock<Mutex<Option<File>>> = OnceLock::new();

/// Registers the progress bar that stderr log lines must be printed around.
pub fn set_active_bar(bar: Option<ProgressBar>) {
    if let Ok(mut slot) = ACTIVE_BAR.lock() {
        *slot = bar;
    }
}

#[derive(Clone, Copy)]
pub struct StderrAroundBar;

impl Write for StderrAroundBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE_BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for StderrAroundBar {
    type Writer = StderrAroundBar;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[derive(Clone, Copy)]
pub struct RunLogFile;

impl Write for RunLogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(Ok(mut guard)) = LOG_FILE.get().map(|m| m.lock()) {
            if let Some(f) = guard.as_mut() {
                f.write_all(buf)?;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RunLogFile {
    type Writer = RunLogFile;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs the global subscriber once: stderr at `RUST_LOG` (default info) plus the run log file
/// once `log_to_file` is called.
pub fn init() {
    let _ = LOG_FILE.set(Mutex::new(None));
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = fmt::layer()
        .with_writer(StderrAroundBar)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter());
    let file = fmt::layer()
        .with_writer(RunLogFile)
        .with_ansi(false)
        .with_target(false)
        .with_filter(filter());
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

/// Starts copying log lines into `path` (appending).
pub fn log_to_file(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if let Some(Ok(mut slot)) = LOG_FILE.get().map(|m| m.lock()) {
        *slot = Some(file);
    }
    Ok(())
}
