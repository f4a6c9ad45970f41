//! Incremental saves: only changed chunks are written, restore, resharding
//! and verification follow the chunk maps, retention keeps what kept steps
//! point into, and damage to referenced bytes is caught and named.

use std::sync::Arc;

use ckpt_core::format::layout;
use ckpt_core::{
    Checkpointer, Error, MemoryTier, RestoreOptions, Retention, ShardSpec, TensorMut, TensorRef,
    Tier, TierPolicy, TrainingState, store,
};

const RUN: &str = "inc";
const CHUNK: u64 = 4096;
/// Frozen parameters: 64 chunks that never change.
const FROZEN: usize = 64 * CHUNK as usize;
/// Trained parameters: 8 chunks that change every step.
const TRAINED: usize = 8 * CHUNK as usize;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn checkpointer(tier: &MemoryTier, policy: TierPolicy) -> Checkpointer {
    Checkpointer::builder(RUN)
        .tier(Arc::new(tier.clone()), policy)
        .chunk_size(CHUNK)
        .block_size(8192)
        .build()
        .expect("checkpointer")
}

fn frozen() -> Vec<u8> {
    ckpt_core::rng::pattern(FROZEN, 1)
}

fn trained(step: u64) -> Vec<u8> {
    ckpt_core::rng::pattern(TRAINED, 100 + step)
}

/// Saves step `step` and waits for its outcome.
fn try_save(ckpt: &Checkpointer, step: u64) -> ckpt_core::Result<ckpt_core::SaveReport> {
    let (f, t) = (frozen(), trained(step));
    let tf = TensorRef::new("frozen", ckpt_core::DType::U8, &[FROZEN as u64], &f);
    let tt = TensorRef::new("trained", ckpt_core::DType::U8, &[TRAINED as u64], &t);
    let state = TrainingState::builder(step)
        .model([&tf as &dyn ckpt_core::TensorView, &tt])
        .without_optimizer()
        .rng(&step)
        .data_loader(&step)
        .lr_schedule(&0.5)
        .build()
        .expect("state");
    ckpt.save(&state).expect("save").wait()
}

/// Saves step `step`; returns the bytes of the shard file on the tier.
fn save(ckpt: &Checkpointer, tier: &MemoryTier, step: u64) -> u64 {
    let report = try_save(ckpt, step).expect("durable");
    assert!(report.is_durable(), "{report:?}");
    let shard = rt()
        .block_on(store::shard_file(tier, RUN, step, 0))
        .expect("shard");
    rt().block_on(tier.size(&shard)).expect("size")
}

/// Flips the byte at `at` of `frozen` in step 1's shard file (the file
/// later steps' frozen chunks point into); returns that file's path.
fn flip_frozen_byte(tier: &MemoryTier, at: u64) -> String {
    let m1 = rt()
        .block_on(store::load_manifest(tier, RUN, 1))
        .expect("manifest");
    let p = &m1.tensors["frozen"].pieces[0];
    let path = format!("{}/{}", layout::step_dir(RUN, 1), p.file);
    assert!(tier.tamper(&path, |v| v[(p.offset + at) as usize] ^= 1));
    path
}

/// Restores `step` (or the newest) and checks it bit for bit.
fn restore(ckpt: &Checkpointer, step: Option<u64>) -> ckpt_core::Result<ckpt_core::Restored> {
    let (mut f, mut t) = (vec![0u8; FROZEN], vec![0u8; TRAINED]);
    let mut opts = RestoreOptions::default();
    if let Some(s) = step {
        opts = opts.step(s);
    }
    let r = ckpt
        .restore_with(
            &mut [
                &mut TensorMut::new("frozen", ckpt_core::DType::U8, &[FROZEN as u64], &mut f),
                &mut TensorMut::new("trained", ckpt_core::DType::U8, &[TRAINED as u64], &mut t),
            ],
            &opts,
        )?
        .expect("a checkpoint");
    assert!(f == frozen(), "frozen bytes of step {}", r.step);
    assert!(t == trained(r.step), "trained bytes of step {}", r.step);
    Ok(r)
}

