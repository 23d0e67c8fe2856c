//! The timing simulation: inner steps, syncs and WAN links as events, without failures.
//!
//! Each region has one WAN link, full duplex, `link_rate_gbps` per direction, with one-way
//! latency `rtt/2`. A link is a FIFO server: a transfer starts when it is ready and the link is
//! free, holds the link for `bits / rate`, and lands one latency later (so back-to-back
//! transfers pipeline, as on a real TCP/QUIC stream).
//!
//! * **DP**: every step all-reduces the gradient (ring: each link carries `2(M−1)/M × size` in
//!   each direction and pays `2(M−1)` one-way latencies). Buckets leave while the backward pass
//!   runs, from `(1 − dp_overlap)` into the step; the next step waits for the all-reduce.
//! * **DiLoCo**: every `diloco_h` steps a ring all-reduce of the whole outer gradient; training
//!   blocks until it is done (τ = 0).
//! * **Streaming DiLoCo**: P fragments, each all-reduced every H steps at staggered offsets;
//!   training continues for τ steps while one is in flight and blocks only if it is still not
//!   back.
//! * **Decoupled DiLoCo**: a learner uploads the fragment due at each step to the syncer
//!   (star: one copy up per learner), the syncer merges (`merge_s`) and broadcasts it down; the
//!   learner never waits, and applies it at the first step boundary after it lands. What the
//!   links cannot carry shows up as *lag* (steps between upload and apply, budgeted at τ),
//!   not as idle chips.
//!
//! Learners are identical in this model (same chips, same batch), so every lock-step worker and
//! every Decoupled learner follows the same timeline, and one representative learner and link
//! are simulated. The schedule is periodic (period H, or one step for DP), so a window of a few
//! periods is simulated event by event and the rest of the run is extrapolated at the
//! steady-state rate measured over the window's second half.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::input::Resolved;

/// The four ways of training the planner compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `ddp` is the recipe's name (`sync.mode`).
    #[serde(alias = "ddp")]
    Dp,
    Diloco,
    Streaming,
    Decoupled,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Dp, Mode::Diloco, Mode::Streaming, Mode::Decoupled];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Dp => "DP",
            Mode::Diloco => "DiLoCo",
            Mode::Streaming => "Streaming DiLoCo",
            Mode::Decoupled => "Decoupled DiLoCo",
        }
    }
}

/// A FIFO link in one direction, with a histogram of the bits it carried per time bin (to find
/// the busiest window).
struct Link {
    rate_bps: f64,
    free_at: f64,
    bits: f64,
    bin_s: f64,
    bins: Vec<f64>,
    /// A transfer held the link for a whole bin: the peak is the link rate whatever the bins say.
    saturated_bin: bool,
}

/// Bins beyond this are not recorded (only a link that is saturated anyway gets there).
const MAX_BINS: usize = 1 << 22;

impl Link {
    fn new(rate_bps: f64, bin_s: f64) -> Self {
        Link {
            rate_bps,
            free_at: 0.0,
            bits: 0.0,
            bin_s,
            bins: Vec::new(),
            saturated_bin: false,
        }
    }

    /// Queues `bits` ready at `ready`; returns when the last bit lands.
    fn send(&mut self, ready: f64, bits: f64, latency_s: f64) -> f64 {
        let start = ready.max(self.free_at);
        let busy = bits / self.rate_bps;
        self.free_at = start + busy;
        self.bits += bits;
        self.record(start, busy, bits);
        self.free_at + latency_s
    }

    fn record(&mut self, start: f64, busy: f64, bits: f64) {
        if busy >= self.bin_s {
            self.saturated_bin = true;
        }
        // Once one transfer has filled a whole bin the peak is known; skip the bookkeeping.
        if busy <= 0.0 || self.saturated_bin {
            return;
        }
        let first = (start / self.bin_s) as usize;
        let last = ((start + busy) / self.bin_s) as usize;
        if last >= MAX_BINS {
            return;
        }
        if self.bins.len() <= last {
            self.bins.resize(last + 1, 0.0);
        }
        for (b, slot) in self.bins.iter_mut().enumerate().take(last + 1).skip(first) {
            let lo = (b as f64 * self.bin_s).max(start);
            let hi = ((b + 1) as f64 * self.bin_s).min(start + busy);
            if hi > lo {
                *slot += bits * (hi - lo) / busy;
            }
        }
    }

