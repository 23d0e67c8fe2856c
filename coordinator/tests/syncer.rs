//! The syncer state machine driven by hand on a virtual clock.

use atoll_coordinator::syncer::RejectReason;
use atoll_coordinator::{
    stale_contributions, Action, Contribution, Event, FinalStep, FragmentPlan, MergeRule,
    OuterOptimizer, Progress, Syncer, SyncerConfig, TensorInfo, TimerId,
};

/// One fragment holding one 2-element tensor, Θ = [1, 1]; H = 4.
fn syncer(quorum: usize, grace_gamma: f64) -> Syncer {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 4,
        tau: 2,
        quorum,
        grace_gamma,
        outer: OuterOptimizer {
            lr: 0.7,
            momentum: 0.9,
        },
        merge: MergeRule::Mean,
        heartbeat_timeout_s: 100.0,
        pull_timeout_s: 50.0,
        ..SyncerConfig::default()
    };
    Syncer::new(config, plan, &[vec![1.0, 1.0]])
}

fn progress(steps: u64) -> Vec<Progress> {
    vec![Progress {
        c_steps: steps,
        c_tokens: steps * 100,
    }]
}

fn report(s: &mut Syncer, now: f64, learner: u32, step: u64) -> Vec<Action> {
    s.handle_in_place(
        now,
        Event::Report {
            learner,
            step,
            progress: progress(step),
            applied: Vec::new(),
        },
    )
}

/// A report where the learner's counters restarted at its last applied broadcast.
fn report_since(s: &mut Syncer, now: f64, learner: u32, step: u64, since_sync: u64) -> Vec<Action> {
    s.handle_in_place(
        now,
        Event::Report {
            learner,
            step,
            progress: progress(since_sync),
            applied: Vec::new(),
        },
    )
}

/// A report that also says which version of the fragment the learner holds; returns the pulls.
fn report_holding(
    s: &mut Syncer,
    now: f64,
    learner: u32,
    step: u64,
    since: u64,
    held: u64,
) -> Vec<u32> {
    pulls(&s.handle_in_place(
        now,
        Event::Report {
            learner,
            step,
            progress: progress(since),
            applied: vec![held],
        },
    ))
}

fn pulls(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::Pull { learner, .. } = a {
                Some(*learner)
            } else {
                None
            }
        })
        .collect()
}

fn grace_timer(actions: &[Action]) -> Option<f64> {
    actions.iter().find_map(|a| match a {
        Action::ArmTimer {
            id: TimerId::Grace { .. },
            at,
        } => Some(*at),
        _ => None,
    })
}

fn contribution(learner: u32, round: u64, base: u64, delta: [f32; 2], steps: u64) -> Event {
    let progress = Progress {
        c_steps: steps,
        c_tokens: steps * 100,
    };
    Event::Contribution(Contribution::new(
        learner,
        0,
        round,
        base,
        progress,
        vec![delta.to_vec()],
    ))
}

fn broadcast(actions: &[Action]) -> Option<(u64, Vec<f32>)> {
    actions.iter().find_map(|a| match a {
        Action::Broadcast {
            version, values, ..
        } => Some((*version, values[0].clone())),
        _ => None,
    })
}

fn join_all(s: &mut Syncer, learners: &[u32]) {
    for &l in learners {
        let a = s.handle_in_place(0.0, Event::Join { learner: l });
        assert!(matches!(a[0], Action::CatchUp { .. }));
    }
}

/// The learners join, then report steps 1 to 4 at times 1 to 4: round 1 of the fragment is due.
fn join_and_report_four_steps(s: &mut Syncer, learners: &[u32]) {
    join_all(s, learners);
    for step in 1..=4 {
        for &l in learners {
            report(s, step as f64, l, step);
        }
    }
}

#[test]
fn quorum_not_reached_means_no_pull_and_reached_means_pull() {
    let mut s = syncer(2, 0.0);
    join_all(&mut s, &[1, 2, 3]);
    for step in 1..4 {
        assert!(
            pulls(&report(&mut s, step as f64, 1, step)).is_empty(),
            "round not due before H"
        );
    }
    assert!(
        pulls(&report(&mut s, 4.0, 1, 4)).is_empty(),
        "one responder, K = 2"
    );
    let a = report(&mut s, 4.1, 2, 4);
    assert_eq!(
        pulls(&a),
        vec![1, 2],
        "quorum of 2 reached; no grace with γ = 0"
    );
}

#[test]
fn the_grace_window_waits_for_stragglers_up_to_its_cap() {
    let mut s = syncer(1, 0.5);
    join_all(&mut s, &[1, 2]);
    // Learner 1 steps every 1.0 s; learner 2 is slower.
    for step in 1..=3 {
        report(&mut s, step as f64, 1, step);
    }
    report(&mut s, 2.5, 2, 1);
    let a = report(&mut s, 4.0, 1, 4);
    assert!(pulls(&a).is_empty());
    // grace = γ·(τ·t_step − t_quorum − t_sync) = 0.5·(2·1 − 0 − 0) = 1.0 s, within the 1-step cap.
    let at = grace_timer(&a).expect("grace armed");
    assert!((at - 5.0).abs() < 1e-9, "{at}");
    // Learner 2 reports progress inside the window: everyone answered, pull at once.
    let a = report(&mut s, 4.5, 2, 2);
    assert_eq!(pulls(&a), vec![1, 2]);
    // The stale grace timer is ignored.
    assert!(s
        .handle_in_place(
            5.0,
            Event::Timer(TimerId::Grace {
                fragment: 0,
                round: 1
            })
        )
        .is_empty());
}

