//! The object tier against a real S3-compatible server.
//!
//! Point the suite at a server with `CKPT_TEST_S3_ENDPOINT`,
//! `CKPT_TEST_S3_BUCKET`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
//! (`scripts/s3-server.sh start` starts a local s3s-fs and writes them to
//! `target/s3-test-server.env`). Without them every test prints why it is
//! skipped and returns; with `CKPT_REQUIRE_S3=1` they fail instead.
//!
//! The restart test also starts a private s3s-fs (`CKPT_S3S_FS`, or
//! `$CKPT_TOOLS/bin/s3s-fs`, default `~/.local/ckpt-tools/bin/s3s-fs`).
//!
//! Every test works under its own prefix, so the tests can share a bucket
//! and run in parallel.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ckpt_core::{
    Checkpointer, Error, PutMode, SaveReport, TensorMut, Tier, TierPolicy, format::layout,
};
use ckpt_io::object::object_store::{ObjectStoreExt, PutPayload, RetryConfig};
use ckpt_io::{ObjectTier, ObjectTierConfig};

#[path = "../../tests/common/s3s.rs"]
mod s3s;
use s3s::{Server, free_port, require_s3, s3s_fs_binary};

const MIB: usize = 1 << 20;

/// Connection settings from the environment.
#[derive(Clone)]
struct S3Env {
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_key: String,
}

/// The server to test against, or `None` (after saying why) if none is
/// configured. Panics instead when `CKPT_REQUIRE_S3=1`.
fn s3_env(test: &str) -> Option<S3Env> {
    let vars = [
        "CKPT_TEST_S3_ENDPOINT",
        "CKPT_TEST_S3_BUCKET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ];
    let values: Vec<Option<String>> = vars
        .iter()
        .map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .collect();
    let missing: Vec<&str> = vars
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{test}: SKIPPED: no S3 server configured ({} unset); run `scripts/s3-server.sh start` \
             and `source target/s3-test-server.env`",
            missing.join(", ")
        );
        assert!(!require_s3(), "CKPT_REQUIRE_S3=1 but {why}");
        eprintln!("{why}");
        return None;
    }
    let mut it = values.into_iter().flatten();
    Some(S3Env {
        endpoint: it.next()?,
        bucket: it.next()?,
        access_key: it.next()?,
        secret_key: it.next()?,
    })
}

/// A prefix no other test (or earlier run) uses.
fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("ckpt-tests/{test}-{}-{nanos}", std::process::id())
}

fn config(env: &S3Env) -> ObjectTierConfig {
    ObjectTierConfig::default()
        .with_endpoint(env.endpoint.clone())
        .with_allow_http(true)
        .with_region(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()))
        .with_credentials(env.access_key.clone(), env.secret_key.clone())
}

fn tier(env: &S3Env, prefix: &str, cfg: ObjectTierConfig) -> ObjectTier {
    ObjectTier::from_url(&format!("s3://{}/{prefix}", env.bucket), cfg).expect("object tier")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Deterministic, position-dependent bytes (no two parts alike).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    ckpt_core::rng::pattern(len, seed)
}

fn paths(objects: &[ckpt_core::ObjectMeta]) -> Vec<String> {
    let mut p: Vec<String> = objects.iter().map(|o| o.path.clone()).collect();
    p.sort();
    p
}

