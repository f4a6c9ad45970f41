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
//! server (and the replica of rank R-1 it held) with it. The launcher
//! restarts rank R alone as the next incarnation and tells the other ranks
//! to roll back: they build a new checkpointer for that incarnation and
//! restore the newest committed step in-process, their servers keeping
//! their memory. Rank R's new process brings up an empty server on the same
//! port and restores its shard from its buddy's memory. With `--no-peer`
//! (the shared directory only) the launcher instead kills every rank and
//! restarts them all, as torchrun does.
//!
//! ```text
//! cargo run --release --example multi_rank -- --ranks 4 --dir /tmp/mr-a --steps 40 --every 5
//! cargo run --release --example multi_rank -- --ranks 4 --dir /tmp/mr-b --steps 40 --every 5 \
//!     --kill-rank 1 --kill-at-step 23
//! ```
//!
//! Both print the same `final-state-blake3`.
//!
//! The model: every rank owns a contiguous block of the hidden units of a
//! two-layer network (rows of `mlp.w1`, entries of `mlp.b1` and `mlp.w2`), a
//! block of rows of an embedding table, and the Adam moments of exactly
//! those: the sharded-optimizer (ZeRO) layout, each tensor split along dim 0
//! with `ShardSpec::split`. The job has no collective communication: each
//! rank fits its block, as a sub-network, to its share of the target on its
//! own data-parallel slice of a synthetic data set. A rank's update depends
//! only on the step and its own shard and loop state, so the run is
//! reproducible, and every checkpoint is one consistent cut of all ranks.

// Index loops read like the math they implement (forward/backward, Adam).
#![allow(clippy::needless_range_loop)]

