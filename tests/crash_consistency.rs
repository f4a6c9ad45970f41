//! SIGKILL a process that is writing checkpoints, many times, in every
//! phase of a save and of a restore; after every kill, every committed step
//! must verify, restore must return the newest committed checkpoint without
//! falling back, and the run must be able to go on.
//!
//! Kills are aimed: the child logs the start of each phase (`ckpt::phase`
//! events: restore, stage, flush, commit, gc) and each kill waits for one
//! of them (round robin, plus unaimed kills at random moments), then kills
//! within the next 0–2 ms, so every phase is hit.
//!
//! `CKPT_CRASH_KILLS` sets the number of kills (default 20); `CKPT_CRASH_SEED`
//! replays a schedule.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use ckpt::rng::Rng;
use ckpt::{CheckpointStore, DType, LocalTier, TensorMut, Tier, checked_nbytes};
use common::example;

#[test]
fn sigkill_at_random_moments_never_yields_a_partial_checkpoint() {
    let kills: u32 = std::env::var("CKPT_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = common::seed_from_env("CKPT_CRASH_SEED");
    eprintln!("crash test: {kills} kills");
    let mut rng = Rng::seed_from_u64(seed);
    let qs = example("quickstart");
    let dir = tempfile::tempdir().expect("tempdir");
    let tier: Arc<dyn Tier> = Arc::new(LocalTier::new(dir.path()).expect("tier"));
    let store = CheckpointStore::new(tier.clone()).expect("store");
    let mut last_step = 0u64;
    let mut restored_steps = Vec::new();

    const AIMS: [&str; 6] = ["restore", "stage", "flush", "commit", "gc", "anywhere"];
    let mut landed: BTreeMap<&str, u32> = BTreeMap::new();
    for kill in 0..kills {
        let aim = AIMS[kill as usize % AIMS.len()];
        let mut child = Command::new(&qs)
            .arg("--dir")
            .arg(dir.path())
            .args([
                "--steps",
                "1000000",
                "--every",
                "3",
                "--state-mb",
                "12",
                "--keep",
                "2",
                "--quiet",
            ])
            .env("CKPT_LOG", "warn,ckpt::phase=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn quickstart");
        let (tx, rx) = mpsc::channel::<String>();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(p) = phase_of(&line)
                    && tx.send(p).is_err()
                {
                    break;
                }
            }
        });
        let delay = if aim == "anywhere" {
            let d = Duration::from_millis(rng.range(40, 700));
            std::thread::sleep(d);
            d
        } else {
            // The 1st to 3rd time the phase starts (restore: only once).
            let nth = if aim == "restore" { 1 } else { rng.range(1, 4) };
            let start = Instant::now();
            let mut seen = 0;
            while seen < nth {
                match rx.recv_timeout(Duration::from_secs(120)) {
                    Ok(p) if p == aim => seen += 1,
                    Ok(_) => {}
                    Err(e) => panic!("kill {kill}: no `{aim}` phase within 120 s: {e}"),
                }
            }
            std::thread::sleep(Duration::from_micros(rng.range(0, 2000)));
            start.elapsed()
        };
        child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
        let status = child.wait().expect("reap");
        assert!(
            !status.success(),
            "kill {kill}: the child must have been killed"
        );
        *landed.entry(aim).or_default() += 1;

        // Every committed step verifies completely.
        let steps = store.steps("quickstart").expect("list");
        let Some(&newest) = steps.last() else {
            eprintln!("kill {kill} ({aim}) after {delay:?}: nothing committed yet");
            continue;
        };
        for &s in &steps {
            let m = store
                .manifest("quickstart", s)
                .unwrap_or_else(|e| panic!("kill {kill}: step {s} committed but unreadable: {e}"));
            let report = store.verify(&m);
            assert!(
                report.is_ok(),
                "kill {kill} (seed {seed}): committed step {s} does not verify: {:?}",
                report.failures
            );
        }

        // Restore through the library: newest step, no fallback needed.
        let m = store.manifest("quickstart", newest).expect("manifest");
        let mut bufs: Vec<(String, DType, Vec<u64>, Vec<u8>)> = m
            .tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.dtype,
                    t.shape.clone(),
                    vec![0u8; checked_nbytes(&t.shape, t.dtype).expect("size") as usize],
                )
            })
            .collect();
        let mut targets: Vec<TensorMut<'_>> = bufs
            .iter_mut()
            .map(|(n, d, s, b)| TensorMut::new(n.clone(), *d, s, b))
            .collect();
        let mut refs: Vec<&mut dyn ckpt::TensorViewMut> =
            targets.iter_mut().map(|t| t as _).collect();
        let r = store
            .restore(
                "quickstart",
                &mut refs,
                &ckpt::RestoreOptions::default().threads(2),
            )
            .expect("restore")
            .expect("a committed checkpoint");
        assert_eq!(r.step, newest);
        assert!(
            r.skipped.is_empty(),
            "kill {kill} (seed {seed}): restore had to skip {:?}",
            r.skipped
        );
        assert!(
            newest >= last_step,
            "kill {kill}: newest committed step went backwards ({last_step} -> {newest})"
        );
        last_step = newest;
        restored_steps.push(newest);
        eprintln!(
            "kill {kill} ({aim}) after {delay:?}: committed {steps:?}, restored step {newest}"
        );
    }
    eprintln!("kills per phase: {landed:?}");
    if kills as usize >= AIMS.len() {
        assert!(
            AIMS.iter().all(|a| landed.get(a).copied().unwrap_or(0) > 0),
            "some phase was never hit: {landed:?}"
        );
    }
    assert!(
        restored_steps.len() as u32 >= kills / 2,
        "too few kills landed after a commit: {restored_steps:?}"
    );
    let start = Instant::now();
    // Crash leftovers (temp files of killed writers) are cleaned by gc.
    let gc = store
        .gc("quickstart", &ckpt::Retention::keep_last(2))
        .expect("gc");
    eprintln!("gc: {gc:?} in {:?}", start.elapsed());
    let left = list_objects(&store, "quickstart/");
    let newest = *restored_steps.last().expect("some restore");
    assert!(
        left.iter()
            // The failure log and the save history outlive every step.
            .filter(|o| !o.path.contains("/events/") && !o.path.contains("/saves/"))
            .all(|o| ckpt::format::layout::parse_path(&o.path)
                .is_some_and(|(_, s, _)| s >= newest.saturating_sub(3 * 2))),
        "gc left old leftovers: {left:?}"
    );
}

/// Every object under `prefix`, through a runtime of the test's own.
fn list_objects(store: &CheckpointStore, prefix: &str) -> Vec<ckpt::ObjectMeta> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(store.tier().list(prefix))
        .expect("list")
}

/// The phase name of a `ckpt::phase` log line (`phase="flush"`), with any
/// terminal colours stripped.
fn phase_of(line: &str) -> Option<String> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    if !plain.contains("ckpt::phase") {
        return None;
    }
    let rest = plain.split_once("phase=\"")?.1;
    Some(rest.split('"').next()?.to_string())
}