/// Reports that reach the syncer in bursts (here four at a time, as a busy coordinator handles
/// them) still measure the learner's real step time, so the grace window keeps its length. Timed
/// one interval at a time, the bursts shortened the window to 0.54 s.
#[test]
fn reports_in_bursts_do_not_shorten_the_grace_window() {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 16,
        quorum: 1,
        grace_gamma: 0.5,
        ..SyncerConfig::default()
    };
    let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
    join_all(&mut s, &[1, 2]);
    // Learner 1 steps every second; its reports arrive four at a time, 1 ms apart.
    let mut last = Vec::new();
    for step in 1..=16u64 {
        let burst_end = step.div_ceil(4) * 4;
        let at = burst_end as f64 + 0.001 * (step - (burst_end - 4)) as f64;
        last = report(&mut s, at, 1, step);
    }
    // grace = γ·τ·t_step = 0.5 · 2 · 1 s, within the one-step cap: the timer 1 s after the
    // round opened (within the bursts' jitter of a few ms per eight steps).
    let at = grace_timer(&last).expect("grace armed");
    let opened = 16.004;
    assert!((at - opened - 1.0).abs() < 0.01, "grace ends at {at}");
}

#[test]
fn the_grace_window_is_capped_at_one_step() {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 4,
        tau: 8,
        quorum: 1,
        grace_gamma: 1.0,
        ..SyncerConfig::default()
    };
    let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
    join_all(&mut s, &[1, 2]);
    for step in 1..=3 {
        report(&mut s, step as f64, 1, step);
    }
    let a = report(&mut s, 4.0, 1, 4);
    // Uncapped it would be 1·(8·1 − 0 − 0) = 8 s; the cap is one step (1 s).
    assert!((grace_timer(&a).unwrap() - 5.0).abs() < 1e-9);
    let a = s.handle_in_place(
        5.0,
        Event::Timer(TimerId::Grace {
            fragment: 0,
            round: 1,
        }),
    );
    assert_eq!(pulls(&a), vec![1], "the straggler gets weight 0 this round");
}

#[test]
fn merge_applies_nesterov_and_broadcasts_a_new_version() {
    let mut s = syncer(1, 0.0);
    join_and_report_four_steps(&mut s, &[1]);
    let a = s.handle_in_place(4.5, contribution(1, 1, 0, [1.0, -0.5], 4));
    let (version, values) = broadcast(&a).expect("broadcast");
    assert_eq!(version, 1);
    // First outer step: Θ − 0.7·(1 + 0.9)·Δ = Θ − 1.33·Δ.
    assert!(
        (values[0] - (1.0 - 1.33)).abs() < 1e-6 && (values[1] - (1.0 + 0.665)).abs() < 1e-6,
        "{values:?}"
    );
    assert_eq!(s.vector_clock(1), Some(vec![1]));
    assert_eq!(s.merge_log().len(), 1);
}

/// The merge runs outside the syncer: while it is out, the fragment keeps its version, opens no
/// new round and still answers reports; the result then bumps the version, logs the merge with
/// what it took, and broadcasts.
#[test]
fn a_round_hands_out_its_merge_and_the_syncer_goes_on_until_it_returns() {
    let mut s = syncer(2, 0.0);
    join_and_report_four_steps(&mut s, &[1, 2]);
    s.handle(4.5, contribution(1, 1, 0, [1.0, -0.5], 4));
    let a = s.handle(4.6, contribution(2, 1, 0, [1.0, -0.5], 4));
    let [Action::Merge(job)] = a.as_slice() else {
        panic!("the closed round asks for its merge and nothing else: {a:?}");
    };
    let job = job.clone();
    assert_eq!(job.fragment(), 0);
    assert!(s.round_in_flight() && s.merge_in_flight());
    assert_eq!(s.version(0), 0, "no new version before the merge is back");
    // The next round's step passes while the merge runs: reports are answered (heartbeats),
    // but no round opens on a fragment that is merging, and a snapshot is the state before it.
    for step in 5..=9 {
        let a = report(&mut s, 4.6 + step as f64 / 10.0, 1, step);
        assert!(pulls(&a).is_empty(), "{a:?}");
        assert!(a.iter().all(|a| !matches!(a, Action::Merge(_))), "{a:?}");
    }
    assert_eq!(s.fragment_snapshot(0).theta[0], vec![1.0, 1.0]);
    assert!(s.fragment_snapshot(0).momentum[0].iter().all(|&m| m == 0.0));

    let merged = job.run();
    assert_eq!(merged.state.version, 1);
    let a = s.handle(7.0, Event::Merged(merged.clone()));
    let (version, values) = broadcast(&a).expect("broadcast");
    assert_eq!(version, 1);
    assert!((values[0] - (1.0 - 1.33)).abs() < 1e-6, "{values:?}");
    assert_eq!(s.fragment_snapshot(0), merged.state);
    assert!(!s.merge_in_flight());
    let record = s.merge_log().last().expect("logged");
    assert_eq!((record.at, record.pull_s), (7.0, 4.6 - 4.0));
    assert!((record.merge_s - 2.4).abs() < 1e-9, "{record:?}");
    assert_eq!(record.contributors.len(), 2);
    assert_eq!(s.vector_clock(2), Some(vec![1]));
    // A second copy of the same result changes nothing.
    assert!(s.handle(7.1, Event::Merged(merged)).is_empty());
    assert_eq!(s.merge_log().len(), 1);
    // With the merge back, the next reports open the round that came due meanwhile.
    report(&mut s, 7.2, 1, 10);
    assert_eq!(pulls(&report(&mut s, 7.2, 2, 10)), vec![1, 2]);
}

