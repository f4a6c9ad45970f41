//! ckpt-bench: planning, simulation and benchmarking tools for ckpt.
//!
//! Each subcommand lives in its own module with an `Args` struct and a
//! `run` function; this file only dispatches.

mod compress;
mod erasure;
mod fingerprint;
mod floors;
mod flush;
mod incremental;
mod plan;
mod plot;
mod restore;
mod sim;
mod simulate;
mod stage;
#[cfg(feature = "cuda")]
mod stage_gpu;
mod staging_size;
mod synth;
mod tiers;
mod train;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command line of ckpt-bench.
#[derive(Debug, Parser)]
#[command(
    name = "ckpt-bench",
    version,
    about = "Planning and benchmarking tools for ckpt"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint interval of every policy (Young, Daly, availability,
    /// latency-aware) with its expected overhead.
    Plan(plan::PlanArgs),
    /// Discrete-event simulation of a job with failures over a sweep of
    /// checkpoint intervals.
    Simulate(simulate::SimulateArgs),
    /// Math-stop of an async save vs the memcpy floor and a blocking save
    /// (with `--device cuda`: of GPU tensors vs the device-to-host floor).
    Stage(stage::StageArgs),
    /// Cost of comparing replicas between saves (fingerprint + exchange) vs
    /// the memcpy floor of the same bytes.
    Fingerprint(fingerprint::FingerprintArgs),
    /// Time from save to durable vs the raw write bandwidth of the directory.
    Flush(flush::FlushArgs),
    /// Cold restore with verification vs a raw cold read.
    Restore(restore::RestoreArgs),
    /// Per-chunk zstd: ratio and speed by tensor kind, and time to durable
    /// with compression off, on and auto.
    Compress(compress::CompressArgs),
    /// Reed–Solomon encode/decode throughput beside memcpy, and peer
    /// memory and restore time for the buddy replica, 4+2 and 8+2.
    Erasure(erasure::ErasureArgs),
    /// Incremental vs whole saves: bytes written and time to durable, for
    /// a fine-tuning shape and for full training.
    Incremental(incremental::IncrementalArgs),
    /// Staging pool capacity sweep: math-stop and waited/skipped saves for
    /// saves arriving at a fixed interval.
    StagingSize(staging_size::StagingSizeArgs),
    /// Slowdown of a synthetic training loop that saves every k steps, vs
    /// no checkpoints and vs blocking saves.
    Train(train::TrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Stage(args) => stage::run(&args).map_err(|e| CliError::io(e.to_string())),
        Command::Fingerprint(args) => {
            fingerprint::run(&args).map_err(|e| CliError::io(e.to_string()))
        }
        Command::Flush(args) => flush::run(&args).map_err(|e| CliError::io(e.to_string())),
        Command::Restore(args) => restore::run(&args).map_err(|e| CliError::io(e.to_string())),
        Command::Compress(args) => compress::run(&args).map_err(|e| CliError::io(e.to_string())),
        Command::Erasure(args) => erasure::run(&args).map_err(|e| CliError::io(e.to_string())),
        Command::Incremental(args) => {
            incremental::run(&args).map_err(|e| CliError::io(e.to_string()))
        }
        Command::StagingSize(args) => {
            staging_size::run(&args).map_err(|e| CliError::io(e.to_string()))
        }
        Command::Train(args) => train::run(&args).map_err(|e| CliError::io(e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.exit_code)
        }
    }
}

/// Error of a subcommand: a message for the user and the exit code (2 for
/// invalid arguments, as clap uses; 1 for failures while running).
#[derive(Debug, Clone, PartialEq)]
pub struct CliError {
    /// What went wrong, for the user.
    pub message: String,
    /// Process exit code.
    pub exit_code: u8,
}

impl CliError {
    /// Invalid or inconsistent arguments (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: 2,
        }
    }

    /// A failure while running, e.g. writing a file (exit code 1).
    pub fn io(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: 1,
        }
    }
}

/// Writes `text` to standard output.
pub fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| CliError::io(format!("cannot write to standard output: {e}")))
}
