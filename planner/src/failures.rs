//! The failure model: chip interruptions as a Poisson process, and what one costs a job.
//!
//! Every chip fails at rate 1/MTBI. The union of N independent Poisson processes is one Poisson
//! process of rate N/MTBI, so a failure domain of 1.2M chips is simulated as a single stream of
//! failures (one event per failure, not per chip): that is exact, not an approximation, and is
//! what keeps the simulation of millions of chips cheap.
//!
//! A *failure domain* is the set of chips one failure stops: the whole job for DP and the
//! lock-step DiLoCo modes, a single learner for Decoupled DiLoCo. On a failure the domain
//!
//! * loses the progress since its last safe point — the last checkpoint for a job that
//!   restarts, the step in flight for one that re-meshes (elastic) or a Decoupled learner
//!   (which resumes from the syncer and a healthy peer, not from a checkpoint);
//! * pauses for `restart_s` (restart) or `reconfigure_s` (elastic re-mesh).
//!
//! Chips do not fail while their domain is paused (they are idle). With progress committed in
//! units of `c` seconds, the expected goodput of a domain is then exactly
//! `λc / ((e^{λc} − 1)(1 + λ·pause))` (renewal argument: a unit of work costs
//! `(1/λ + pause)(e^{λc} − 1)` seconds in expectation). [`analytic_goodput`] is that formula;
//! [`simulate_domain`] draws the same process event by event with a seeded generator, and the
//! tests check the two agree.

use serde::Serialize;

use crate::input::{PlanInput, SECONDS_PER_YEAR};

/// A small, seedable generator (SplitMix64): the planner must be deterministic and has no
/// dependency on `rand`.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so `-ln(u)` is finite.
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Exponential with the given rate (1/s).
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -self.next_open01().ln() / rate
    }
}

/// How one failure domain behaves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Domain {
    /// Failures per second of the whole domain (chips / MTBI).
    pub rate: f64,
    /// Pause per failure, s.
    pub pause_s: f64,
    /// Progress is committed in units of this many seconds (checkpoint interval or one step);
    /// a failure loses the uncommitted part.
    pub commit_s: f64,
}

/// Expected goodput (useful time / elapsed time) of a domain.
pub fn analytic_goodput(d: &Domain) -> f64 {
    if d.rate <= 0.0 {
        return 1.0;
    }
    let lc = d.rate * d.commit_s;
    // λc/(e^{λc} − 1) → 1 as c → 0; exp_m1 keeps it accurate for tiny λc.
    let lost = if lc > 0.0 { lc / lc.exp_m1() } else { 1.0 };
    lost / (1.0 + d.rate * d.pause_s)
}

/// What one simulated domain did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DomainRun {
    pub elapsed_s: f64,
    pub useful_s: f64,
    /// Time paused (restarting or re-meshing).
    pub paused_s: f64,
    pub failures: u64,
}

impl DomainRun {
    pub fn goodput(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.useful_s / self.elapsed_s
        } else {
            1.0
        }
    }
}

/// Draws the failure process of one domain for `horizon_s` of wall clock.
pub fn simulate_domain(d: &Domain, horizon_s: f64, rng: &mut SplitMix64) -> DomainRun {
    let mut run = DomainRun {
        elapsed_s: 0.0,
        useful_s: 0.0,
        paused_s: 0.0,
        failures: 0,
    };
    if d.rate <= 0.0 {
        run.elapsed_s = horizon_s;
        run.useful_s = horizon_s;
        return run;
    }
    while run.elapsed_s < horizon_s {
        let up = rng.exponential(d.rate);
        if run.elapsed_s + up >= horizon_s {
            // The run ends before the next failure: everything left is kept.
            run.useful_s += horizon_s - run.elapsed_s;
            run.elapsed_s = horizon_s;
            break;
        }
        // Each up period starts at a commit point (after a restart or re-mesh the domain
        // resumes from one), so the committed part is a whole number of units.
        let kept = if d.commit_s > 0.0 {
            (up / d.commit_s).floor() * d.commit_s
        } else {
            up
        };
        run.useful_s += kept;
        run.paused_s += d.pause_s;
        run.elapsed_s += up + d.pause_s;
        run.failures += 1;
    }
    run
}

/// The simulated horizon of a domain: the projected run, but at least `MIN_FAILURES` expected
/// failures (so that the goodput is a stable estimate of the expectation, not one lucky draw)
/// and at most `MAX_FAILURES` (beyond that the goodput estimate no longer moves, so a longer run
/// is extrapolated at the simulated rate instead of simulated: the one shortcut taken).
pub const MIN_FAILURES: f64 = 20_000.0;
pub const MAX_FAILURES: f64 = 1_000_000.0;

