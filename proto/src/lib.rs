//! Atoll's control plane, package `atoll.v1` (see `atoll/v1/control.proto`).

pub mod client;

pub mod v1 {
    tonic::include_proto!("atoll.v1");
}

/// Bumped on any incompatible change to the control or data plane; a learner with another
/// version is refused at Join. 2: tensors above `sync.link.part_values` travel as several parts
/// (a 12B embedding as 15-16), where version 1 sent every tensor as one.
pub const PROTOCOL_VERSION: u32 = 2;