#[test]
fn only_changed_chunks_are_written_and_every_step_restores_bit_exact() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(4));
    let sizes: Vec<u64> = (1..=6).map(|s| save(&ckpt, &tier, s)).collect();
    eprintln!("shard bytes per save: {sizes:?}");
    let full = sizes[0];
    assert!(full > (FROZEN + TRAINED) as u64, "{sizes:?}");
    // Saves 2..4 write the trained chunks only; save 5 is whole again
    // (a whole save every 4), save 6 incremental on it.
    for (i, &size) in sizes.iter().enumerate() {
        let step = i + 1;
        let whole = step == 1 || step == 5;
        if whole {
            assert_eq!(size, full, "step {step}: {sizes:?}");
        } else {
            assert!(
                size < (TRAINED as u64) + 16 * CHUNK,
                "step {step} wrote {size} bytes: {sizes:?}"
            );
        }
    }
    for s in 1..=6 {
        let r = restore(&ckpt, Some(s)).expect("restore");
        assert_eq!((r.step, r.fell_back()), (s, false));
        let m = rt()
            .block_on(store::load_manifest(&tier, RUN, s))
            .expect("manifest");
        let v = rt().block_on(store::verify_step(&tier, &m));
        assert!(v.is_ok(), "step {s}: {v:?}");
        assert_eq!(
            v.bytes,
            (FROZEN + TRAINED) as u64,
            "verify reads referenced bytes too"
        );
    }
    // Step 4 points into step 1 (frozen), not into steps 2 or 3.
    let m4 = rt()
        .block_on(store::load_manifest(&tier, RUN, 4))
        .expect("manifest");
    let refs: std::collections::BTreeSet<u64> = m4.tensors["frozen"]
        .pieces
        .iter()
        .flat_map(|p| p.referenced_steps())
        .collect();
    assert_eq!(refs, [1].into());
    assert!(
        m4.tensors["trained"].pieces[0]
            .referenced_steps()
            .next()
            .is_none()
    );
}

#[test]
fn a_resharded_restore_reads_through_the_chunk_map() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(8));
    for s in 1..=3 {
        save(&ckpt, &tier, s);
    }
    // Half of `frozen` as rank 1 of 2 would ask for it.
    let spec = ShardSpec::split(vec![FROZEN as u64], 0, 2, 1).expect("spec");
    let mut half = vec![0u8; FROZEN / 2];
    let mut t = vec![0u8; TRAINED];
    let r = ckpt
        .restore(&mut [
            &mut TensorMut::new("frozen", ckpt_core::DType::U8, &spec.shape, &mut half)
                .with_shard(spec),
            &mut TensorMut::new("trained", ckpt_core::DType::U8, &[TRAINED as u64], &mut t),
        ])
        .expect("restore")
        .expect("a checkpoint");
    assert_eq!(r.step, 3);
    assert!(half == frozen()[FROZEN / 2..]);
    assert!(t == trained(3));
}

#[test]
fn retention_keeps_the_steps_kept_steps_point_into() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(1).incremental(100));
    for s in 1..=4 {
        save(&ckpt, &tier, s);
    }
    // keep_last(1) keeps 4, and 1, whose file holds 4's frozen chunks; 2
    // and 3 are gone.
    let steps = rt()
        .block_on(store::committed_steps(&tier, RUN))
        .expect("list");
    assert_eq!(steps, vec![1, 4]);
    let retention = Retention::keep_last(1);
    let report = rt()
        .block_on(store::gc(&tier, RUN, &retention))
        .expect("gc");
    assert_eq!(report.kept_for_references, vec![1]);
    assert_eq!(restore(&ckpt, None).expect("restore").step, 4);
}

#[test]
fn a_corrupt_referenced_chunk_is_named_and_restore_falls_back() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(100));
    for s in 1..=3 {
        save(&ckpt, &tier, s);
    }
    // Flip a byte of chunk 5 of `frozen` in step 1's file: steps 2 and 3
    // read it from there too.
    let path = flip_frozen_byte(&tier, 5 * CHUNK + 3);
    let e = restore(&ckpt, None).expect_err("every step shares the damaged chunk");
    let text = e.to_string();
    assert!(text.contains(&path) && text.contains("chunk 5"), "{text}");
    // Step 3 alone (its trained chunks are its own) names the same place.
    let m3 = rt()
        .block_on(store::load_manifest(&tier, RUN, 3))
        .expect("manifest");
    let v = rt().block_on(store::verify_step(&tier, &m3));
    assert!(
        v.failures
            .iter()
            .any(|f| f.contains(&path) && f.contains("chunk 5")),
        "{v:?}"
    );
}

