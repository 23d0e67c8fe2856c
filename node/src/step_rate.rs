//! A learner's token rate over its last steps, as it reports and exports it. One step's time
//! swings with whatever else the host runs; averaged over a window, the rate a dashboard shows
//! moves with the learner's throughput rather than with each step's luck.

use std::collections::VecDeque;

/// Steps the rate is averaged over.
const WINDOW: usize = 20;

#[derive(Default)]
pub struct StepRate {
    seconds: VecDeque<f64>,
}

impl StepRate {
    /// Records a step of `tokens` that took `seconds`; returns tokens per second over the last
    /// [`WINDOW`] steps.
    pub fn record(&mut self, seconds: f64, tokens: u64) -> f64 {
        if self.seconds.len() == WINDOW {
            self.seconds.pop_front();
        }
        self.seconds.push_back(seconds);
        let total: f64 = self.seconds.iter().sum();
        (tokens as f64 * self.seconds.len() as f64) / total.max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_tokens_over_the_window_s_time() {
        let mut r = StepRate::default();
        assert_eq!(r.record(2.0, 100), 50.0);
        // One quick step among slow ones moves the rate by its share of the window only.
        assert_eq!(r.record(0.5, 100), 200.0 / 2.5);
        for _ in 0..WINDOW {
            r.record(1.0, 100);
        }
        assert_eq!(r.record(1.0, 100), 100.0);
    }
}
