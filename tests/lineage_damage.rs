//! What a user meets when the run's records are damaged or a tier fails at
//! the wrong moment: a flipped byte in `LINEAGE.json` after a rollback, a
//! manifest that cannot be read while `gc` runs, a rollback's uncommit that
//! a tier missed.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ckpt::{
    CheckpointStore, Checkpointer, Error, Restored, Retention, TensorMut, TensorRef, Tier,
    TierPolicy, TrainingState,
};
use ckpt_io::{Fault, FaultTier, LocalTier, MemoryTier};
use common::{digest, example, run};

fn quickstart(dir: &Path, steps: u64) -> std::process::Output {
    run(Command::new(example("quickstart"))
        .arg("--dir")
        .arg(dir)
        .args([
            "--steps",
            &steps.to_string(),
            "--every",
            "10",
            "--state-mb",
            "1",
            "--keep",
            "3",
        ]))
}

fn ls(dir: &Path) -> std::process::Output {
    run(Command::new(env!("CARGO_BIN_EXE_ckpt")).arg("ls").arg(dir))
}

/// A run of 30 steps, step 30's shard corrupt, a run to 40 that restores
/// step 20 and rolls back past 30 (`LINEAGE.json` written), then, if
/// `damage`, one flipped byte in `LINEAGE.json`, and a run to 60.
fn runs_with_a_rollback(dir: &Path, damage: bool) -> std::process::Output {
    let out = quickstart(dir, 30);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shard = common::shard_file(&dir.join("quickstart/step-00000000000000000030"), 0);
    let mut b = std::fs::read(&shard).expect("shard");
    let at = b.len() - 100;
    b[at] ^= 0x40;
    std::fs::write(&shard, b).expect("write");
    let out = quickstart(dir, 40);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(common::resumed_from(&out), 20);
    let lineage = dir.join("quickstart/LINEAGE.json");
    let mut b = std::fs::read(&lineage).expect("a rollback was recorded");
    if damage {
        let at = b.iter().position(|&c| c == b'"').expect("json") + 1;
        b[at] ^= 0x01;
        std::fs::write(&lineage, &b).expect("write");
        let listed = ls(dir);
        assert!(
            listed.status.success(),
            "ckpt ls refused a run whose lineage record is damaged:\n{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let text = String::from_utf8_lossy(&listed.stdout);
        assert!(text.contains("40"), "{text}");
    }
    quickstart(dir, 60)
}

/// After a rollback, one flipped byte in `LINEAGE.json`: `ckpt ls` still
/// lists the run, the next run restores (following the rollbacks its
/// manifests show, with a warning) and commits every save (the record is
/// rebuilt), and its result is the one the same runs get without the
/// damage.
#[test]
fn a_flipped_byte_in_the_lineage_record_loses_no_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = runs_with_a_rollback(dir.path(), true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(common::resumed_from(&out), 40);
    let durable = common::durable_steps(&out);
    assert_eq!(durable, vec![50, 60], "every save commits: {stderr}");
    assert!(
        stderr.contains("lineage record"),
        "the damage is said: {stderr}"
    );
    let fixed = std::fs::read(dir.path().join("quickstart/LINEAGE.json")).expect("record");
    ckpt::format::manifest::Lineage::parse("LINEAGE.json", &fixed).expect("repaired record");
    let clean = tempfile::tempdir().expect("tempdir");
    let reference = runs_with_a_rollback(clean.path(), false);
    assert!(reference.status.success());
    assert_eq!(digest(&out), digest(&reference), "resumed run differs");
}

const N: usize = 4096;

fn checkpointer(tier: Arc<dyn Tier>, keep: usize, incarnation: &str) -> Checkpointer {
    Checkpointer::builder("r")
        .incarnation(incarnation)
        .chunk_size(4096)
        .tier(tier, TierPolicy::keep_last(keep).incremental(100))
        .build()
        .expect("checkpointer")
}

/// Step `step`'s weights: only the first chunk changes from step to step,
/// so an incremental save points into the steps before it.
fn weights(step: u64, lineage: u64) -> Vec<f32> {
    let mut w = vec![7.0f32; N];
    w[0] = (step * 10 + lineage) as f32;
    w
}

fn save(c: &Checkpointer, step: u64, lineage: u64) -> ckpt::Result<ckpt::SaveReport> {
    let w = weights(step, lineage);
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = TrainingState::builder(step)
        .model([&t])
        .without_optimizer()
        .without_loop_state()
        .build()?;
    c.save(&s)?.wait()
}

fn restore(c: &Checkpointer, step: Option<u64>) -> Restored {
    let mut w = vec![0f32; N];
    let mut opts = ckpt::RestoreOptions::default();
    if let Some(s) = step {
        opts = opts.step(s);
    }
    c.restore_with(
        &mut [&mut TensorMut::from_slice("w", &[N as u64], &mut w)],
        &opts,
    )
    .expect("restore")
    .expect("a checkpoint")
}

/// `gc` (what `ckpt gc` runs) with keep-last 1 over incremental steps, while
/// the kept step's MANIFEST cannot be read the second time (a 503 between
/// the listing and the load): it fails, typed and naming the manifest, and
/// deletes nothing; once the read works, gc keeps what the newest step
/// points into, and the newest step restores.
#[test]
fn gc_that_cannot_read_a_kept_manifest_deletes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Arc<dyn Tier> = Arc::new(LocalTier::new(dir.path()).expect("local"));
    let c = checkpointer(local.clone(), 10, "a");
    for step in 1..=3 {
        let r = save(&c, step, 0).expect("save");
        assert!(r.tiers[0].committed);
    }
    drop(c);
    let faulty = FaultTier::new(local.clone());
    // Step 3's MANIFEST: readable once (the lineage check, the listing),
    // not the next time.
    faulty.inject_times(
        Fault::fail_get("step-00000000000000000003/MANIFEST.json"),
        1,
    );
    let store = CheckpointStore::new(Arc::new(faulty)).expect("store");
    let e = store
        .gc("r", &Retention::keep_last(1))
        .expect_err("a kept manifest it cannot read stops gc");
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("MANIFEST.json"), "{e}");
    let store = CheckpointStore::new(local.clone()).expect("store");
    assert_eq!(
        store.steps("r").expect("steps"),
        vec![1, 2, 3],
        "nothing deleted"
    );
    let report = store.gc("r", &Retention::keep_last(1)).expect("gc");
    assert!(report.kept_for_references.contains(&1), "{report:?}");
    let m = store.manifest("r", 3).expect("manifest");
    assert!(store.verify(&m).failures.is_empty());
}

