//! Edge cases of the commit and the restore: a lost reply to the commit's
//! create, a failed restore leaving no unverified bytes behind, a manifest
//! naming a path outside its step, a shard too large for an object store's
//! part limit, a rank that skips a save in a job of two, a writer left
//! over from an earlier incarnation, and a shard file gone before the
//! commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::format::layout;
use ckpt_core::format::manifest::Manifest;
use ckpt_core::{
    BusyPolicy, Checkpointer, PutMode, RestoreOptions, TensorMut, TensorRef, Tier, TierPolicy,
    TrainingState,
};
use ckpt_io::{Fault, FaultGate, FaultTier, MemoryTier};
#[cfg(feature = "s3")]
use ckpt_io::{ObjectTier, ObjectTierConfig};

const RUN: &str = "edges";

fn state_of<'a>(step: u64, t: &'a TensorRef<'a>) -> TrainingState<'a> {
    TrainingState::builder(step)
        .model([t as &dyn ckpt_core::TensorView])
        .without_optimizer()
        .rng(&step)
        .data_loader(&step)
        .lr_schedule(&0.1)
        .build()
        .expect("state")
}

fn weights(step: u64, n: usize) -> Vec<u8> {
    ckpt_core::rng::pattern(n, step)
}

fn save(ckpt: &Checkpointer, step: u64, n: usize) -> ckpt_core::SaveHandle {
    let w = weights(step, n);
    let t = TensorRef::new("w", ckpt_core::DType::U8, &[n as u64], &w);
    ckpt.save(&state_of(step, &t)).expect("save")
}

