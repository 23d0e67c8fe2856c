//! A congestion controller for provisioned inter-region links: it sends at the rate the link
//! was bought for instead of probing for it.
//!
//! Loss-based controllers read every lost packet as congestion. On a 2 Gbps, 40 ms path the
//! window is ~7,000 packets, and after one cut CUBIC needs seconds to grow back, so 0.1% random
//! loss holds a single connection to a few percent of the link (the Mathis bound). A dedicated
//! link is not shared with strangers; its loss is mostly not congestion. This controller keeps
//! the window at 1.25× the bandwidth-delay product of the configured rate and the minimum RTT
//! (quinn's pacer then sends at the link rate with a small standing queue), ignores sparse loss,
//! and backs off only when loss is heavy enough to mean the link is really smaller or shared:
//! more than [`HEAVY_LOSS`] of an epoch's bytes (an epoch lasts several round trips and at least
//! [`MIN_EPOCH_PACKETS`] packets) cut the target rate by 20%, and each clean epoch
//! gives back 5% of the configured rate. Persistent congestion (an outage) restarts from a
//! small window that doubles every round trip.

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Loss fraction of an epoch above which the link counts as congested.
pub const HEAVY_LOSS: f64 = 0.03;
/// The window over the bandwidth-delay product: room for the pacer's 25% burst allowance.
const WINDOW_GAIN: f64 = 1.25;
/// Never below this fraction of the configured rate.
const MIN_RATE_FRACTION: f64 = 0.05;
const MIN_WINDOW_PACKETS: u64 = 16;
/// An epoch is judged only once it has seen this many packets' worth of bytes (it runs on past
/// its length until then). A loss fraction from a handful of packets is noise: at 1% random
/// loss an epoch of 30 packets loses one (3.3%, past [`HEAVY_LOSS`]) about one time in four,
/// which the transfers' short tails (or a sender held up by a busy machine) produced. With 500
/// packets, 1% loss reads as heavy about once in 10⁴ epochs.
const MIN_EPOCH_PACKETS: u64 = 500;

/// Builds [`Provisioned`] controllers for a link of `rate_bps`.
#[derive(Debug, Clone, Copy)]
pub struct ProvisionedConfig {
    pub rate_bps: f64,
    /// The RTT assumed until the first acknowledgement measures it.
    pub initial_rtt: Duration,
}

impl ControllerFactory for ProvisionedConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Provisioned::new(*self, now, current_mtu))
    }
}

#[derive(Debug, Clone)]
pub struct Provisioned {
    config: ProvisionedConfig,
    mtu: u16,
    min_rtt: Duration,
    /// The rate aimed at: the configured one unless heavy loss said otherwise.
    target_bps: f64,
    /// While recovering from persistent congestion: the slow-start window.
    ramp: Option<u64>,
    epoch_start: Instant,
    epoch_acked: u64,
    epoch_lost: u64,
}

impl Provisioned {
    pub fn new(config: ProvisionedConfig, now: Instant, mtu: u16) -> Self {
        Provisioned {
            config,
            mtu,
            min_rtt: config.initial_rtt,
            target_bps: config.rate_bps,
            ramp: None,
            epoch_start: now,
            epoch_acked: 0,
            epoch_lost: 0,
        }
    }

    /// The rate aimed at now, in bits per second.
    pub fn target_bps(&self) -> f64 {
        self.target_bps
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu as u64
    }

    fn target_window(&self) -> u64 {
        let bdp = self.target_bps / 8.0 * self.min_rtt.as_secs_f64();
        ((bdp * WINDOW_GAIN) as u64).max(self.min_window())
    }

    /// Several round trips, so that an epoch sees enough packets to measure 0.1% loss.
    fn epoch_length(&self) -> Duration {
        (4 * self.min_rtt).max(Duration::from_millis(50))
    }

    fn end_epoch_if_due(&mut self, now: Instant) {
        let total = self.epoch_acked + self.epoch_lost;
        if now.saturating_duration_since(self.epoch_start) < self.epoch_length()
            || total < MIN_EPOCH_PACKETS * self.mtu as u64
        {
            return;
        }
        let loss = self.epoch_lost as f64 / total as f64;
        let configured = self.config.rate_bps;
        self.target_bps = if loss > HEAVY_LOSS {
            (self.target_bps * 0.8).max(configured * MIN_RATE_FRACTION)
        } else {
            (self.target_bps + 0.05 * configured).min(configured)
        };
        self.epoch_start = now;
        self.epoch_acked = 0;
        self.epoch_lost = 0;
    }

    fn on_acked(&mut self, now: Instant, bytes: u64, min_rtt: Duration) {
        self.min_rtt = min_rtt;
        self.epoch_acked += bytes;
        if let Some(ramp) = self.ramp.as_mut() {
            *ramp += bytes;
            if *ramp >= self.target_window() {
                self.ramp = None;
            }
        }
        self.end_epoch_if_due(now);
    }
}