/// What a job's end waits for: `flush` leaves a merging fragment alone (its driver waits for the
/// merge before flushing).
#[test]
fn flush_passes_over_a_fragment_whose_merge_is_out() {
    let mut s = syncer(1, 0.0);
    join_and_report_four_steps(&mut s, &[1]);
    let a = s.handle(4.5, contribution(1, 1, 0, [1.0, -0.5], 4));
    assert!(matches!(a.as_slice(), [Action::Merge(_)]), "{a:?}");
    let progress = [(1, progress(2))].into_iter().collect();
    assert!(s.flush(5.0, &progress).is_empty());
    assert!(s.round_in_flight());
}

#[test]
fn duplicate_late_unrequested_and_non_finite_contributions_are_rejected() {
    let mut s = syncer(2, 0.0);
    join_all(&mut s, &[1, 2, 3]);
    for step in 1..=4 {
        report(&mut s, step as f64, 1, step);
        report(&mut s, step as f64 + 0.1, 2, step);
    }
    let reason = |a: &[Action]| {
        a.iter().find_map(|x| {
            if let Action::Rejected { reason, .. } = x {
                Some(*reason)
            } else {
                None
            }
        })
    };
    // Learner 3 was not pulled.
    assert_eq!(
        reason(&s.handle_in_place(5.0, contribution(3, 1, 0, [1.0, 1.0], 4))),
        Some(RejectReason::NotRequested)
    );
    assert!(reason(&s.handle_in_place(5.0, contribution(1, 1, 0, [1.0, 1.0], 4))).is_none());
    assert_eq!(
        reason(&s.handle_in_place(5.1, contribution(1, 1, 0, [9.0, 9.0], 4))),
        Some(RejectReason::Duplicate)
    );
    let a = s.handle_in_place(5.2, contribution(2, 1, 0, [f32::NAN, 1.0], 4));
    assert_eq!(reason(&a), Some(RejectReason::NonFinite));
    // The round completes with learner 1 alone: the NaN sender ended its part.
    let (_, values) = broadcast(&a).expect("merged without the NaN contribution");
    assert!((values[0] - (1.0 - 1.33)).abs() < 1e-6);
    assert_eq!(
        reason(&s.handle_in_place(6.0, contribution(2, 1, 0, [1.0, 1.0], 4))),
        Some(RejectReason::Late)
    );
    assert_eq!(s.stats().rejected, 4);
    assert_eq!(s.merge_log()[0].contributors.len(), 1);
}

#[test]
fn a_learner_that_dies_mid_fragment_is_dropped_and_the_round_completes() {
    let mut s = syncer(2, 0.0);
    join_and_report_four_steps(&mut s, &[1, 2]);
    assert!(
        broadcast(&s.handle_in_place(4.5, contribution(1, 1, 0, [0.5, 0.5], 4))).is_none(),
        "waiting for learner 2"
    );
    // Learner 2 goes silent; its heartbeat timer fires.
    let seq = 5; // one Join plus four Reports armed heartbeats 1..=5
    let a = s.handle_in_place(104.0, Event::Timer(TimerId::Heartbeat { learner: 2, seq }));
    assert!(a.contains(&Action::MarkedAbsent { learner: 2 }));
    assert!(broadcast(&a).is_some(), "merged with the survivor");
    assert!(!s.is_active(2));
}

#[test]
fn a_returning_learner_catches_up_on_every_version_it_missed() {
    let mut s = syncer(1, 0.0);
    join_all(&mut s, &[1, 2]);
    s.handle_in_place(0.5, Event::Leave { learner: 2 });
    for round in 1..=3u64 {
        for step in (round - 1) * 4 + 1..=round * 4 {
            report_since(&mut s, step as f64, 1, step, step - (round - 1) * 4);
        }
        assert!(broadcast(&s.handle_in_place(
            round as f64 * 4.0 + 0.5,
            contribution(1, round, round - 1, [0.1, 0.1], 4)
        ))
        .is_some());
        // Absent learners are not sent broadcasts.
    }
    assert_eq!(s.version(0), 3);
    assert_eq!(s.vector_clock(2), Some(vec![0]));
    let a = s.handle_in_place(20.0, Event::Join { learner: 2 });
    match &a[0] {
        Action::CatchUp { fragments, .. } => assert_eq!(fragments[0].1, 3),
        other => panic!("expected a catch-up, got {other:?}"),
    }
    assert_eq!(s.vector_clock(2), Some(vec![3]));
}

