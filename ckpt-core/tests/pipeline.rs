//! The save → flush → commit → restore pipeline against the in-memory tier.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{
    BusyPolicy, Checkpointer, DType, Error, MemoryTier, RestoreOptions, ShardSpec, SharedTensor,
    TensorMut, TensorRef, TierPolicy, TrainingState, format::layout, store,
};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (i as u32 ^ seed) as f32 * 0.5).collect()
}

/// A state of one model and one optimizer tensor, no loop state.
fn bare_state<'a>(step: u64, w: &'a TensorRef<'a>, m: &'a TensorRef<'a>) -> TrainingState<'a> {
    TrainingState::builder(step)
        .model([w])
        .optimizer([m])
        .without_loop_state()
        .build()
        .expect("state")
}

mod support;

fn save_step(ckpt: &Checkpointer, step: u64, w: &[f32], m: &[f32]) -> ckpt_core::SaveReport {
    support::save_w_m(ckpt, step, w, m).wait().expect("durable")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn save_restore_round_trip_with_small_chunks_and_blocks() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
        .chunk_size(4096)
        .block_size(8192)
        .staging_capacity(3 * 8192) // smaller than the state: streams
        .build()
        .expect("build");
    let (w, m) = (data(20_000, 1), data(7_777, 2));
    let r = save_step(&ckpt, 5, &w, &m);
    assert!(r.is_durable());
    assert_eq!(r.bytes, (20_000 + 7_777) * 4);
    let (mut w2, mut m2) = (vec![0f32; w.len()], vec![0f32; m.len()]);
    let restored = ckpt
        .restore(&mut [
            &mut TensorMut::from_slice("w", &[20_000], &mut w2),
            &mut TensorMut::from_slice("opt.m", &[7_777], &mut m2),
        ])
        .expect("restore")
        .expect("some");
    assert_eq!((restored.step, w2 == w, m2 == m), (5, true, true));
    assert_eq!(
        restored.loop_state.data_loader::<u64>().expect("loader"),
        5 * 32
    );
    assert!(!restored.fell_back());
}

#[test]
fn corrupt_newest_falls_back_and_reports() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(3))
        .chunk_size(4096)
        .build()
        .expect("build");
    let (w1, w2) = (data(5000, 1), data(5000, 2));
    let m = data(10, 3);
    save_step(&ckpt, 1, &w1, &m);
    save_step(&ckpt, 2, &w2, &m);
    let path = rt()
        .block_on(ckpt_core::store::shard_file(&tier, "r", 2, 0))
        .expect("shard");
    assert!(tier.tamper(&path, |v| v[4096 + 9000] ^= 0x40));
    let mut out = vec![0f32; 5000];
    let mut mo = vec![0f32; 10];
    let restored = ckpt
        .restore(&mut [
            &mut TensorMut::from_slice("w", &[5000], &mut out),
            &mut TensorMut::from_slice("opt.m", &[10], &mut mo),
        ])
        .expect("restore")
        .expect("some");
    assert_eq!(restored.step, 1);
    assert_eq!(out, w1);
    assert_eq!(restored.skipped.len(), 1);
    match &restored.skipped[0].error {
        Error::Corrupt { path, chunk: 2, .. } => {
            assert!(
                path.contains("/rank-00000.") && path.ends_with(".safetensors"),
                "{path}"
            )
        }
        other => panic!("want a corrupt chunk 2, got {other:?}"),
    }
}

#[test]
fn shape_mismatch_is_a_typed_error_not_a_fallback() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier), TierPolicy::keep_last(2))
        .build()
        .expect("build");
    save_step(&ckpt, 1, &data(100, 1), &data(4, 1));
    let mut out = vec![0f32; 99];
    let err = ckpt
        .restore(&mut [&mut TensorMut::from_slice("w", &[99], &mut out)])
        .expect_err("mismatch");
    match err {
        Error::TensorMismatch { tensor, reason } => {
            assert_eq!(tensor, "w");
            assert!(reason.contains("[100]"), "{reason}");
        }
        e => panic!("unexpected {e}"),
    }
    let mut none = vec![0f32; 3];
    let err = ckpt
        .restore(&mut [&mut TensorMut::from_slice("nope", &[3], &mut none)])
        .expect_err("missing");
    assert!(
        matches!(err, Error::TensorMismatch { ref tensor, .. } if tensor == "nope"),
        "{err}"
    );
}