#[test]
fn put_get_range_size_list_delete_and_create_once() {
    let Some(env) = s3_env("put_get_range_size_list_delete_and_create_once") else {
        return;
    };
    let t = tier(
        &env,
        &unique_prefix("semantics"),
        config(&env).with_request_timeout(Duration::from_secs(20)),
    );
    rt().block_on(async {
        let a = Bytes::from_static(b"0123456789");
        t.put("a/x", a.clone(), PutMode::Overwrite)
            .await
            .expect("put");
        t.put("a/xy", Bytes::from_static(b"xy"), PutMode::Overwrite)
            .await
            .expect("put");
        t.put("a/y/z", Bytes::new(), PutMode::Overwrite)
            .await
            .expect("put empty");
        t.put("b", Bytes::from_static(b"b"), PutMode::Overwrite)
            .await
            .expect("put");

        assert_eq!(t.get("a/x").await.expect("get"), a);
        assert_eq!(t.get("a/y/z").await.expect("get empty").len(), 0);
        assert_eq!(&t.get_range("a/x", 2..5).await.expect("range")[..], b"234");
        assert_eq!(&t.get_range("a/x", 9..10).await.expect("last")[..], b"9");
        assert!(t.get_range("a/x", 10..10).await.expect("empty").is_empty());
        for bad in [5..11, 10..12, 11..11] {
            let e = t.get_range("a/x", bad.clone()).await.expect_err("past end");
            assert!(matches!(e, Error::Incomplete { .. }), "{bad:?}: {e}");
        }
        let mut buf = [0u8; 4];
        t.read_into("a/x", 6, &mut buf).await.expect("read_into");
        assert_eq!(&buf, b"6789");
        let e = t
            .read_into("a/x", 8, &mut buf)
            .await
            .expect_err("short read_into");
        assert!(matches!(e, Error::Incomplete { .. }), "{e}");
        assert_eq!(t.size("a/x").await.expect("size"), 10);
        assert_eq!(t.size("a/y/z").await.expect("size"), 0);

        for e in [
            t.size("nope").await.expect_err("size missing"),
            t.get("nope").await.expect_err("get missing"),
            t.get_range("nope", 0..1).await.expect_err("range missing"),
        ] {
            assert!(
                matches!(&e, Error::NotFound { path } if path == "nope"),
                "{e}"
            );
        }

        // Listing matches a string prefix, recursively, like MemoryTier.
        assert_eq!(
            paths(&t.list("").await.expect("list all")),
            ["a/x", "a/xy", "a/y/z", "b"]
        );
        assert_eq!(
            paths(&t.list("a/").await.expect("list a/")),
            ["a/x", "a/xy", "a/y/z"]
        );
        assert_eq!(
            paths(&t.list("a/x").await.expect("list a/x")),
            ["a/x", "a/xy"]
        );
        assert!(t.list("c/").await.expect("list empty").is_empty());
        let sizes: Vec<u64> = {
            let mut l = t.list("a/x").await.expect("list");
            l.sort_by(|p, q| p.path.cmp(&q.path));
            l.iter().map(|o| o.size).collect()
        };
        assert_eq!(sizes, [10, 2]);

        // Overwrite replaces; Create happens once (where the server ignores
        // the condition, by the fallback the probe switches on).
        let g = t.create_guarantee().await;
        eprintln!("{}: {g}", t.location());
        t.put("a/x", Bytes::from_static(b"new"), PutMode::Overwrite)
            .await
            .expect("overwrite");
        assert_eq!(&t.get("a/x").await.expect("get")[..], b"new");
        t.put(
            "m/MANIFEST.json",
            Bytes::from_static(b"one"),
            PutMode::Create,
        )
        .await
        .expect("first create");
        let e = t
            .put(
                "m/MANIFEST.json",
                Bytes::from_static(b"two"),
                PutMode::Create,
            )
            .await
            .expect_err("second create must fail");
        assert!(
            matches!(&e, Error::AlreadyExists { path } if path == "m/MANIFEST.json"),
            "{e}"
        );
        assert_eq!(&t.get("m/MANIFEST.json").await.expect("get")[..], b"one");

        // The single-writer fallback behaves the same from one process.
        let t2 = tier(&env, t.prefix(), config(&env).with_conditional_put(false));
        assert!(!t2.capabilities().atomic_create);
        let e = t2
            .put("m/MANIFEST.json", Bytes::from_static(b"3"), PutMode::Create)
            .await
            .expect_err("fallback create must fail too");
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
        t2.put("m/OTHER.json", Bytes::from_static(b"4"), PutMode::Create)
            .await
            .expect("fallback create");

        // Delete; deleting an absent object succeeds.
        t.delete("a/x").await.expect("delete");
        t.delete("a/x").await.expect("delete absent");
        assert!(matches!(t.get("a/x").await, Err(Error::NotFound { .. })));
        for p in paths(&t.list("").await.expect("list")) {
            t.delete(&p).await.expect("cleanup");
        }
        assert!(t.list("").await.expect("list").is_empty());
        t.check().await.expect("check");
        assert!(
            t.location()
                .starts_with(&format!("s3://{}/ckpt-tests/", env.bucket))
        );
    });
}