    /// Highest rate over any bin, bit/s.
    fn peak_bps(&self) -> f64 {
        if self.saturated_bin {
            return self.rate_bps;
        }
        let most = self.bins.iter().copied().fold(0.0, f64::max);
        (most / self.bin_s).min(self.rate_bps)
    }
}

/// What the window simulation measured, extrapolated to the whole run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Timeline {
    /// Wall clock of the whole run without failures, s.
    pub wall_s: f64,
    /// Mean time per inner step in steady state, s.
    pub step_s: f64,
    /// Share of the wall clock the chips compute.
    pub compute_utilization: f64,
    /// Bits each link carries over the whole run, per direction.
    pub up_bits: f64,
    pub down_bits: f64,
    /// Busiest one-step window of a link (either direction), bit/s.
    pub peak_bps: f64,
    /// Steps between sending a fragment and applying its merge: the largest in steady state.
    pub lag_steps: u64,
}

/// Steps simulated event by event: a whole number of periods, at least 200 steps, and no more
/// than the run.
fn window_steps(period: u32, total: u64) -> u64 {
    let period = u64::from(period.max(1));
    let periods = 200u64.div_ceil(period).max(4);
    let even = periods + periods % 2;
    (even * period).min(total)
}

/// When each fragment falls due within a period of `h` steps: fragment p after step
/// `((p + 1)·h)/P − 1`, spread evenly (with P = H, one fragment per step; with P = 1, after the
/// H-th step).
fn due_offsets(fragments: u32, h: u32) -> Vec<u64> {
    let (p, h) = (u64::from(fragments), u64::from(h));
    (0..p).map(|i| ((i + 1) * h / p).max(1) - 1).collect()
}

/// Fragments due at each step of a period (so a step costs O(1), not O(P), to schedule).
fn due_per_phase(fragments: u32, h: u32) -> Vec<u32> {
    let mut due = vec![0u32; h.max(1) as usize];
    for o in due_offsets(fragments, h) {
        // Offsets are < h by construction.
        if let Some(slot) = due.get_mut(o as usize) {
            *slot += 1;
        }
    }
    due
}

struct LockStep {
    period: u32,
    fragments: u32,
    tau: u32,
    /// Bits one link carries per sync of one fragment, each direction.
    bits: f64,
    latency_s: f64,
    /// When a sync may start, as a share of the step from its start.
    launch_at: f64,
}

fn lockstep(r: &Resolved, spec: &LockStep) -> Timeline {
    let t = r.step_compute_s;
    let steps = window_steps(spec.period, r.total_steps);
    let half = steps / 2;
    let due = due_per_phase(spec.fragments, spec.period);
    let mut link = Link::new(r.rate_bps, t);
    // (step the sync was launched after, when it lands)
    let mut in_flight: VecDeque<(u64, f64)> = VecDeque::new();
    let (mut end, mut start_at_half, mut last_landing) = (0.0f64, 0.0f64, 0.0f64);
    let communicates = r.learners > 1 && spec.bits > 0.0;
    // Before step j, every sync launched at step s with s + τ + 1 ≤ j must have landed.
    let ready = |j: u64, end: f64, in_flight: &mut VecDeque<(u64, f64)>| {
        let mut start = end;
        while let Some(&(s, landing)) = in_flight.front() {
            if s + u64::from(spec.tau) < j {
                start = start.max(landing);
                in_flight.pop_front();
            } else {
                break;
            }
        }
        start
    };
    for j in 0..steps {
        let start = ready(j, end, &mut in_flight);
        if j == half {
            start_at_half = start;
        }
        end = start + t;
        if communicates {
            let phase = j % u64::from(spec.period);
            for _ in 0..due[phase as usize] {
                let landing = link.send(start + spec.launch_at * t, spec.bits, spec.latency_s);
                last_landing = last_landing.max(landing);
                in_flight.push_back((j, landing));
            }
        }
    }
    // When the step after the window could start: the steady-state rate is measured from the
    // start of step `half` to there, so every step in between counts its own stall.
    let next_start = ready(steps, end, &mut in_flight);
    // The last syncs must land before the run is over.
    let window_wall = next_start.max(last_landing);
    let steady = if steps > half && half > 0 {
        (next_start - start_at_half) / (steps - half) as f64
    } else {
        window_wall / steps.max(1) as f64
    };
    let rest = (r.total_steps - steps) as f64;
    let wall = window_wall + rest * steady;
    let scale = r.total_steps as f64 / steps.max(1) as f64;
    Timeline {
        wall_s: wall,
        step_s: wall / r.total_steps as f64,
        compute_utilization: r.total_steps as f64 * t / wall,
        up_bits: link.bits * scale,
        down_bits: link.bits * scale,
        peak_bps: if communicates { link.peak_bps() } else { 0.0 },
        lag_steps: u64::from(spec.tau),
    }
}