/// A rollback whose uncommit a tier missed (its deletes failed): before
/// the next saves the checkpointer tries again, so the reused step numbers
/// commit there, and the tier alone no longer lists the abandoned steps.
#[test]
fn a_missed_uncommit_is_retried_and_the_tier_commits_the_reused_steps() {
    let mem = Arc::new(MemoryTier::new());
    let faulty = Arc::new(FaultTier::new(mem.clone()));
    let c = checkpointer(faulty.clone(), 10, "a");
    for step in 1..=4 {
        save(&c, step, 0).expect("save");
    }
    drop(c);
    // A rollback to step 2 (3 and 4 abandoned) while deletes fail.
    let c = checkpointer(faulty.clone(), 10, "b");
    let r = restore(&c, Some(2));
    assert_eq!(r.newer_committed, vec![4, 3]);
    faulty.inject_times(Fault::fail_delete("MANIFEST.json"), 1);
    let r3 = save(&c, 3, 1);
    // The retry before the next save uncommits what the first try left.
    let r4 = save(&c, 4, 1).expect("step 4 of the new lineage commits");
    assert!(r4.tiers[0].committed, "{r4:?}");
    let r5 = save(&c, 5, 1).expect("step 5");
    assert!(r5.tiers[0].committed);
    let store = CheckpointStore::new(mem.clone() as Arc<dyn Tier>).expect("store");
    let steps = store.steps("r").expect("steps");
    let want: Vec<u64> = if r3.is_ok() {
        vec![1, 2, 3, 4, 5]
    } else {
        vec![1, 2, 4, 5]
    };
    assert_eq!(steps, want, "step 3's first try: {r3:?}");
    // Every listed step holds the new lineage's bytes.
    for &s in &steps {
        let mut w = vec![0f32; N];
        let r = store
            .restore(
                "r",
                &mut [&mut TensorMut::from_slice("w", &[N as u64], &mut w)],
                &ckpt::RestoreOptions::default().step(s),
            )
            .expect("restore")
            .expect("step");
        assert_eq!(w, weights(s, u64::from(s > 2)), "step {}", r.step);
    }
}
