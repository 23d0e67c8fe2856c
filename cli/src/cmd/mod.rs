//! Subcommand families, one file each (main.rs keeps the clap tree and the dispatch).

pub mod finetune;
