//! A map over independent pieces of work on scoped threads, results in the order of the work:
//! how merges and the framing of large fragments use a machine's cores without a thread pool
//! or any effect of the thread count on the result.

/// Runs `f` over `work` on up to `threads` threads (inline for one thread or one item).
pub fn map<W: Send, R: Send>(work: Vec<W>, threads: usize, f: impl Fn(W) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, work.len().max(1));
    if threads == 1 {
        return work.into_iter().map(f).collect();
    }
    let count = work.len();
    let queue = std::sync::Mutex::new(work.into_iter().enumerate());
    let results = std::sync::Mutex::new((0..count).map(|_| None).collect::<Vec<Option<R>>>());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = queue.lock().expect("work queue").next();
                let Some((i, w)) = next else { break };
                let r = f(w);
                results.lock().expect("results")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

/// The machine's cores: the default thread count.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_the_order_of_the_work_on_any_thread_count() {
        let work: Vec<u64> = (0..97).collect();
        for threads in [1, 2, 5, 200] {
            let squares = super::map(work.clone(), threads, |x| x * x);
            assert_eq!(squares, work.iter().map(|x| x * x).collect::<Vec<_>>());
        }
        assert!(super::map(Vec::<u8>::new(), 4, |x| x).is_empty());
    }
}
