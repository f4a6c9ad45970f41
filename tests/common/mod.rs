//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod s3s;
pub mod tmpfs;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a binary built by `cargo test` for this package: the examples
/// (`target/<profile>/examples/NAME`) or the `ckpt` CLI.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "example binary {} is missing: run the tests through `cargo test` (which builds examples)",
        path.display()
    );
    path
}

/// Runs a command to completion, panicking with its output if it cannot
/// start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The `final-state-blake3:` line of a quickstart run.
pub fn digest(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("final-state-blake3: "))
        .unwrap_or_else(|| {
            panic!(
                "no digest in output:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

/// The step of the `resumed from step N` line of an example's output.
pub fn resumed_from(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumed from step "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the run did not resume:\n{stdout}"))
}

/// The steps an example reported durable (`step N  durable ...`) before
/// it stopped: a crashed run's resume starts from the newest of them or a
/// newer one whose report the abort cut off, never from an older one.
pub fn durable_steps(out: &Output) -> Vec<u64> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (first, step, what) = (words.next()?, words.next()?, words.next()?);
            (first == "step" && what == "durable").then(|| step.parse().ok())?
        })
        .collect()
}

/// A child process whose stdout is one JSON object per line (the
/// examples' `--json`), read on a thread of its own; every event is stamped
/// with the time it arrived.
pub struct Events {
    pub child: std::process::Child,
    rx: std::sync::mpsc::Receiver<(std::time::Instant, serde_json::Value)>,
    /// Every event received so far, in order.
    pub seen: Vec<(std::time::Instant, serde_json::Value)>,
}

impl Events {
    /// Spawns `cmd` with its stdout piped (stderr goes to the test's).
    pub fn spawn(cmd: &mut Command) -> Self {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send((std::time::Instant::now(), v)).is_err()
                {
                    break;
                }
            }
        });
        Self {
            child,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits (at most `limit`) for an event satisfying `pred`, and returns
    /// it; panics naming `what` on timeout or if the process ends first.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: std::time::Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let limit = hang_guard(limit);
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, v)) => {
                    self.seen.push((t, v.clone()));
                    if pred(&v) {
                        return v;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("no {what} within {limit:?}; events so far: {:?}", self.seen)
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the process ended before {what}; events: {:?}", self.seen)
                }
            }
        }
    }

    /// Waits (at most `limit`) for the process to exit, collecting the
    /// rest of its events; returns its status.
    pub fn finish(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let limit = hang_guard(limit);
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => self.seen.push(e),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("the process did not exit within {limit:?}")
                }
            }
        }
        self.child.wait().expect("reap")
    }

    /// The events of one kind, with their arrival times.
    pub fn of(&self, kind: &str) -> Vec<(std::time::Instant, serde_json::Value)> {
        self.seen
            .iter()
            .filter(|(_, v)| v["event"] == kind)
            .cloned()
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The median of `xs` (0 for none).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A seed from the environment variable `var` (to replay a run), else a
/// fresh one from the clock; printed so a failure can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{var}={seed}");
    seed
}

/// The shard file of `rank` in a step directory on disk (its name carries
/// the save attempt that wrote it); panics unless there is exactly one.
pub fn shard_file(step_dir: &std::path::Path, rank: u32) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(step_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", step_dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| ckpt::format::layout::is_rank_data_file(&e.file_name().to_string_lossy(), rank))
        .map(|e| e.path())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one shard file of rank {rank} in {}: {found:?}",
        step_dir.display()
    );
    found.into_iter().next().expect("one")
}

/// A wait's limit is a hang guard, not a figure: what the event takes on an
/// idle machine, given three times over for a loaded one.
pub fn hang_guard(limit: std::time::Duration) -> std::time::Duration {
    limit * 3
}