fn one_tier(tier: Arc<dyn Tier>) -> Checkpointer {
    Checkpointer::builder(RUN)
        .tier(tier, TierPolicy::keep_last(5))
        .build()
        .expect("checkpointer")
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

#[test]
fn a_lost_reply_to_the_commit_is_still_a_commit() {
    // The MANIFEST's create is stored, but the reply is lost: the retry
    // sees AlreadyExists, for the object this very commit created.
    let faults = FaultTier::new(Arc::new(MemoryTier::new()));
    faults.inject(Fault::lose_reply(layout::MANIFEST));
    let ckpt = one_tier(Arc::new(faults.clone()));
    let report = save(&ckpt, 1, 4096).wait().expect("committed");
    assert!(report.is_durable(), "{report:?}");
    // A MANIFEST that is someone else's (different bytes) is still a
    // refusal: a committed checkpoint is never overwritten.
    let report = save(&ckpt, 2, 4096).wait().expect("committed");
    assert!(report.is_durable());
    let other = block_on(faults.get(&layout::manifest_path(RUN, 1))).expect("step 1");
    block_on(
        faults
            .inner()
            .put(&layout::manifest_path(RUN, 3), other, PutMode::Overwrite),
    )
    .expect("plant a foreign MANIFEST at step 3");
    let err = save(&ckpt, 3, 4096).wait().expect_err("step 3 exists");
    assert!(err.to_string().contains("exists"), "{err}");
}

#[test]
fn a_failed_restore_leaves_zeros_not_unverified_bytes() {
    let tier = Arc::new(MemoryTier::new());
    let n = 1 << 20;
    let ckpt = one_tier(tier.clone());
    save(&ckpt, 1, n).wait().expect("step 1");
    // Corrupt the only checkpoint's data.
    let path = block_on(ckpt_core::store::shard_file(tier.as_ref(), RUN, 1, 0)).expect("shard");
    let mut bytes = block_on(tier.get(&path)).expect("shard").to_vec();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    block_on(tier.put(&path, Bytes::from(bytes), PutMode::Overwrite)).expect("corrupt");

    let mut buf = vec![0xAAu8; n];
    let mut t = TensorMut::new("w", ckpt_core::DType::U8, &[n as u64], &mut buf);
    let err = ckpt
        .restore_with(&mut [&mut t], &RestoreOptions::default())
        .expect_err("nothing verifies");
    assert!(err.to_string().contains("corrupt"), "{err}");
    // The failed attempt read most of the corrupt shard into the buffer;
    // none of it (nor the caller's old bytes) may stay.
    assert!(buf.iter().all(|b| *b == 0), "the target was not scrubbed");
}

#[test]
fn a_manifest_naming_a_path_outside_its_step_is_a_data_fault() {
    let tier = Arc::new(MemoryTier::new());
    let ckpt = one_tier(tier.clone());
    save(&ckpt, 1, 4096).wait().expect("step 1");
    save(&ckpt, 2, 4096).wait().expect("step 2");
    // Step 2's MANIFEST, well formed and sealed, points its shard at
    // `../../escape`.
    let path = layout::manifest_path(RUN, 2);
    let mut m = Manifest::parse(&path, &block_on(tier.get(&path)).expect("get")).expect("parse");
    m.ranks[0].file = "../../escape".into();
    for t in m.tensors.values_mut() {
        for p in &mut t.pieces {
            p.file = "../../escape".into();
        }
    }
    let json = Bytes::from(m.to_json().expect("json"));
    block_on(tier.put(&path, json, PutMode::Overwrite)).expect("rewrite");

    let mut buf = vec![0u8; 4096];
    let mut t = TensorMut::new("w", ckpt_core::DType::U8, &[4096], &mut buf);
    let r = ckpt
        .restore_with(&mut [&mut t], &RestoreOptions::default())
        .expect("falls back")
        .expect("step 1");
    assert_eq!(r.step, 1);
    assert_eq!(buf, weights(1, 4096));
    let why = r
        .skipped
        .iter()
        .map(|s| s.error.to_string())
        .collect::<Vec<_>>();
    assert!(
        why.iter().any(|w| w.contains("not a plain file name")),
        "{why:?}"
    );
}

#[cfg(feature = "s3")]
#[test]
fn a_shard_too_large_for_the_part_limit_fails_that_tier_at_once() {
    // 5 MiB parts, at most 2 of them: objects of up to 10 MiB.
    let store = Arc::new(object_store::memory::InMemory::new());
    let object = ObjectTier::with_config(
        store.clone(),
        "p",
        "s3://mem/p",
        ObjectTierConfig::default()
            .with_part_size(5 << 20)
            .with_max_parts(2),
    )
    .expect("object tier");
    let local = Arc::new(MemoryTier::new());
    let ckpt = Checkpointer::builder(RUN)
        .tier(local, TierPolicy::keep_last(2))
        .tier(Arc::new(object.clone()), TierPolicy::keep_last(2))
        .build()
        .expect("checkpointer");
    let t0 = Instant::now();
    let report = save(&ckpt, 1, 12 << 20)
        .wait()
        .expect("the first tier commits");
    let elapsed = t0.elapsed();
    assert!(report.tiers[0].committed);
    let e = report.tiers[1]
        .error
        .as_ref()
        .expect("the object tier refuses");
    let text = e.to_string();
    assert!(
        text.contains("needs a part size of at least") && text.contains("10485760 bytes"),
        "{text}"
    );
    // Nothing was uploaded for it.
    let listed = block_on(object.list(&format!("{RUN}/step-"))).expect("list");
    assert!(listed.is_empty(), "{listed:?}");
    eprintln!("refused in {elapsed:?}");
    // A shard within the limit goes through.
    let report = save(&ckpt, 2, 8 << 20).wait().expect("saved");
    assert!(report.tiers.iter().all(|t| t.committed), "{report:?}");
}

#[test]
fn a_rank_that_skips_a_save_fails_the_step_at_once_and_tiers_stay_in_step() {
    // Two ranks on one store; tier A takes every save, tier B every other
    // one. Rank 1's shard writes are slow, so its pool is still held when
    // step 2 comes and it skips (BusyPolicy::Skip).
    let (a, b) = (Arc::new(MemoryTier::new()), Arc::new(MemoryTier::new()));
    let n = 1 << 20;
    // Rank 1's shard writes wait until the test opens the gate: slow for
    // exactly as long as the test needs, on any machine.
    let gate = FaultGate::new();
    let ckpts: Vec<Checkpointer> = (0..2u32)
        .map(|rank| {
            let slow = |t: &Arc<MemoryTier>| {
                let f = FaultTier::new(t.clone());
                if rank == 1 {
                    f.inject(Fault::hold(".safetensors", &gate));
                }
                Arc::new(f)
            };
            Checkpointer::builder(RUN)
                .rank(rank, 2)
                .incarnation("1")
                .staging_capacity(n as u64)
                .when_busy(BusyPolicy::Skip)
                .commit_timeout(Duration::from_secs(20))
                .tier(slow(&a), TierPolicy::keep_last(5))
                .tier(slow(&b), TierPolicy::keep_last(5).every(2))
                .build()
                .expect("checkpointer")
        })
        .collect();
    let shard = |rank: u32, step: u64| weights(step * 10 + u64::from(rank), n);
    let save_rank = |rank: usize, step: u64| {
        let w = shard(rank as u32, step);
        let spec =
            ckpt_core::ShardSpec::split(vec![2 * n as u64], 0, 2, rank as u64).expect("spec");
        let t = TensorRef::new("w", ckpt_core::DType::U8, &spec.shape, &w).with_shard(spec);
        ckpts[rank].save(&state_of(step, &t)).expect("save")
    };
    let step1: Vec<_> = (0..2).map(|r| save_rank(r, 1)).collect();
    // Rank 0's flush is quick: its pool is free again for step 2 (its
    // commit still waits for rank 1). Rank 1's is not (its shard is still
    // being written).
    let free = |r: usize| {
        ckpts[r]
            .staging_stats()
            .is_some_and(|s| s.free_blocks == s.blocks)
    };
    // A hang guard only: rank 0's flush is a memory copy.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !free(0) {
        assert!(Instant::now() < deadline, "rank 0's flush did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!free(1), "rank 1's slow flush still holds its pool");
    let step2: Vec<_> = (0..2).map(|r| save_rank(r, 2)).collect();
    assert!(step2[1].skipped(), "rank 1's pool is still held");
    // Rank 1's step 1 may finish now (step 2 was skipped at its save).
    gate.open();
    // Rank 0 learns of the skip from rank 1's note and gives up on step 2
    // at once, not after the 20 s commit timeout.
    let e = step2[0].wait().expect_err("step 2 cannot commit");
    // Given up for rank 1's note (a timeout would say "did not answer").
    assert!(e.to_string().contains("rank 1 skipped"), "{e}");
    for h in step1 {
        assert!(h.wait().expect("step 1").is_durable());
    }
    // Step 3 is save number 2 on both ranks (the skip counted): both send
    // it to tier B, which commits it.
    let step3: Vec<_> = (0..2).map(|r| save_rank(r, 3)).collect();
    for (r, h) in step3.into_iter().enumerate() {
        let report = h.wait().expect("step 3");
        assert_eq!(report.tiers.len(), 2, "rank {r}: {report:?}");
        assert!(
            report.tiers.iter().all(|t| t.committed),
            "rank {r}: {report:?}"
        );
    }
    let on_b = block_on(ckpt_core::store::committed_steps(b.as_ref(), RUN)).expect("list");
    assert_eq!(on_b, vec![1, 3]);
}

#[test]
fn a_writer_left_over_from_an_earlier_incarnation_cannot_touch_a_committed_step() {
    // Incarnation 1 starts step 5 and stalls mid-flush; incarnation 2
    // (the restarted job) commits step 5. The stalled writer then wakes
    // and finishes its shard: a file of its own attempt, which no
    // manifest names.
    let tier = Arc::new(MemoryTier::new());
    let n = 64 << 10;
    let builder = |inc: &str| {
        Checkpointer::builder(RUN)
            .incarnation(inc)
            .tier(tier.clone(), TierPolicy::keep_last(5))
            .build()
            .expect("checkpointer")
    };
    let stale = block_on(async {
        let path = format!(
            "{}/{}",
            layout::step_dir(RUN, 5),
            layout::rank_data_file(0, &layout::new_attempt("1", 5))
        );
        let mut w = tier.create(&path).await.expect("stale create");
        w.write(Bytes::from(vec![0xAB; 4096])).await.expect("write");
        (path, w)
    });
    let second = builder("2");
    save(&second, 5, n).wait().expect("step 5 commits");
    let (stale_path, mut w) = stale;
    block_on(async {
        w.write(Bytes::from(vec![0xCD; n])).await.expect("write");
        w.finish().await.expect("the stale writer finishes")
    });
    let m = block_on(ckpt_core::store::load_manifest(tier.as_ref(), RUN, 5)).expect("manifest");
    assert_ne!(
        format!("{}/{}", layout::step_dir(RUN, 5), m.ranks[0].file),
        stale_path,
        "the committed step names its own attempt's file"
    );
    let mut out = vec![0u8; n];
    let r = second
        .restore_with(
            &mut [&mut TensorMut::new(
                "w",
                ckpt_core::DType::U8,
                &[n as u64],
                &mut out,
            )],
            &RestoreOptions::default(),
        )
        .expect("restore")
        .expect("a checkpoint");
    assert_eq!(r.step, 5);
    assert!(out == weights(5, n), "step 5 restores bit-exact");
    let report = block_on(ckpt_core::store::verify_step(tier.as_ref(), &m));
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn the_coordinator_commits_only_when_every_shard_file_is_there() {
    // Rank 0's shard is slow; meanwhile rank 1's shard file disappears
    // after its rank manifest was written (a tier that lost it, a
    // cleanup). The coordinator checks every file before the commit.
    let mem = Arc::new(MemoryTier::new());
    let n = 256 << 10;
    let ckpts: Vec<Checkpointer> = (0..2u32)
        .map(|rank| {
            let f = FaultTier::new(mem.clone());
            if rank == 0 {
                f.inject_times(
                    Fault::Latency {
                        suffix: ".safetensors".into(),
                        delay: Duration::from_millis(800),
                    },
                    1,
                );
            }
            Checkpointer::builder(RUN)
                .rank(rank, 2)
                .incarnation("1")
                .commit_timeout(Duration::from_secs(20))
                .tier(Arc::new(f), TierPolicy::keep_last(5))
                .build()
                .expect("checkpointer")
        })
        .collect();
    let handles: Vec<_> = (0..2u32)
        .map(|rank| {
            let w = weights(u64::from(rank), n);
            let spec = ckpt_core::ShardSpec::split(vec![2 * n as u64], 0, 2, u64::from(rank))
                .expect("spec");
            let t = TensorRef::new("w", ckpt_core::DType::U8, &spec.shape, &w).with_shard(spec);
            ckpts[rank as usize].save(&state_of(1, &t)).expect("save")
        })
        .collect();
    let rank1 = format!(
        "{}/{}",
        layout::step_dir(RUN, 1),
        layout::rank_manifest_file(1)
    );
    // A hang guard.
    let deadline = Instant::now() + Duration::from_secs(120);
    while block_on(mem.size(&rank1)).is_err() {
        assert!(Instant::now() < deadline, "rank 1 never wrote its manifest");
        std::thread::sleep(Duration::from_millis(2));
    }
    let shard = block_on(ckpt_core::store::shard_file(mem.as_ref(), RUN, 1, 1)).expect("shard");
    block_on(mem.delete(&shard)).expect("delete");
    for (r, h) in handles.into_iter().enumerate() {
        let e = h.wait().expect_err("step 1 must not commit");
        let text = e.to_string();
        assert!(
            text.contains("rank 1's shard file is missing"),
            "rank {r}: {text}"
        );
    }
    assert!(
        block_on(ckpt_core::store::committed_steps(mem.as_ref(), RUN))
            .expect("list")
            .is_empty()
    );
}