#[test]
fn a_deleted_referenced_step_is_a_typed_error_and_restore_falls_back() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(4));
    for s in 1..=5 {
        save(&ckpt, &tier, s);
    }
    // Step 1 deleted by hand: 2, 3 and 4 point into it; 5 is whole.
    rt().block_on(store::delete_step(&tier, RUN, 1))
        .expect("delete");
    let r = restore(&ckpt, None).expect("step 5 is whole");
    assert_eq!(r.step, 5);
    let e = restore(&ckpt, Some(4)).expect_err("step 4's frozen chunks are gone");
    let text = e.to_string();
    assert!(
        text.contains(&layout::step_dir(RUN, 1)) && text.contains("gone"),
        "{text}"
    );
    assert!(
        matches!(&e, Error::NotCommitted { .. } | Error::Incomplete { .. }),
        "{e:?}"
    );
}

/// f32 weights of small magnitude, as a trained layer's are: the exponent
/// bytes repeat, the mantissas do not.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            ((ckpt_core::rng::splitmix64(&mut z) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect()
}

#[test]
fn compressed_chunks_decode_alone_and_restore_bit_exact() {
    let tier = MemoryTier::new();
    // Chunks of 64 KiB: each its own zstd frame.
    let ckpt = Checkpointer::builder(RUN)
        .tier(
            Arc::new(tier.clone()),
            TierPolicy::keep_last(10)
                .incremental(8)
                .compression(ckpt_core::Compression::On),
        )
        .chunk_size(64 << 10)
        .block_size(1 << 20)
        .build()
        .expect("checkpointer");
    let n = 256 * 1024; // 1 MiB of f32: 16 chunks
    let (w1, w2) = (weights(n, 1), weights(n, 2));
    let frozen = vec![0u8; 8 << 16]; // 8 chunks that compress to nothing
    let save_w = |step: u64, w: &[f32]| {
        let tw = TensorRef::from_slice("w", &[n as u64], w);
        let tz = TensorRef::new(
            "zeros",
            ckpt_core::DType::U8,
            &[frozen.len() as u64],
            &frozen,
        );
        let state = TrainingState::builder(step)
            .model([&tw as &dyn ckpt_core::TensorView, &tz])
            .without_optimizer()
            .rng(&step)
            .data_loader(&step)
            .lr_schedule(&0.5)
            .build()
            .expect("state");
        let r = ckpt.save(&state).expect("save").wait().expect("durable");
        (r.tiers[0].written, r.tiers[0].referenced)
    };
    let (written1, _) = save_w(1, &w1);
    let (written2, referenced2) = save_w(2, &w2);
    let raw = (n * 4 + frozen.len()) as u64;
    eprintln!(
        "raw {raw}, step 1 wrote {written1}, step 2 wrote {written2} (referenced {referenced2})"
    );
    // Grouped by byte plane, small f32 weights lose their exponent bytes'
    // entropy: well under 90% of raw; zeros vanish.
    assert!(written1 * 10 < raw * 8, "{written1} of {raw}");
    // Step 2: `zeros` unchanged, only `w` (compressed) written.
    assert_eq!(referenced2, frozen.len() as u64);
    // Restores all of `w` (or one shard of it) and `zeros` at `step` (or
    // the newest); `zeros` must come back as zeros.
    let restore_wz = |step: Option<u64>, shard: Option<ShardSpec>| {
        let len = shard.as_ref().map_or(n, |s| s.numel() as usize);
        let mut out = vec![0f32; len];
        let mut z = vec![1u8; frozen.len()];
        let mut w = TensorMut::from_slice("w", &[len as u64], &mut out);
        if let Some(spec) = shard {
            w = w.with_shard(spec);
        }
        let mut opts = RestoreOptions::default();
        if let Some(s) = step {
            opts = opts.step(s);
        }
        let r = ckpt
            .restore_with(
                &mut [
                    &mut w,
                    &mut TensorMut::new("zeros", ckpt_core::DType::U8, &[z.len() as u64], &mut z),
                ],
                &opts,
            )
            .expect("restore")
            .expect("a checkpoint");
        assert!(z.iter().all(|b| *b == 0), "step {}: zeros differ", r.step);
        (r, out)
    };
    for (step, want) in [(1u64, &w1), (2, &w2)] {
        let (r, out) = restore_wz(Some(step), None);
        assert_eq!(r.step, step);
        assert!(out == *want, "step {step}: w differs");
        let m = rt()
            .block_on(store::load_manifest(&tier, RUN, step))
            .expect("manifest");
        let v = rt().block_on(store::verify_step(&tier, &m));
        assert!(v.is_ok(), "{v:?}");
    }
    // A slice of `w` reads (and decodes) only its chunks.
    let spec = ShardSpec::split(vec![n as u64], 0, 4, 3).expect("spec");
    let (r, quarter) = restore_wz(None, Some(spec));
    assert!(quarter == w2[3 * n / 4..]);
    // Exactly its 4 chunks of 16 (a quarter of `w`), and `zeros`.
    assert_eq!(
        r.bytes_read,
        (n + frozen.len()) as u64,
        "read {} bytes for a quarter of w and all of zeros",
        r.bytes_read
    );
    // A damaged frame in step 2: restore says which chunk and falls back.
    let m2 = rt()
        .block_on(store::load_manifest(&tier, RUN, 2))
        .expect("manifest");
    let c = &m2.tensors["w"].pieces[0].chunks[10];
    let at = (c.offset + c.zstd.expect("compressed") / 2) as usize;
    let path = format!("{}/{}", layout::step_dir(RUN, 2), c.file);
    assert!(tier.tamper(&path, |v| v[at] ^= 0x55));
    let (r, out) = restore_wz(None, None);
    assert_eq!(r.step, 1, "{:?}", r.skipped);
    assert!(out == w1);
    let why = r.skipped[0].error.to_string();
    assert!(why.contains(&path) && why.contains("chunk 10"), "{why}");
}

