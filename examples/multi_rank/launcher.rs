//! The launcher: starts the ranks the way torchrun does (`RANK`,
//! `WORLD_SIZE` and the incarnation in the environment), steps them in
//! lockstep, kills one when asked, and restarts it alone (with peer memory)
//! or the whole job (without).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt::store;

use crate::rank::{PEER_ADDRS_ENV, PEER_SECRET_ENV};
use crate::{Args, Error};

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
    /// Writes one line to every rank but those in `skip`. `Err(rank)` if
    /// one is gone.
    fn tell(&mut self, line: &str, skip: &[u32]) -> Result<(), u32> {
        for (r, stdin) in self.stdins.iter_mut().enumerate() {
            if skip.contains(&(r as u32)) {
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
        self.tell("go", &[])
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
    /// With peers: ranks `.0` were killed; every other rank reached the
    /// barrier and waits for the launcher's word.
    Rollback(Vec<u32>),
    /// A save was refused because replicas differ (`.0` says where): every
    /// rank reached the barrier; roll them all back.
    Sdc(String),
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
            .args(["--replicas", &args.replicas.to_string()])
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
            if let Some((k, m)) = args.peer_ec {
                cmd.args(["--peer-ec", &format!("{k}+{m}")]);
            }
        }
        if self.inc == 0
            && let (Some(r), Some(s)) = (args.abort_rank, args.abort_during_save)
        {
            cmd.args(["--abort-rank", &r.to_string()])
                .args(["--abort-during-save", &s.to_string()]);
        }
        if self.inc == 0
            && let Some(sdc) = &args.inject_sdc
        {
            cmd.args(["--inject-sdc", sdc]);
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
            let mut killed: Vec<u32> = Vec::new();
            let mut sdc: Option<String> = None;
            let deadline = Instant::now() + self.timeout();
            while ready.iter().any(|r| !r) {
                let what = format!("step {want} on every rank");
                let msg = self.next(ranks, deadline, &what)?;
                let r = msg.rank;
                if killed.contains(&r) {
                    continue; // the last words of a killed rank
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
                    let doomed = &self.args.kill_rank;
                    // Once every rank to kill is at the barrier: all at once.
                    if self.kill_pending
                        && self.args.kill_at_step == Some(want)
                        && doomed.iter().all(|d| ready[*d as usize])
                    {
                        self.kill_pending = false;
                        for &d in doomed {
                            ranks.kill(d);
                        }
                        let who = ranks_named(doomed);
                        if self.peer_env.is_some() {
                            // Only these ranks go: their peer servers, and
                            // what they held for others, die with them.
                            let (its, it) = if doomed.len() == 1 {
                                ("its peer server", "it")
                            } else {
                                ("their peer servers", "them")
                            };
                            println!("killed {who} (SIGKILL) at step {want}; {its} died with {it}");
                            killed = doomed.clone();
                        } else {
                            println!("killed {who} (SIGKILL) at step {want}; stopping the others");
                            let was = if doomed.len() == 1 { "was" } else { "were" };
                            return Ok(Lockstep::Lost(Outcome::RankLost(format!(
                                "{who} {was} killed at step {want}"
                            ))));
                        }
                    }
                } else if line.starts_with("info ") {
                    print_info(r, &line);
                } else if let Some(what) = line.strip_prefix("sdc ") {
                    let mut w = what.split(' ');
                    let (Some(s), Some(t), Some(rs)) = (w.next(), w.next(), w.next()) else {
                        return Err(format!("rank {r}: bad line {line:?}").into());
                    };
                    sdc.get_or_insert_with(|| format!("step={s} tensor={t} rank={rs}"));
                } else {
                    return Err(format!("rank {r}: unexpected line {line:?}").into());
                }
            }
            if !killed.is_empty() {
                return Ok(Lockstep::Rollback(killed));
            }
            if let Some(what) = sdc {
                return Ok(Lockstep::Sdc(what));
            }
            step = want;
        }
    }

    /// With peers: restarts the killed ranks `killed` alone, as the next
    /// incarnation, and tells the others to roll back in-process to the
    /// newest committed step (their peer servers keep their memory).
    fn rollback(&mut self, ranks: &mut Ranks, killed: &[u32]) -> Result<Option<Outcome>, Error> {
        let steps = committed_steps(self.args)?;
        println!("committed steps: {steps:?}");
        if self.inc >= self.args.max_restarts {
            return Err(format!(
                "{} lost, and no restarts are left (--max-restarts {})",
                if killed.len() == 1 {
                    format!("{} was", ranks_named(killed))
                } else {
                    format!("{} were", ranks_named(killed))
                },
                self.args.max_restarts
            )
            .into());
        }
        self.inc += 1;
        let inc = self.incarnation();
        println!(
            "restarting {} alone as incarnation {inc}; the other ranks roll back in-process",
            ranks_named(killed)
        );
        for &r in killed {
            let (child, stdin, id) = self.spawn_rank(r)?;
            let i = r as usize;
            // The old process is reaped already; replacing it drops its handle.
            ranks.children[i] = child;
            ranks.stdins[i] = stdin;
            ranks.ids[i] = id;
        }
        if let Err(lost) = ranks.tell(&format!("rollback {inc}"), killed) {
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
                Lockstep::Rollback(killed) => {
                    if let Some(o) = self.rollback(&mut ranks, &killed)? {
                        return Ok(o);
                    }
                }
                Lockstep::Sdc(what) => {
                    println!("sdc-detected {what}");
                    if self.inc >= self.args.max_restarts {
                        return Err(format!(
                            "replicas differ ({what}), and no restarts are left (--max-restarts {})",
                            self.args.max_restarts
                        )
                        .into());
                    }
                    self.inc += 1;
                    let inc = self.incarnation();
                    println!(
                        "rolling every rank back to the newest committed step as incarnation {inc}"
                    );
                    if let Err(lost) = ranks.tell(&format!("rollback {inc}"), &[]) {
                        return Ok(Self::lost(&mut ranks, lost, "before the rollback"));
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
        if let Err(r) = ranks.tell("exit", &[]) {
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

pub fn launcher(args: &Args) -> Result<(), Error> {
    if args.ranks == 0 || args.every == 0 || args.replicas == 0 {
        return Err("--ranks, --every and --replicas must be at least 1".into());
    }
    if !args.ranks.is_multiple_of(args.replicas) {
        return Err(format!(
            "--ranks {} is not a multiple of --replicas {}",
            args.ranks, args.replicas
        )
        .into());
    }
    if let Some((r, _)) = args.sdc()?
        && r >= args.ranks
    {
        return Err(format!("--inject-sdc rank {r} is outside --ranks {}", args.ranks).into());
    }
    if let Some(r) = args
        .kill_rank
        .iter()
        .copied()
        .chain(args.abort_rank)
        .find(|r| *r >= args.ranks)
    {
        return Err(format!("rank {r} is outside --ranks {}", args.ranks).into());
    }
    if let Some((k, m)) = args.peer_ec
        && k + m > args.ranks
    {
        return Err(format!(
            "--peer-ec {k}+{m} needs at least {} ranks, --ranks is {}",
            k + m,
            args.ranks
        )
        .into());
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
        Some((addrs, _)) => match args.peer_ec {
            Some((k, m)) => println!(
                "peer tier: rank r's shard erasure-coded {k}+{m} over the servers of ranks r..r+{}; servers {addrs}",
                k + m - 1
            ),
            None => println!(
                "peer tier: rank r's shard replicated in rank (r+1)'s server; servers {addrs}"
            ),
        },
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
        kill_pending: !args.kill_rank.is_empty(),
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

/// `rank 2`, or `ranks [1, 4]`.
fn ranks_named(ranks: &[u32]) -> String {
    match ranks {
        [one] => format!("rank {one}"),
        many => format!("ranks {many:?}"),
    }
}
