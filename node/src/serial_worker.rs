//! A thread of its own that does jobs one after another, in the order they were sent: how a
//! learner keeps long passes over a fragment (encoding a contribution, joining a message cut into
//! parts) off its training thread without reordering them.

use std::sync::mpsc;
use std::thread::JoinHandle;

/// Dropping it finishes the jobs already sent and ends the thread.
pub struct SerialWorker<J: Send + 'static> {
    jobs: Option<mpsc::Sender<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> SerialWorker<J> {
    /// Starts thread `name`, which runs `work` on every job sent.
    pub fn start(name: &str, mut work: impl FnMut(J) + Send + 'static) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<J>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || queue.into_iter().for_each(&mut work))?;
        Ok(SerialWorker {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues `job`; returns at once, `false` when the thread has stopped (its work panicked).
    pub fn send(&self, job: J) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok())
    }
}

impl<J: Send + 'static> Drop for SerialWorker<J> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
