//! A rollback survives retention, reused step numbers and a crash.
//!
//! Steps 900..1200 are committed on two tiers (keeping 4); an error is
//! detected, and a new process resumes from 900 with
//! `RestoreOptions::after_detected_error`, then saves 950, 1000 (a step
//! number the abandoned lineage held), 1050, 1100, 1200 (again) and 1250,
//! and is SIGKILLed while saving 1300. After that:
//! - every new step was kept while it was among the 4 newest of the new
//!   lineage (no gc after a commit deleted it for being below 1200);
//! - the saves at 1000 and 1200 committed, with the new content;
//! - a plain restore returns 1250 (the new lineage's newest), never the
//!   abandoned 1200, even from a tier that missed the uncommit (its
//!   abandoned MANIFEST put back): the rollback record is read from every
//!   tier, and a commit there repairs it;
//! - `ckpt ls` on that tier does not list the abandoned step.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt::format::layout;
use ckpt::{
    CheckpointStore, Checkpointer, LocalTier, RestoreOptions, TensorMut, TensorRef, TierPolicy,
    TrainingState,
};

const RUN: &str = "lineage";
const N: usize = 64 * 1024;

/// The tensor a lineage saves at `step` (`lineage` 0: the old one, 1: the
/// new one): different bytes for every (lineage, step).
fn weights(lineage: u64, step: u64) -> Vec<u8> {
    ckpt::rng::pattern(N * 4, lineage * 1_000_000 + step)
}

fn checkpointer(dirs: &[PathBuf], incarnation: &str) -> Checkpointer {
    let mut b = Checkpointer::builder(RUN)
        .incarnation(incarnation)
        .commit_timeout(Duration::from_secs(20));
    for d in dirs {
        b = b.tier(
            Arc::new(LocalTier::new(d).expect("tier")),
            TierPolicy::keep_last(4),
        );
    }
    b.build().expect("checkpointer")
}

fn save(ckpt: &Checkpointer, lineage: u64, step: u64) -> ckpt::SaveHandle {
    let w = weights(lineage, step);
    let t = TensorRef::new("w", ckpt::DType::F32, &[N as u64], &w);
    let state = TrainingState::builder(step)
        .model([&t])
        .without_optimizer()
        .rng(&[lineage, step])
        .data_loader(&step)
        .lr_schedule(&0.01)
        .build()
        .expect("state");
    ckpt.save(&state).expect("save")
}

/// Restores with `opts`; returns the step and the tensor's bytes.
fn restore(ckpt: &Checkpointer, opts: &RestoreOptions) -> (ckpt::Restored, Vec<u8>) {
    let mut buf = vec![0u8; N * 4];
    let mut t = TensorMut::new("w", ckpt::DType::F32, &[N as u64], &mut buf);
    let r = ckpt
        .restore_with(&mut [&mut t], opts)
        .expect("restore")
        .expect("a checkpoint");
    (r, buf)
}

fn steps(dir: &Path) -> Vec<u64> {
    CheckpointStore::new(Arc::new(LocalTier::new(dir).expect("tier")))
        .expect("store")
        .steps(RUN)
        .expect("steps")
}