#[test]
fn contributions_against_an_older_version_are_re_anchored() {
    let mut s = syncer(1, 0.0);
    join_and_report_four_steps(&mut s, &[1]);
    let (_, v1) = broadcast(&s.handle_in_place(4.5, contribution(1, 1, 0, [1.0, 0.0], 4))).unwrap();
    for step in 5..=8 {
        report_since(&mut s, step as f64, 1, step, step - 4);
    }
    // Measured against version 0 (Θ0 = [1, 1]) although version 1 is current: the syncer re-anchors
    // Δ at Θ1, i.e. Δ' = Δ + Θ1 − Θ0.
    let a = s.handle_in_place(8.5, contribution(1, 2, 0, [0.0, 0.0], 4));
    let (version, _) = broadcast(&a).unwrap();
    assert_eq!(version, 2);
    let record = &s.merge_log()[1];
    assert_eq!(record.contributors[0].4, 0, "base version logged");
    assert!(v1[0] < 0.0);
    assert_eq!(stale_contributions(s.merge_log()), 1, "counted as stale");
    // This syncer merges by plain mean, which logs no agreement (RDA's is tested in merge.rs).
    assert_eq!(record.agreement, None);
}

/// How learner 2, still holding version 0 when fragment 0's round 2 pulls (version 1 being the
/// newest), is pulled: at once without `pull_current_only`; with it, at its first report holding
/// version 1 (`catches_up`), else when the wait of τ steps ends. Returns its pulls at the round's
/// report, at its next report (8.5 s) and at the end of the wait (the timer's firing).
fn round_2_pulls(pull_current_only: bool, catches_up: bool) -> [Vec<u32>; 3] {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 4,
        tau: 2,
        quorum: 1,
        grace_gamma: 0.0,
        pull_current_only,
        ..SyncerConfig::default()
    };
    let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
    join_all(&mut s, &[1, 2]);
    let report = report_holding;
    for step in 1..=3 {
        report(&mut s, step as f64, 1, step, step, 0);
        report(&mut s, step as f64 + 0.1, 2, step, step, 0);
    }
    assert_eq!(
        report(&mut s, 4.0, 1, 4, 4, 0),
        vec![1],
        "round 1: learner 1"
    );
    let merged = s.handle_in_place(4.5, contribution(1, 1, 0, [1.0, 0.0], 4));
    assert_eq!(broadcast(&merged).map(|(v, _)| v), Some(1));
    for step in 5..=7 {
        report(&mut s, step as f64, 1, step, step - 4, 1);
    }
    // Round 2 opens at step 8; learner 2 has trained 8 steps from version 0.
    let at_round = s.handle_in_place(
        8.0,
        Event::Report {
            learner: 2,
            step: 8,
            progress: progress(8),
            applied: vec![0],
        },
    );
    let wait = at_round.iter().find_map(|a| match a {
        Action::ArmTimer {
            id: id @ TimerId::DeferredPull { .. },
            at,
        } => Some((*id, *at)),
        _ => None,
    });
    assert_eq!(wait.is_some(), pull_current_only, "{at_round:?}");
    let next = report(&mut s, 8.5, 2, 9, 9, u64::from(catches_up));
    let at_wait_end = wait.map_or_else(Vec::new, |(id, at)| {
        // The fastest learner steps about once a second: a wait of τ = 2 steps.
        assert!((at - 10.0).abs() < 0.1, "{at}");
        pulls(&s.handle_in_place(at, Event::Timer(id)))
    });
    // It answers from the version it held when pulled: the newest once it caught up, else the
    // one before, which the merge re-anchors.
    let base = u64::from(pull_current_only && catches_up);
    let merged = s.handle_in_place(10.5, contribution(2, 2, base, [1.0, 0.0], 9));
    assert_eq!(broadcast(&merged).map(|(v, _)| v), Some(2));
    assert_eq!(stale_contributions(s.merge_log()), 1 - base);
    [pulls(&at_round), next, at_wait_end]
}

/// Under `apply: rebase` (`pull_current_only`) a learner whose report says it still holds the
/// version before the newest is not pulled at once: its Δ would be measured from that version,
/// and the merge's re-anchoring would pull Θ back towards it. The round pulls it once it reports
/// the newest version, or after τ steps from the version it holds (its link does not keep up).
#[test]
fn a_learner_behind_the_newest_version_is_pulled_once_it_holds_it_or_after_tau_steps() {
    let none = Vec::<u32>::new;
    assert_eq!(round_2_pulls(false, true), [vec![2], none(), none()]);
    assert_eq!(round_2_pulls(true, true), [none(), vec![2], none()]);
    assert_eq!(round_2_pulls(true, false), [none(), none(), vec![2]]);
}

#[test]
fn quantised_broadcasts_move_theta_by_the_decoded_update() {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 4,
        quorum: 1,
        grace_gamma: 0.0,
        broadcast_codec: Some(atoll_wire::Codec::E3M0),
        ..SyncerConfig::default()
    };
    let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
    join_and_report_four_steps(&mut s, &[1]);
    let (_, values) =
        broadcast(&s.handle_in_place(4.5, contribution(1, 1, 0, [1.0, 0.3], 4))).unwrap();
    // Exact update (lr 0.7, momentum 0.5): −1.05·[1.0, 0.3] = [−1.05, −0.315]; E3M0 with scale
    // 1.05 keeps −1.05 and rounds 0.315/1.05 = 0.3 to the level 0.25: −0.2625.
    assert!((values[0] - (1.0 - 1.05)).abs() < 1e-6, "{values:?}");
    assert!((values[1] - (1.0 - 0.2625)).abs() < 1e-6, "{values:?}");
}