pub fn horizon_for(d: &Domain, run_s: f64) -> f64 {
    if d.rate <= 0.0 {
        return run_s.max(1.0);
    }
    run_s.clamp(MIN_FAILURES / d.rate, MAX_FAILURES / d.rate)
}

/// Goodput of a job made of `domains` identical, independent failure domains (one for DP,
/// M learners for Decoupled): simulated, expected, and the uptime (share of time at least one
/// domain is running).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GoodputEstimate {
    pub simulated: f64,
    pub analytic: f64,
    pub uptime: f64,
    /// Failures over the simulated horizon, all domains together.
    pub failures_simulated: u64,
    /// Expected failures over the projected run, all domains together.
    pub failures_expected: f64,
}

pub fn estimate(domain: &Domain, domains: u32, run_s: f64, seed: u64) -> GoodputEstimate {
    let horizon = horizon_for(domain, run_s);
    let mut useful = 0.0;
    let mut elapsed = 0.0;
    let mut all_down = 1.0;
    let mut failures = 0;
    for i in 0..domains {
        // Independent stream per domain, reproducible from the one seed.
        let mut rng =
            SplitMix64::new(seed ^ (u64::from(i) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let run = simulate_domain(domain, horizon, &mut rng);
        useful += run.useful_s;
        elapsed += run.elapsed_s;
        all_down *= run.paused_s / run.elapsed_s.max(f64::MIN_POSITIVE);
        failures += run.failures;
    }
    GoodputEstimate {
        simulated: useful / elapsed,
        analytic: analytic_goodput(domain),
        // Independence of the learners' outages: all are down at once with the product of
        // their down shares.
        uptime: 1.0 - all_down,
        failures_simulated: failures,
        failures_expected: domain.rate * f64::from(domains) * run_s,
    }
}

/// The rows of the paper's goodput table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Layout {
    /// One domain of every chip; a failure restarts the job from its last checkpoint.
    DpNoElastic,
    /// One domain of every chip; a failure pauses the job to re-mesh.
    DpElastic,
    /// M learners of N/M chips, each its own domain.
    Decoupled { learners: u32 },
}

impl Layout {
    pub fn label(&self) -> String {
        match self {
            Layout::DpNoElastic => "DP, no elasticity".to_string(),
            Layout::DpElastic => "DP, elastic".to_string(),
            Layout::Decoupled { learners } => format!("Decoupled M={learners}"),
        }
    }
}

/// The failure model's constants, taken from a [`PlanInput`], and the step time they apply to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FailureModel {
    /// Failures per chip per second.
    pub chip_rate: f64,
    pub restart_s: f64,
    pub checkpoint_interval_steps: u32,
    pub reconfigure_s: f64,
    pub learner_elastic: bool,
    /// Duration of one step (the unit of lost work), s.
    pub step_s: f64,
    pub seed: u64,
}

impl FailureModel {
    /// The model of `input` (which must be valid) at a given step time.
    pub fn from_input(input: &PlanInput, step_s: f64) -> Self {
        FailureModel {
            chip_rate: input
                .mtbi_chip_years
                .filter(|y| *y > 0.0)
                .map_or(0.0, |y| 1.0 / (y * SECONDS_PER_YEAR)),
            restart_s: input.restart_s,
            checkpoint_interval_steps: input.checkpoint_interval_steps.max(1),
            reconfigure_s: input.reconfigure_s,
            learner_elastic: input.learner_elastic,
            step_s,
            seed: input.seed,
        }
    }

    /// The failure domain of `layout` on `chips` chips, and how many of them there are.
    pub fn domain(&self, layout: Layout, chips: f64) -> (Domain, u32) {
        let restart = Domain {
            rate: self.chip_rate * chips,
            pause_s: self.restart_s,
            commit_s: self.step_s * f64::from(self.checkpoint_interval_steps),
        };
        let elastic = Domain {
            rate: self.chip_rate * chips,
            pause_s: self.reconfigure_s,
            commit_s: self.step_s,
        };
        match layout {
            Layout::DpNoElastic => (restart, 1),
            Layout::DpElastic => (elastic, 1),
            Layout::Decoupled { learners } => {
                let m = learners.max(1);
                let per = chips / f64::from(m);
                let d = if self.learner_elastic {
                    elastic
                } else {
                    // A restarted learner still resumes from a peer's current state, so it only
                    // loses the step in flight.
                    Domain {
                        pause_s: self.restart_s,
                        ..elastic
                    }
                };
                (
                    Domain {
                        rate: self.chip_rate * per,
                        ..d
                    },
                    m,
                )
            }
        }
    }

