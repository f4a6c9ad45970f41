//! One rank of the job: its peer server (which outlives rollbacks), its
//! checkpointer (peer tier first, then the shared location), and its
//! training loop, stepped by the launcher over stdin/stdout.

use std::io::BufRead;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ckpt::rng::Rng;
use ckpt::{Checkpointer, SaveHandle, Tier, TierPolicy, format::layout};
use ckpt_io::{Fault, FaultTier};

use crate::common::data::{Loader, LrSchedule};
use crate::common::model::{Shard, as_targets};
use crate::{Args, Error};

/// Samples per step and rank.
const BATCH: usize = 16;

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
pub const PEER_ADDRS_ENV: &str = "CKPT_PEER_ADDRS";
/// Environment variable with the peer group's secret (hex).
pub const PEER_SECRET_ENV: &str = "CKPT_PEER_SECRET";
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

    /// The peer tier: the buddy replica, or `ec` = `(k, m)` erasure coding.
    fn tier(&self, rank: u32, ec: Option<(u32, u32)>) -> Result<Arc<dyn Tier>, Error> {
        let mut cfg = ckpt_io::PeerConfig::new(self.servers.clone(), rank, self.secret.clone());
        // One rank per "node": every rank's buddy is the next rank, and an
        // erasure-coded shard's fragments are on ranks r..r+k+m-1.
        cfg.ranks_per_node = 1;
        if let Some((k, m)) = ec {
            cfg = cfg.erasure(k, m);
        }
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

pub fn worker(args: &Args) -> Result<(), Error> {
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
    let first_life = incarnation.is_none();
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
        tiers.push((
            peer.tier(rank, args.peer_ec)?,
            TierPolicy::keep_last(PEER_KEEP),
        ));
    }
    let mut shared = ckpt::open_location(&args.dir)?;
    if let (Some(r), Some(step)) = (args.abort_rank, args.abort_during_save)
        && r == rank
        && incarnation.is_none()
    {
        // Dies after its shard file of that step is durable, before the
        // coordinator can see its piece.
        let faults = FaultTier::new(shared);
        faults.inject(Fault::kill_process_on_put(format!(
            "{}/{}",
            layout::step_dir(&args.run, step),
            layout::rank_manifest_file(rank)
        )));
        shared = Arc::new(faults);
    }
    tiers.push((shared, TierPolicy::keep_last(args.keep)));

    // Data-parallel replicas: ranks r*R .. r*R+R hold shard r, identically
    // (each replica computes the same update from the same data, as
    // replicas do after their gradient all-reduce).
    let replicas = args.replicas.max(1);
    let (shards, shard_index) = (world / replicas, rank / replicas);
    let group: Vec<u32> = (shard_index * replicas..(shard_index + 1) * replicas).collect();
    let mut shard = Shard::new(shard_index, shards, args.state_mb)?;
    let mut builder = Checkpointer::builder(args.run.clone())
        // The pool is allocated up front, not inside the first save.
        .staging_capacity(shard.nbytes())
        .from_env()
        .copy_threads(1)
        .restore_threads(2)
        .commit_timeout(timeout);
    if replicas > 1 {
        builder = builder.replicas(group);
    }
    if let Some(inc) = incarnation {
        builder = builder.incarnation(inc);
    }
    for (tier, policy) in tiers {
        builder = builder.tier(tier, policy);
    }
    let ckpt = builder.build()?;

    let mut rng = Rng::seed_from_u64(1000 + u64::from(shard_index));
    let mut loader = Loader::new(5_000);
    let mut sched = LrSchedule {
        base: 3e-3,
        warmup: 10,
        total: args.steps,
    };
    let mut step = 0u64;

    // Every rank restores its own block; the checkpointers agree on the
    // step (the launcher checks that they did).
    {
        let mut targets = shard.targets();
        let mut refs = as_targets(&mut targets);
        let t0 = Instant::now();
        match ckpt.restore(&mut refs)? {
            Some(r) => {
                step = r.step;
                rng = r.loop_state.rng()?;
                loader = r.loop_state.data_loader()?;
                sched = r.loop_state.lr_schedule()?;
                if !r.newer_committed.is_empty() {
                    info(format!(
                        "newer committed steps {:?} could not be restored by every rank; \
                         the job resumes from step {} (rank 0 uncommits them)",
                        r.newer_committed, r.step
                    ));
                }
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

    let sdc = args.sdc()?.filter(|(r, _)| *r == rank && first_life);
    let mut pending: Option<SaveHandle> = None;
    while step < args.steps {
        let batch = loader.next_batch(shard_index, shards, BATCH);
        let lr = sched.at(step);
        let loss = shard.train_step(&batch, lr, step + 1, &mut rng);
        step += 1;
        if sdc.is_some_and(|(_, s)| s == step) {
            // Silent data corruption: one bit of this replica's weights.
            let w = &mut shard.params[0][0];
            *w = f32::from_bits(w.to_bits() ^ (1 << 20));
            say(format!(
                "info step {step:>4}  injected a bit flip into rank {rank}'s mlp.w1"
            ));
        }
        let last = step == args.steps;
        if step.is_multiple_of(args.every) || last {
            if let Some(prev) = pending.take_if(|_| last) {
                settle(&prev, &say, &info);
            }
            let views = shard.views();
            let state = Shard::state(&views, step, &rng, &loader, &sched)?;
            let h = ckpt.save(&state)?;
            info(format!(
                "step {step:>4}  loss {loss:.5}  save: math-stop {:.2} ms for {:.1} MiB",
                h.math_stop().as_secs_f64() * 1e3,
                state.nbytes() as f64 / (1 << 20) as f64,
            ));
            // Deterministic demos and tests (CKPT_MULTI_WAIT_DURABLE) wait
            // for each save to commit on every tier before the next step
            // (the math-stop then includes the flush); the last save must
            // be durable before the rank reports its result. Otherwise a
            // save settles while the next steps run.
            if last || std::env::var_os("CKPT_MULTI_WAIT_DURABLE").is_some() {
                settle(&h, &say, &info);
            } else if let Some(prev) = pending.replace(h) {
                settle(&prev, &say, &info);
            }
        }
        if let Some(h) = pending.take_if(|h| h.is_done()) {
            settle(&h, &say, &info);
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
    // Every save has settled (refused ones rolled the job back).
    drop(ckpt.close());
    say(format!("digest {}", shard.digest(&(&rng, &loader))));
    Ok(Ended::Done)
}

/// Reports how a finished save ended: durable (an info line), refused
/// because the replicas differ (`sdc <step> <tensor> <ranks>` to the
/// launcher, which rolls every rank back to the newest clean step), or
/// failed otherwise (an info line; training goes on).
fn settle(h: &SaveHandle, say: &impl Fn(String), info: &impl Fn(String)) {
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
        Err(e) => {
            if let ckpt::Error::NotCommitted { step, failures } = &e {
                for f in failures {
                    if let ckpt::Error::ReplicaMismatch { tensor, ranks, .. } = &f.error {
                        let ranks: Vec<String> = ranks.iter().map(ToString::to_string).collect();
                        say(format!("sdc {step} {tensor} {}", ranks.join(",")));
                        return;
                    }
                }
            }
            info(format!("save of step {} failed: {e}", h.step()))
        }
    }
}