/// One Nesterov round with momentum (learners 1 and 2; learner 3 never reports), then the
/// end-of-job flush where learner 1 has 3 new steps, learner 2 one and learner 3 none; returns Θ
/// after the flush.
fn theta_after_flush(final_step: FinalStep) -> Vec<f32> {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 4,
        quorum: 2,
        grace_gamma: 0.0,
        outer: OuterOptimizer {
            lr: 0.7,
            momentum: 0.9,
        },
        merge: MergeRule::Rda,
        final_step,
        ..SyncerConfig::default()
    };
    let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
    join_all(&mut s, &[1, 2, 3]);
    report(&mut s, 4.0, 1, 4);
    let a = report(&mut s, 4.0, 2, 4);
    assert_eq!(pulls(&a), vec![1, 2]);
    s.handle_in_place(4.1, contribution(1, 1, 0, [0.5, 1.0], 4));
    let a = s.handle_in_place(4.2, contribution(2, 1, 0, [0.5, 1.0], 4));
    let (_, theta) = broadcast(&a).expect("round 1 merged");
    // The first Nesterov step: Θ − 1.33·Δ.
    assert!((theta[0] - 0.335).abs() < 1e-6 && (theta[1] + 0.33).abs() < 1e-6);

    let progress = [(1, progress(3)), (2, progress(1)), (3, progress(0))]
        .into_iter()
        .collect();
    let a = s.flush(10.0, &progress);
    let a = s.merge_in_place(10.0, a);
    let round = a
        .iter()
        .find_map(|a| match a {
            Action::Pull { round, .. } => Some(*round),
            _ => None,
        })
        .expect("the flush pulls");
    let mut last = Vec::new();
    for (learner, base, delta, steps) in [
        (1, 1, [0.2, 0.0], 3),
        (2, 1, [0.4, 0.2], 1),
        (3, 0, [0.0, 0.0], 0),
    ] {
        if pulls(&a).contains(&learner) {
            last = s.handle_in_place(10.1, contribution(learner, round, base, delta, steps));
        }
    }
    broadcast(&last).expect("the flush round merged").1
}

#[test]
fn the_final_round_averages_the_learners_without_momentum() {
    // Every learner counts once, learner 3 too although it has no new work: Θ₁ plus the mean of
    // the three learners' own work, [0.335, −0.33] − ([0.2, 0] + [0.4, 0.2] + [0, 0]) / 3. Its
    // Δ is measured from version 0 but is not re-anchored (that would pull Θ back to version 0).
    let averaged = theta_after_flush(FinalStep::Average);
    let want = [0.335 - 0.6 / 3.0, -0.33 - 0.2 / 3.0];
    for (got, want) in averaged.iter().zip(want) {
        assert!((got - want).abs() < 1e-6, "{averaged:?} vs {want}");
    }
    // With `outer` the flush pulls only learners with new work and takes one more Nesterov
    // step: the look-ahead along the momentum buffer (0.9·Δ₁ + Δ₂) carries Θ much further.
    let outer = theta_after_flush(FinalStep::Outer);
    assert!(outer[0] < -0.2 && outer[1] < -0.9, "{outer:?}");
}

/// The final average replaces Θ_p even when every learner's work is merged already: Θ_p then
/// still holds the outer step's look-ahead, which the learners' models (what the average is
/// over) do not. Its pulls say so, for the learners answer them from their last step's model.
#[test]
fn the_final_average_covers_fragments_without_new_work_and_its_pulls_say_so() {
    for final_step in [FinalStep::Average, FinalStep::Outer] {
        let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
        let config = SyncerConfig {
            h: 4,
            final_step,
            ..SyncerConfig::default()
        };
        let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
        join_all(&mut s, &[1, 2]);
        let idle = [(1, progress(0)), (2, progress(0))].into_iter().collect();
        let a = s.flush(10.0, &idle);
        let pulled: Vec<(u32, u64, bool)> = a
            .iter()
            .filter_map(|a| match a {
                Action::Pull {
                    learner,
                    round,
                    average,
                    ..
                } => Some((*learner, *round, *average)),
                _ => None,
            })
            .collect();
        if final_step == FinalStep::Outer {
            assert!(pulled.is_empty(), "{a:?}");
            continue;
        }
        assert_eq!(
            pulled.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>(),
            vec![(1, true), (2, true)]
        );
        // The learners' last-step models are Θ_p − [0.2, 0] and Θ_p − [0.4, 0.2]: Θ_p becomes
        // their mean.
        let round = pulled[0].1;
        s.handle_in_place(10.1, contribution(1, round, 0, [0.2, 0.0], 0));
        let a = s.handle_in_place(10.2, contribution(2, round, 0, [0.4, 0.2], 0));
        let (_, theta) = broadcast(&a).expect("the average merged");
        assert!(
            (theta[0] - 0.7).abs() < 1e-6 && (theta[1] - 0.9).abs() < 1e-6,
            "{theta:?}"
        );
    }
}

