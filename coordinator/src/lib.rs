//! Decoupled DiLoCo as pure logic: the fragment plan, merge rules and outer optimizer, the
//! syncer state machine and the learner protocol. No sockets, threads, clocks or tch: drivers
//! (the deterministic simulation, the network service) feed timestamped events and carry out the
//! returned actions.

pub mod learner;
pub mod merge;
pub mod plan;
pub mod syncer;

pub use learner::{ApplyRule, LearnerProtocol};
pub use merge::{FinalStep, MergeRule, OuterOptimizer};
pub use plan::{FragmentPlan, TensorInfo};
pub use syncer::{
    apply_update, Action, Contribution, EncodedUpdate, Event, FragmentSnapshot, LearnerId,
    LearnerSnapshot, MergeRecord, Progress, Syncer, SyncerConfig, SyncerStats, TimerId,
};