#[test]
fn the_first_save_after_a_restart_compares_against_the_restored_step() {
    let tier = MemoryTier::new();
    let policy = TierPolicy::keep_last(10).incremental(8);
    let full = {
        let ckpt = checkpointer(&tier, policy);
        let full = save(&ckpt, &tier, 1);
        save(&ckpt, &tier, 2);
        assert!(ckpt.close().iter().all(|r| r.is_ok()));
        full
    };
    // A new process: no base in memory. The restored step's manifest
    // carries each chunk's blake3, so its first save skips the frozen
    // chunks again, pointing into step 1 (where step 2 points too).
    let ckpt = checkpointer(&tier, policy);
    assert_eq!(restore(&ckpt, None).expect("restore").step, 2);
    let size = save(&ckpt, &tier, 3);
    assert!(
        size < (TRAINED as u64) + 16 * CHUNK,
        "the first save after a restart wrote {size} of {full} bytes"
    );
    let m = rt()
        .block_on(store::load_manifest(&tier, RUN, 3))
        .expect("manifest");
    let frozen = &m.tensors["frozen"].pieces[0];
    assert!(
        frozen.chunks.iter().all(|c| c.step == Some(1)),
        "frozen chunks point at step 1: {:?}",
        frozen.chunks.first()
    );
    assert_eq!(frozen.chunk_blake3.len(), FROZEN / CHUNK as usize);
    assert!(ckpt.close().iter().all(|r| r.is_ok()));
    // A process that restores nothing (a fresh start) saves whole.
    let other = MemoryTier::new();
    let ckpt = checkpointer(&other, policy);
    assert_eq!(save(&ckpt, &other, 1), full);
    // Every step still restores bit-exact.
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10));
    for s in 1..=3 {
        assert_eq!(restore(&ckpt, Some(s)).expect("restore").step, s);
    }
}