/// A round that opens after the last learner applied its fragment's newest version, with no
/// new work on it, can never gather a quorum: the job's last rounds replace it (they used to pass
/// over the fragment and wait for that round for ever), and no round opens after them.
#[test]
fn the_last_rounds_replace_a_round_that_can_no_longer_gather_its_quorum() {
    for final_step in [FinalStep::Average, FinalStep::Outer] {
        let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
        let config = SyncerConfig {
            h: 4,
            quorum: 1,
            grace_gamma: 0.0,
            final_step,
            ..SyncerConfig::default()
        };
        let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
        join_all(&mut s, &[1]);
        let a = report(&mut s, 4.0, 1, 4);
        assert_eq!(pulls(&a), vec![1]);
        let a = s.handle_in_place(4.1, contribution(1, 1, 0, [0.1, 0.1], 4));
        assert!(broadcast(&a).is_some());
        // The learner applied version 1 at its last step (its counters restarted) and stopped.
        let a = report_since(&mut s, 8.0, 1, 8, 0);
        assert!(pulls(&a).is_empty());
        assert!(
            s.round_in_flight(),
            "round 2 opened at step 8, waiting for a quorum"
        );
        assert!(
            !s.pull_in_flight(),
            "but nobody has been asked for anything"
        );
        let stopped = [(1, progress(0))].into_iter().collect();
        let a = s.flush(9.0, &stopped);
        if final_step == FinalStep::Average {
            let pulled: Vec<(u32, bool)> = a
                .iter()
                .filter_map(|a| match a {
                    Action::Pull {
                        learner, average, ..
                    } => Some((*learner, *average)),
                    _ => None,
                })
                .collect();
            assert_eq!(pulled, vec![(1, true)], "{a:?}");
            let round = match a.iter().find(|a| matches!(a, Action::Pull { .. })) {
                Some(Action::Pull { round, .. }) => *round,
                _ => unreachable!(),
            };
            let a = s.handle_in_place(9.1, contribution(1, round, 1, [0.0, 0.0], 0));
            assert!(broadcast(&a).is_some(), "the average merged");
        } else {
            assert!(pulls(&a).is_empty(), "no new work: no outer step");
        }
        assert!(!s.round_in_flight(), "{final_step:?}: the job can end");
        report_since(&mut s, 10.0, 1, 8, 0);
        assert!(
            !s.round_in_flight(),
            "{final_step:?}: no round opens after the last ones"
        );
    }
}

/// A learner pulled again before it applied the broadcast answering its previous pull measures
/// both contributions from the same anchor: the merge log counts the steps they share once, while
/// the merge still weighs each contribution by all the work its Δ holds.
#[test]
fn work_reported_by_two_pulls_from_one_anchor_is_merged_once() {
    let mut s = syncer(1, 0.0);
    join_all(&mut s, &[1]);
    let merged = |s: &mut Syncer, now: f64, step: u64, round: u64, base: u64, steps: u64| {
        let a = report_since(s, now, 1, step, steps);
        assert_eq!(pulls(&a), vec![1], "round {round} pulls at step {step}");
        let a = s.handle_in_place(now + 0.1, contribution(1, round, base, [0.1, 0.1], steps));
        assert!(broadcast(&a).is_some(), "round {round} merges");
        let record = s.merge_log().last().unwrap().clone();
        (
            record.contributors[0].1,
            record.contributors[0].2,
            record.contributors[0].3,
        )
    };
    assert_eq!(merged(&mut s, 4.0, 4, 1, 0, 4), (40000.0, 4, 400));
    // Version 1 has not reached the learner: its second Δ is still measured from version 0 and
    // its counters hold all 8 steps since then.
    assert_eq!(merged(&mut s, 8.0, 8, 2, 0, 8), (80000.0, 4, 400));
    // Version 2 applied at step 8 (counters reset): the next 4 steps are all new.
    assert_eq!(merged(&mut s, 12.0, 12, 3, 2, 4), (40000.0, 4, 400));
    let tokens: u64 = s
        .merge_log()
        .iter()
        .flat_map(|r| r.contributors.iter().map(|c| c.3))
        .sum();
    assert_eq!(tokens, 1200, "12 steps of 100 tokens");
}

/// One learner, one fragment Θ = [1, 1], H = 4, the same Δ every round; `codec` None broadcasts
/// exact f32. Returns the syncer after `rounds` merges.
fn constant_rounds(codec: Option<atoll_wire::Codec>, error_feedback: bool, rounds: u64) -> Syncer {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let mut s = Syncer::new(
        broadcast_config(codec, error_feedback),
        plan,
        &[vec![1.0, 1.0]],
    );
    join_all(&mut s, &[1]);
    run_rounds(&mut s, 1..=rounds);
    s
}

fn broadcast_config(codec: Option<atoll_wire::Codec>, error_feedback: bool) -> SyncerConfig {
    SyncerConfig {
        h: 4,
        quorum: 1,
        grace_gamma: 0.0,
        outer: OuterOptimizer {
            lr: 0.7,
            momentum: 0.5,
        },
        broadcast_codec: codec,
        broadcast_error_feedback: error_feedback,
        ..SyncerConfig::default()
    }
}