#[test]
fn multipart_upload_reads_back_and_abort_leaves_nothing() {
    let Some(env) = s3_env("multipart_upload_reads_back_and_abort_leaves_nothing") else {
        return;
    };
    let t = tier(
        &env,
        &unique_prefix("multipart"),
        config(&env).with_part_size(16 * MIB),
    );
    let data = Bytes::from(pattern(40 * MIB, 1));
    rt().block_on(async {
        // 40 MiB in uneven writes: parts of 16 + 16 + 8 MiB.
        let mut w = t.create("big/obj").await.expect("create");
        let mut rest = data.clone();
        let mut sizes = [3 * MIB, 7 * MIB + 13, 1, 11 * MIB].iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().expect("cycle")).min(rest.len());
            w.write(rest.split_to(n)).await.expect("write");
        }
        assert!(
            t.list("big/").await.expect("list").is_empty(),
            "an unfinished upload must not be visible"
        );
        w.finish().await.expect("finish");

        assert_eq!(t.size("big/obj").await.expect("size"), 40 * MIB as u64);
        let listed = t.list("big/").await.expect("list");
        assert_eq!(paths(&listed), ["big/obj"]);
        assert_eq!(listed[0].size, 40 * MIB as u64);
        let p = 16 * MIB as u64;
        for r in [
            0..100,
            p - 7..p + 9,
            2 * p - 1..2 * p + 1,
            40 * MIB as u64 - 5..40 * MIB as u64,
        ] {
            let got = t.get_range("big/obj", r.clone()).await.expect("range");
            assert_eq!(got, data.slice(r.start as usize..r.end as usize), "{r:?}");
        }
        let mut buf = vec![0u8; 24 * MIB];
        t.read_into("big/obj", 8 * MIB as u64, &mut buf)
            .await
            .expect("read_into");
        assert!(buf[..] == data[8 * MIB..32 * MIB], "read_into bytes differ");
        assert!(
            t.get("big/obj").await.expect("get") == data,
            "whole object differs"
        );

        // A small object through the writer is one PUT.
        let mut w = t.create("small").await.expect("create");
        w.write(Bytes::from_static(b"hello ")).await.expect("write");
        w.write(Bytes::from_static(b"world")).await.expect("write");
        w.finish().await.expect("finish");
        assert_eq!(&t.get("small").await.expect("get")[..], b"hello world");

        // Aborted after parts went up: nothing visible, earlier object kept.
        let mut w = t.create("big/obj").await.expect("create");
        w.write(Bytes::from(pattern(20 * MIB, 2)))
            .await
            .expect("write");
        w.write(Bytes::from(pattern(20 * MIB, 3)))
            .await
            .expect("write");
        w.abort().await.expect("abort");
        let mut w = t.create("big/aborted").await.expect("create");
        w.write(data.slice(..33 * MIB)).await.expect("write");
        w.abort().await.expect("abort");
        // Dropped without finish: aborted in the background.
        let mut w = t.create("big/dropped").await.expect("create");
        w.write(data.slice(..20 * MIB)).await.expect("write");
        drop(w);
        assert_eq!(paths(&t.list("big/").await.expect("list")), ["big/obj"]);
        assert!(
            t.get("big/obj").await.expect("get") == data,
            "aborted upload replaced data"
        );

        for p in paths(&t.list("").await.expect("list")) {
            t.delete(&p).await.expect("cleanup");
        }
    });
}

#[path = "../../ckpt-core/tests/support/mod.rs"]
mod support;
use support::save_w_m as save_step;

fn floats(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (i as u32 ^ seed) as f32 * 0.25).collect()
}

fn restore_w(ckpt: &Checkpointer, n: usize, m: usize) -> (ckpt_core::Restored, Vec<f32>) {
    let (mut w, mut om) = (vec![0f32; n], vec![0f32; m]);
    let r = ckpt
        .restore(&mut [
            &mut TensorMut::from_slice("w", &[n as u64], &mut w),
            &mut TensorMut::from_slice("opt.m", &[m as u64], &mut om),
        ])
        .expect("restore")
        .expect("a checkpoint");
    (r, w)
}