#[test]
fn retention_keeps_newest_and_removes_old_steps() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
        .build()
        .expect("build");
    for step in 1..=5 {
        save_step(&ckpt, step, &data(64, step as u32), &data(8, 0));
    }
    let steps = rt()
        .block_on(store::committed_steps(&tier, "r"))
        .expect("list");
    assert_eq!(steps, vec![4, 5]);
    let all = rt()
        .block_on(ckpt_core::Tier::list(&tier, "r/"))
        .expect("list");
    let left: std::collections::BTreeSet<u64> = all
        .iter()
        .filter_map(|o| layout::parse_path(&o.path))
        .map(|(_, s, _)| s)
        .collect();
    assert_eq!(left.into_iter().collect::<Vec<_>>(), vec![4, 5], "{all:?}");
}

#[test]
fn committed_step_is_never_overwritten() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
        .build()
        .expect("build");
    save_step(&ckpt, 7, &data(64, 1), &data(8, 0));
    let tw_data = data(64, 99);
    let m = data(8, 0);
    let tw = TensorRef::from_slice("w", &[64], &tw_data);
    let tm = TensorRef::from_slice("opt.m", &[8], &m);
    let state = bare_state(7, &tw, &tm);
    let err = ckpt
        .save(&state)
        .expect("save")
        .wait()
        .expect_err("second commit of step 7 must fail");
    match &err {
        Error::NotCommitted { step: 7, failures } => assert!(
            matches!(&failures[0].error, Error::AlreadyExists { path } if path.ends_with("MANIFEST.json")),
            "{err:?}"
        ),
        other => panic!("want NotCommitted, got {other:?}"),
    }
    let mut out = vec![0f32; 64];
    ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[64], &mut out)])
        .expect("restore");
    assert_eq!(out, data(64, 1));
}

#[test]
fn zero_copy_shared_bytes_and_reshard_one_to_three() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
        .chunk_size(4096)
        .build()
        .expect("build");
    let global: Vec<f32> = data(9 * 700, 5);
    let bytes = Bytes::copy_from_slice(ckpt_core::as_bytes(&global));
    let t = SharedTensor::new("emb", DType::F32, &[9, 700], bytes);
    let state = TrainingState::builder(3)
        .model([&t])
        .without_optimizer()
        .without_loop_state()
        .build()
        .expect("state");
    let report = ckpt.save(&state).expect("save").wait().expect("durable");
    assert_eq!(report.staged_bytes, 0, "shared bytes are not copied");
    for part in 0..3 {
        let shard = ShardSpec::split(vec![9, 700], 1, 3, part).expect("shard");
        let mut out = vec![0f32; shard.numel() as usize];
        let shape = shard.shape.clone();
        ckpt.restore(&mut [
            &mut TensorMut::from_slice("emb", &shape, &mut out).with_shard(shard.clone())
        ])
        .expect("restore");
        for r in 0..9u64 {
            for c in 0..shape[1] {
                let g = global[(r * 700 + shard.offsets[1] + c) as usize];
                assert_eq!(out[(r * shape[1] + c) as usize], g);
            }
        }
    }
}

#[test]
fn busy_pool_skip_policy_reports_skip() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(
            Arc::new(tier.clone()),
            TierPolicy::keep_last(2).rate_limit(200_000),
        )
        .staging_capacity(64 << 10)
        .block_size(8192)
        .when_busy(BusyPolicy::Skip)
        .build()
        .expect("build");
    let w = data(8192, 1); // 32 KiB: takes ~0.16 s at 200 KB/s
    let m = data(8, 0);
    let tw = TensorRef::from_slice("w", &[8192], &w);
    let tm = TensorRef::from_slice("opt.m", &[8], &m);
    let s1 = bare_state(1, &tw, &tm);
    let h1 = ckpt.save(&s1).expect("save 1");
    let s2 = bare_state(2, &tw, &tm);
    let h2 = ckpt.save(&s2).expect("save 2");
    let s3 = bare_state(3, &tw, &tm);
    let h3 = ckpt.save(&s3).expect("save 3");
    assert!(!h1.skipped());
    assert!(
        h3.skipped() || h2.skipped(),
        "a third save while two flushes hold 64 KiB must skip"
    );
    h1.wait().expect("first durable");
}