fn decoupled(r: &Resolved) -> Timeline {
    let t = r.step_compute_s;
    let steps = window_steps(r.h, r.total_steps);
    let half = steps / 2;
    let due = due_per_phase(r.fragments, r.h);
    let fragment_values = r.params / f64::from(r.fragments);
    let mut up = Link::new(r.rate_bps, t);
    let mut down = Link::new(r.rate_bps, t);
    let mut lag = 0u64;
    let communicates = r.learners > 1;
    if communicates {
        for j in 0..steps {
            let phase = j % u64::from(r.h);
            let sent = (j + 1) as f64 * t;
            for _ in 0..due[phase as usize] {
                // Every learner uploads at the same moment over its own link; the syncer merges
                // once all are in (identical learners arrive together) and broadcasts.
                let merged = up.send(sent, fragment_values * r.up_bits, r.one_way_s) + r.merge_s;
                let landed = down.send(merged, fragment_values * r.down_bits, r.one_way_s);
                if j >= half {
                    // Applied at the first step boundary after it lands.
                    let boundaries = ((landed - sent) / t).ceil().max(0.0) as u64;
                    lag = lag.max(boundaries);
                }
            }
        }
    }
    let scale = r.total_steps as f64 / steps.max(1) as f64;
    let wall = r.total_steps as f64 * t;
    Timeline {
        wall_s: wall,
        step_s: t,
        compute_utilization: 1.0,
        up_bits: up.bits * scale,
        down_bits: down.bits * scale,
        peak_bps: up.peak_bps().max(down.peak_bps()),
        lag_steps: lag,
    }
}

/// Simulates `mode` on the resolved input.
pub(crate) fn timeline(r: &Resolved, mode: Mode) -> Timeline {
    let m = f64::from(r.learners);
    let ring = 2.0 * (m - 1.0) / m;
    let ring_latency = 2.0 * (m - 1.0) * r.one_way_s;
    match mode {
        Mode::Dp => lockstep(
            r,
            &LockStep {
                period: 1,
                fragments: 1,
                tau: 0,
                bits: ring * r.params * r.dp_bits,
                latency_s: ring_latency,
                launch_at: 1.0 - r.dp_overlap,
            },
        ),
        Mode::Diloco => lockstep(
            r,
            &LockStep {
                period: r.diloco_h,
                fragments: 1,
                tau: 0,
                bits: ring * r.params * r.up_bits,
                latency_s: ring_latency,
                launch_at: 1.0,
            },
        ),
        Mode::Streaming => lockstep(
            r,
            &LockStep {
                period: r.h,
                fragments: r.fragments,
                tau: r.tau,
                bits: ring * r.params / f64::from(r.fragments) * r.up_bits,
                latency_s: ring_latency,
                launch_at: 1.0,
            },
        ),
        Mode::Decoupled => decoupled(r),
    }
}

