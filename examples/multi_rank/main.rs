//! Multi-rank: a data-parallel job with a sharded optimizer, N rank
//! processes on one machine, checkpointing into peer memory (each rank's
//! shard replicated in the next rank's RAM) and into one shared directory
//! (as they would into a shared file system or an object store), rank 0
//! coordinating each commit.
//!
//! The launcher starts N processes of this same binary the way torchrun
//! does (`RANK`, `WORLD_SIZE` and the incarnation in the environment) and
//! steps them in lockstep over their stdin/stdout. Each rank runs a peer
//! server on a loopback port the launcher picked (`CKPT_PEER_ADDRS`, with
//! the group's secret in `CKPT_PEER_SECRET`); its tiers are the peer tier,
//! then the shared directory.
//!
//! `--kill-rank R --kill-at-step K` SIGKILLs rank R once, taking its peer
//! server (and the replica of rank R-1 it held) with it (`--kill-ranks
//! A,B` kills several at once). The launcher
//! restarts rank R alone as the next incarnation and tells the other ranks
//! to roll back: they build a new checkpointer for that incarnation and
//! restore the newest committed step in-process, their servers keeping
//! their memory. Rank R's new process brings up an empty server on the same
//! port and restores its shard from its buddy's memory. With `--no-peer`
//! (the shared directory only) the launcher instead kills every rank and
//! restarts them all, as torchrun does. `--peer-ec 4+2` erasure-codes each
//! shard over 6 ranks' servers instead of replicating it: 1.5x memory, and
//! `--kill-ranks 1,4` (two servers at once) still restores from peers; a
//! third lost server makes the restarted ranks fall back to the shared
//! directory.
//!
//! ```text
//! cargo run --release --example multi_rank -- --ranks 4 --dir /tmp/mr-a --steps 40 --every 5
//! cargo run --release --example multi_rank -- --ranks 4 --dir /tmp/mr-b --steps 40 --every 5 \
//!     --kill-rank 1 --kill-at-step 23
//! ```
//!
//! Both print the same `final-state-blake3`.
//!
//! The model (`examples/common/model.rs`): every rank owns a block of the
//! hidden units of a two-layer network, of the rows of an embedding table,
//! and of the Adam moments of exactly those (the sharded-optimizer, ZeRO,
//! layout, each tensor split along dimension 0 with `ShardSpec::split`).
//!
//! Files: `main.rs` (arguments), `rank.rs` (one rank: its peer server, its
//! checkpointer, its training loop), `launcher.rs` (starting, stepping,
//! killing and restarting the ranks).

use std::process::ExitCode;

use clap::Parser;

#[path = "../common/mod.rs"]
mod common;
mod launcher;
mod rank;

/// Errors of the example's processes.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The example's command line (the launcher's; ranks get the same).
#[derive(Parser, Debug, Clone)]
#[command(
    about = "A multi-rank training job with async checkpoints, rank failure and restart",
    args_override_self = true
)]
pub struct Args {
    /// Rank processes to run.
    #[arg(long, default_value_t = 4)]
    pub ranks: u32,
    /// Shared checkpoint directory (every rank writes its shard here).
    #[arg(long)]
    pub dir: String,
    /// Total training steps.
    #[arg(long, default_value_t = 40)]
    pub steps: u64,
    /// Save every K steps (and after the last step).
    #[arg(long, default_value_t = 5)]
    pub every: u64,
    /// Megabytes of embedding parameters across all ranks (plus as much
    /// again twice for Adam's moments).
    #[arg(long, default_value_t = 4)]
    pub state_mb: u64,
    /// SIGKILL these ranks (`--kill-rank 1`, `--kill-ranks 1,4`) when
    /// they report `--kill-at-step`, once, all at the same moment.
    #[arg(
        long,
        alias = "kill-ranks",
        value_delimiter = ',',
        requires = "kill_at_step"
    )]
    pub kill_rank: Vec<u32>,
    /// The step at which `--kill-rank` is killed.
    #[arg(long, requires = "kill_rank")]
    pub kill_at_step: Option<u64>,
    /// Erasure-code each rank's shard across the peer servers instead of
    /// replicating it on the next rank's: `K+M`, e.g. `4+2` (K data and M
    /// parity fragments on K+M ranks; any M may be lost at once).
    #[arg(long, value_parser = parse_ec, conflicts_with = "no_peer")]
    pub peer_ec: Option<(u32, u32)>,
    /// Make this rank die (SIGKILL itself) in the middle of committing the
    /// save of `--abort-during-save`: after its shard file is durable,
    /// before its rank manifest is written. First incarnation only.
    #[arg(long, requires = "abort_during_save")]
    pub abort_rank: Option<u32>,
    /// The step whose save `--abort-rank` dies in.
    #[arg(long, requires = "abort_rank")]
    pub abort_during_save: Option<u64>,
    /// Restarts allowed after a rank dies (torchrun's --max-restarts).
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Run name inside the directory.
    #[arg(long, default_value = "multi_rank")]
    pub run: String,
    /// Committed checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Bound on every wait: a barrier, a rank's commit, a rank's exit.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Identifies this launch; the incarnation of restart n is `<job-id>.<n>`.
    /// Default: fresh for every launch.
    #[arg(long)]
    pub job_id: Option<String>,
    /// Replicate every rank's shard into the next rank's memory: a peer
    /// tier in front of the shared directory, and a killed rank restarts
    /// alone (the default).
    #[arg(long, conflicts_with = "no_peer")]
    pub peer: bool,
    /// The shared directory only: no peer servers, and a killed rank
    /// restarts the whole job.
    #[arg(long)]
    pub no_peer: bool,
    /// Data-parallel replicas of each shard: `--ranks` must be a multiple;
    /// `--ranks 4 --replicas 2` is 2 shards x 2 replicas. Each piece is
    /// written by one replica; the commit compares the replicas' checksums.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// `RANK:STEP`: flip one bit of that rank's parameters right after that
    /// step (first incarnation only), as silent data corruption would. The
    /// next save is refused and the job rolls back to the newest clean step.
    #[arg(long)]
    pub inject_sdc: Option<String>,
    /// Internal: run as one rank (started by the launcher).
    #[arg(long, hide = true)]
    pub rank_worker: bool,
}

/// `K+M` as `(K, M)`.
fn parse_ec(s: &str) -> Result<(u32, u32), String> {
    let (k, m) = s
        .split_once('+')
        .ok_or_else(|| format!("`{s}`: want K+M, e.g. 4+2"))?;
    let k = k.trim().parse().map_err(|e| format!("`{s}`: K: {e}"))?;
    let m = m.trim().parse().map_err(|e| format!("`{s}`: M: {e}"))?;
    Ok((k, m))
}

impl Args {
    /// `--inject-sdc` as (rank, step).
    pub fn sdc(&self) -> Result<Option<(u32, u64)>, Error> {
        let Some(spec) = &self.inject_sdc else {
            return Ok(None);
        };
        let (r, s) = spec
            .split_once(':')
            .ok_or_else(|| format!("--inject-sdc {spec}: want RANK:STEP"))?;
        Ok(Some((r.trim().parse()?, s.trim().parse()?)))
    }
}

fn main() -> ExitCode {
    common::init_logging();
    let args = Args::parse();
    let (who, result) = if args.rank_worker {
        (
            format!("rank {}", std::env::var("RANK").unwrap_or_default()),
            rank::worker(&args),
        )
    } else {
        ("launcher".to_string(), launcher::launcher(&args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multi_rank {who}: {e}");
            ExitCode::FAILURE
        }
    }
}