#[test]
fn trust_limit_skips_newer_checkpoints() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier), TierPolicy::keep_last(5))
        .build()
        .expect("build");
    save_step(&ckpt, 1, &data(16, 1), &data(4, 0));
    std::thread::sleep(Duration::from_millis(20));
    let limit = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis() as u64;
    std::thread::sleep(Duration::from_millis(20));
    save_step(&ckpt, 2, &data(16, 2), &data(4, 0));
    let mut out = vec![0f32; 16];
    let r = ckpt
        .restore_with(
            &mut [&mut TensorMut::from_slice("w", &[16], &mut out)],
            &RestoreOptions::default().not_after_unix_ms(limit),
        )
        .expect("restore")
        .expect("some");
    assert_eq!(r.step, 1);
    assert_eq!(out, data(16, 1));
    assert!(
        matches!(
            r.skipped[0].error,
            Error::AfterTrustLimit { step: 2, limit_unix_ms, .. } if limit_unix_ms == limit
        ),
        "{:?}",
        r.skipped
    );
}

#[test]
fn fresh_store_restores_nothing() {
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
        .build()
        .expect("build");
    let mut out = vec![0f32; 4];
    assert!(
        ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[4], &mut out)])
            .expect("restore")
            .is_none()
    );
}

/// A tier that holds staged bytes before releasing them (like an object
/// store's multipart parts) cannot stream through a smaller pool: the save
/// fails at once with a typed error instead of waiting forever.
#[test]
fn streaming_through_a_pool_smaller_than_a_tiers_buffer_is_a_clear_error() {
    #[derive(Debug, Clone)]
    struct Buffering(MemoryTier);
    impl ckpt_core::Tier for Buffering {
        fn location(&self) -> String {
            "mem://buffering".into()
        }
        fn capabilities(&self) -> ckpt_core::Capabilities {
            self.0.capabilities().with_buffered_write(1 << 20)
        }
        fn create<'a>(
            &'a self,
            p: &'a str,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<Box<dyn ckpt_core::TierWriter>>>
        {
            self.0.create(p)
        }
        fn put<'a>(
            &'a self,
            p: &'a str,
            d: Bytes,
            m: ckpt_core::PutMode,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<()>> {
            self.0.put(p, d, m)
        }
        fn get<'a>(
            &'a self,
            p: &'a str,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<Bytes>> {
            self.0.get(p)
        }
        fn get_range<'a>(
            &'a self,
            p: &'a str,
            r: std::ops::Range<u64>,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<Bytes>> {
            self.0.get_range(p, r)
        }
        fn size<'a>(
            &'a self,
            p: &'a str,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<u64>> {
            self.0.size(p)
        }
        fn list<'a>(
            &'a self,
            p: &'a str,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<Vec<ckpt_core::ObjectMeta>>> {
            self.0.list(p)
        }
        fn delete<'a>(
            &'a self,
            p: &'a str,
        ) -> futures::future::BoxFuture<'a, ckpt_core::Result<()>> {
            self.0.delete(p)
        }
    }
    let ckpt = Checkpointer::builder("r")
        .tier(
            Arc::new(Buffering(MemoryTier::new())),
            TierPolicy::keep_last(2),
        )
        .block_size(8192)
        .staging_capacity(64 << 10)
        .build()
        .expect("build");
    let w = data(200_000, 1); // 800 KB > 64 KiB pool
    let m = data(4, 0);
    let tw = TensorRef::from_slice("w", &[200_000], &w);
    let tm = TensorRef::from_slice("opt.m", &[4], &m);
    let state = bare_state(1, &tw, &tm);
    let err = ckpt.save(&state).expect_err("must not deadlock");
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{msg}");
    assert!(
        msg.contains("mem://buffering") && msg.contains("raise the staging capacity"),
        "{msg}"
    );
}

