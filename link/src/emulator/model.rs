//! The link's behaviour without any I/O: given a packet's arrival time and size, [`LinkModel`]
//! decides whether it is dropped (outage, full queue, random loss) or when it comes out at the
//! far end. Time is explicit (a [`Duration`] since the emulator started), so tests drive it with
//! virtual time and get exact, reproducible answers; the relay feeds it `Instant::elapsed()`.
//!
//! Per direction, a packet goes through:
//! 0. **MTU**: dropped if it would not fit the path's MTU (its payload plus 28 bytes of IPv4 and
//!    UDP headers), as a router on a path without fragmentation drops it; this is what QUIC's
//!    path-MTU discovery probes for;
//! 1. **outage**: dropped if it arrives during a scheduled outage;
//! 2. **bottleneck queue** (drop-tail): dropped if the bytes still waiting for transmission plus
//!    this packet exceed `queue_limit_bytes` (a packet arriving at an empty queue always fits);
//! 3. **token bucket**: the packet leaves the bottleneck once the bucket (filled at `rate`, at
//!    most `burst_bytes` deep) holds its size. With a depth of one packet or less this is a link
//!    serialising at `rate`, the packet leaving when its last bit is sent;
//! 4. **random loss**: dropped with probability `loss`, after it used the link's capacity (as a
//!    corrupted frame on a real wire does);
//! 5. **delay line**: it arrives at the far end `delay ± jitter` after leaving the bottleneck
//!    (uniform jitter), but never before the previous packet. Jitter therefore delays packets
//!    without reordering them: WAN paths rarely reorder, and QUIC would count every reordered
//!    packet beyond its threshold as a loss, which would make jitter act as extra loss;
//! 6. **outage again**: dropped if it would arrive during an outage (the link was cut while it was
//!    in flight).
//!
//! Rates count UDP payload bytes (no IP/UDP headers), so a `2gbps` link carries 2 Gbit/s of
//! datagrams.

use super::spec::Outage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::time::Duration;

/// One direction of a link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// Bits per second; `None`: unlimited (no bottleneck queue either).
    pub rate_bps: Option<u64>,
    /// One-way propagation delay.
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability of losing each packet.
    pub loss: f64,
    /// Bytes that may wait for transmission at the bottleneck.
    pub queue_limit_bytes: u64,
    /// Depth of the token bucket: bytes that may leave back-to-back after an idle period.
    pub burst_bytes: u64,
    pub outages: Vec<Outage>,
    /// The largest IP packet the path carries, headers included.
    pub mtu: u32,
}

/// IPv4 (20) + UDP (8) headers, which count against the path MTU.
pub const IPV4_UDP_HEADERS: u32 = 28;

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            rate_bps: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            queue_limit_bytes: u64::MAX,
            burst_bytes: 0,
            outages: Vec::new(),
            mtu: u32::MAX,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Mtu,
    Outage,
    Queue,
    Loss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The packet reaches the far end at this time.
    Deliver(Duration),
    Drop(DropReason),
}

/// What one direction did, by packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub offered_packets: u64,
    pub offered_bytes: u64,
    /// Accepted for delivery (scheduled on the delay line).
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    pub dropped_mtu: u64,
    pub dropped_outage: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
}

/// The sans-IO state of one direction.
#[derive(Debug, Clone)]
pub struct LinkModel {
    params: LinkParams,
    /// Nanoseconds of transmission per byte (0 when unlimited).
    ns_per_byte: f64,
    /// Token-bucket state as a virtual time, in ns: when the link will have sent everything
    /// accepted so far (the bucket is full again from then on). Floating point so that the
    /// fractional-nanosecond serialisation times of multi-Gbps links do not accumulate drift.
    full_at: f64,
    /// Arrival time of the latest delivered packet, which later ones may not overtake.
    last_delivery: Duration,
    rng: ChaCha8Rng,
    counters: Counters,
}

