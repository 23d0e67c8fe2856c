//! Decoupled DiLoCo syncer (see issue 3).
