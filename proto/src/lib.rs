//! Atoll's control plane, package `atoll.v1` (see `atoll/v1/control.proto`).

pub mod client;

pub mod v1 {
    tonic::include_proto!("atoll.v1");
}

/// Bumped on any incompatible change to the control or data plane; a learner with another
/// version is refused at Join.
pub const PROTOCOL_VERSION: u32 = 1;