fn run_rounds(s: &mut Syncer, rounds: std::ops::RangeInclusive<u64>) {
    for round in rounds {
        for step in 4 * (round - 1) + 1..=4 * round {
            report_since(s, step as f64, 1, step, step - 4 * (round - 1));
        }
        let a = s.handle_in_place(
            4.0 * round as f64 + 0.5,
            contribution(1, round, round - 1, [0.1, 0.03], 4),
        );
        assert!(broadcast(&a).is_some(), "round {round} merges");
    }
}

fn theta(s: &Syncer) -> Vec<f32> {
    s.fragment_snapshot(0).theta[0].clone()
}

/// With a 2-bit broadcast the small coordinate's update (0.3 of the large one) is rounded to a
/// third of it every round; without error feedback that error piles up round after round, with
/// it Θ stays within one rounding of the exact (f32) trajectory.
#[test]
fn broadcast_error_feedback_keeps_theta_on_the_exact_trajectory() {
    let rounds = 20;
    let exact = theta(&constant_rounds(None, false, rounds));
    let int2 = Some(atoll_wire::Codec::Int2);
    let plain = theta(&constant_rounds(int2, false, rounds));
    let fed_back = theta(&constant_rounds(int2, true, rounds));
    let error = |v: &[f32]| {
        v.iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    // Int2 has no zero level: the small coordinate moves by at least a third of the large one's
    // step every round, so without feedback it overshoots by about 0.005 a round.
    // Measured: 0.0023 against 0.091 (exact Θ = [−1.73, 0.181]).
    assert!(error(&fed_back) < 0.02, "{fed_back:?} vs {exact:?}");
    assert!(error(&plain) > 0.05, "{plain:?} vs {exact:?}");
    // The residual is part of the fragment's saved state only where it is used.
    assert_eq!(
        constant_rounds(int2, true, 1)
            .fragment_snapshot(0)
            .residual
            .len(),
        1
    );
    assert!(constant_rounds(int2, false, 1)
        .fragment_snapshot(0)
        .residual
        .is_empty());
}

/// A coordinator restarted from its saved fragments carries on with the same residual, so its
/// fragment state matches the uninterrupted syncer's bit for bit.
#[test]
fn a_restored_syncer_keeps_the_broadcast_residual() {
    let int2 = Some(atoll_wire::Codec::Int2);
    let through = constant_rounds(int2, true, 7);
    let before = constant_rounds(int2, true, 5);
    let restore = |residual: bool| {
        let mut snapshot = before.fragment_snapshot(0);
        if !residual {
            snapshot.residual = Default::default();
        }
        let config = broadcast_config(int2, true);
        let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
        let mut s = Syncer::restore(
            config,
            plan,
            vec![snapshot],
            before.learner_snapshots(),
            before.merge_log().to_vec(),
            before.stats().clone(),
        );
        s.handle_in_place(20.0, Event::Join { learner: 1 });
        run_rounds(&mut s, 6..=7);
        s.fragment_snapshot(0)
    };
    assert_eq!(restore(true), through.fragment_snapshot(0));
    assert_ne!(
        restore(false).residual,
        through.fragment_snapshot(0).residual,
        "a dropped residual changes what the next broadcasts owe"
    );
}

/// With quantised broadcasts the syncer keeps old versions as their updates (one full copy for
/// the oldest): a contribution measured against a version three merges old is re-anchored
/// exactly as one measured against the current version with Θ_cur − Θ_old added by hand.
#[test]
fn contributions_against_a_version_kept_as_updates_are_re_anchored_exactly() {
    // Five merges with e3m0 broadcasts and feedback; Θ of every version from the broadcasts.
    let five_rounds = || {
        let mut s = constant_rounds(Some(atoll_wire::Codec::E3M0), true, 0);
        let mut thetas = vec![vec![1.0f32, 1.0]];
        for round in 1..=5u64 {
            for step in 4 * (round - 1) + 1..=4 * round {
                report_since(&mut s, step as f64, 1, step, step - 4 * (round - 1));
            }
            let delta = [0.1 / round as f32, -0.03 * round as f32];
            let a = s.handle_in_place(
                4.0 * round as f64 + 0.5,
                contribution(1, round, round - 1, delta, 4),
            );
            thetas.push(broadcast(&a).expect("merged").1);
        }
        (s, thetas)
    };
    let sixth = |s: &mut Syncer, base: u64, delta: [f32; 2]| {
        for step in 21..=24 {
            report_since(s, step as f64, 1, step, step - 20);
        }
        let a = s.handle_in_place(24.5, contribution(1, 6, base, delta, 4));
        assert!(broadcast(&a).is_some(), "round 6 merges");
        s.fragment_snapshot(0)
    };
    let (mut s, thetas) = five_rounds();
    // Version 2 is kept as the update from version 1, which is kept in full.
    let re_anchored = sixth(&mut s, 2, [0.02, 0.01]);
    let (cur, old) = (&thetas[5], &thetas[2]);
    let by_hand = [0.02 + (cur[0] - old[0]), 0.01 + (cur[1] - old[1])];
    assert_eq!(re_anchored, sixth(&mut five_rounds().0, 5, by_hand));
    // Older than the four kept versions: refused as stale.
    let (mut s, _) = five_rounds();
    for step in 21..=24 {
        report_since(&mut s, step as f64, 1, step, step - 20);
    }
    let a = s.handle_in_place(24.5, contribution(1, 6, 0, [0.02, 0.01], 4));
    assert!(
        a.iter().any(|a| matches!(
            a,
            Action::Rejected {
                reason: RejectReason::StaleBase,
                ..
            }
        )),
        "{a:?}"
    );
}

/// One fragment, H = 4, τ = 2, steps of 1 s, so a grace window of 2γ s: learner
/// `reports[i].0` reports each step at t = step + `reports[i].1` and answers a pull at once.
/// Returns, per round, the learners it merged and when it merged, from the round's opening.
fn rounds_of_learners_reporting_at(
    grace_gamma: f64,
    max_skipped_rounds: u32,
    reports: &[(u32, f64)],
    rounds: u64,
) -> Vec<(Vec<u32>, f64)> {
    let plan = FragmentPlan::new(vec![TensorInfo::new("w", &[2])], 1).unwrap();
    let config = SyncerConfig {
        h: 4,
        quorum: 1,
        grace_gamma,
        heartbeat_timeout_s: 100.0,
        pull_timeout_s: 50.0,
        max_skipped_rounds,
        ..SyncerConfig::default()
    };
    let mut s = Syncer::new(config, plan, &[vec![1.0, 1.0]]);
    let learners: Vec<u32> = reports.iter().map(|r| r.0).collect();
    join_all(&mut s, &learners);
    let mut timers: Vec<(f64, TimerId)> = Vec::new();
    let handle = |s: &mut Syncer, now: f64, event: Event, timers: &mut Vec<(f64, TimerId)>| {
        let mut queue = vec![event];
        while let Some(event) = queue.pop() {
            for action in s.handle_in_place(now, event) {
                match action {
                    Action::Pull { learner, round, .. } => {
                        queue.push(contribution(learner, round, s.version(0), [0.1, 0.1], 1))
                    }
                    Action::ArmTimer {
                        id: id @ TimerId::Grace { .. },
                        at,
                    } => timers.push((at, id)),
                    _ => {}
                }
            }
        }
    };
    let mut schedule: Vec<(f64, u32, u64)> = (1..=rounds * 4)
        .flat_map(|step| {
            reports
                .iter()
                .map(move |&(learner, offset)| (step as f64 + offset, learner, step))
        })
        .collect();
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (at, learner, step) in schedule {
        // Timers due before this report fire first, in order.
        timers.sort_by(|a, b| a.0.total_cmp(&b.0));
        while timers.first().is_some_and(|(due, _)| *due <= at) {
            let (due, id) = timers.remove(0);
            handle(&mut s, due, Event::Timer(id), &mut timers);
        }
        let report = Event::Report {
            learner,
            step,
            progress: progress(step),
            applied: Vec::new(),
        };
        handle(&mut s, at, report, &mut timers);
    }
    s.merge_log()
        .iter()
        .map(|r| {
            let opened = (r.round * 4) as f64;
            (r.contributors.iter().map(|c| c.0).collect(), r.at - opened)
        })
        .collect()
}

/// Without a grace window (γ = 0, as when steps are shorter than a sync) a learner that always
/// reports second enters no round at all; with the guard (the default, 2 rounds) every third
/// round waits for it, here half a second.
#[test]
fn a_learner_skipped_round_after_round_is_waited_for() {
    let reports = [(1, 0.0), (2, 0.5)];
    let unguarded = rounds_of_learners_reporting_at(0.0, 0, &reports, 9);
    assert_eq!(unguarded.len(), 9);
    assert!(
        unguarded.iter().all(|(m, at)| m == &[1] && *at == 0.0),
        "{unguarded:?}"
    );

    let guarded = rounds_of_learners_reporting_at(0.0, 2, &reports, 9);
    let expected: Vec<(Vec<u32>, f64)> = (1..=9)
        .map(|r| {
            if r % 3 == 0 {
                (vec![1, 2], 0.5)
            } else {
                (vec![1], 0.0)
            }
        })
        .collect();
    assert_eq!(guarded, expected);
}

/// With a grace window of half a step (γ = 0.25), learner 2 (0.1 s behind) is in every round
/// and learner 3 (0.7 s behind) in none, until the guard holds every third round past the
/// window's end for it: the round closes as soon as it reports, not at the end of the two steps
/// it is owed.
#[test]
fn an_owed_learner_extends_the_grace_window_only_until_it_reports() {
    let reports = [(1, 0.0), (2, 0.1), (3, 0.7)];
    let unguarded = rounds_of_learners_reporting_at(0.25, 0, &reports, 6);
    assert_eq!(unguarded.len(), 6);
    assert!(
        unguarded
            .iter()
            .all(|(m, at)| m == &[1, 2] && (at - 0.5).abs() < 1e-9),
        "{unguarded:?}"
    );
    let guarded = rounds_of_learners_reporting_at(0.25, 2, &reports, 6);
    assert_eq!(guarded.len(), 6);
    for (r, (merged, at)) in (1..).zip(&guarded) {
        let (want, when) = if r % 3 == 0 {
            (vec![1, 2, 3], 0.7)
        } else {
            (vec![1, 2], 0.5)
        };
        assert_eq!(merged, &want, "round {r}: {guarded:?}");
        assert!((at - when).abs() < 1e-9, "round {r}: {guarded:?}");
    }
}