use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ckpt::{
    Capabilities, Checkpointer, ObjectMeta, PutMode, SaveHandle, ShardSpec, TensorMut, TensorRef,
    TensorView, Tier, TierPolicy, TierWriter, TrainingState, format::layout, store,
};
use clap::Parser;
use serde::{Deserialize, Serialize};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug, Clone)]
#[command(about = "A multi-rank training job with async checkpoints, rank failure and restart")]
struct Args {
    /// Rank processes to run.
    #[arg(long, default_value_t = 4)]
    ranks: u32,
    /// Shared checkpoint directory (every rank writes its shard here).
    #[arg(long)]
    dir: String,
    /// Total training steps.
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Save every K steps (and after the last step).
    #[arg(long, default_value_t = 5)]
    every: u64,
    /// Megabytes of embedding parameters across all ranks (plus as much
    /// again twice for Adam's moments).
    #[arg(long, default_value_t = 4)]
    state_mb: u64,
    /// SIGKILL this rank when it reports `--kill-at-step`, once.
    #[arg(long, requires = "kill_at_step")]
    kill_rank: Option<u32>,
    /// The step at which `--kill-rank` is killed.
    #[arg(long, requires = "kill_rank")]
    kill_at_step: Option<u64>,
    /// Make this rank die (SIGKILL itself) in the middle of committing the
    /// save of `--abort-during-save`: after its shard file is durable,
    /// before its rank manifest is written. First incarnation only.
    #[arg(long, requires = "abort_during_save")]
    abort_rank: Option<u32>,
    /// The step whose save `--abort-rank` dies in.
    #[arg(long, requires = "abort_rank")]
    abort_during_save: Option<u64>,
    /// Restarts allowed after a rank dies (torchrun's --max-restarts).
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Run name inside the directory.
    #[arg(long, default_value = "multi_rank")]
    run: String,
    /// Committed checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Bound on every wait: a barrier, a rank's commit, a rank's exit.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Identifies this launch; the incarnation of restart n is `<job-id>.<n>`.
    /// Default: fresh for every launch.
    #[arg(long)]
    job_id: Option<String>,
    /// Replicate every rank's shard into the next rank's memory: a peer
    /// tier in front of the shared directory, and a killed rank restarts
    /// alone (the default).
    #[arg(long, conflicts_with = "no_peer")]
    peer: bool,
    /// The shared directory only: no peer servers, and a killed rank
    /// restarts the whole job.
    #[arg(long)]
    no_peer: bool,
    /// Internal: run as one rank (started by the launcher).
    #[arg(long, hide = true)]
    rank_worker: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (who, result) = if args.rank_worker {
        (
            format!("rank {}", std::env::var("RANK").unwrap_or_default()),
            worker(&args),
        )
    } else {
        ("launcher".to_string(), launcher(&args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multi_rank {who}: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The model shard of one rank.

const IN: usize = 32;
/// Hidden units of the whole model, split across ranks.
const HID: u64 = 96;
const EMB_DIM: u64 = 64;
const BATCH: usize = 16;

/// xoshiro256** (Blackman & Vigna), seeded by splitmix64: small, and its
/// whole state is four words a checkpoint can hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rng {
    s: [u64; 4],
}

fn splitmix(z: &mut u64) -> u64 {
    *z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut r = *z;
    r = (r ^ (r >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    r = (r ^ (r >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    r ^ (r >> 31)
}

/// A value in [-1, 1) from 24 random bits.
fn unit(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

impl Rng {
    fn seeded(seed: u64) -> Self {
        let mut z = seed;
        let mut s = [0u64; 4];
        for x in &mut s {
            *x = splitmix(&mut z);
        }
        Self { s }
    }
    fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    fn uniform(&mut self) -> f32 {
        unit(self.next_u64())
    }
}

/// This rank's data-loader position: the data set is sharded by rank, sample
/// `cursor` of rank r is global sample `cursor * world + r`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Loader {
    epoch: u64,
    cursor: u64,
    per_rank: u64,
}

impl Loader {
    fn next_batch(&mut self, rank: u32, world: u32) -> Vec<([f32; IN], f32)> {
        let mut out = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let idx = self.epoch * 1_000_003 + self.cursor * u64::from(world) + u64::from(rank);
            let mut r = Rng::seeded(idx);
            let mut x = [0f32; IN];
            for v in &mut x {
                *v = r.uniform();
            }
            let y = (x
                .iter()
                .enumerate()
                .map(|(i, v)| v * ((i % 5) as f32 - 2.0) * 0.3)
                .sum::<f32>())
            .sin();
            out.push((x, y));
            self.cursor += 1;
            if self.cursor == self.per_rank {
                self.cursor = 0;
                self.epoch += 1;
            }
        }
        out
    }
}

/// Warm-up then cosine decay.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LrSchedule {
    base: f32,
    warmup: u64,
    total: u64,
}

impl LrSchedule {
    fn at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let p =
            (step - self.warmup) as f32 / (self.total.saturating_sub(self.warmup)).max(1) as f32;
        self.base * 0.5 * (1.0 + (std::f32::consts::PI * p.min(1.0)).cos())
    }
}

/// One rank's block of every parameter tensor and of its Adam moments.
struct Shard {
    /// Global tensor name and this rank's block of it.
    specs: Vec<(&'static str, ShardSpec)>,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Shard {
    fn new(rank: u32, world: u32, state_mb: u64) -> Result<Self, Error> {
        let emb_rows = (state_mb * (1 << 20) / 4 / EMB_DIM).max(u64::from(world));
        let globals: [(&'static str, Vec<u64>, f32); 4] = [
            ("mlp.w1", vec![HID, IN as u64], (1.0 / IN as f32).sqrt()),
            ("mlp.b1", vec![HID], 0.1),
            ("mlp.w2", vec![HID], 0.1),
            ("emb.table", vec![emb_rows, EMB_DIM], 0.1),
        ];
        let mut specs = Vec::new();
        let mut params = Vec::new();
        for (k, (name, global, scale)) in globals.into_iter().enumerate() {
            let spec = ShardSpec::split(global, 0, world.into(), rank.into())?;
            // Initial values are a function of the global element index, so
            // the whole model is the same for any number of ranks.
            let row: u64 = spec.shape[1..].iter().product();
            let first = spec.offsets[0] * row;
            let len = spec.numel();
            params.push(
                (first..first + len)
                    .map(|i| {
                        let mut z = ((k as u64) << 56) ^ i;
                        unit(splitmix(&mut z)) * scale
                    })
                    .collect::<Vec<f32>>(),
            );
            specs.push((name, spec));
        }
        let zeros: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.len()]).collect();
        Ok(Self {
            specs,
            params,
            m: zeros.clone(),
            v: zeros,
        })
    }

    fn hidden(&self) -> usize {
        self.params[1].len()
    }

    /// Forward, backward and Adam on this rank's block. Returns the loss.
    fn train_step(&mut self, batch: &[([f32; IN], f32)], lr: f32, t: u64, rng: &mut Rng) -> f32 {
        let hid = self.hidden();
        // This block's share of the target.
        let share = hid as f32 / HID as f32;
        let mut grads: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0f32; p.len()]).collect();
        let mut loss = 0f32;
        let mut h = vec![0f32; hid];
        for (x, y) in batch {
            for j in 0..hid {
                let mut a = self.params[1][j];
                for i in 0..IN {
                    a += self.params[0][j * IN + i] * x[i];
                }
                h[j] = a.max(0.0);
            }
            let out: f32 = (0..hid).map(|j| self.params[2][j] * h[j]).sum();
            let d = out - y * share;
            loss += d * d / batch.len() as f32;
            let g = 2.0 * d / batch.len() as f32;
            for j in 0..hid {
                grads[2][j] += g * h[j];
                if h[j] > 0.0 {
                    let gh = g * self.params[2][j];
                    grads[1][j] += gh;
                    for i in 0..IN {
                        grads[0][j * IN + i] += gh * x[i];
                    }
                }
            }
        }
        // A few embedding rows of this block, picked by the rank's RNG, get
        // a small update, like sparse embedding gradients.
        let dim = EMB_DIM as usize;
        let rows = self.params[3].len() / dim;
        for _ in 0..4 {
            let r = (rng.next_u64() % rows as u64) as usize;
            for j in 0..dim {
                grads[3][r * dim + j] += rng.uniform() * 1e-3;
            }
        }
        // Adam (Kingma & Ba 2015) on this rank's shard of the moments.
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for k in 0..self.params.len() {
            let (p, m, v, g) = (
                &mut self.params[k],
                &mut self.m[k],
                &mut self.v[k],
                &grads[k],
            );
            for i in 0..p.len() {
                if g[i] == 0.0 && m[i] == 0.0 {
                    continue;
                }
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            }
        }
        loss
    }

    fn nbytes(&self) -> u64 {
        self.params.iter().map(|p| p.len() as u64 * 12).sum()
    }
}

// ---------------------------------------------------------------------------
// One rank.

/// The launcher's "go" signals, read from stdin by a thread so every wait
/// is bounded.
struct Gate {
    rx: Receiver<String>,
    timeout: Duration,
}

/// What the launcher says at a barrier.
enum Cmd {
    /// Take the next step.
    Go,
    /// Another rank was lost and restarted: drop the in-memory state and
    /// resume from the newest committed step as this incarnation.
    Rollback(String),
    /// Every rank has reported its result: exit.
    Exit,
}

impl Gate {
    fn new(timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx, timeout }
    }

    fn wait(&self) -> Result<Cmd, Error> {
        match self.rx.recv_timeout(self.timeout) {
            Ok(l) => {
                let l = l.trim();
                if l == "go" {
                    Ok(Cmd::Go)
                } else if l == "exit" {
                    Ok(Cmd::Exit)
                } else if let Some(inc) = l.strip_prefix("rollback ") {
                    Ok(Cmd::Rollback(inc.to_string()))
                } else {
                    Err(format!("unexpected message from the launcher: {l:?}").into())
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("no word from the launcher for {:?}", self.timeout).into())
            }
            Err(RecvTimeoutError::Disconnected) => Err("the launcher went away".into()),
        }
    }
}

fn env_u32(name: &str) -> Result<u32, Error> {
    let v = std::env::var(name).map_err(|_| format!("{name} is not set"))?;
    Ok(v.trim()
        .parse()
        .map_err(|_| format!("{name}={v} is not a number"))?)
}

/// Environment variable with the peer servers' addresses, in rank order.
const PEER_ADDRS_ENV: &str = "CKPT_PEER_ADDRS";
/// Environment variable with the peer group's secret (hex).
const PEER_SECRET_ENV: &str = "CKPT_PEER_SECRET";
/// Most bytes a rank's peer server holds (its buddy's replicas and every
/// rank's manifests); a cap, not an allocation.
const PEER_BUDGET: u64 = 1 << 30;
/// Steps kept in peer memory.
const PEER_KEEP: usize = 2;

/// This rank's part of the peer group: its own server, which lives as
/// long as the process (across rollbacks), and what its tier needs to
/// reach every server.
struct Peer {
    servers: Vec<std::net::SocketAddr>,
    secret: Vec<u8>,
    // Dropped before the runtime it runs on.
    _server: ckpt_io::PeerServerHandle,
    _rt: tokio::runtime::Runtime,
}

impl Peer {
    /// Starts this rank's server on its address from the environment;
    /// `None` when the launcher runs without peers.
    fn from_env(rank: u32, world: u32) -> Result<Option<Self>, Error> {
        let Ok(addrs) = std::env::var(PEER_ADDRS_ENV) else {
            return Ok(None);
        };
        let servers = addrs
            .split(',')
            .map(|a| a.trim().parse())
            .collect::<Result<Vec<std::net::SocketAddr>, _>>()
            .map_err(|e| format!("{PEER_ADDRS_ENV}={addrs}: {e}"))?;
        if servers.len() != world as usize {
            return Err(format!(
                "{PEER_ADDRS_ENV} names {} servers for {world} ranks",
                servers.len()
            )
            .into());
        }
        let secret = std::env::var(PEER_SECRET_ENV)
            .map_err(|_| format!("{PEER_SECRET_ENV} is not set"))?
            .into_bytes();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("peer-server")
            .enable_all()
            .build()?;
        let server = {
            let _guard = rt.enter();
            ckpt_io::PeerServer::spawn(
                ckpt_io::PeerServerConfig::new(secret.clone(), PEER_BUDGET)
                    .with_bind(servers[rank as usize]),
            )?
        };
        Ok(Some(Self {
            servers,
            secret,
            _server: server,
            _rt: rt,
        }))
    }

