//! Subcommand families, one file each.

pub mod drafter;
pub mod eval;
