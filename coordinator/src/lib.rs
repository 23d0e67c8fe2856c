//! The Decoupled DiLoCo syncer: a sans-IO state machine (no sockets, threads or tch) that takes
//! learner events with timestamps and returns actions. Its implementation is the subject of the
//! Decoupled DiLoCo core issue; the crate is in the workspace so the CLI and the network service
//! have one place to depend on.