/// The failure log in the store: a start that follows no clean stop counts as
/// a failure, and the scheduler's MTBF estimate sees it after a restart.
#[test]
fn failure_log_counts_unclean_restarts_only() {
    let tier = MemoryTier::new();
    let open = || {
        Checkpointer::builder("r")
            .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
            .build()
            .expect("build")
    };
    let failures_seen = |ckpt: &Checkpointer, want: &str| {
        // The start event is written in the background: poll, bounded.
        // A hang guard: the event is written at once.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = ckpt.explain_schedule();
            if line.contains(want) {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected `{want}` in: {line}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let a = open();
    save_step(&a, 1, &data(16, 1), &data(4, 0));
    failures_seen(&a, "0 failures");
    drop(a); // no close(): as if the process died

    let b = open();
    let mut out = vec![0f32; 16];
    b.restore(&mut [&mut TensorMut::from_slice("w", &[16], &mut out)])
        .expect("restore");
    failures_seen(&b, "1 failures");
    b.close(); // clean stop recorded

    let c = open();
    c.restore(&mut [&mut TensorMut::from_slice("w", &[16], &mut out)])
        .expect("restore");
    // Exactly one: the clean stop between b and c is not a failure (a
    // miscount would show "2 failures" and time out here).
    failures_seen(&c, "1 failures");
}

/// A save's report says when each tier was durable, counted from the save's
/// start (math-stop included, once), and how full the staging pool was
/// until every tier finished.
#[test]
fn reports_time_each_tier_from_the_save_start_and_the_pools_occupancy() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder("r")
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
        // About 0.2 s to write the 1 MiB state.
        .tier(
            Arc::new(MemoryTier::new()),
            TierPolicy::keep_last(2).rate_limit(5 << 20),
        )
        .block_size(64 << 10)
        .build()
        .expect("build");
    let (w, m) = (data(200_000, 1), data(62_144, 2));
    let bytes = ((w.len() + m.len()) * 4) as u64;
    let r = save_step(&ckpt, 1, &w, &m);
    let (fast, slow) = (&r.tiers[0], &r.tiers[1]);
    let (fast_at, slow_at) = (
        fast.durable_at.expect("fast tier committed"),
        slow.durable_at.expect("slow tier committed"),
    );
    assert!(fast_at >= r.math_stop && slow_at >= r.math_stop, "{r:?}");
    assert!(fast_at <= r.total && slow_at <= r.total, "{r:?}");
    assert!(slow_at >= Duration::from_millis(150), "{r:?}");
    assert_eq!(r.durable_after(), Some(slow_at.max(fast_at)));

    let s = &r.staging;
    assert!(
        s.len() >= 2 && s.len() <= ckpt_core::STAGING_SAMPLES + 1,
        "{s:?}"
    );
    assert!(s.windows(2).all(|p| p[0].at <= p[1].at), "{s:?}");
    let peak = s.iter().map(|p| p.in_use_bytes).max().unwrap_or(0);
    assert!(peak >= bytes, "the pool held the whole save: {s:?}");
    // The slow tier held the blocks after the fast one was durable.
    let held_after_fast = s
        .iter()
        .filter(|p| p.at > fast_at && p.at < slow_at)
        .any(|p| p.in_use_bytes > 0);
    assert!(held_after_fast, "fast {fast_at:?}, slow {slow_at:?}: {s:?}");
    assert_eq!(s.last().map(|p| p.in_use_bytes), Some(0), "{s:?}");
}

/// A save larger than the pool streams through it: the time its copy
/// waited for blocks to come back is part of the math-stop and reported,
/// and the pool never holds more than its capacity.
#[test]
fn a_save_larger_than_the_pool_reports_the_wait_inside_its_math_stop() {
    let ckpt = Checkpointer::builder("r")
        .tier(
            Arc::new(MemoryTier::new()),
            TierPolicy::keep_last(1).rate_limit(4 << 20),
        )
        .block_size(64 << 10)
        .staging_capacity(4 * (64 << 10))
        .build()
        .expect("build");
    let (w, m) = (data(200_000, 3), data(62_144, 4));
    let r = save_step(&ckpt, 1, &w, &m);
    assert!(r.is_durable());
    assert!(
        r.waited >= Duration::from_millis(100),
        "1 MiB through 256 KiB at 4 MiB/s waits: {r:?}"
    );
    assert!(r.math_stop >= r.waited, "{r:?}");
    assert!(r.math_stop >= r.copy, "{r:?}");
    let peak = r.staging.iter().map(|p| p.in_use_bytes).max().unwrap_or(0);
    assert_eq!(peak, 4 * (64 << 10), "{:?}", r.staging);
}

/// `flush_while_staging`: blocks go to the tier while the copy runs and are
/// summed after it. The checkpoint is the same as with the flush held
/// (same crc32c and blake3 of every tensor, staged or zero-copy), restores
/// bit-exact, and a save larger than the pool still streams through it.
#[test]
fn flushing_while_staging_writes_the_same_checkpoint() {
    let (w, m) = (data(200_000, 3), data(77_777, 4));
    let emb: Vec<f32> = data(9 * 700, 5);
    let emb_bytes = Bytes::copy_from_slice(ckpt_core::as_bytes(&emb));
    let rt = rt();
    // (flush while staging, crc while staging, pool): the default first.
    let configs = [
        (false, false, 4 << 20),
        (true, false, 4 << 20),
        (true, true, 4 << 20),
        (true, false, 3 * 8192), // smaller than the state: streams
    ];
    let mut sums: Vec<Vec<(String, serde_json::Value, serde_json::Value)>> = Vec::new();
    for (early, crc_early, pool) in configs {
        let tier = MemoryTier::new();
        let ckpt = Checkpointer::builder("fws")
            .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
            .chunk_size(4096)
            .block_size(8192)
            .staging_capacity(pool)
            .blake3(true)
            .checksum_while_staging(crc_early)
            .flush_while_staging(early)
            .build()
            .expect("build");
        let tw = TensorRef::from_slice("w", &[w.len() as u64], &w);
        let tm = TensorRef::from_slice("opt.m", &[m.len() as u64], &m);
        let te = SharedTensor::new("emb", DType::F32, &[9, 700], emb_bytes.clone());
        let state = TrainingState::builder(1)
            .model([&tw])
            .model([&te])
            .optimizer([&tm])
            .without_loop_state()
            .build()
            .expect("state");
        let r = ckpt.save(&state).expect("save").wait().expect("durable");
        assert!(r.is_durable(), "{early} {crc_early} {pool}");
        let path = format!(
            "{}/{}",
            layout::step_dir("fws", 1),
            layout::rank_manifest_file(0)
        );
        let json = rt
            .block_on(ckpt_core::Tier::get(&tier, &path))
            .expect("rank manifest");
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        let mut got: Vec<_> = v["tensors"]
            .as_array()
            .expect("tensors")
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().expect("name").to_string(),
                    t["piece"]["crc32c"].clone(),
                    t["piece"]["blake3"].clone(),
                )
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(
            got.iter().all(|t| t.2.is_string()),
            "blake3 recorded: {got:?}"
        );
        sums.push(got);
        let (mut w2, mut m2, mut e2) = (
            vec![0f32; w.len()],
            vec![0f32; m.len()],
            vec![0f32; emb.len()],
        );
        let restored = ckpt
            .restore(&mut [
                &mut TensorMut::from_slice("w", &[w.len() as u64], &mut w2),
                &mut TensorMut::from_slice("emb", &[9, 700], &mut e2),
                &mut TensorMut::from_slice("opt.m", &[m.len() as u64], &mut m2),
            ])
            .expect("restore")
            .expect("a checkpoint");
        assert_eq!(restored.step, 1);
        assert!(
            w2 == w && m2 == m && e2 == emb,
            "{early} {crc_early} {pool}"
        );
    }
    for (i, s) in sums.iter().enumerate().skip(1) {
        assert_eq!(s, &sums[0], "config {i} summed differently");
    }
}