    /// Waits (at most `timeout`) until every server of the group accepts
    /// connections, so the first restore and save find the whole group.
    fn wait_for_group(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        for addr in &self.servers {
            while std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_err() {
                if Instant::now() >= deadline {
                    return Err(format!("peer server {addr} not up within {timeout:?}").into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn tier(&self, rank: u32) -> Result<Arc<dyn Tier>, Error> {
        let mut cfg = ckpt_io::PeerConfig::new(self.servers.clone(), rank, self.secret.clone());
        // One rank per "node": every rank's buddy is the next rank.
        cfg.ranks_per_node = 1;
        Ok(Arc::new(ckpt_io::PeerTier::new(cfg)?))
    }
}

/// How one life of a rank's training loop ended.
enum Ended {
    /// The run is complete and its digest reported.
    Done,
    /// The launcher asked for a rollback as this incarnation.
    Rollback(String),
}

fn worker(args: &Args) -> Result<(), Error> {
    let timeout = Duration::from_secs(args.timeout_s);
    // The launcher bounds every wait itself; this bound only ends a rank
    // whose launcher went silent. A rank restarted alone may wait at its
    // first barrier while the others roll back, which takes up to the
    // commit timeout (a save of theirs in flight cannot commit without the
    // killed rank) plus their restore: hence three times the timeout.
    let gate = Gate::new(3 * timeout);
    let rank = env_u32("RANK")?;
    let world = env_u32("WORLD_SIZE")?;
    // The server comes up before anything is restored and outlives every
    // rollback: the replicas it holds for its neighbour stay in its RAM.
    let peer = Peer::from_env(rank, world)?;
    if let Some(p) = &peer {
        p.wait_for_group(timeout)?;
    }
    let mut incarnation = None;
    loop {
        match train(args, &gate, rank, world, peer.as_ref(), incarnation.take())? {
            Ended::Rollback(inc) => incarnation = Some(inc),
            Ended::Done => {
                // Other ranks may still be finishing their last commit
                // through this rank's server: it stays up until the
                // launcher has every rank's result.
                return match gate.wait()? {
                    Cmd::Exit => Ok(()),
                    _ => Err("expected `exit` from the launcher".into()),
                };
            }
        }
    }
}

/// Builds a checkpointer (as `incarnation`, else the one in the
/// environment), restores the newest committed step and trains to the end
/// or until the launcher orders a rollback.
fn train(
    args: &Args,
    gate: &Gate,
    rank: u32,
    world: u32,
    peer: Option<&Peer>,
    incarnation: Option<String>,
) -> Result<Ended, Error> {
    let timeout = Duration::from_secs(args.timeout_s);
    let say = |s: String| println!("{s}");
    let info = |s: String| {
        if rank == 0 {
            println!("info {s}");
        }
    };

    // The tiers this rank writes, fastest first; restore tries them in this
    // order and takes the newest step that verifies.
    let mut tiers: Vec<(Arc<dyn Tier>, TierPolicy)> = Vec::new();
    // Peer memory: this rank's shard replicated into its buddy's server
    // (the next rank's), so a restarted rank restores from RAM when its
    // shard survived there and from the shared directory otherwise.
    if let Some(peer) = peer {
        tiers.push((peer.tier(rank)?, TierPolicy::keep_last(PEER_KEEP)));
    }
    let mut shared = ckpt::open_location(&args.dir)?;
    if let (Some(r), Some(step)) = (args.abort_rank, args.abort_during_save)
        && r == rank
    {
        shared = Arc::new(DieBeforeRankManifest {
            path: format!(
                "{}/{}",
                layout::step_dir(&args.run, step),
                layout::rank_manifest_file(rank)
            ),
            inner: shared,
        });
    }
    tiers.push((shared, TierPolicy::keep_last(args.keep)));

    let mut shard = Shard::new(rank, world, args.state_mb)?;
    let mut builder = Checkpointer::builder(args.run.clone())
        // The pool is allocated up front, not inside the first save.
        .staging_capacity(shard.nbytes())
        .from_env()
        .copy_threads(1)
        .restore_threads(2)
        .commit_timeout(timeout);
    if let Some(inc) = incarnation {
        builder = builder.incarnation(inc);
    }
    for (tier, policy) in tiers {
        builder = builder.tier(tier, policy);
    }
    let ckpt = builder.build()?;

    let mut rng = Rng::seeded(1000 + u64::from(rank));
    let mut loader = Loader {
        epoch: 0,
        cursor: 0,
        per_rank: 5_000,
    };
    let sched = LrSchedule {
        base: 3e-3,
        warmup: 10,
        total: args.steps,
    };
    let mut step = 0u64;

    // Every rank restores its own block; all of them find the same newest
    // committed step (the launcher checks).
    {
        let Shard {
            specs,
            params,
            m,
            v,
        } = &mut shard;
        let mut targets: Vec<TensorMut<'_>> = Vec::new();
        for (((name, spec), p), (mm, vv)) in specs
            .iter()
            .zip(params.iter_mut())
            .zip(m.iter_mut().zip(v.iter_mut()))
        {
            let shape = spec.shape.clone();
            targets.push(TensorMut::from_slice(*name, &shape, p).with_shard(spec.clone()));
            targets.push(
                TensorMut::from_slice(format!("adam.m.{name}"), &shape, mm)
                    .with_shard(spec.clone()),
            );
            targets.push(
                TensorMut::from_slice(format!("adam.v.{name}"), &shape, vv)
                    .with_shard(spec.clone()),
            );
        }
        let mut refs: Vec<&mut dyn ckpt::TensorViewMut> =
            targets.iter_mut().map(|t| t as _).collect();
        let t0 = Instant::now();
        match ckpt.restore(&mut refs)? {
            Some(r) => {
                step = r.step;
                rng = r.loop_state.rng()?;
                loader = r.loop_state.data_loader()?;
                let _: LrSchedule = r.loop_state.lr_schedule()?;
                say(format!(
                    "restored {} {} {} {:.1} {}",
                    r.step,
                    r.tier_index,
                    r.bytes_read,
                    t0.elapsed().as_secs_f64() * 1e3,
                    r.tier
                ));
            }
            None => say("fresh".into()),
        }
    }
    info(format!(
        "rank 0 of {world}: {:.1} MiB of state (params + Adam m + v) in its shard",
        shard.nbytes() as f64 / (1 << 20) as f64
    ));
    say(format!("ready {step}"));
    match gate.wait()? {
        Cmd::Go => {}
        Cmd::Rollback(inc) => return Ok(Ended::Rollback(inc)),
        Cmd::Exit => return Err("told to exit before the last step".into()),
    }

    let mut pending: Option<SaveHandle> = None;
    while step < args.steps {
        let batch = loader.next_batch(rank, world);
        let lr = sched.at(step);
        let loss = shard.train_step(&batch, lr, step + 1, &mut rng);
        step += 1;
        if step.is_multiple_of(args.every) || step == args.steps {
            if let Some(h) = pending.take() {
                if h.is_done() {
                    report_durable(&h, &info);
                } else {
                    pending = Some(h);
                }
            }
            let views: Vec<[TensorRef<'_>; 3]> = shard
                .specs
                .iter()
                .enumerate()
                .map(|(k, (name, spec))| {
                    let shape = &spec.shape;
                    [
                        TensorRef::from_slice(*name, shape, &shard.params[k])
                            .with_shard(spec.clone()),
                        TensorRef::from_slice(format!("adam.m.{name}"), shape, &shard.m[k])
                            .with_shard(spec.clone()),
                        TensorRef::from_slice(format!("adam.v.{name}"), shape, &shard.v[k])
                            .with_shard(spec.clone()),
                    ]
                })
                .collect();
            let state = TrainingState::builder(step)
                .model(views.iter().map(|[p, _, _]| p as &dyn TensorView))
                .optimizer(
                    views
                        .iter()
                        .flat_map(|[_, m, v]| [m as &dyn TensorView, v as &dyn TensorView]),
                )
                .rng(&rng)
                .data_loader(&loader)
                .lr_schedule(&sched)
                .build()?;
            let h = ckpt.save(&state)?;
            info(format!(
                "step {step:>4}  loss {loss:.5}  save: math-stop {:.2} ms for {:.1} MiB",
                h.math_stop().as_secs_f64() * 1e3,
                state.nbytes() as f64 / (1 << 20) as f64,
            ));
            if std::env::var_os("CKPT_MULTI_WAIT_DURABLE").is_some() {
                // Deterministic demos and tests: each save is committed on
                // every tier before the next step (the math-stop then
                // includes the flush).
                report_durable(&h, &info);
            } else if let Some(prev) = pending.replace(h) {
                report_durable(&prev, &info);
            }
        }
        say(format!("ready {step}"));
        match gate.wait()? {
            Cmd::Go => {}
            // The save in flight (if any) finishes or fails within the
            // commit timeout as the checkpointer is dropped.
            Cmd::Rollback(inc) => return Ok(Ended::Rollback(inc)),
            Cmd::Exit => return Err("told to exit before the last step".into()),
        }
    }
    // The last save must be durable before the rank reports its result.
    if let Some(h) = pending.take() {
        let r = h.wait()?;
        if let Some(t) = r.tiers.first() {
            info(format!(
                "step {:>4}  durable: flush {:.1} ms, commit {:.1} ms",
                r.step,
                t.flush.as_secs_f64() * 1e3,
                t.commit.as_secs_f64() * 1e3
            ));
        }
    }
    for r in ckpt.close() {
        r?;
    }
    say(format!("digest {}", digest(&shard, &rng, &loader)?));
    Ok(Ended::Done)
}

fn report_durable(h: &SaveHandle, info: &impl Fn(String)) {
    match h.wait() {
        Ok(r) => {
            let t = r.tiers.first();
            info(format!(
                "step {:>4}  durable: flush {:.1} ms, commit {:.1} ms",
                r.step,
                t.map(|t| t.flush.as_secs_f64() * 1e3).unwrap_or(0.0),
                t.map(|t| t.commit.as_secs_f64() * 1e3).unwrap_or(0.0)
            ))
        }
        Err(e) => info(format!("save of step {} failed: {e}", h.step())),
    }
}

/// blake3 over this rank's whole state: its parameter and moment blocks,
/// its RNG and its data-loader position.
fn digest(shard: &Shard, rng: &Rng, loader: &Loader) -> Result<String, Error> {
    let mut h = blake3::Hasher::new();
    for buf in shard.params.iter().chain(&shard.m).chain(&shard.v) {
        h.update(ckpt::as_bytes(buf));
    }
    h.update(&serde_json::to_vec(&(rng, loader))?);
    Ok(h.finalize().to_hex().to_string())
}

/// Fault injection: the rank dies (SIGKILL, no cleanup) when its commit
/// reaches the write of one rank manifest, i.e. after its shard file of
/// that step is durable and before the coordinator can see the piece.
#[derive(Debug)]
struct DieBeforeRankManifest {
    inner: Arc<dyn Tier>,
    path: String,
}

type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl Tier for DieBeforeRankManifest {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, ckpt::Result<Box<dyn TierWriter>>> {
        self.inner.create(path)
    }
    fn put<'a>(
        &'a self,
        path: &'a str,
        data: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, ckpt::Result<()>> {
        if path == self.path {
            eprintln!("multi_rank: dying on purpose before writing {path}");
            // SAFETY: raise(2) with a valid signal number has no
            // memory-safety preconditions; SIGKILL ends the process here.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
        self.inner.put(path, data, mode)
    }
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, ckpt::Result<Bytes>> {
        self.inner.get(path)
    }
    fn get_range<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, ckpt::Result<Bytes>> {
        self.inner.get_range(path, range)
    }
    fn read_into<'a>(
        &'a self,
        path: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, ckpt::Result<()>> {
        self.inner.read_into(path, offset, buf)
    }
    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, ckpt::Result<u64>> {
        self.inner.size(path)
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, ckpt::Result<Vec<ObjectMeta>>> {
        self.inner.list(prefix)
    }
    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, ckpt::Result<()>> {
        self.inner.delete(path)
    }
}

// ---------------------------------------------------------------------------
// The launcher.

enum Event {
    Line(String),
    Closed,
}

/// A line (or end of output) from the rank process with spawn id `id`.
struct Msg {
    id: u64,
    rank: u32,
    event: Event,
}

/// The rank processes of the job. Dropping it SIGKILLs and reaps every one
/// still running, so no rank outlives the launcher's scope, on success,
/// error or panic alike.
struct Ranks {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    /// The spawn id of each rank's current process: lines from a process
    /// that was replaced are ignored.
    ids: Vec<u64>,
}

impl Ranks {
    /// Writes one line to every rank but `skip`. `Err(rank)` if one is gone.
    fn tell(&mut self, line: &str, skip: Option<u32>) -> Result<(), u32> {
        for (r, stdin) in self.stdins.iter_mut().enumerate() {
            if skip == Some(r as u32) {
                continue;
            }
            let ok = stdin.as_mut().is_some_and(|s| {
                s.write_all(line.as_bytes())
                    .and_then(|()| s.write_all(b"\n"))
                    .and_then(|()| s.flush())
                    .is_ok()
            });
            if !ok {
                return Err(r as u32);
            }
        }
        Ok(())
    }

    /// Tells every rank to take its next step. `Err(rank)` if one is gone.
    fn go(&mut self) -> Result<(), u32> {
        self.tell("go", None)
    }

    /// SIGKILLs one rank and reaps it.
    fn kill(&mut self, rank: u32) {
        if let Some(c) = self.children.get_mut(rank as usize) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How rank `rank` ended, waiting for it at most until `deadline`.
    fn exit_status(&mut self, rank: u32, deadline: Instant) -> Option<ExitStatus> {
        let c = self.children.get_mut(rank as usize)?;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.stdins.clear();
    }
}

/// How an incarnation ended.
enum Outcome {
    /// Every rank finished; their digests in rank order.
    Finished(Vec<String>),
    /// A rank died or was killed: restart the job.
    RankLost(String),
}

/// How the lockstep loop ended.
enum Lockstep {
    /// Every rank took the last step.
    Finished,
    /// A rank was lost: restart the job.
    Lost(Outcome),
    /// With peers: rank `.0` was killed; every other rank reached the
    /// barrier and waits for the launcher's word.
    Rollback(u32),
}

struct Launcher<'a> {
    args: &'a Args,
    job: String,
    /// With peers: `CKPT_PEER_ADDRS` and `CKPT_PEER_SECRET` for the ranks.
    peer_env: Option<(String, String)>,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    next_id: u64,
    kill_pending: bool,
    /// The current incarnation number: restarts (or rollbacks) so far.
    inc: u32,
}

impl Launcher<'_> {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.timeout_s)
    }

    fn incarnation(&self) -> String {
        format!("{}.{}", self.job, self.inc)
    }

    /// Starts rank `rank` as a process of the current incarnation.
    fn spawn_rank(&mut self, rank: u32) -> Result<(Child, Option<ChildStdin>, u64), Error> {
        let args = self.args;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--rank-worker")
            .arg("--dir")
            .arg(&args.dir)
            .args(["--steps", &args.steps.to_string()])
            .args(["--every", &args.every.to_string()])
            .args(["--state-mb", &args.state_mb.to_string()])
            .args(["--run", &args.run])
            .args(["--keep", &args.keep.to_string()])
            .args(["--timeout-s", &args.timeout_s.to_string()])
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", args.ranks.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("TORCHELASTIC_RESTART_COUNT", self.inc.to_string())
            .env("CKPT_INCARNATION", self.incarnation())
            .env_remove("CKPT_RUN")
            .env_remove(PEER_ADDRS_ENV)
            .env_remove(PEER_SECRET_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((addrs, secret)) = &self.peer_env {
            cmd.env(PEER_ADDRS_ENV, addrs).env(PEER_SECRET_ENV, secret);
        }
        if self.inc == 0
            && let (Some(r), Some(s)) = (args.abort_rank, args.abort_during_save)
        {
            cmd.args(["--abort-rank", &r.to_string()])
                .args(["--abort-during-save", &s.to_string()]);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start rank {rank}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let stdin = child.stdin.take();
        let id = self.next_id;
        self.next_id += 1;
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let msg = Msg {
                    id,
                    rank,
                    event: Event::Line(line),
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            let _ = tx.send(Msg {
                id,
                rank,
                event: Event::Closed,
            });
        });
        Ok((child, stdin, id))
    }

    fn spawn_all(&mut self) -> Result<Ranks, Error> {
        let mut ranks = Ranks {
            children: Vec::new(),
            stdins: Vec::new(),
            ids: Vec::new(),
        };
        for rank in 0..self.args.ranks {
            let (child, stdin, id) = self.spawn_rank(rank)?;
            ranks.children.push(child);
            ranks.stdins.push(stdin);
            ranks.ids.push(id);
        }
        Ok(ranks)
    }

    /// The next message from a current rank process, within `deadline`.
    fn next(&self, ranks: &Ranks, deadline: Instant, waiting_for: &str) -> Result<Msg, Error> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) if ranks.ids.get(m.rank as usize) == Some(&m.id) => return Ok(m),
                Ok(_) => continue, // from a killed or replaced process
                Err(_) => {
                    return Err(format!(
                        "timed out after {:?} waiting for {waiting_for}",
                        deadline.saturating_duration_since(Instant::now())
                    )
                    .into());
                }
            }
        }
    }

    fn lost(ranks: &mut Ranks, rank: u32, when: &str) -> Outcome {
        let status = ranks
            .exit_status(rank, Instant::now() + Duration::from_secs(5))
            .map_or_else(|| "still running".to_string(), |s| s.to_string());
        Outcome::RankLost(format!("rank {rank} died {when} ({status})"))
    }

    /// Every rank says where it restored from, then reports ready; they
    /// must all name the same step. `Err` carries a lost rank.
    fn restore_phase(&self, ranks: &mut Ranks) -> Result<Result<u64, Outcome>, Error> {
        let n = self.args.ranks;
        let mut start: Vec<Option<u64>> = vec![None; n as usize];
        // Twice the timeout: a rank rolling back first waits (at most the
        // commit timeout) for a save that was in flight.
        let deadline = Instant::now() + 2 * self.timeout();
        while start.iter().any(Option::is_none) {
            let msg = self.next(ranks, deadline, "the ranks to restore")?;
            let r = msg.rank;
            let line = match msg.event {
                Event::Closed => return Ok(Err(Self::lost(ranks, r, "while restoring"))),
                Event::Line(l) => l,
            };
            let mut words = line.splitn(6, ' ');
            match words.next() {
                Some("fresh") => println!("rank {r}: fresh start (no committed checkpoint)"),
                Some("restored") => {
                    let f: Vec<&str> = words.collect();
                    let [step, tier_index, bytes, ms, tier] = f.as_slice() else {
                        return Err(format!("rank {r}: bad line {line:?}").into());
                    };
                    println!(
                        "rank {r}: restored step {step} from {tier} (tier {tier_index}, {bytes} bytes verified, {ms} ms)"
                    );
                }
                Some("ready") => start[r as usize] = Some(words.next().unwrap_or("").parse()?),
                Some("info") => print_info(r, &line),
                _ => return Err(format!("rank {r}: unexpected line {line:?}").into()),
            }
        }
        let first = start[0].unwrap_or(0);
        if start.iter().any(|s| *s != Some(first)) {
            return Err(format!(
                "ranks resumed from different steps {start:?}: no consistent checkpoint"
            )
            .into());
        }
        Ok(Ok(first))
    }

    /// Steps every rank in lockstep from `first` to the last step.
    fn lockstep(&mut self, ranks: &mut Ranks, first: u64) -> Result<Lockstep, Error> {
        let n = self.args.ranks;
        let mut step = first;
        loop {
            if let Err(r) = ranks.go() {
                let why = format!("after step {step}");
                return Ok(Lockstep::Lost(Self::lost(ranks, r, &why)));
            }
            if step >= self.args.steps {
                return Ok(Lockstep::Finished);
            }
            // The barrier: every rank reports the next step.
            let want = step + 1;
            let mut ready = vec![false; n as usize];
            let mut killed = None;
            let deadline = Instant::now() + self.timeout();
            while ready.iter().any(|r| !r) {
                let what = format!("step {want} on every rank");
                let msg = self.next(ranks, deadline, &what)?;
                let r = msg.rank;
                if killed == Some(r) {
                    continue; // the last words of the killed rank
                }
                let line = match msg.event {
                    Event::Closed => {
                        let why = format!("during step {want}");
                        return Ok(Lockstep::Lost(Self::lost(ranks, r, &why)));
                    }
                    Event::Line(l) => l,
                };
                if let Some(s) = line.strip_prefix("ready ") {
                    if s.parse::<u64>()? != want {
                        return Err(format!("rank {r} at step {s}, expected {want}").into());
                    }
                    ready[r as usize] = true;
                    if self.kill_pending
                        && self.args.kill_rank == Some(r)
                        && self.args.kill_at_step == Some(want)
                    {
                        self.kill_pending = false;
                        ranks.kill(r);
                        if self.peer_env.is_some() {
                            // Only this rank goes: its peer server, and the
                            // replica it held for its neighbour, die with it.
                            println!(
                                "killed rank {r} (SIGKILL) at step {want}; its peer server died with it"
                            );
                            killed = Some(r);
                        } else {
                            println!(
                                "killed rank {r} (SIGKILL) at step {want}; stopping the others"
                            );
                            return Ok(Lockstep::Lost(Outcome::RankLost(format!(
                                "rank {r} was killed at step {want}"
                            ))));
                        }
                    }
                } else if line.starts_with("info ") {
                    print_info(r, &line);
                } else {
                    return Err(format!("rank {r}: unexpected line {line:?}").into());
                }
            }
            if let Some(r) = killed {
                return Ok(Lockstep::Rollback(r));
            }
            step = want;
        }
    }

    /// With peers: restarts the killed rank `r` alone, as the next
    /// incarnation, and tells the others to roll back in-process to the
    /// newest committed step (their peer servers keep their memory).
    fn rollback(&mut self, ranks: &mut Ranks, r: u32) -> Result<Option<Outcome>, Error> {
        let steps = committed_steps(self.args)?;
        println!("committed steps: {steps:?}");
        if self.inc >= self.args.max_restarts {
            return Err(format!(
                "rank {r} was lost, and no restarts are left (--max-restarts {})",
                self.args.max_restarts
            )
            .into());
        }
        self.inc += 1;
        let inc = self.incarnation();
        println!(
            "restarting rank {r} alone as incarnation {inc}; the other ranks roll back in-process"
        );
        let (child, stdin, id) = self.spawn_rank(r)?;
        let i = r as usize;
        // The old process is reaped already; replacing it drops its handle.
        ranks.children[i] = child;
        ranks.stdins[i] = stdin;
        ranks.ids[i] = id;
        if let Err(lost) = ranks.tell(&format!("rollback {inc}"), Some(r)) {
            return Ok(Some(Self::lost(ranks, lost, "before the rollback")));
        }
        Ok(None)
    }

    fn run_incarnation(&mut self) -> Result<Outcome, Error> {
        let n = self.args.ranks;
        let mut ranks = self.spawn_all()?;
        println!("incarnation {}: started {n} ranks", self.incarnation());

        loop {
            let first = match self.restore_phase(&mut ranks)? {
                Ok(s) => s,
                Err(lost) => return Ok(lost),
            };
            match self.lockstep(&mut ranks, first)? {
                Lockstep::Finished => break,
                Lockstep::Lost(o) => return Ok(o),
                Lockstep::Rollback(r) => {
                    if let Some(o) = self.rollback(&mut ranks, r)? {
                        return Ok(o);
                    }
                }
            }
        }

        // The end: each rank makes its last save durable and reports.
        let mut digests: Vec<Option<String>> = vec![None; n as usize];
        let deadline = Instant::now() + self.timeout();
        while digests.iter().any(Option::is_none) {
            let msg = self.next(&ranks, deadline, "the ranks' final digests")?;
            let r = msg.rank;
            match msg.event {
                Event::Closed if digests[r as usize].is_some() => {} // done
                Event::Closed => {
                    return Ok(Self::lost(&mut ranks, r, "before reporting its result"));
                }
                Event::Line(l) => {
                    if let Some(d) = l.strip_prefix("digest ") {
                        digests[r as usize] = Some(d.to_string());
                    } else if l.starts_with("info ") {
                        print_info(r, &l);
                    } else {
                        return Err(format!("rank {r}: unexpected line {l:?}").into());
                    }
                }
            }
        }
        // Every rank's checkpointer is closed: the ranks (and their peer
        // servers) may go.
        if let Err(r) = ranks.tell("exit", None) {
            return Ok(Self::lost(&mut ranks, r, "before it was told to exit"));
        }
        for r in 0..n {
            match ranks.exit_status(r, deadline) {
                Some(s) if s.success() => {}
                Some(s) => return Err(format!("rank {r} exited with {s}").into()),
                None => {
                    return Err(format!("rank {r} did not exit within {:?}", self.timeout()).into());
                }
            }
        }
        Ok(Outcome::Finished(digests.into_iter().flatten().collect()))
    }
}

fn print_info(rank: u32, line: &str) {
    println!("[rank {rank}] {}", line.trim_start_matches("info "));
}

/// Committed steps of the run in `dir`, as the restarted ranks will see them.
fn committed_steps(args: &Args) -> Result<Vec<u64>, Error> {
    let tier = ckpt::open_location(&args.dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(store::committed_steps(tier.as_ref(), &args.run))?)
}

/// `n` free loopback addresses for the ranks' peer servers. Each rank
/// binds its own; a restarted rank binds the same one again.
fn free_addrs(n: u32) -> Result<Vec<std::net::SocketAddr>, Error> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?)
}

/// A fresh secret for the peer group, as hex: 256 bits from the standard
/// library's per-process random hash keys, the clock and the process id.
fn random_secret() -> String {
    use std::hash::BuildHasher;
    let mut h = blake3::Hasher::new();
    for i in 0..8u64 {
        h.update(&std::hash::RandomState::new().hash_one(i).to_le_bytes());
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.finalize().to_hex().to_string()
}

fn launcher(args: &Args) -> Result<(), Error> {
    if args.ranks == 0 || args.every == 0 {
        return Err("--ranks and --every must be at least 1".into());
    }
    if let Some(r) = args.kill_rank.or(args.abort_rank)
        && r >= args.ranks
    {
        return Err(format!("rank {r} is outside --ranks {}", args.ranks).into());
    }
    let job = args.job_id.clone().unwrap_or_else(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("{ms:x}-{}", std::process::id())
    });
    // `--peer` is the default; `--no-peer` turns it off (clap rejects both).
    let peer_env = if !args.peer && args.no_peer {
        None
    } else {
        let addrs = free_addrs(args.ranks)?;
        let list = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Some((list, random_secret()))
    };
    println!(
        "multi_rank: {} ranks, {} steps, save every {}, checkpoints in {} (run {})",
        args.ranks, args.steps, args.every, args.dir, args.run
    );
    match &peer_env {
        Some((addrs, _)) => {
            println!("peer tier: rank r's shard replicated in rank (r+1)'s server; servers {addrs}")
        }
        None => println!("peer tier: off (--no-peer)"),
    }
    let (tx, rx) = mpsc::channel();
    let mut l = Launcher {
        args,
        job: job.clone(),
        peer_env,
        rx,
        tx,
        next_id: 0,
        kill_pending: args.kill_rank.is_some(),
        inc: 0,
    };
    loop {
        match l.run_incarnation()? {
            Outcome::Finished(digests) => {
                let mut h = blake3::Hasher::new();
                for (r, d) in digests.iter().enumerate() {
                    println!("rank {r} final shard digest: {d}");
                    h.update(d.as_bytes());
                }
                println!("restarts: {}", l.inc);
                println!("final-state-blake3: {}", h.finalize().to_hex());
                return Ok(());
            }
            Outcome::RankLost(why) => {
                println!("{why}; all ranks stopped");
                let steps = committed_steps(args)?;
                println!("committed steps: {steps:?}");
                if l.inc >= args.max_restarts {
                    return Err(format!(
                        "{why}, and no restarts are left (--max-restarts {})",
                        args.max_restarts
                    )
                    .into());
                }
                l.inc += 1;
                println!(
                    "restarting all {} ranks as incarnation {job}.{}",
                    args.ranks, l.inc
                );
            }
        }
    }
}