#[test]
fn compaction_copies_what_kept_steps_point_at_so_gc_can_delete_it() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(100));
    for s in 1..=5 {
        save(&ckpt, &tier, s);
    }
    let retention = Retention::keep_last(2);
    // Without compaction, 4 and 5 keep 1 alive.
    let (_, _, for_refs) = rt()
        .block_on(store::select_with_references(
            &tier,
            RUN,
            &[1, 2, 3, 4, 5],
            &retention,
        ))
        .expect("plan");
    assert_eq!(for_refs, vec![1]);
    let c = rt()
        .block_on(store::compact(&tier, RUN, &retention))
        .expect("compact");
    // Step 4 takes copies of the frozen chunks; step 5 points at them.
    assert_eq!(c.compacted_steps, vec![4, 5], "{c:?}");
    assert_eq!(c.copied_chunks, (FROZEN / CHUNK as usize) as u64, "{c:?}");
    assert_eq!(c.copied_bytes, FROZEN as u64, "{c:?}");
    assert_eq!(c.redirected_chunks, c.copied_chunks, "{c:?}");
    let m5 = rt()
        .block_on(store::load_manifest(&tier, RUN, 5))
        .expect("manifest");
    let refs: std::collections::BTreeSet<u64> = m5
        .tensors
        .values()
        .flat_map(|t| t.pieces.iter().flat_map(|p| p.referenced_steps()))
        .collect();
    assert_eq!(refs, [4].into());
    let g = rt()
        .block_on(store::gc(&tier, RUN, &retention))
        .expect("gc");
    assert_eq!(g.deleted_steps, vec![1, 2, 3], "{g:?}");
    assert!(g.kept_for_references.is_empty(), "{g:?}");
    for s in [4, 5] {
        assert_eq!(restore(&ckpt, Some(s)).expect("restore").step, s);
        let m = rt()
            .block_on(store::load_manifest(&tier, RUN, s))
            .expect("manifest");
        let v = rt().block_on(store::verify_step(&tier, &m));
        assert!(v.is_ok(), "step {s}: {v:?}");
    }
    // A second compaction finds nothing to do; the next save points into
    // the compacted step.
    let again = rt()
        .block_on(store::compact(&tier, RUN, &retention))
        .expect("compact");
    assert!(again.compacted_steps.is_empty(), "{again:?}");
    save(&ckpt, &tier, 6);
    assert_eq!(restore(&ckpt, Some(6)).expect("restore").step, 6);
}

#[test]
fn compaction_refuses_to_copy_a_corrupt_chunk_and_changes_nothing() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(100));
    for s in 1..=3 {
        save(&ckpt, &tier, s);
    }
    let path = flip_frozen_byte(&tier, 7 * CHUNK);
    let before = rt()
        .block_on(store::load_manifest(&tier, RUN, 3))
        .expect("manifest");
    let e = rt()
        .block_on(store::compact(&tier, RUN, &Retention::keep_last(1)))
        .expect_err("a corrupt chunk is not copied");
    let text = e.to_string();
    assert!(
        text.contains(&path) && text.contains("chunk 7") && text.contains("frozen"),
        "{text}"
    );
    let after = rt()
        .block_on(store::load_manifest(&tier, RUN, 3))
        .expect("manifest");
    assert_eq!(before, after, "the kept step's manifest is unchanged");
    // gc still keeps step 1 for step 3's references.
    let g = rt()
        .block_on(store::gc(&tier, RUN, &Retention::keep_last(1)))
        .expect("gc");
    assert_eq!(g.kept_for_references, vec![1], "{g:?}");
}

#[test]
fn a_save_pointing_into_a_step_gc_deleted_meanwhile_fails_and_the_next_is_whole() {
    let tier = MemoryTier::new();
    let ckpt = checkpointer(&tier, TierPolicy::keep_last(10).incremental(100));
    for s in 1..=3 {
        save(&ckpt, &tier, s);
    }
    // Compaction and gc from outside while the job runs: step 1 goes, but
    // this process's base still points into it.
    let retention = Retention::keep_last(1);
    rt().block_on(store::compact(&tier, RUN, &retention))
        .expect("compact");
    let g = rt()
        .block_on(store::gc(&tier, RUN, &retention))
        .expect("gc");
    assert_eq!(g.deleted_steps, vec![1, 2]);
    let e = try_save(&ckpt, 4).expect_err("not committed on the only tier");
    assert!(matches!(e, Error::NotCommitted { step: 4, .. }), "{e:?}");
    let why = e.to_string();
    assert!(
        why.contains(&layout::step_dir(RUN, 1)) && why.contains("no longer committed"),
        "{why}"
    );
    // Training goes on; the next save on the tier is whole, and commits.
    let full = save(&ckpt, &tier, 5);
    assert!(full > FROZEN as u64, "{full}");
    assert_eq!(restore(&ckpt, None).expect("restore").step, 5);
}
