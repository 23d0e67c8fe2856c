//! Uploads snapshots on a thread of its own so the training loop only pays for the copy to host
//! memory. One snapshot uploads at a time and at most one more waits: a trainer that checkpoints
//! faster than the store absorbs blocks on `submit` (backpressure) instead of piling snapshots up
//! in memory.

use crate::{CheckpointStore, Snapshot};
use anyhow::{anyhow, Result};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What became of one submitted snapshot.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub step: u64,
    pub bytes: u64,
    pub upload_s: f64,
    /// None when committed; the error otherwise (the previous checkpoints are untouched).
    pub error: Option<String>,
    pub deleted_by_retention: Vec<u64>,
}

pub struct BackgroundWriter {
    tx: Option<mpsc::SyncSender<Snapshot>>,
    done: mpsc::Receiver<WriteOutcome>,
    thread: Option<JoinHandle<()>>,
    outcomes: Vec<WriteOutcome>,
}

impl BackgroundWriter {
    pub fn start(
        store: CheckpointStore,
        keep_last: usize,
        keep_every: Option<u64>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Snapshot>(1);
        let (done_tx, done) = mpsc::channel();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("atoll-ckpt")
            .enable_all()
            .build()
            .map_err(|e| anyhow!("cannot start the checkpoint writer: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("atoll-ckpt-writer".into())
            .spawn(move || {
                for snapshot in rx {
                    let started = Instant::now();
                    let step = snapshot.step;
                    let result = rt.block_on(async {
                        let manifest = store.write(snapshot).await?;
                        let deleted = store.apply_retention(keep_last, keep_every).await?;
                        Ok::<_, anyhow::Error>((manifest.total_bytes(), deleted))
                    });
                    let upload_s = started.elapsed().as_secs_f64();
                    let outcome = match result {
                        Ok((bytes, deleted)) => {
                            tracing::info!(
                                "checkpoint step-{step} committed to {} ({:.1} MB in {upload_s:.2} s)",
                                store.url(),
                                bytes as f64 / 1e6
                            );
                            metrics::counter!("atoll_checkpoint_bytes_total").increment(bytes);
                            metrics::histogram!("atoll_checkpoint_upload_seconds")
                                .record(upload_s);
                            WriteOutcome {
                                step,
                                bytes,
                                upload_s,
                                error: None,
                                deleted_by_retention: deleted,
                            }
                        }
                        Err(e) => {
                            let bytes = 0;
                            tracing::error!(
                                "checkpoint step-{step} was NOT written to {}: {e:#}; the previous checkpoints are untouched",
                                store.url()
                            );
                            metrics::counter!("atoll_checkpoint_failures_total").increment(1);
                            WriteOutcome {
                                step,
                                bytes,
                                upload_s,
                                error: Some(format!("{e:#}")),
                                deleted_by_retention: Vec::new(),
                            }
                        }
                    };
                    if done_tx.send(outcome).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| anyhow!("cannot start the checkpoint writer thread: {e}"))?;
        Ok(BackgroundWriter {
            tx: Some(tx),
            done,
            thread: Some(thread),
            outcomes: Vec::new(),
        })
    }

    /// Queues a snapshot; returns how long the caller was blocked because the previous upload had
    /// not finished (zero normally).
    pub fn submit(&mut self, snapshot: Snapshot) -> Result<Duration> {
        let started = Instant::now();
        self.collect();
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("the checkpoint writer is closed"))?;
        tx.send(snapshot)
            .map_err(|_| anyhow!("the checkpoint writer stopped"))?;
        Ok(started.elapsed())
    }

    fn collect(&mut self) {
        self.outcomes.extend(self.done.try_iter());
    }

    /// Outcomes of the uploads finished so far.
    pub fn outcomes(&mut self) -> &[WriteOutcome] {
        self.collect();
        &self.outcomes
    }

    /// Waits for every queued upload and returns all outcomes.
    pub fn finish(mut self) -> Vec<WriteOutcome> {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.collect();
        std::mem::take(&mut self.outcomes)
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        // Let queued uploads complete: dropping a writer must not lose a checkpoint mid-way.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
