//! `atoll`: train, inspect and probe Gemma models. This file is the command tree and the
//! dispatch; each subcommand lives in `cmd/<name>.rs` with its arguments.

mod cmd;
mod malloc_tuning;

use anyhow::Result;
use atoll_trainer::logging;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "atoll",
    version,
    about = "Train and fine-tune Gemma models across regions with Decoupled DiLoCo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on one learner from a recipe.
    Train(cmd::train::TrainArgs),
    /// LoRA fine-tuning of a Hugging Face checkpoint on JSONL chat/text data; writes a PEFT
    /// adapter (see docs/finetune.md).
    Finetune(cmd::finetune::FinetuneArgs),
    /// Simulate a multi-learner run (DP, DiLoCo, Streaming or Decoupled DiLoCo) in one process on
    /// a virtual clock; deterministic for a given seed.
    Simulate(cmd::simulate::SimulateArgs),
    /// Run the coordinator of a multi-region job: the syncer behind gRPC (TLS) and QUIC.
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Run one region's learner against a coordinator.
    Learner(cmd::learner::LearnerArgs),
    /// Relay UDP traffic (QUIC) through an emulated WAN link: rate, delay, jitter, loss, a
    /// bottleneck queue and scheduled outages, in user space. Runs until Ctrl-C.
    LinkEmulator(cmd::link_emulator::LinkEmulatorArgs),
    /// Show a running job: membership, steps, fragment versions, bytes per link, goodput.
    Status(cmd::status::StatusArgs),
    /// Run a whole multi-region job on this machine: a coordinator and one learner process per
    /// region, with a live display; every process is stopped at the end or on Ctrl-C.
    Run(cmd::run::RunArgs),
    /// Launch material for real clusters from a recipe: Kubernetes objects, SLURM scripts, the
    /// job's TLS material (docs/deploy.md).
    Deploy {
        #[command(subcommand)]
        command: cmd::deploy::DeployCommand,
    },
    /// Measurements on held-out text (`atoll eval drafter`: MTP drafter acceptance rate).
    Eval {
        #[command(subcommand)]
        command: cmd::eval::EvalCommand,
    },
    /// Gemma 4 MTP drafters: export for transformers, numerics probe (docs/drafter.md).
    Drafter {
        #[command(subcommand)]
        command: cmd::drafter::DrafterCommand,
    },
    /// Export a checkpoint for local runtimes: a Hugging Face directory or GGUF (docs/export.md).
    Export(cmd::export::ExportArgs),
    /// Inspect model configurations.
    Model {
        #[command(subcommand)]
        command: cmd::model::ModelCommand,
    },
    /// Write the logits of a checkpoint for given token ids (a numerics probe).
    Logits(cmd::logits::LogitsArgs),
    /// Micro-benchmarks (see benchmarks/).
    Bench {
        #[command(subcommand)]
        command: cmd::bench::BenchCommand,
    },
    /// Project DP, classic DiLoCo, Streaming and Decoupled DiLoCo at scale (no tensors): wall
    /// clock, utilisation, goodput, bytes and bandwidth per link; writes plan.json and plan.svg.
    /// From a recipe (its model, sync and link settings), flags, or both (flags win). See
    /// docs/planning.md.
    Plan(cmd::plan::PlanArgs),
    /// List and verify checkpoints in a checkpoint location (see docs/checkpoint.md).
    Checkpoints {
        #[command(subcommand)]
        command: cmd::checkpoints::CheckpointsCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.computes_tensors() {
        malloc_tuning::reexec_with_tuned_malloc();
    }
    if cli.command.only_prints() {
        // Rust ignores SIGPIPE, so `atoll plan | head` would end in a panic on the closed pipe;
        // the default action ends the process quietly, as `cat` does. Not for commands that
        // start processes or hold connections, where a write to a dead child's pipe must stay
        // an error rather than end the job.
        // SAFETY: setting a signal's disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    logging::init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// Commands whose time goes into training or evaluating a model, where glibc's default
    /// allocator costs a tenth of each step (see `malloc_tuning`). Exports and checkpoint copies
    /// stream tensors and keep glibc's habit of returning memory at once.
    fn computes_tensors(&self) -> bool {
        matches!(
            self,
            Command::Train(_)
                | Command::Finetune(_)
                | Command::Simulate(_)
                | Command::Coordinator(_)
                | Command::Learner(_)
                | Command::Run(_)
                | Command::Eval { .. }
                | Command::Drafter { .. }
                | Command::Logits(_)
                | Command::Bench { .. }
        )
    }

    /// Commands that print a report and end: no child processes, no connections to keep.
    fn only_prints(&self) -> bool {
        matches!(
            self,
            Command::Bench { .. }
                | Command::Model { .. }
                | Command::Plan(_)
                | Command::Checkpoints { .. }
        )
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => cmd::train::run(args),
        Command::Finetune(args) => cmd::finetune::run(args),
        Command::Simulate(args) => cmd::simulate::run(args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Learner(args) => cmd::learner::run(args),
        Command::LinkEmulator(args) => cmd::link_emulator::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Deploy { command } => cmd::deploy::run(command),
        Command::Export(args) => cmd::export::run(args),
        Command::Eval { command } => cmd::eval::run(command),
        Command::Drafter { command } => cmd::drafter::run(command),
        Command::Model { command } => cmd::model::run(command),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Bench { command } => cmd::bench::run(command),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Checkpoints { command } => cmd::checkpoints::run(command),
    }
}