/// The resumed process (run by [`a_rollback_survives_retention_reuse_and_a_crash`]
/// as a child, which it SIGKILLs): resumes from the newest step before the
/// detection time in `CKPT_LINEAGE_DETECTED_MS`, saves the new lineage,
/// printing `committed <step> <steps on tier 0>` after each commit.
#[test]
#[ignore = "the child process of a_rollback_survives_retention_reuse_and_a_crash, which runs it"]
fn resumed_process() {
    let dirs: Vec<PathBuf> = std::env::var("CKPT_LINEAGE_DIRS")
        .expect("CKPT_LINEAGE_DIRS")
        .split(',')
        .map(PathBuf::from)
        .collect();
    let detected: u64 = std::env::var("CKPT_LINEAGE_DETECTED_MS")
        .expect("CKPT_LINEAGE_DETECTED_MS")
        .parse()
        .expect("ms");
    let ckpt = checkpointer(&dirs, "2");
    let opts = RestoreOptions::default().after_detected_error(detected, Duration::ZERO);
    let (r, bytes) = restore(&ckpt, &opts);
    assert_eq!(r.step, 900);
    assert_eq!(bytes, weights(0, 900));
    assert_eq!(r.newer_committed, vec![1200, 1100, 1000], "newest first");
    println!("restored {}", r.step);
    for step in [950, 1000, 1050, 1100, 1200, 1250] {
        let report = save(&ckpt, 1, step).wait().expect("committed");
        assert!(report.is_durable(), "{step}: {report:?}");
        println!("committed {step} {:?}", steps(&dirs[0]));
    }
    let _inflight = save(&ckpt, 1, 1300);
    println!("saving 1300");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_rollback_survives_retention_reuse_and_a_crash() {
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = [root.path().join("a"), root.path().join("b")];

    // The old lineage: 900..1200 on both tiers; the error is detected
    // after 900 was saved and before 1000.
    let detected;
    {
        let ckpt = checkpointer(&dirs, "1");
        save(&ckpt, 0, 900).wait().expect("900");
        std::thread::sleep(Duration::from_millis(20));
        detected = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        std::thread::sleep(Duration::from_millis(20));
        for step in [1000, 1100, 1200] {
            save(&ckpt, 0, step).wait().expect("old lineage");
        }
        for r in ckpt.close() {
            r.expect("close");
        }
    }
    assert_eq!(steps(&dirs[0]), vec![900, 1000, 1100, 1200]);
    // Tier b's copy of the abandoned 1200, to put back later as a tier
    // that missed the uncommit would still have it.
    let old_1200 = root.path().join("old-1200");
    copy_dir(&dirs[1].join(layout::step_dir(RUN, 1200)), &old_1200);

    // The resumed process, killed while saving 1300.
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--ignored", "--exact", "resumed_process", "--nocapture"])
        .env(
            "CKPT_LINEAGE_DIRS",
            format!("{},{}", dirs[0].display(), dirs[1].display()),
        )
        .env("CKPT_LINEAGE_DETECTED_MS", detected.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the resumed process");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    // A hang guard: the resumed run takes seconds.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = Vec::new();
    for line in out.lines() {
        let line = line.expect("child output");
        assert!(Instant::now() < deadline, "the resumed process is too slow");
        if line.starts_with("saving 1300") {
            break;
        }
        if line.starts_with("restored") || line.starts_with("committed") {
            seen.push(line);
        }
    }
    // SAFETY: `kill` on the child's own pid, which has not been reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "SIGKILL the resumed process");
    let status = child.wait().expect("reap");
    assert!(!status.success(), "the resumed process was killed");
    assert_eq!(seen.len(), 7, "the resumed process stopped early: {seen:?}");

    // Every new step stayed while it was among the 4 newest of its lineage.
    let expect = [
        "committed 950 [900, 950]",
        "committed 1000 [900, 950, 1000]",
        "committed 1050 [900, 950, 1000, 1050]",
        "committed 1100 [950, 1000, 1050, 1100]",
        "committed 1200 [1000, 1050, 1100, 1200]",
        "committed 1250 [1050, 1100, 1200, 1250]",
    ];
    assert_eq!(&seen[1..], &expect, "{seen:?}");

    // Tier b missed the uncommit: its abandoned 1200 MANIFEST is back, and
    // its own rollback record is gone (as if it was down at the rollback).
    let b_1200 = dirs[1].join(layout::step_dir(RUN, 1200));
    std::fs::remove_dir_all(&b_1200).expect("remove new 1200 on b");
    copy_dir(&old_1200, &b_1200);
    std::fs::remove_file(dirs[1].join(layout::lineage_path(RUN))).expect("remove b's record");
    assert!(
        steps(&dirs[1]).contains(&1200),
        "tier b now offers the abandoned 1200"
    );

    // A plain restore, tier b first: the newest step of the new lineage,
    // with its content; never the abandoned 1200 from b.
    let ckpt = checkpointer(&[dirs[1].clone(), dirs[0].clone()], "3");
    let (r, bytes) = restore(&ckpt, &RestoreOptions::default());
    assert_eq!(r.step, 1250, "{r:?}");
    assert_eq!(bytes, weights(1, 1250));
    assert!(r.newer_committed.is_empty(), "{:?}", r.newer_committed);
    // The step numbers reused by the new lineage hold its content (looked
    // at by another checkpointer: a restore followed by a save would roll
    // the run back to it).
    let look = checkpointer(&[dirs[1].clone(), dirs[0].clone()], "3");
    let (r, bytes) = restore(&look, &RestoreOptions::default().step(1200));
    assert_eq!((r.step, r.tier_index), (1200, 1), "from tier a: {r:?}");
    assert_eq!(bytes, weights(1, 1200));
    drop(look);
    // The next commit repairs tier b's record, and tier b's retention
    // then treats the abandoned 1200 as a leftover (removed), keeping the
    // new lineage's 4 newest.
    save(&ckpt, 1, 1300).wait().expect("1300");
    for r in ckpt.close() {
        r.expect("close");
    }
    assert!(dirs[1].join(layout::lineage_path(RUN)).exists());
    assert_eq!(steps(&dirs[1]), vec![1050, 1100, 1250, 1300], "tier b");
    assert!(!b_1200.exists(), "the abandoned 1200 is gone from tier b");
    assert_eq!(steps(&dirs[0]), vec![1100, 1200, 1250, 1300], "tier a");

    // The manifests record their lineage and parent.
    let store =
        CheckpointStore::new(Arc::new(LocalTier::new(&dirs[0]).expect("tier"))).expect("store");
    let m = store.manifest(RUN, 1300).expect("manifest");
    assert_eq!((m.lineage, m.parent), (1, Some(1250)));
    let m = store.manifest(RUN, 1250).expect("manifest");
    assert_eq!((m.lineage, m.parent), (1, Some(1200)));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}
