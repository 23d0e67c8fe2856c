//! One file per command family; main.rs keeps the clap tree and the dispatch.

pub mod export;