#[test]
fn checkpoint_round_trip_and_corruption_falls_back() {
    let Some(env) = s3_env("checkpoint_round_trip_and_corruption_falls_back") else {
        return;
    };
    let t = tier(&env, &unique_prefix("pipeline"), config(&env));
    let ckpt = Checkpointer::builder("run")
        .tier(Arc::new(t.clone()), TierPolicy::keep_last(3))
        .chunk_size(256 << 10)
        .build()
        .expect("checkpointer");
    let n = 3 * MIB / 4; // 3 MiB of f32
    let (w1, w2, m) = (floats(n, 1), floats(n, 2), floats(1000, 3));
    save_step(&ckpt, 1, &w1, &m).wait().expect("step 1 durable");
    let r2: SaveReport = save_step(&ckpt, 2, &w2, &m).wait().expect("step 2 durable");
    assert!(r2.tiers[0].committed, "{:?}", r2.tiers);

    let (r, w) = restore_w(&ckpt, n, 1000);
    assert_eq!((r.step, r.fell_back()), (2, false));
    assert!(w == w2, "restored step 2 differs");
    assert_eq!(r.loop_state.data_loader::<u64>().expect("loader"), 64);

    // Flip one byte of step 2's shard behind ckpt's back.
    let shard = rt()
        .block_on(ckpt_core::store::shard_file(&t, "run", 2, 0))
        .expect("shard of step 2");
    let key = t.object_key(&shard).expect("key");
    rt().block_on(async {
        let mut bytes = t
            .store()
            .get(&key)
            .await
            .expect("raw get")
            .bytes()
            .await
            .expect("raw body")
            .to_vec();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        t.store()
            .put(&key, PutPayload::from(bytes))
            .await
            .expect("raw put");
    });

    // A fresh checkpointer (a restarted job) falls back to step 1.
    drop(ckpt);
    let ckpt = Checkpointer::builder("run")
        .tier(Arc::new(t.clone()), TierPolicy::keep_last(3))
        .build()
        .expect("checkpointer");
    let (r, w) = restore_w(&ckpt, n, 1000);
    assert_eq!(r.step, 1);
    assert!(w == w1, "restored step 1 differs");
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    assert_eq!(r.skipped[0].step, Some(2));
    assert!(
        matches!(&r.skipped[0].error, Error::Corrupt { path, .. } if *path == shard),
        "{:?}",
        r.skipped[0].error
    );
    assert!(
        r.skipped[0].tier.starts_with("s3://"),
        "{}",
        r.skipped[0].tier
    );

    rt().block_on(async {
        for p in paths(&t.list("").await.expect("list")) {
            t.delete(&p).await.expect("cleanup");
        }
    });
}

