//! The virtual clock: events ordered by (virtual time, sequence number), and each learner's
//! simulated link (a transfer waits for the link, takes 8·b / bandwidth, then the latency).

use atoll_coordinator::syncer::{Event, FragmentValues};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

fn sim_time(seconds: f64) -> u64 {
    (seconds * 1e9).round() as u64
}

pub(super) enum SimEvent {
    StepDone(usize),
    ToSyncer(Event),
    PullArrives {
        learner: usize,
        fragment: usize,
        round: u64,
    },
    BroadcastArrives {
        learner: usize,
        fragment: usize,
        version: u64,
        values: FragmentValues,
        /// The round whose merge produced this version, when this learner's contribution was in it.
        merged_round: Option<u64>,
    },
    CatchUpArrives {
        learner: usize,
        fragments: Vec<(usize, u64, FragmentValues)>,
    },
    Fail(usize),
    Recover(usize),
}

pub(super) struct Queue {
    pub(super) heap: BinaryHeap<Reverse<(u64, u64)>>,
    pub(super) events: BTreeMap<u64, SimEvent>,
    pub(super) seq: u64,
}

impl Queue {
    pub(super) fn push(&mut self, at: f64, event: SimEvent) {
        self.seq += 1;
        self.heap.push(Reverse((sim_time(at), self.seq)));
        self.events.insert(self.seq, event);
    }
    pub(super) fn pop(&mut self) -> Option<(f64, SimEvent)> {
        let Reverse((t, seq)) = self.heap.pop()?;
        Some((t as f64 / 1e9, self.events.remove(&seq).expect("queued")))
    }
}

pub(super) struct Link {
    pub(super) bandwidth_bps: f64,
    pub(super) latency_s: f64,
    pub(super) up_free_at: f64,
    pub(super) down_free_at: f64,
}

impl Link {
    /// Arrival time of `bytes` sent at `now` on the up (true) or down link.
    pub(super) fn send(&mut self, now: f64, bytes: u64, up: bool) -> f64 {
        let free = if up {
            &mut self.up_free_at
        } else {
            &mut self.down_free_at
        };
        let start = now.max(*free);
        let done = start + 8.0 * bytes as f64 / self.bandwidth_bps;
        *free = done;
        done + self.latency_s
    }
}