impl LinkModel {
    pub fn new(params: LinkParams, seed: u64) -> Self {
        let ns_per_byte = match params.rate_bps {
            Some(bps) if bps > 0 => 8e9 / bps as f64,
            _ => 0.0,
        };
        LinkModel {
            params,
            ns_per_byte,
            full_at: 0.0,
            last_delivery: Duration::ZERO,
            rng: ChaCha8Rng::seed_from_u64(seed),
            counters: Counters::default(),
        }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether `t` falls inside a scheduled outage.
    pub fn in_outage(&self, t: Duration) -> bool {
        self.params.outages.iter().any(|o| o.at <= t && t < o.end())
    }

    /// Bytes waiting for transmission at time `now` (beyond what the bucket's burst covers).
    pub fn queued_bytes(&self, now: Duration) -> u64 {
        if self.ns_per_byte == 0.0 {
            return 0;
        }
        let behind_ns = (self.full_at - now.as_nanos() as f64).max(0.0);
        let waiting = behind_ns / self.ns_per_byte - self.params.burst_bytes as f64;
        waiting.max(0.0).round() as u64
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`. Calls must come in
    /// non-decreasing `now`.
    pub fn offer(&mut self, now: Duration, len: usize) -> Verdict {
        let c = &mut self.counters;
        c.offered_packets += 1;
        c.offered_bytes += len as u64;
        if (len as u64).saturating_add(IPV4_UDP_HEADERS as u64) > self.params.mtu as u64 {
            c.dropped_mtu += 1;
            return Verdict::Drop(DropReason::Mtu);
        }
        if self.in_outage(now) {
            self.counters.dropped_outage += 1;
            return Verdict::Drop(DropReason::Outage);
        }
        let departure = if self.ns_per_byte > 0.0 {
            let queued = self.queued_bytes(now);
            if queued > 0 && queued + len as u64 > self.params.queue_limit_bytes {
                self.counters.dropped_queue += 1;
                return Verdict::Drop(DropReason::Queue);
            }
            // `full_at` is when a link serialising at `rate` would have sent everything
            // accepted, this packet included; the bucket lets a packet leave up to `burst`
            // bytes' worth of time ahead of that schedule (and never before it arrived).
            let t = now.as_nanos() as f64;
            let burst_ns = self.params.burst_bytes as f64 * self.ns_per_byte;
            self.full_at = self.full_at.max(t) + len as f64 * self.ns_per_byte;
            let leave = t.max(self.full_at - burst_ns);
            Duration::from_nanos(leave.ceil() as u64)
        } else {
            now
        };
        if self.params.loss > 0.0 && self.rng.random::<f64>() < self.params.loss {
            self.counters.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }
        let mut arrival = departure + self.params.delay;
        if !self.params.jitter.is_zero() {
            let j = self.params.jitter.as_nanos() as i64;
            let offset = self.rng.random_range(-j..=j);
            arrival = if offset >= 0 {
                arrival + Duration::from_nanos(offset as u64)
            } else {
                // Jitter never makes a packet arrive before it left the bottleneck.
                arrival
                    .saturating_sub(Duration::from_nanos(offset.unsigned_abs()))
                    .max(departure)
            };
        }
        let arrival = arrival.max(self.last_delivery);
        if self.in_outage(arrival) {
            self.counters.dropped_outage += 1;
            return Verdict::Drop(DropReason::Outage);
        }
        self.last_delivery = arrival;
        self.counters.delivered_packets += 1;
        self.counters.delivered_bytes += len as u64;
        Verdict::Deliver(arrival)
    }
}

/// Packets on their way, in delivery order. The model never lets a packet overtake another, so a
/// FIFO suffices: releasing everything due is a pop from the front, and one timer per direction
/// (the front's due time) replaces one timer per packet.
#[derive(Debug)]
pub struct DelayLine<T> {
    queue: VecDeque<(Duration, T)>,
    bytes: u64,
}

impl<T> Default for DelayLine<T> {
    fn default() -> Self {
        DelayLine {
            queue: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T> DelayLine<T> {
    /// Appends a packet due at `at`, which must not be earlier than the last one pushed (it is
    /// moved to that time if it is, keeping the order).
    pub fn push(&mut self, at: Duration, len: usize, item: T) {
        let at = self.queue.back().map_or(at, |(last, _)| at.max(*last));
        self.bytes += len as u64;
        self.queue.push_back((at, item));
    }

    /// When the next packet is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.queue.front().map(|(at, _)| *at)
    }

    /// The `i`-th packet from the front if it is due at `now`.
    pub fn peek_due(&self, now: Duration, i: usize) -> Option<&T> {
        self.queue
            .get(i)
            .and_then(|(at, item)| (*at <= now).then_some(item))
    }

    /// Removes the front packet if it is due at `now`; `len` is its size, for the byte count.
    pub fn pop_due(&mut self, now: Duration, len: impl Fn(&T) -> usize) -> Option<T> {
        if self.queue.front()?.0 > now {
            return None;
        }
        let (_, item) = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(len(&item) as u64);
        Some(item)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes on their way.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    /// 8 Mbit/s: exactly one byte per microsecond, so expected times are easy to write.
    fn eight_mbps() -> LinkParams {
        LinkParams {
            rate_bps: Some(8_000_000),
            delay: 10 * MS,
            ..LinkParams::default()
        }
    }

    fn at(v: Verdict) -> Duration {
        match v {
            Verdict::Deliver(t) => t,
            Verdict::Drop(r) => panic!("dropped: {r:?}"),
        }
    }

    /// A datagram whose IP packet exceeds the MTU never reaches the far end and takes no link time.
    #[test]
    fn packets_beyond_the_mtu_are_dropped() {
        let mut m = LinkModel::new(
            LinkParams {
                mtu: 1500,
                ..eight_mbps()
            },
            1,
        );
        assert_eq!(at(m.offer(Duration::ZERO, 1472)), 1472 * US + 10 * MS);
        assert_eq!(
            m.offer(Duration::ZERO, 1473),
            Verdict::Drop(DropReason::Mtu)
        );
        assert_eq!(m.queued_bytes(Duration::ZERO), 1472);
        let c = m.counters();
        assert_eq!(
            (c.offered_packets, c.delivered_packets, c.dropped_mtu),
            (2, 1, 1)
        );
    }

    #[test]
    fn serialisation_and_delay() {
        let mut m = LinkModel::new(eight_mbps(), 1);
        // Three back-to-back 1000-byte packets leave at 1, 2 and 3 ms, then travel 10 ms.
        assert_eq!(at(m.offer(Duration::ZERO, 1000)), 11 * MS);
        assert_eq!(at(m.offer(Duration::ZERO, 1000)), 12 * MS);
        assert_eq!(at(m.offer(Duration::ZERO, 1000)), 13 * MS);
        assert_eq!(m.queued_bytes(Duration::ZERO), 3000);
        assert_eq!(m.queued_bytes(2500 * US), 500);
        // After the link went idle a packet is sent at once.
        assert_eq!(at(m.offer(20 * MS, 500)), 20 * MS + 500 * US + 10 * MS);
    }

    #[test]
    fn token_bucket_burst() {
        let mut m = LinkModel::new(
            LinkParams {
                burst_bytes: 3000,
                delay: Duration::ZERO,
                ..eight_mbps()
            },
            1,
        );
        // A full bucket of 3000 bytes lets three 1000-byte packets through at once...
        for _ in 0..3 {
            assert_eq!(at(m.offer(Duration::ZERO, 1000)), Duration::ZERO);
        }
        // ...then the fourth waits for 1000 bytes of tokens.
        assert_eq!(at(m.offer(Duration::ZERO, 1000)), MS);
        // 10 ms later the bucket is full again.
        for _ in 0..3 {
            assert_eq!(at(m.offer(20 * MS, 1000)), 20 * MS);
        }
    }

    #[test]
    fn long_run_rate_is_exact() {
        // 100 Mbit/s, offered 1200-byte packets at 150 Mbit/s for one second of virtual time
        // with a generous queue: the delivered bytes leave at exactly the configured rate.
        let mut m = LinkModel::new(
            LinkParams {
                rate_bps: Some(100_000_000),
                queue_limit_bytes: 1 << 30,
                ..LinkParams::default()
            },
            1,
        );
        let gap = Duration::from_nanos((1200.0 * 8.0 / 150e6 * 1e9) as u64);
        let mut t = Duration::ZERO;
        let mut last = Duration::ZERO;
        let mut n = 0u64;
        while t < Duration::from_secs(1) {
            last = at(m.offer(t, 1200));
            n += 1;
            t += gap;
        }
        let rate = (n * 1200 * 8) as f64 / last.as_secs_f64();
        assert!((rate - 100e6).abs() < 1e3, "rate {rate}");
    }

    #[test]
    fn drop_tail_queue() {
        let mut m = LinkModel::new(
            LinkParams {
                queue_limit_bytes: 2500,
                ..eight_mbps()
            },
            1,
        );
        assert!(matches!(m.offer(Duration::ZERO, 1000), Verdict::Deliver(_)));
        assert!(matches!(m.offer(Duration::ZERO, 1000), Verdict::Deliver(_)));
        // 2000 queued + 1000 > 2500.
        assert_eq!(
            m.offer(Duration::ZERO, 1000),
            Verdict::Drop(DropReason::Queue)
        );
        // A smaller one still fits, and after 1 ms of draining a full-size one does again.
        assert!(matches!(m.offer(Duration::ZERO, 500), Verdict::Deliver(_)));
        assert_eq!(m.offer(Duration::ZERO, 1), Verdict::Drop(DropReason::Queue));
        assert_eq!(at(m.offer(MS + 500 * US, 1000)), 3500 * US + 10 * MS);
        let c = m.counters();
        assert_eq!((c.delivered_packets, c.dropped_queue), (4, 2));
        // A packet larger than the whole queue still passes an empty queue.
        let mut m = LinkModel::new(
            LinkParams {
                queue_limit_bytes: 100,
                ..eight_mbps()
            },
            1,
        );
        assert!(matches!(m.offer(Duration::ZERO, 1500), Verdict::Deliver(_)));
    }

    #[test]
    fn loss_is_binomial_and_reproducible() {
        let params = LinkParams {
            loss: 0.01,
            ..LinkParams::default()
        };
        let run = |seed| {
            let mut m = LinkModel::new(params.clone(), seed);
            (0..100_000)
                .map(|i| m.offer(Duration::from_micros(i), 1200))
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        let lost = a
            .iter()
            .filter(|v| **v == Verdict::Drop(DropReason::Loss))
            .count() as f64;
        // Expected 1000, σ = √(n p (1 − p)) ≈ 31.5; allow 5σ.
        assert!((lost - 1000.0).abs() < 5.0 * 31.5, "lost {lost}");
        // Survivors are delayed by nothing here, so they arrive when offered.
        assert!(a
            .iter()
            .enumerate()
            .all(|(i, v)| matches!(v, Verdict::Drop(_))
                || *v == Verdict::Deliver(Duration::from_micros(i as u64))));
    }

    #[test]
    fn outages() {
        let mut m = LinkModel::new(
            LinkParams {
                delay: 10 * MS,
                outages: vec![Outage {
                    at: Duration::from_secs(1),
                    duration: Duration::from_secs(2),
                }],
                ..LinkParams::default()
            },
            1,
        );
        assert_eq!(at(m.offer(Duration::from_millis(900), 100)), 910 * MS);
        // In flight when the link is cut: lost.
        assert_eq!(
            m.offer(Duration::from_millis(995), 100),
            Verdict::Drop(DropReason::Outage)
        );
        assert_eq!(
            m.offer(Duration::from_millis(1500), 100),
            Verdict::Drop(DropReason::Outage)
        );
        assert_eq!(
            m.offer(Duration::from_millis(2999), 100),
            Verdict::Drop(DropReason::Outage)
        );
        // The outage ends at 3 s exactly.
        assert_eq!(at(m.offer(Duration::from_secs(3), 100)), 3010 * MS);
        assert_eq!(m.counters().dropped_outage, 3);
    }

    #[test]
    fn jitter_stays_in_bounds_and_keeps_order() {
        let mut m = LinkModel::new(
            LinkParams {
                delay: 20 * MS,
                jitter: 2 * MS,
                ..LinkParams::default()
            },
            3,
        );
        let mut prev = Duration::ZERO;
        let mut spread = (Duration::MAX, Duration::ZERO);
        for i in 0..10_000u64 {
            // One packet every 5 ms: far enough apart that order never binds.
            let t = Duration::from_millis(5 * i);
            let a = at(m.offer(t, 100));
            assert!(a >= prev);
            let d = a - t;
            assert!(d >= 18 * MS && d <= 22 * MS, "delay {d:?}");
            spread = (spread.0.min(d), spread.1.max(d));
            prev = a;
        }
        // Uniform over ±2 ms: both ends are reached closely.
        assert!(spread.0 < 18100 * US && spread.1 > 21900 * US, "{spread:?}");
        // Packets 10 µs apart with ±2 ms jitter would reorder; they are held in order instead.
        let mut prev = Duration::ZERO;
        for i in 0..1000u64 {
            let a = at(m.offer(Duration::from_secs(60) + 10 * US * i as u32, 100));
            assert!(a >= prev);
            prev = a;
        }
    }

    #[test]
    fn delay_line_releases_due_packets_in_order() {
        let mut line = DelayLine::default();
        line.push(5 * MS, 10, "a");
        line.push(7 * MS, 20, "b");
        line.push(6 * MS, 30, "c"); // earlier than b: kept behind it
        assert_eq!(line.next_due(), Some(5 * MS));
        assert_eq!(line.bytes(), 60);
        assert_eq!(line.pop_due(4 * MS, |_| 10), None);
        assert_eq!(line.peek_due(7 * MS, 1), Some(&"b"));
        assert_eq!(line.peek_due(6 * MS, 1), None);
        assert_eq!(line.pop_due(7 * MS, |_| 10), Some("a"));
        assert_eq!(line.pop_due(7 * MS, |_| 20), Some("b"));
        assert_eq!(line.next_due(), Some(7 * MS));
        assert_eq!(line.pop_due(7 * MS, |_| 30), Some("c"));
        assert!(line.is_empty());
        assert_eq!(line.bytes(), 0);
    }
}