/// Whether `mode` meets its bandwidth target on `r`: compute utilisation ≥ `target`, and for
/// Decoupled (which never idles) fragments applied within τ steps.
pub(crate) fn meets(r: &Resolved, mode: Mode, target: f64) -> bool {
    let tl = timeline(r, mode);
    match mode {
        Mode::Decoupled => tl.lag_steps <= u64::from(r.tau.max(1)),
        _ => tl.compute_utilization >= target,
    }
}

/// The lowest link rate (Gbit/s) at which `mode` meets `target` (see [`meets`]), by bisection
/// on a log scale between 1 Mbit/s and 100 Tbit/s; `None` if even 100 Tbit/s is not enough
/// (latency-bound) or the mode does not use the links (one learner).
pub(crate) fn gbps_needed(r: &Resolved, mode: Mode, target: f64) -> Option<f64> {
    if r.learners < 2 {
        return None;
    }
    let at = |gbps: f64| Resolved {
        rate_bps: gbps * 1e9,
        ..r.clone()
    };
    let (mut lo, mut hi) = (1e-3f64, 1e5f64);
    if !meets(&at(hi), mode, target) {
        return None;
    }
    if meets(&at(lo), mode, target) {
        return Some(lo);
    }
    // Utilisation only grows with the rate, so the boundary is unique; 40 halvings of the
    // log-range pin it to 0.001 %.
    for _ in 0..40 {
        let mid = (lo * hi).sqrt();
        if meets(&at(mid), mode, target) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{Codec, PlanInput};

    fn resolved(f: impl FnOnce(&mut PlanInput)) -> Resolved {
        let mut input = PlanInput::default();
        f(&mut input);
        input.resolve().expect("valid test input")
    }

    #[test]
    fn dp_step_is_compute_or_all_reduce() {
        let r = resolved(|_| {});
        let tl = timeline(&r, Mode::Dp);
        let v = 1.5 * r.params * 16.0; // ring 2·3/4, bf16
        let expected = (r.step_compute_s / 3.0 + v / 2e9 + 6.0 * 0.02).max(r.step_compute_s);
        assert!(
            (tl.step_s - expected).abs() < 1e-4 * expected,
            "{} vs {expected}",
            tl.step_s
        );
        assert!((tl.up_bits - v * r.total_steps as f64).abs() < 1e-6 * tl.up_bits);
        assert_eq!(tl.peak_bps, 2e9, "a 144 s all-reduce fills the link");
        // On a fat link the all-reduce hides behind the backward pass.
        let fast = resolved(|i| i.link_rate_gbps = 1e5);
        let tl = timeline(&fast, Mode::Dp);
        assert!(tl.compute_utilization > 0.99, "{}", tl.compute_utilization);
    }

    #[test]
    fn one_learner_sends_nothing() {
        let r = resolved(|i| i.learners = 1);
        for mode in Mode::ALL {
            let tl = timeline(&r, mode);
            assert_eq!(tl.up_bits, 0.0, "{mode:?}");
            assert!((tl.compute_utilization - 1.0).abs() < 1e-12, "{mode:?}");
        }
        assert_eq!(gbps_needed(&r, Mode::Dp, 0.9), None);
    }

    #[test]
    fn diloco_blocks_for_the_whole_model_every_h_steps() {
        let r = resolved(|i| i.diloco_h = Some(100));
        let tl = timeline(&r, Mode::Diloco);
        let sync = 1.5 * r.params * 4.125 / 2e9 + 6.0 * 0.02;
        let expected = r.step_compute_s + sync / 100.0;
        assert!(
            (tl.step_s - expected).abs() < 1e-4 * expected,
            "{} vs {expected}",
            tl.step_s
        );
    }

    #[test]
    fn streaming_blocks_only_when_the_transfer_outlasts_the_overlap() {
        // One fragment per step, each ≈ 1.5 × 12e9/24 × 4.125 bit = 3.1 Gbit per link.
        let compute = |gbps: f64, tau: u32| {
            let r = resolved(|i| {
                i.link_rate_gbps = gbps;
                i.tau = tau;
            });
            timeline(&r, Mode::Streaming).compute_utilization
        };
        // 20 Gbit/s: 0.15 s per fragment, hidden behind a 3 s step.
        assert!(compute(20.0, 1) > 0.999);
        // 2 Gbit/s: 1.6 s per fragment. With τ = 1 it hides behind one 3 s step; with τ = 0
        // every step waits for its own fragment.
        assert!(compute(2.0, 1) > 0.999);
        let blocked = compute(2.0, 0);
        let r = resolved(|_| {});
        let frag = 1.5 * r.params / 24.0 * 4.125 / 2e9 + 0.12;
        let expected = r.step_compute_s / (r.step_compute_s + frag);
        assert!((blocked - expected).abs() < 1e-3, "{blocked} vs {expected}");
        // 0.4 Gbit/s: 7.7 s of link time per 3 s step, whatever τ: the link sets the pace.
        let saturated = compute(0.4, 2);
        assert!(saturated < 0.45, "{saturated}");
    }

    #[test]
    fn decoupled_never_idles_but_lags_on_a_thin_link() {
        let ok = resolved(|_| {});
        let tl = timeline(&ok, Mode::Decoupled);
        assert_eq!(tl.compute_utilization, 1.0);
        assert!(tl.lag_steps <= 2, "lag {}", tl.lag_steps);
        // Up and down: one fragment each per step.
        let frag_bits = ok.params / 24.0 * 4.125;
        assert!((tl.up_bits - frag_bits * ok.total_steps as f64).abs() < 1e-6 * tl.up_bits);
        assert!((tl.peak_bps - frag_bits / ok.step_compute_s).abs() < 0.01 * tl.peak_bps);
        let thin = resolved(|i| i.link_rate_gbps = 0.2);
        let tl = timeline(&thin, Mode::Decoupled);
        assert_eq!(tl.compute_utilization, 1.0);
        assert!(
            tl.lag_steps > 20,
            "queued fragments fall behind: lag {}",
            tl.lag_steps
        );
        let bf16_down = resolved(|i| i.down_codec = Some(Codec::Bf16));
        let tl = timeline(&bf16_down, Mode::Decoupled);
        assert!((tl.down_bits / tl.up_bits - 16.0 / 4.125).abs() < 1e-9);
    }

    #[test]
    fn bandwidth_search_brackets_the_target() {
        let r = resolved(|_| {});
        for mode in [Mode::Dp, Mode::Streaming, Mode::Diloco] {
            let g = gbps_needed(&r, mode, 0.9).expect("reachable");
            let at = |gbps: f64| Resolved {
                rate_bps: gbps * 1e9,
                ..r.clone()
            };
            assert!(meets(&at(g * 1.001), mode, 0.9), "{mode:?} at {g}");
            assert!(!meets(&at(g * 0.99), mode, 0.9), "{mode:?} below {g}");
        }
        let dp = gbps_needed(&r, Mode::Dp, 0.9).expect("dp");
        let dec = gbps_needed(&r, Mode::Decoupled, 0.9).expect("decoupled");
        assert!(dp / dec > 100.0, "dp {dp} decoupled {dec}");
    }

    #[test]
    fn mode_names_match_plan_json_and_the_recipes() {
        let names: Vec<String> = Mode::ALL
            .iter()
            .map(|m| serde_json::to_string(m).expect("mode"))
            .collect();
        assert_eq!(
            names,
            ["\"dp\"", "\"diloco\"", "\"streaming\"", "\"decoupled\""]
        );
        let ddp: Mode = serde_json::from_str("\"ddp\"").expect("recipe name");
        assert_eq!(ddp, Mode::Dp);
    }

    #[test]
    fn offsets_spread_fragments_over_the_period() {
        assert_eq!(due_offsets(1, 500), vec![499]);
        assert_eq!(due_offsets(4, 4), vec![0, 1, 2, 3]);
        assert_eq!(due_offsets(8, 100), vec![11, 24, 36, 49, 61, 74, 86, 99]);
        assert_eq!(due_per_phase(6, 4), vec![2, 2, 1, 1]);
        assert_eq!(window_steps(1, 1_000_000), 200);
        assert_eq!(window_steps(500, 1_000_000), 2000);
        assert_eq!(window_steps(24, 10), 10);
    }
}