#[test]
fn wrong_credentials_and_missing_bucket_are_clear_errors() {
    let Some(env) = s3_env("wrong_credentials_and_missing_bucket_are_clear_errors") else {
        return;
    };
    let prefix = unique_prefix("errors");
    let bad = tier(
        &env,
        &prefix,
        config(&env).with_credentials(env.access_key.clone(), "not-the-secret"),
    );
    let missing_bucket = format!(
        "ckpt-missing-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let nobucket = ObjectTier::from_url(&format!("s3://{missing_bucket}/{prefix}"), config(&env))
        .expect("tier");
    rt().block_on(async {
        let errors = [
            bad.check().await.expect_err("check with a wrong secret"),
            bad.list("").await.expect_err("list with a wrong secret"),
            bad.get("x").await.expect_err("get with a wrong secret"),
            bad.put("x", Bytes::from_static(b"x"), PutMode::Create)
                .await
                .expect_err("put with a wrong secret"),
        ];
        for e in errors {
            eprintln!("wrong secret: {e}");
            match &e {
                Error::Backend {
                    retryable, message, ..
                } => {
                    assert!(!retryable, "{e}");
                    assert!(message.contains("credentials were rejected"), "{e}");
                    assert!(message.contains(&env.endpoint), "{e}");
                    assert!(message.contains(&env.bucket), "{e}");
                }
                _ => panic!("wrong secret: want a Backend error, got {e}"),
            }
        }

        for e in [
            nobucket
                .check()
                .await
                .expect_err("check of a missing bucket"),
            nobucket
                .list("")
                .await
                .expect_err("list of a missing bucket"),
        ] {
            eprintln!("missing bucket: {e}");
            match &e {
                Error::Backend {
                    retryable, message, ..
                } => {
                    assert!(!retryable, "{e}");
                    assert!(message.contains("does not exist"), "{e}");
                    assert!(message.contains(&missing_bucket), "{e}");
                    assert!(message.contains(&env.endpoint), "{e}");
                }
                _ => panic!("missing bucket: want a Backend error, got {e}"),
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Server stopped mid-upload.

/// Waits for a save with a bound (`SaveHandle::wait` itself has none).
fn wait_bounded(h: &ckpt_core::SaveHandle, limit: Duration) -> ckpt_core::Result<SaveReport> {
    let (tx, rx) = mpsc::channel();
    let h2 = h.clone();
    std::thread::spawn(move || {
        let _ = tx.send(h2.wait());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("save of step {} did not finish within {limit:?}", h.step()))
}

#[test]
fn server_killed_mid_upload_fails_the_save_and_keeps_older_checkpoints() {
    const TEST: &str = "server_killed_mid_upload_fails_the_save_and_keeps_older_checkpoints";
    let Some(bin) = s3s_fs_binary(TEST) else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("private")).expect("bucket dir");
    let mut server = Server::start(bin, root.path().to_path_buf(), free_port());

    let retry = RetryConfig {
        max_retries: 1,
        retry_timeout: Duration::from_secs(2),
        ..RetryConfig::default()
    };
    let t = ObjectTier::from_url(
        "s3://private/ckpt",
        ObjectTierConfig::default()
            .with_endpoint(server.endpoint())
            .with_region("us-east-1")
            .with_credentials(server.access_key.clone(), server.secret_key.clone())
            .with_part_size(5 * MIB)
            .with_retry(retry)
            .with_connect_timeout(Duration::from_secs(1))
            .with_request_timeout(Duration::from_secs(10)),
    )
    .expect("tier");
    let ckpt = Checkpointer::builder("run")
        .tier(
            Arc::new(t.clone()),
            TierPolicy::keep_last(2).rate_limit(8 * MIB as u64),
        )
        .staging_capacity(80 * MIB as u64)
        .build()
        .expect("checkpointer");

    let m = floats(1000, 9);
    let w1 = floats(MIB / 4, 1); // 1 MiB
    save_step(&ckpt, 1, &w1, &m).wait().expect("step 1 durable");

    // Step 2: 64 MiB at 8 MiB/s: at least 8 s of upload (the rate limit
    // is a floor on the time, whatever the machine). The save returns
    // before it: the math-stop is the copy alone (its figure is
    // `ckpt-bench stage`'s, not this test's).
    let n2 = 16 * MIB;
    let w2 = floats(n2, 2);
    let began = Instant::now();
    let h2 = save_step(&ckpt, 2, &w2, &m);
    let returned = began.elapsed();
    assert!(
        !h2.is_done(),
        "the save finished before it returned: the flush did not run in the background"
    );
    // Some of the upload has happened (the first 5 MiB part takes 0.6 s
    // at the limit), then the server dies mid-upload.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        !h2.is_done(),
        "the save finished before the server was stopped"
    );
    server.kill();

    // The training thread keeps going while the flush fails: polling the
    // handle never blocks.
    let (tx, rx) = mpsc::channel();
    let waiter = h2.clone();
    std::thread::spawn(move || {
        let _ = tx.send(waiter.wait());
    });
    // Counted, not timed: a poll that blocked until the save ended would
    // leave room for one or two polls, not many.
    let (mut slowest, mut polls) = (Duration::ZERO, 0u32);
    let outcome = loop {
        let t0 = Instant::now();
        let _ = (h2.is_done(), h2.report());
        slowest = slowest.max(t0.elapsed());
        polls += 1;
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A hang guard: the retry budget is 2 s a request.
                assert!(
                    began.elapsed() < Duration::from_secs(300),
                    "the failed save did not finish within 300 s"
                );
            }
            Err(e) => panic!("waiter thread: {e}"),
        }
    };
    assert!(
        polls >= 3,
        "only {polls} polls while the save failed: polling blocked (slowest {slowest:?})"
    );
    let err = outcome.expect_err("a save whose server died must fail");
    eprintln!(
        "server killed: save failed {:?} after the start, math-stop {:?}, save returned in {returned:?}, {polls} polls, slowest {slowest:?}: {err}",
        began.elapsed(),
        h2.math_stop()
    );
    let report = h2.report();
    assert!(
        !report.is_durable() && !report.tiers[0].committed,
        "{report:?}"
    );
    match &report.tiers[0].error {
        Some(Error::Backend { tier, .. }) => assert_eq!(tier, "s3://private/ckpt"),
        other => panic!("want a Backend error naming the tier, got {other:?}"),
    }
    assert!(
        matches!(&err, Error::NotCommitted { step: 2, failures } if failures.len() == 1),
        "{err:?}"
    );

    // Restart on the same data and port: step 1 is intact, step 2 left
    // nothing visible, and the next save works.
    server.spawn();
    let leftovers = rt()
        .block_on(t.list(&format!("{}/", layout::step_dir("run", 2))))
        .expect("list step 2");
    assert!(leftovers.is_empty(), "failed upload left {leftovers:?}");
    let (r, w) = restore_w(&ckpt, MIB / 4, 1000);
    assert_eq!((r.step, r.fell_back()), (1, false));
    assert!(w == w1, "step 1 differs after the restart");

    // The failed save took the tier out of saves; its health probe brings
    // it back within one probe interval of the server answering.
    let status = ckpt.tier_status();
    assert!(!status[0].is_available(), "{status:?}");
    let back = Instant::now();
    while !ckpt.tier_status()[0].is_available() {
        // A hang guard: the probe's interval is far shorter.
        assert!(
            back.elapsed() < Duration::from_secs(120),
            "the tier is still out 120 s after its server came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("tier back in saves {:?} after the restart", back.elapsed());
    let w3 = floats(MIB / 4, 3);
    let h3 = save_step(&ckpt, 3, &w3, &m);
    let rep3 = wait_bounded(&h3, Duration::from_secs(30)).expect("step 3 durable after restart");
    assert!(rep3.tiers[0].committed);
    let (r, w) = restore_w(&ckpt, MIB / 4, 1000);
    assert_eq!(r.step, 3);
    assert!(w == w3, "step 3 differs");
    drop(ckpt);
    server.kill();
}

/// The conformance suite every tier passes, against the real S3 server.
#[test]
fn conformance_suite() {
    let Some(env) = s3_env("conformance_suite") else {
        return;
    };
    let prefix = unique_prefix("conformance");
    let tier: std::sync::Arc<dyn ckpt_core::Tier> =
        std::sync::Arc::new(tier(&env, &prefix, config(&env)));
    // What the server's conditional create guarantees is probed, not
    // assumed: the checks that need an atomic create say why they skip
    // where it is not (s3s-fs: racy; Garage: ignored), and the racing
    // coordinators check holds everywhere.
    rt().block_on(ckpt_io::conformance::run_all(tier));
}

#[test]
fn error_codes_in_a_path_do_not_change_how_errors_are_classified() {
    // Errors are classified from the typed error and the response, never
    // from text that includes the object path: a run and a prefix named
    // after S3 error codes save, list and restore like any other.
    let Some(env) = s3_env("error_codes_in_a_path_do_not_change_how_errors_are_classified") else {
        return;
    };
    // (Short names: s3s-fs keeps a temporary file named after the key.)
    let prefix = format!("{}/NoSuchKey-412", unique_prefix("codes"));
    let t = tier(&env, &prefix, config(&env));
    let run = "NoSuchBucket-AccessDenied-503";
    let ckpt = Checkpointer::builder(run)
        .tier(Arc::new(t.clone()), TierPolicy::keep_last(3))
        .build()
        .expect("checkpointer");
    let (n, m) = (4096, 10);
    let (w1, om) = (floats(n, 7), floats(m, 8));
    let report = save_step(&ckpt, 1, &w1, &om)
        .wait()
        .expect("step 1 durable");
    assert!(report.is_durable(), "{report:?}");
    let (r, w) = restore_w(&ckpt, n, m);
    assert_eq!(r.step, 1);
    assert!(w == w1);
    // A missing object there is NotFound, not a missing bucket.
    let missing = format!("{}/NoSuchBucket.json", layout::step_dir(run, 1));
    match rt().block_on(t.get(&missing)) {
        Err(Error::NotFound { path }) => assert_eq!(path, missing),
        other => panic!("want NotFound for {missing}: {other:?}"),
    }
    assert_eq!(
        rt().block_on(ckpt_core::store::committed_steps(&t, run))
            .expect("list"),
        vec![1]
    );
    // Two words the S3 client reads as a failure in any response body
    // (which echoes keys): refused up front, naming the word, not a save
    // that uploads everything and then fails.
    for word in ["InternalError", "SlowDown"] {
        let bad = format!("{}/{word}", unique_prefix("codes"));
        match ObjectTier::from_url(&format!("s3://{}/{bad}", env.bucket), config(&env)) {
            Err(Error::InvalidPath { path, reason }) => {
                assert_eq!(path, bad);
                assert!(reason.contains(word), "{reason}");
            }
            other => panic!("prefix {bad}: {other:?}"),
        }
        let run = format!("run-{word}");
        let ckpt = Checkpointer::builder(run.as_str())
            .tier(Arc::new(t.clone()), TierPolicy::keep_last(3))
            .build()
            .expect("checkpointer");
        let e = save_step(&ckpt, 1, &w1, &om)
            .wait()
            .expect_err("a run named after an echoed error word");
        assert!(
            e.to_string()
                .contains(&format!("must not contain `{word}`")),
            "{e}"
        );
    }
}

#[test]
fn the_probe_reports_what_this_server_guarantees() {
    // s3s-fs checks `If-None-Match` and then writes, without a lock;
    // Garage 2.5 overwrites. The start scripts name the server
    // (`CKPT_TEST_S3_SERVER`); a server of unknown behaviour fails here
    // until its row in docs/s3.md is written.
    let Some(env) = s3_env("the_probe_reports_what_this_server_guarantees") else {
        return;
    };
    let server = std::env::var("CKPT_TEST_S3_SERVER").unwrap_or_default();
    let t = tier(&env, &unique_prefix("probe"), config(&env));
    let mut g = rt().block_on(t.create_guarantee());
    eprintln!("{server}: {g}");
    // A race shows only when it happens: a racy server gets up to five
    // probes (fresh tiers) to show one.
    for _ in 0..4 {
        if s3s::expected_guarantee(&server) != Some("racy") || g.name() == "racy" {
            break;
        }
        g = rt().block_on(tier(&env, &unique_prefix("probe"), config(&env)).create_guarantee());
        eprintln!("{server}, probed again: {g}");
    }
    match s3s::expected_guarantee(&server) {
        Some("racy") => {
            assert!(
                matches!(g, ckpt_core::CreateGuarantee::Racy { winners, .. } if winners > 1),
                "{g}"
            )
        }
        Some(want) => assert_eq!(g.name(), want, "{server}: {g}"),
        None => panic!(
            "CKPT_TEST_S3_SERVER={server:?}: set it to the server under test (docs/s3.md); the probe says: {g}"
        ),
    }
    // The probe removed what it wrote, and a create now refuses an
    // existing object on this server too (the single-writer fallback
    // where the condition is ignored).
    let left = rt().block_on(t.list("")).expect("list");
    assert!(left.is_empty(), "{left:?}");
    rt().block_on(t.put("x", Bytes::from_static(b"1"), PutMode::Create))
        .expect("create");
    let again = rt().block_on(t.put("x", Bytes::from_static(b"2"), PutMode::Create));
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    assert_eq!(&rt().block_on(t.get("x")).expect("get")[..], b"1");
    rt().block_on(t.delete("x")).expect("cleanup");
    // Turned off by configuration: the fallback, without a probe.
    let off = tier(
        &env,
        &unique_prefix("probe"),
        config(&env).with_conditional_put(false),
    );
    assert_eq!(
        rt().block_on(off.create_guarantee()),
        ckpt_core::CreateGuarantee::Ignored
    );
}

/// A TCP proxy on 127.0.0.1 in front of the server that flips one bit in
/// the middle of the body of each of the next `flips` requests whose body
/// is at least `min_body` bytes: a corrupting network path.
struct CorruptingProxy {
    addr: std::net::SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    stop: std::sync::atomic::AtomicBool,
    flips_left: std::sync::atomic::AtomicUsize,
    min_body: usize,
    /// The request lines of the requests it corrupted.
    flipped: std::sync::Mutex<Vec<String>>,
}

impl CorruptingProxy {
    fn start(upstream: &str) -> Self {
        use std::net::{TcpListener, TcpStream};
        let upstream: std::net::SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the test server's endpoint is http://ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(ProxyState {
            stop: false.into(),
            flips_left: 0.into(),
            min_body: MIB,
            flipped: Default::default(),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || {
                            let _ = client.set_nonblocking(false);
                            if let Ok(server) = TcpStream::connect(upstream) {
                                let _ = Self::relay(client, server, &st);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, state }
    }

    /// Arms the proxy to corrupt the next `n` large request bodies.
    fn corrupt_next(&self, n: usize) {
        self.state
            .flips_left
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn flipped(&self) -> Vec<String> {
        self.state.flipped.lock().expect("lock").clone()
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Copies responses back as they are; parses requests (head, then a
    /// `Content-Length` body) and corrupts bodies as armed.
    fn relay(
        client: std::net::TcpStream,
        server: std::net::TcpStream,
        st: &ProxyState,
    ) -> std::io::Result<()> {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::atomic::Ordering;
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
        }
        let (mut back_from, mut back_to) = (server.try_clone()?, client.try_clone()?);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(std::net::Shutdown::Both);
        });
        let mut from = BufReader::new(client);
        let mut to = server;
        loop {
            let mut head = Vec::new();
            loop {
                let n = from.read_until(b'\n', &mut head)?;
                if n == 0 {
                    return Ok(());
                }
                if head.ends_with(b"\r\n\r\n") {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let len = text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            from.read_exact(&mut body)?;
            if len >= st.min_body
                && st
                    .flips_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                body[len / 2] ^= 0x10;
                let line = text.lines().next().unwrap_or_default().to_string();
                st.flipped.lock().expect("lock").push(line);
            }
            to.write_all(&head)?;
            to.write_all(&body)?;
        }
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn corrupted_request_bodies_are_resent_or_refused() {
    use ckpt_io::PayloadChecksum;
    use ckpt_io::object::DIGEST_ATTEMPTS;
    let Some(env) = s3_env("corrupted_request_bodies_are_resent_or_refused") else {
        return;
    };
    let server = std::env::var("CKPT_TEST_S3_SERVER").unwrap_or_default();
    let proxy = CorruptingProxy::start(&env.endpoint);
    // Short keys: s3s-fs names a multipart upload's temporary file after
    // its key.
    let prefix = format!(
        "px{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let direct = tier(&env, &prefix, config(&env));
    let runtime = rt();
    // Every combination: both checksums, a single PUT (3 MiB) and a
    // multipart upload (12 MiB, three parts of 5 MiB), one corrupted
    // request (the resend carries the intact bytes) or every request
    // corrupted (the tier gives up).
    for mode in [PayloadChecksum::Crc64Nvme, PayloadChecksum::SignedSha256] {
        for (shape, len) in [("put", 3 * MIB), ("multipart", 12 * MIB)] {
            for every in [false, true] {
                let cfg = config(&env)
                    .with_endpoint(proxy.endpoint())
                    .with_part_size(5 * MIB)
                    .with_payload_checksum(mode)
                    // Quick retries of a failed-and-retryable request
                    // (s3s-fs answers 500 to a SHA-256 mismatch).
                    .with_retry(RetryConfig {
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(20),
                        ..RetryConfig::default()
                    });
                let via = tier(&env, &prefix, cfg);
                let key = format!("{mode:?}-{shape}-{}", if every { "all" } else { "one" });
                let data = Bytes::from(pattern(len, len as u64));
                let before = proxy.flipped().len();
                proxy.corrupt_next(if every { usize::MAX } else { 1 });
                let outcome = runtime.block_on(async {
                    let mut w = via.create(&key).await?;
                    w.write(data.clone()).await?;
                    w.finish().await
                });
                proxy.corrupt_next(0);
                let flipped = proxy.flipped().len() - before;
                let want = if every { DIGEST_ATTEMPTS } else { 1 };
                assert!(
                    flipped >= want,
                    "{key}: the proxy corrupted {flipped} requests"
                );
                // Whether what the server keeps under the key is what
                // was sent.
                let intact = runtime
                    .block_on(direct.get(&key))
                    .map(|stored| stored == data);
                let unchecked = shape == "multipart"
                    && mode == PayloadChecksum::Crc64Nvme
                    && !s3s::verifies_part_checksums(&server);
                eprintln!(
                    "{key} on {server}: {flipped} corrupted, upload {}, stored {}",
                    if outcome.is_ok() {
                        "succeeded"
                    } else {
                        "refused"
                    },
                    match &intact {
                        Ok(true) => "intact",
                        Ok(false) => "corrupt",
                        Err(_) => "nothing",
                    }
                );
                match (outcome, intact) {
                    // What docs/s3.md says of s3s-fs: it stores a part
                    // whose checksum does not match; restore's crc32c
                    // catches it.
                    (Ok(()), Ok(false)) => assert!(
                        unchecked,
                        "{key} on {server}: stored bytes differ from those sent"
                    ),
                    _ if unchecked => panic!(
                        "{key} on {server}: the part checksum was checked; update \
                         verifies_part_checksums and docs/s3.md"
                    ),
                    // The server refused the corrupted body and the tier
                    // (or object_store's retry, for a 500) sent it again.
                    (Ok(()), Ok(true)) => assert!(
                        !every,
                        "{key} on {server}: every request was corrupted, yet the bytes are intact"
                    ),
                    // Refused every time: the upload fails, naming the
                    // object, so the save fails on this tier and commits
                    // nothing there.
                    (Err(e), stored) => {
                        assert!(
                            every,
                            "{key} on {server}: one corrupted request failed it: {e}"
                        );
                        assert!(
                            e.to_string().contains(&key),
                            "{key}: error does not name it: {e}"
                        );
                        match stored {
                            Err(Error::NotFound { .. }) => {}
                            // s3s-fs checks a single PUT's checksum after
                            // storing the object, and leaves it there: an
                            // uncommitted leftover that retention removes.
                            Ok(false) if s3s::keeps_refused_puts(&server) => {}
                            Ok(same) => panic!(
                                "{key} on {server}: refused, yet an object is there (intact: {same})"
                            ),
                            Err(other) => {
                                panic!("{key} on {server}: read after refusal: {other}")
                            }
                        }
                    }
                    (Ok(()), Err(e)) => panic!("{key} on {server}: uploaded, then read: {e}"),
                }
            }
        }
    }
    runtime.block_on(async {
        for p in paths(&direct.list("").await.expect("list")) {
            direct.delete(&p).await.expect("cleanup");
        }
    });
}