impl Controller for Provisioned {
    fn on_ack(
        &mut self,
        now: Instant,
        _sent: Instant,
        bytes: u64,
        _app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.on_acked(now, bytes, rtt.min());
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.epoch_lost += lost_bytes;
        if is_persistent_congestion {
            self.ramp = Some(self.min_window());
        }
        self.end_epoch_if_due(now);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
    }

    fn window(&self) -> u64 {
        let target = self.target_window();
        self.ramp.map_or(target, |r| r.min(target))
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.target_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (Provisioned, Instant) {
        let now = Instant::now();
        let config = ProvisionedConfig {
            rate_bps: 2e9,
            initial_rtt: Duration::from_millis(40),
        };
        (Provisioned::new(config, now, 1200), now)
    }

    /// Acknowledges `acked` and loses `lost` bytes over one epoch, ending it.
    fn epoch(c: &mut Provisioned, now: &mut Instant, acked: u64, lost: u64) {
        c.epoch_acked += acked;
        c.epoch_lost += lost;
        *now += c.epoch_length();
        c.end_epoch_if_due(*now);
    }

    #[test]
    fn the_window_is_the_configured_bdp_with_headroom() {
        let (c, _) = controller();
        // 2 Gbit/s × 40 ms = 10 MB; × 1.25.
        assert_eq!(c.window(), 12_500_000);
        assert_eq!(c.initial_window(), c.window());
    }

    #[test]
    fn sparse_loss_keeps_the_rate_and_heavy_loss_cuts_it() {
        let (mut c, mut now) = controller();
        for _ in 0..10 {
            epoch(&mut c, &mut now, 99_000_000, 1_000_000); // 1% loss
        }
        assert_eq!(c.target_bps(), 2e9);
        epoch(&mut c, &mut now, 90_000_000, 10_000_000); // 10% loss
        assert!((c.target_bps() - 1.6e9).abs() < 1.0);
        epoch(&mut c, &mut now, 90_000_000, 10_000_000);
        assert!((c.target_bps() - 1.28e9).abs() < 1.0);
        // Clean epochs give back 5% of the configured rate each, up to the configured rate.
        epoch(&mut c, &mut now, 100_000_000, 0);
        assert!((c.target_bps() - 1.38e9).abs() < 1.0);
        for _ in 0..20 {
            epoch(&mut c, &mut now, 100_000_000, 0);
        }
        assert_eq!(c.target_bps(), 2e9);
        // Never below 5% of the configured rate.
        for _ in 0..100 {
            epoch(&mut c, &mut now, 1_000_000, 1_000_000);
        }
        assert!((c.target_bps() - 1e8).abs() < 1.0);
    }

    /// A loss among a few packets is no measure of the link: the epoch runs on until it has seen
    /// enough of them, and is then judged on all it saw.
    #[test]
    fn a_loss_among_few_packets_cuts_nothing_until_the_epoch_has_enough() {
        let (mut c, mut now) = controller();
        // 30 packets, one lost (3.3%), over a whole epoch's length: not judged yet.
        epoch(&mut c, &mut now, 29 * 1200, 1200);
        assert_eq!(c.target_bps(), 2e9);
        assert_eq!(c.epoch_lost, 1200, "the epoch goes on");
        // Then 470 clean packets: 1 lost in 500 (0.2%) is sparse loss.
        epoch(&mut c, &mut now, 470 * 1200, 0);
        assert_eq!(c.target_bps(), 2e9);
        assert_eq!(
            (c.epoch_acked, c.epoch_lost),
            (0, 0),
            "judged and restarted"
        );
        // Heavy loss over enough packets still cuts: 50 lost in 500.
        epoch(&mut c, &mut now, 450 * 1200, 50 * 1200);
        assert!((c.target_bps() - 1.6e9).abs() < 1.0);
    }

    #[test]
    fn persistent_congestion_restarts_from_a_small_window_that_grows_back() {
        let (mut c, now) = controller();
        c.on_congestion_event(now, now, true, 1200);
        assert_eq!(c.window(), 16 * 1200);
        let rtt = Duration::from_millis(40);
        let mut rounds = 0;
        while c.window() < 12_500_000 {
            // A round trip acknowledges the whole window: it doubles.
            let before = c.window();
            c.on_acked(now, before, rtt);
            assert!(
                c.window() == (2 * before).min(12_500_000),
                "{before} -> {}",
                c.window()
            );
            rounds += 1;
        }
        assert_eq!(c.window(), 12_500_000);
        // 19,200 B to 12.5 MB by doubling: 10 round trips.
        assert_eq!(rounds, 10);
    }
}