    /// Goodput of `layout` on `chips` chips over a run of `run_s` seconds.
    pub fn goodput(&self, layout: Layout, chips: f64, run_s: f64) -> GoodputEstimate {
        let (domain, n) = self.domain(layout, chips);
        let salt = match layout {
            Layout::DpNoElastic => 1,
            Layout::DpElastic => 2,
            Layout::Decoupled { learners } => 3 + u64::from(learners),
        };
        estimate(
            &domain,
            n,
            run_s,
            self.seed.wrapping_add(salt.wrapping_mul(0x9E37_79B9)),
        )
    }
}

/// One row of a goodput table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GoodputRow {
    pub layout: Layout,
    pub label: String,
    /// One estimate per chip count, in the order asked.
    pub cells: Vec<GoodputEstimate>,
}

/// The goodput table: `layouts` × `chips`, each cell simulated for `run_s` (at least
/// [`MIN_FAILURES`] failures per domain).
pub fn goodput_table(
    model: &FailureModel,
    layouts: &[Layout],
    chips: &[u64],
    run_s: f64,
) -> Vec<GoodputRow> {
    layouts
        .iter()
        .map(|&layout| GoodputRow {
            layout,
            label: layout.label(),
            cells: chips
                .iter()
                .map(|&n| model.goodput(layout, n as f64, run_s))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_agrees_with_the_renewal_formula() {
        let mut rng = SplitMix64::new(7);
        for (rate, pause, commit) in [
            (0.01, 78.0, 1.0),
            (0.076, 22.0, 1.0),
            (0.002, 100.0, 300.0),
            (0.05, 5.0, 0.0),
        ] {
            let d = Domain {
                rate,
                pause_s: pause,
                commit_s: commit,
            };
            let run = simulate_domain(&d, 200_000.0 / rate, &mut rng);
            let (sim, exp) = (run.goodput(), analytic_goodput(&d));
            assert!(
                (sim - exp).abs() < 0.01,
                "rate {rate}: simulated {sim} vs expected {exp}"
            );
            assert!(run.failures > 50_000, "{} failures", run.failures);
        }
    }

    #[test]
    fn lost_work_grows_with_the_checkpoint_interval() {
        let d = |commit_s| Domain {
            rate: 1e-3,
            pause_s: 60.0,
            commit_s,
        };
        let g: Vec<f64> = [0.0, 60.0, 600.0, 3600.0]
            .iter()
            .map(|&c| analytic_goodput(&d(c)))
            .collect();
        assert!(g.windows(2).all(|w| w[1] < w[0]), "{g:?}");
        // Hourly checkpoints at one failure per 1000 s: most work is lost.
        assert!(g[3] < 0.2, "{g:?}");
        assert_eq!(
            analytic_goodput(&Domain {
                rate: 0.0,
                pause_s: 1e9,
                commit_s: 1e9
            }),
            1.0
        );
    }

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let d = Domain {
            rate: 0.01,
            pause_s: 30.0,
            commit_s: 1.0,
        };
        let a = estimate(&d, 4, 1e6, 42);
        let b = estimate(&d, 4, 1e6, 42);
        let c = estimate(&d, 4, 1e6, 43);
        assert_eq!(a, b);
        assert_ne!(a.simulated, c.simulated);
    }

    #[test]
    fn a_learner_failure_stops_only_that_learner() {
        let model = FailureModel {
            chip_rate: 1.0 / SECONDS_PER_YEAR,
            restart_s: 77.5,
            checkpoint_interval_steps: 1,
            reconfigure_s: 21.5,
            learner_elastic: true,
            step_s: 1.0,
            seed: 1,
        };
        let chips = 1.2e6;
        let dp = model.goodput(Layout::DpNoElastic, chips, 1e5).simulated;
        let elastic = model.goodput(Layout::DpElastic, chips, 1e5).simulated;
        let m: Vec<f64> = [2, 4, 8, 16]
            .iter()
            .map(|&learners| {
                model
                    .goodput(Layout::Decoupled { learners }, chips, 1e5)
                    .simulated
            })
            .collect();
        assert!(dp < elastic && elastic < m[0], "{dp} {elastic} {m:?}");
        assert!(
            m.windows(2).all(|w| w[0] < w[1]),
            "more learners, smaller domains: {m:?}"
        );
        // M learners of N/M chips behave like one elastic job of N/M chips.
        let small = model.goodput(Layout::DpElastic, chips / 8.0, 1e5).simulated;
        assert!((small - m[2]).abs() < 0.01, "{small} vs {}", m[2]);
        let up = model
            .goodput(Layout::Decoupled { learners: 8 }, chips, 1e5)
            .uptime;
        assert!(up > 0.999_99, "uptime {up}");
    }
}
