//! Decoupled DiLoCo as pure logic: the fragment plan, merge rules and outer optimizer, the
//! syncer state machine and the learner protocol. No sockets, clocks or tch: drivers (the
//! deterministic simulation, the network service) feed timestamped events and carry out the
//! returned actions. The one use of threads is inside a merge, which splits large tensors into
//! fixed chunks so that its result does not depend on how many threads ran it.

pub mod history;
pub mod learner;
pub mod merge;
pub mod parallel;
pub mod plan;
pub mod syncer;

pub use learner::{ApplyRule, LearnerProtocol};
pub use merge::{FinalStep, MergeRule, OuterOptimizer};
pub use plan::{FragmentPlan, PartSpan, TensorInfo};
pub use syncer::{
    all_finite, apply_update, stale_contributions, Action, Contribution, EncodedUpdate, Event,
    FragmentSnapshot, FragmentValues, LearnerId, LearnerSnapshot, MergeJob, MergeRecord,
    MergedFragment, Progress, Syncer, SyncerConfig, SyncerStats, TimerId,
};
