//! The conformance suite: the checks every [`Tier`] must pass, whatever it
//! stores to (local files, object stores, peer memory). ckpt's commit
//! protocol, retention and restore only rely on what is checked here.
//!
//! Compiled for this crate's tests and, for other crates, with the
//! `conformance` feature:
//!
//! ```toml
//! [dev-dependencies]
//! ckpt-io = { path = "../ckpt-io", features = ["conformance"] }
//! ```
//!
//! ```ignore
//! use std::sync::Arc;
//! use ckpt_core::Tier;
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn my_tier_conforms() {
//!     let tier: Arc<dyn Tier> = Arc::new(ckpt_io::MemoryTier::new());
//!     ckpt_io::conformance::run_all(tier).await;
//! }
//! ```
//!
//! # Contract of the checks
//! - Every check is a `pub async fn` taking the tier and a `prefix`. The
//!   prefix must be a valid run name (`[A-Za-z0-9._-]`, not starting with
//!   `.`), unique to the call: [`unique_prefix`] makes one. A check only
//!   touches objects under `<prefix>/`, so checks can share a tier (and a
//!   bucket) with other data, and removes what it wrote when it passes.
//! - A violation panics with a message naming the tier's location and the
//!   check; a check that needs a capability the tier does not claim
//!   ([`Tier::capabilities`]) is skipped with a line on stderr.
//! - Checks must run inside a tokio runtime with its timer enabled, of
//!   either flavor. The checks that drive a [`Checkpointer`] run it on the
//!   caller's runtime and make their blocking calls (save, wait, restore)
//!   on its blocking pool.
//!
//! # What a torn upload may leave
//! A streamed object that was not finished ([`abort`](ckpt_core::TierWriter::abort)ed, or
//! dropped) must never be readable under its final path: `get` and `size`
//! fail with [`Error::NotFound`] (or, if an object was there before, still
//! return the old one), and a listing never shows the final path.
//! After `abort` a listing shows nothing at all. After a drop (a crash),
//! a listing may show hidden temporaries: objects in the same directory
//! whose name starts with `.`, which ckpt's layout never mistakes for a
//! commit marker and retention removes with their step.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use ckpt_core::{
    Checkpointer, DType, Error, PutMode, RestoreOptions, Result, Retention, SharedTensor,
    TensorMut, TensorRef, Tier, TierPolicy, TrainingState, format::layout, store,
};

use crate::fault::{FaultTier, OpKind};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A prefix unique to this process and call, usable as a run name:
/// `ckpt-conf-<pid>-<time>-<n>-<check>`.
pub fn unique_prefix(check: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let check: String = check
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "ckpt-conf-{}-{:x}-{n}-{check}",
        std::process::id(),
        nanos & 0xffff_ffff
    )
}

/// Runs every check on `tier`, each under its own [`unique_prefix`].
pub async fn run_all(tier: Arc<dyn Tier>) {
    run_all_except(tier, &[]).await;
}

/// Runs every check except those named in `skip` (check name, reason),
/// printing each skip and its reason: for a server with a known, documented
/// limitation.
pub async fn run_all_except(tier: Arc<dyn Tier>, skip: &[(&str, &str)]) {
    for (check, why) in skip {
        eprintln!(
            "conformance `{check}` skipped on {}: {why}",
            tier.location()
        );
    }
    let skipped = |name: &str| skip.iter().any(|(c, _)| *c == name);
    let t = tier.as_ref();
    let guarantee = t.create_guarantee().await;
    eprintln!("conformance on {}: {guarantee}", t.location());
    put_get_size(t, &unique_prefix("put_get_size")).await;
    list_is_recursive_and_prefix_filtered(t, &unique_prefix("list")).await;
    delete_semantics(t, &unique_prefix("delete")).await;
    create_is_exclusive(t, &unique_prefix("create")).await;
    overwrite_is_atomic(t, &unique_prefix("overwrite")).await;
    streamed_round_trip(t, &unique_prefix("streamed")).await;
    torn_upload_leaves_no_object(t, &unique_prefix("torn")).await;
    ranged_reads(t, &unique_prefix("ranges")).await;
    if !skipped("race") {
        concurrent_commit_has_one_winner(&tier, &unique_prefix("race")).await;
    }
    if !skipped("racing_coordinators") {
        racing_coordinators_commit_once(&tier, &unique_prefix("coordinators")).await;
    }
    retention_gc(&tier, &unique_prefix("gc")).await;
    checkpoint_round_trip(&tier, &unique_prefix("roundtrip")).await;
}

// ---------------------------------------------------------------- helpers

/// Deterministic bytes: the same `(len, seed)` always gives the same data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    ckpt_core::rng::pattern(len, seed)
}

fn fail(tier: &dyn Tier, check: &str, what: impl std::fmt::Display) -> ! {
    panic!("conformance check `{check}` on {}: {what}", tier.location())
}

fn ok<T>(tier: &dyn Tier, check: &str, what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| fail(tier, check, format!("{what}: unexpected error: {e}")))
}

fn expect_not_found<T: Debug>(tier: &dyn Tier, check: &str, what: &str, r: Result<T>) {
    match r {
        Err(Error::NotFound { .. }) => {}
        other => fail(
            tier,
            check,
            format!("{what}: expected NotFound, got {other:?}"),
        ),
    }
}

fn expect_incomplete<T: Debug>(tier: &dyn Tier, check: &str, path: &str, r: Result<T>) {
    match r {
        Err(Error::Incomplete { path: p, .. }) if p == path => {}
        other => fail(
            tier,
            check,
            format!("read past the end of {path}: expected Incomplete naming it, got {other:?}"),
        ),
    }
}

async fn list_paths(tier: &dyn Tier, check: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = ok(tier, check, "list", tier.list(prefix).await)
        .into_iter()
        .map(|o| o.path)
        .collect();
    v.sort();
    v
}

/// Deletes everything under `<prefix>/`.
async fn cleanup(tier: &dyn Tier, check: &str, prefix: &str) {
    let dir = format!("{prefix}/");
    for p in list_paths(tier, check, &dir).await {
        ok(tier, check, "cleanup delete", tier.delete(&p).await);
    }
    let left = list_paths(tier, check, &dir).await;
    if !left.is_empty() {
        fail(
            tier,
            check,
            format!("objects left after deleting: {left:?}"),
        );
    }
}

async fn put(tier: &dyn Tier, check: &str, path: &str, data: &[u8], mode: PutMode) {
    ok(
        tier,
        check,
        &format!("put {path}"),
        tier.put(path, Bytes::copy_from_slice(data), mode).await,
    );
}

async fn get(tier: &dyn Tier, check: &str, path: &str) -> Bytes {
    ok(tier, check, &format!("get {path}"), tier.get(path).await)
}

/// Runs blocking code (a checkpointer's save/wait/restore) on the blocking
/// pool of the caller's runtime, re-raising its panics.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("conformance: blocking task failed: {e}"),
        },
    }
}

// ----------------------------------------------------------------- checks

/// `put` then `get` and `size` return exactly what was put (empty, small
/// and binary objects); `get`, `size` of an absent object fail with
/// [`Error::NotFound`]; `put(Overwrite)` replaces an object, also with one
/// of another size.
pub async fn put_get_size(tier: &dyn Tier, prefix: &str) {
    const C: &str = "put_get_size";
    let absent = format!("{prefix}/absent");
    expect_not_found(tier, C, "get of an absent object", tier.get(&absent).await);
    expect_not_found(
        tier,
        C,
        "size of an absent object",
        tier.size(&absent).await,
    );
    for (name, data) in [
        ("empty", Vec::new()),
        ("one", vec![0u8]),
        ("binary", pattern(70_001, 1)),
        ("nested/deeper/object.bin", pattern(4096, 2)),
    ] {
        let path = format!("{prefix}/{name}");
        put(tier, C, &path, &data, PutMode::Create).await;
        let got = get(tier, C, &path).await;
        if got.as_ref() != data.as_slice() {
            fail(tier, C, format!("get {path} returned other bytes than put"));
        }
        let size = ok(tier, C, "size", tier.size(&path).await);
        if size != data.len() as u64 {
            fail(tier, C, format!("size {path} = {size}, put {}", data.len()));
        }
    }
    let path = format!("{prefix}/binary");
    for (len, seed) in [(100, 3), (200_000, 4), (0, 5)] {
        let data = pattern(len, seed);
        put(tier, C, &path, &data, PutMode::Overwrite).await;
        if get(tier, C, &path).await.as_ref() != data.as_slice() {
            fail(tier, C, format!("overwrite with {len} bytes not read back"));
        }
        let size = ok(tier, C, "size", tier.size(&path).await);
        if size != len as u64 {
            fail(
                tier,
                C,
                format!("size after overwrite = {size}, want {len}"),
            );
        }
    }
    // Overwrite of an absent object creates it.
    let fresh = format!("{prefix}/fresh");
    put(tier, C, &fresh, b"x", PutMode::Overwrite).await;
    if get(tier, C, &fresh).await.as_ref() != b"x" {
        fail(tier, C, "overwrite of an absent object did not create it");
    }
    cleanup(tier, C, prefix).await;
}

/// `list(p)` returns every object whose path starts with the string `p`,
/// recursively, with its size, and nothing else; a prefix that matches
/// nothing (even one naming a directory that does not exist) lists empty.
pub async fn list_is_recursive_and_prefix_filtered(tier: &dyn Tier, prefix: &str) {
    const C: &str = "list";
    let objects = [
        ("a", 1usize),
        ("b/c", 2),
        ("b/d/e", 3),
        ("b/d/f/g", 4),
        ("bb", 5),
        ("c/x", 6),
    ];
    for (name, len) in objects {
        put(
            tier,
            C,
            &format!("{prefix}/{name}"),
            &pattern(len, len as u64),
            PutMode::Create,
        )
        .await;
    }
    let cases: [(&str, &[&str]); 7] = [
        ("/", &["a", "b/c", "b/d/e", "b/d/f/g", "bb", "c/x"]),
        ("/b", &["b/c", "b/d/e", "b/d/f/g", "bb"]),
        ("/b/", &["b/c", "b/d/e", "b/d/f/g"]),
        ("/b/d/f/", &["b/d/f/g"]),
        ("/b/d/f/g", &["b/d/f/g"]),
        ("/zz", &[]),
        ("/nope/deeper/", &[]),
    ];
    for (suffix, want) in cases {
        let p = format!("{prefix}{suffix}");
        let metas = ok(tier, C, &format!("list {p}"), tier.list(&p).await);
        let mut got: Vec<(String, u64)> = metas.into_iter().map(|o| (o.path, o.size)).collect();
        got.sort();
        let mut expect: Vec<(String, u64)> = want
            .iter()
            .map(|n| {
                let len = objects.iter().find(|(o, _)| o == n).map_or(0, |(_, l)| *l);
                (format!("{prefix}/{n}"), len as u64)
            })
            .collect();
        expect.sort();
        if got != expect {
            fail(
                tier,
                C,
                format!("list `{p}` returned {got:?}, expected {expect:?}"),
            );
        }
    }
    cleanup(tier, C, prefix).await;
}

/// `delete` removes one object (its siblings stay); deleting an absent
/// object, or the same object twice, succeeds; a deleted object is gone
/// from `get`, `size` and `list`, and can be created again.
pub async fn delete_semantics(tier: &dyn Tier, prefix: &str) {
    const C: &str = "delete";
    let (a, b) = (format!("{prefix}/d/a"), format!("{prefix}/d/b"));
    put(tier, C, &a, b"aaa", PutMode::Create).await;
    put(tier, C, &b, b"bbb", PutMode::Create).await;
    ok(tier, C, "delete", tier.delete(&a).await);
    expect_not_found(tier, C, "get after delete", tier.get(&a).await);
    expect_not_found(tier, C, "size after delete", tier.size(&a).await);
    if list_paths(tier, C, &format!("{prefix}/")).await != vec![b.clone()] {
        fail(tier, C, "list after delete must show only the sibling");
    }
    if get(tier, C, &b).await.as_ref() != b"bbb" {
        fail(tier, C, "deleting an object changed its sibling");
    }
    ok(tier, C, "second delete", tier.delete(&a).await);
    ok(
        tier,
        C,
        "delete of a never-created object",
        tier.delete(&format!("{prefix}/never/was")).await,
    );
    put(tier, C, &a, b"again", PutMode::Create).await;
    if get(tier, C, &a).await.as_ref() != b"again" {
        fail(tier, C, "create after delete");
    }
    cleanup(tier, C, prefix).await;
}

/// `put(Create)` on an existing object fails with
/// [`Error::AlreadyExists`] naming it, and the first content stays; it
/// leaves nothing else behind. Every tier, whatever its
/// [`Tier::create_guarantee`] (asked first: a tier that probes its backend
/// falls back to check-then-write where the backend ignores the
/// condition); only the race is allowed to differ.
pub async fn create_is_exclusive(tier: &dyn Tier, prefix: &str) {
    const C: &str = "create";
    let _ = tier.create_guarantee().await;
    let path = format!("{prefix}/step/MANIFEST.json");
    put(tier, C, &path, b"first", PutMode::Create).await;
    for data in [&b"second"[..], b"", &pattern(100_000, 9)] {
        match tier
            .put(&path, Bytes::copy_from_slice(data), PutMode::Create)
            .await
        {
            Err(Error::AlreadyExists { path: p }) if p == path => {}
            other => fail(
                tier,
                C,
                format!("second create: expected AlreadyExists naming {path}, got {other:?}"),
            ),
        }
        if get(tier, C, &path).await.as_ref() != b"first" {
            fail(tier, C, "a failed create changed the existing object");
        }
    }
    if list_paths(tier, C, &format!("{prefix}/")).await != vec![path.clone()] {
        fail(tier, C, "failed creates left objects behind");
    }
    cleanup(tier, C, prefix).await;
}

/// `put(Overwrite)` is atomic: readers racing with repeated overwrites
/// always see one whole version, never a mix or a torn object.
pub async fn overwrite_is_atomic(tier: &dyn Tier, prefix: &str) {
    const C: &str = "overwrite";
    let path = format!("{prefix}/object");
    let versions = [pattern(64 << 10, 11), pattern(96 << 10, 12)];
    put(tier, C, &path, &versions[0], PutMode::Create).await;
    let done = AtomicBool::new(false);
    let writer = async {
        for i in 0..24 {
            put(tier, C, &path, &versions[(i + 1) % 2], PutMode::Overwrite).await;
            tokio::task::yield_now().await;
        }
        done.store(true, Ordering::SeqCst);
    };
    let reader = async {
        let mut reads = 0;
        while !done.load(Ordering::SeqCst) || reads == 0 {
            let got = get(tier, C, &path).await;
            if !versions.iter().any(|v| got.as_ref() == v.as_slice()) {
                fail(
                    tier,
                    C,
                    format!("a reader saw {} bytes that are neither version", got.len()),
                );
            }
            reads += 1;
            tokio::task::yield_now().await;
        }
    };
    futures::join!(writer, reader, async {
        // A second reader of sizes: always one version's length.
        while !done.load(Ordering::SeqCst) {
            let n = ok(tier, C, "size", tier.size(&path).await);
            if !versions.iter().any(|v| v.len() as u64 == n) {
                fail(tier, C, format!("size {n} is neither version's"));
            }
            tokio::task::yield_now().await;
        }
    });
    cleanup(tier, C, prefix).await;
}

async fn stream(tier: &dyn Tier, path: &str, parts: &[Bytes]) -> Result<()> {
    let mut w = tier.create(path).await?;
    for p in parts {
        w.write(p.clone()).await?;
    }
    w.finish().await
}

/// A streamed object (`create`, `write` × n, `finish`) reads back as the
/// concatenation of its writes: thousands of small writes, a few MiB-sized
/// ones, empty writes, no write at all; finishing over an existing object
/// replaces it.
pub async fn streamed_round_trip(tier: &dyn Tier, prefix: &str) {
    const C: &str = "streamed";
    let mib = 1usize << 20;
    let small: Vec<Bytes> = (0..2000u64)
        .map(|i| Bytes::from(pattern((i as usize * 7919) % 97 + 1, i)))
        .collect();
    let large: Vec<Bytes> = [3 * mib, 1, mib + 13, 2 * mib - 1]
        .iter()
        .enumerate()
        .map(|(i, &n)| Bytes::from(pattern(n, 100 + i as u64)))
        .collect();
    let mixed = vec![
        Bytes::from(pattern(4096, 1)),
        Bytes::new(),
        Bytes::from(pattern(mib + 1, 2)),
        Bytes::new(),
        Bytes::from(pattern(3, 3)),
    ];
    for (name, parts) in [
        ("small", small),
        ("large", large),
        ("mixed", mixed),
        ("empty", Vec::new()),
    ] {
        let path = format!("{prefix}/{name}.bin");
        ok(
            tier,
            C,
            &format!("stream {path}"),
            stream(tier, &path, &parts).await,
        );
        let want: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let got = get(tier, C, &path).await;
        if got.as_ref() != want.as_slice() {
            fail(
                tier,
                C,
                format!(
                    "{path}: read back {} bytes that differ from the {} written",
                    got.len(),
                    want.len()
                ),
            );
        }
        let size = ok(tier, C, "size", tier.size(&path).await);
        if size != want.len() as u64 {
            fail(
                tier,
                C,
                format!("{path}: size {size}, wrote {}", want.len()),
            );
        }
    }
    // Finishing a stream over an existing object replaces it.
    let path = format!("{prefix}/small.bin");
    let parts = [Bytes::from_static(b"new "), Bytes::from_static(b"content")];
    ok(tier, C, "stream over", stream(tier, &path, &parts).await);
    if get(tier, C, &path).await.as_ref() != b"new content" {
        fail(
            tier,
            C,
            "a finished stream did not replace the existing object",
        );
    }
    cleanup(tier, C, prefix).await;
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

/// Whether `entry` is a hidden temporary that a torn upload of `target`
/// may leave (see the module docs): same directory, name starting with
/// `.`, not the target itself.
pub fn is_hidden_temporary(entry: &str, target: &str) -> bool {
    entry != target
        && parent(entry) == parent(target)
        && entry
            .rsplit_once('/')
            .is_some_and(|(_, name)| name.starts_with('.'))
}

/// A streamed object that is aborted or dropped before `finish` is never
/// readable under its final path, before or after; an aborted one leaves
/// nothing in a listing, a dropped one only hidden temporaries (see the
/// module docs) and never a commit marker ckpt would trust; a torn
/// overwrite leaves the old object intact.
pub async fn torn_upload_leaves_no_object(tier: &dyn Tier, prefix: &str) {
    const C: &str = "torn";
    let dir = format!("{prefix}/");
    let data = Bytes::from(pattern(300_000, 21));

    // Aborted.
    let path = format!("{}/rank-00000.safetensors", layout::step_dir(prefix, 1));
    let mut w = ok(tier, C, "create", tier.create(&path).await);
    ok(tier, C, "write", w.write(data.slice(..100_000)).await);
    ok(tier, C, "write", w.write(data.slice(100_000..)).await);
    expect_not_found(
        tier,
        C,
        "get of an unfinished object",
        tier.get(&path).await,
    );
    expect_not_found(
        tier,
        C,
        "size of an unfinished object",
        tier.size(&path).await,
    );
    ok(tier, C, "abort", w.abort().await);
    expect_not_found(tier, C, "get after abort", tier.get(&path).await);
    expect_not_found(tier, C, "size after abort", tier.size(&path).await);
    let left = list_paths(tier, C, &dir).await;
    if !left.is_empty() {
        fail(tier, C, format!("an aborted upload left {left:?}"));
    }

    // Dropped (as in a crash), on the commit marker's path.
    let marker = layout::manifest_path(prefix, 2);
    let mut w = ok(tier, C, "create", tier.create(&marker).await);
    ok(
        tier,
        C,
        "write",
        w.write(Bytes::from_static(b"{\"format\":1")).await,
    );
    drop(w);
    expect_not_found(tier, C, "get after drop", tier.get(&marker).await);
    expect_not_found(tier, C, "size after drop", tier.size(&marker).await);
    let left = list_paths(tier, C, &dir).await;
    if let Some(bad) = left.iter().find(|p| !is_hidden_temporary(p, &marker)) {
        fail(
            tier,
            C,
            format!("a dropped upload left `{bad}`, which is not a hidden temporary ({left:?})"),
        );
    }
    let steps = ok(
        tier,
        C,
        "committed_steps",
        store::committed_steps(tier, prefix).await,
    );
    if !steps.is_empty() {
        fail(
            tier,
            C,
            format!("a torn commit marker made steps {steps:?} committed"),
        );
    }
    cleanup(tier, C, prefix).await;

    // Torn overwrites keep the old object.
    let path = format!("{prefix}/kept.bin");
    put(tier, C, &path, b"old", PutMode::Create).await;
    for abort in [true, false] {
        let mut w = ok(tier, C, "create", tier.create(&path).await);
        ok(tier, C, "write", w.write(data.clone()).await);
        if abort {
            ok(tier, C, "abort", w.abort().await);
        } else {
            drop(w);
        }
        if get(tier, C, &path).await.as_ref() != b"old" {
            fail(
                tier,
                C,
                format!(
                    "a torn overwrite ({}) replaced the old object",
                    if abort { "aborted" } else { "dropped" }
                ),
            );
        }
    }
    cleanup(tier, C, prefix).await;
}

/// `get_range` and `read_into` return exactly the bytes asked for at the
/// start, middle and end of an object (empty ranges included); a range
/// past the end fails with [`Error::Incomplete`] naming the object; an
/// absent object fails with [`Error::NotFound`].
pub async fn ranged_reads(tier: &dyn Tier, prefix: &str) {
    const C: &str = "ranges";
    let path = format!("{prefix}/ranged.bin");
    let data = pattern(10_000, 31);
    put(tier, C, &path, &data, PutMode::Create).await;
    for (a, b) in [
        (0u64, 0u64),
        (0, 1),
        (0, 10_000),
        (1, 4097),
        (4095, 4096),
        (5000, 5000),
        (9_999, 10_000),
        (10_000, 10_000),
    ] {
        let got = ok(
            tier,
            C,
            &format!("get_range {a}..{b}"),
            tier.get_range(&path, a..b).await,
        );
        if got.as_ref() != &data[a as usize..b as usize] {
            fail(tier, C, format!("get_range {a}..{b} returned other bytes"));
        }
        let mut buf = vec![0u8; (b - a) as usize];
        ok(
            tier,
            C,
            &format!("read_into {a}..{b}"),
            tier.read_into(&path, a, &mut buf).await,
        );
        if buf != data[a as usize..b as usize] {
            fail(
                tier,
                C,
                format!("read_into at {a}, {} bytes: other bytes", b - a),
            );
        }
    }
    for (a, b) in [
        (9_990, 10_001),
        (10_000, 10_001),
        (0, 10_001),
        (20_000, 20_010),
    ] {
        expect_incomplete(tier, C, &path, tier.get_range(&path, a..b).await);
        let mut buf = vec![0u8; (b - a) as usize];
        expect_incomplete(tier, C, &path, tier.read_into(&path, a, &mut buf).await);
    }
    let absent = format!("{prefix}/absent.bin");
    expect_not_found(
        tier,
        C,
        "get_range of an absent object",
        tier.get_range(&absent, 0..1).await,
    );
    let mut buf = [0u8; 1];
    expect_not_found(
        tier,
        C,
        "read_into of an absent object",
        tier.read_into(&absent, 0, &mut buf).await,
    );
    cleanup(tier, C, prefix).await;
}

/// N tasks racing `put(path, .., Create)` on the same commit marker:
/// exactly one succeeds, every other fails with [`Error::AlreadyExists`],
/// and the stored object is the winner's. Skipped, saying so, for tiers
/// whose [`Tier::create_guarantee`] is not atomic (the probe found the
/// race); [`racing_coordinators_commit_once`] holds on those too.
pub async fn concurrent_commit_has_one_winner(tier: &Arc<dyn Tier>, prefix: &str) {
    const C: &str = "race";
    let g = tier.create_guarantee().await;
    if !g.is_atomic() {
        eprintln!("conformance `{C}` skipped on {}: {g}", tier.location());
        return;
    }
    const TASKS: usize = 16;
    let mut markers = Vec::new();
    for round in 0..6u64 {
        let path = layout::manifest_path(prefix, round);
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| {
                let (tier, path) = (tier.clone(), path.clone());
                let data = Bytes::from(format!("writer {i} ").repeat(100 + i));
                tokio::spawn(
                    async move { (data.clone(), tier.put(&path, data, PutMode::Create).await) },
                )
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (data, r) = t
                .await
                .unwrap_or_else(|e| fail(tier.as_ref(), C, format!("task failed: {e}")));
            match r {
                Ok(()) => winners.push(data),
                Err(Error::AlreadyExists { path: p }) if p == path => {}
                Err(e) => fail(tier.as_ref(), C, format!("a losing create failed with {e}")),
            }
        }
        if winners.len() != 1 {
            fail(
                tier.as_ref(),
                C,
                format!("{} of {TASKS} racing creates succeeded", winners.len()),
            );
        }
        if get(tier.as_ref(), C, &path).await != winners[0] {
            fail(tier.as_ref(), C, "the stored object is not the winner's");
        }
        markers.push(path);
    }
    if list_paths(tier.as_ref(), C, &format!("{prefix}/")).await != markers {
        fail(tier.as_ref(), C, "racing creates left other objects behind");
    }
    cleanup(tier.as_ref(), C, prefix).await;
}

/// 16 coordinators (one-rank jobs of 16 incarnations, as after a
/// split brain) save the same step of one run at once, on any tier,
/// whatever its [`Tier::create_guarantee`]: exactly one reports the step
/// committed, and the MANIFEST there is that one's (its incarnation and
/// data); every other one reports `AlreadyExists` or `CommitConflict`.
pub async fn racing_coordinators_commit_once(tier: &Arc<dyn Tier>, run: &str) {
    const C: &str = "racing_coordinators";
    const RACERS: usize = 16;
    let t = tier.as_ref();
    let barrier = Arc::new(std::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let (tier, run, barrier) = (tier.clone(), run.to_string(), barrier.clone());
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let ckpt = Checkpointer::builder(run.as_str())
                    .tier(tier, TierPolicy::keep_last(3))
                    .incarnation(format!("racer-{i}"))
                    .chunk_size(4096)
                    .block_size(8192)
                    .staging_capacity(64 << 10)
                    .runtime(handle)
                    .build()?;
                let w = pattern(20_000, 1000 + i as u64);
                let tensor = TensorRef::new("w", ckpt_core::DType::U8, &[20_000], &w);
                let state = TrainingState::builder(1)
                    .model([&tensor as &dyn ckpt_core::TensorView])
                    .without_optimizer()
                    .rng(&(i as u64))
                    .data_loader(&(i as u64))
                    .lr_schedule(&0.1f64)
                    .build()?;
                barrier.wait();
                let handle = ckpt.save(&state)?;
                let _ = handle.wait();
                let report = handle.report();
                drop(ckpt);
                Ok::<_, Error>((i, report))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, report) = match task.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => fail(t, C, format!("a racer could not save: {e}")),
            Err(e) => fail(t, C, format!("a racer panicked: {e}")),
        };
        let tr = report
            .tiers
            .first()
            .unwrap_or_else(|| fail(t, C, format!("racer {i}: no tier report")));
        match (&tr.committed, &tr.error) {
            (true, _) => winners.push(i),
            (false, Some(Error::AlreadyExists { .. } | Error::CommitConflict { .. })) => {}
            (false, e) => fail(t, C, format!("racer {i} failed otherwise: {e:?}")),
        }
    }
    if winners.len() != 1 {
        fail(
            t,
            C,
            format!(
                "{} of {RACERS} racing coordinators report the commit: {winners:?}",
                winners.len()
            ),
        );
    }
    let m = ok(t, C, "load manifest", store::load_manifest(t, run, 1).await);
    let winner = winners[0];
    if m.incarnation != format!("racer-{winner}") {
        fail(
            t,
            C,
            format!(
                "racer {winner} reports the commit, the MANIFEST is {}'s",
                m.incarnation
            ),
        );
    }
    if m.ranks[0].loop_state.data_loader::<u64>().ok() != Some(winner as u64) {
        fail(t, C, "the MANIFEST's loop state is not the winner's");
    }
    let verified = store::verify_step(t, &m).await;
    if !verified.is_ok() {
        fail(
            t,
            C,
            format!("the winner's step does not verify: {verified:?}"),
        );
    }
    cleanup(t, C, run).await;
}

/// The tensors the checkpointer checks save at `step`.
struct Sample {
    w: Vec<f32>,
    h: Vec<u16>,
    m: Vec<f64>,
    shared: Bytes,
}

impl Sample {
    fn new(step: u64) -> Self {
        Self {
            w: (0..20_000)
                .map(|i| ((i as u64 * 31 + step) % 1009) as f32 * 0.25)
                .collect(),
            h: (0..3 * 1000).map(|i| (i as u64 ^ step) as u16).collect(),
            m: vec![step as f64 * 1.5],
            shared: Bytes::from(pattern(9_000, step)),
        }
    }

    fn save(&self, ckpt: &Checkpointer, step: u64) -> Result<ckpt_core::SaveReport> {
        let w = TensorRef::from_slice("w", &[20_000], &self.w);
        let h = TensorRef::new(
            "h.bf16",
            DType::BF16,
            &[3, 1000],
            ckpt_core::as_bytes(&self.h),
        );
        let m = TensorRef::from_slice("opt.m", &[], &self.m);
        let s = SharedTensor::new("emb", DType::U8, &[9, 1000], self.shared.clone());
        let state = TrainingState::builder(step)
            .model([&w, &h])
            .model([&s])
            .optimizer([&m])
            .rng(&[step, 1])
            .data_loader(&(step * 10))
            .lr_schedule(&0.5f64)
            .build()?;
        ckpt.save(&state)?.wait()
    }

    /// Restores into fresh buffers; returns the restore and whether every
    /// tensor matches `self`.
    fn restore(
        &self,
        ckpt: &Checkpointer,
        opts: &RestoreOptions,
    ) -> Result<(ckpt_core::Restored, bool)> {
        let mut w = vec![0f32; self.w.len()];
        let mut h = vec![0u16; self.h.len()];
        let mut m = vec![0f64; 1];
        let mut s = vec![0u8; self.shared.len()];
        let r = ckpt
            .restore_with(
                &mut [
                    &mut TensorMut::from_slice("w", &[20_000], &mut w),
                    &mut TensorMut::new(
                        "h.bf16",
                        DType::BF16,
                        &[3, 1000],
                        ckpt_core::as_bytes_mut(&mut h),
                    ),
                    &mut TensorMut::from_slice("opt.m", &[], &mut m),
                    &mut TensorMut::from_slice("emb", &[9, 1000], &mut s),
                ],
                opts,
            )?
            .ok_or_else(|| Error::NotFound {
                path: "no checkpoint".into(),
            })?;
        let same = ckpt_core::as_bytes(&w) == ckpt_core::as_bytes(&self.w)
            && h == self.h
            && m[0].to_bits() == self.m[0].to_bits()
            && s == self.shared.as_ref();
        Ok((r, same))
    }
}

fn checkpointer(tier: Arc<dyn Tier>, run: &str, policy: TierPolicy) -> Result<Checkpointer> {
    // Smaller than a save, so it streams, unless the tier holds more staged
    // bytes per upload than that (an object store's parts).
    let capacity = (6 * 8192).max(tier.capabilities().buffered_write + 4 * 8192);
    Checkpointer::builder(run)
        .tier(tier, policy)
        .chunk_size(4096)
        .block_size(8192)
        .staging_capacity(capacity)
        .runtime(tokio::runtime::Handle::current())
        .build()
}

/// Retention through [`store::gc`] on steps committed by a real
/// [`Checkpointer`]: keep-last 2 plus keep-every 3 keeps exactly the
/// expected steps, deletes each other step's `MANIFEST.json` before any of
/// its data, removes uncommitted leftovers older than the newest commit,
/// leaves newer uncommitted steps (a save in progress) alone, always keeps
/// the newest, and every kept step still restores bit-identically.
pub async fn retention_gc(tier: &Arc<dyn Tier>, run: &str) {
    const C: &str = "gc";
    let t = tier.as_ref();
    let faults = FaultTier::new(tier.clone());
    let traced: Arc<dyn Tier> = Arc::new(faults.clone());
    let ckpt = ok(
        t,
        C,
        "build checkpointer",
        checkpointer(traced.clone(), run, TierPolicy::keep_last(100)),
    );
    let ckpt = blocking(move || {
        for step in 1..=6 {
            if let Err(e) = Sample::new(step).save(&ckpt, step) {
                return Err((step, e));
            }
        }
        Ok(ckpt)
    })
    .await
    .unwrap_or_else(|(s, e)| fail(t, C, format!("save of step {s}: {e}")));
    // An uncommitted leftover older than the newest commit, and a newer
    // step still being written.
    let leftover = format!("{}/rank-00000.safetensors", layout::step_dir(run, 0));
    let in_progress = format!("{}/rank-00000.safetensors", layout::step_dir(run, 9));
    put(t, C, &leftover, b"torn", PutMode::Create).await;
    put(t, C, &in_progress, b"writing", PutMode::Create).await;

    faults.clear_journal();
    let retention = Retention::keep_last(2).with_keep_every(3);
    let report = ok(
        t,
        C,
        "gc",
        store::gc(traced.as_ref(), run, &retention).await,
    );
    if (
        report.kept_steps.as_slice(),
        report.deleted_steps.as_slice(),
        report.removed_leftovers.as_slice(),
    ) != (&[3, 5, 6][..], &[1, 2, 4][..], &[0][..])
    {
        fail(
            t,
            C,
            format!("keep-last 2 + keep-every 3 over 1..=6: {report:?}"),
        );
    }
    let deletes: Vec<String> = faults
        .journal()
        .into_iter()
        .filter(|o| o.kind == OpKind::Delete)
        .map(|o| o.path)
        .collect();
    for step in [0u64, 1, 2, 4] {
        let dir = format!("{}/", layout::step_dir(run, step));
        let mine: Vec<&String> = deletes.iter().filter(|p| p.starts_with(&dir)).collect();
        if mine.first().map(|p| p.as_str()) != Some(layout::manifest_path(run, step).as_str())
            || mine.len() < 2
        {
            fail(
                t,
                C,
                format!(
                    "step {step}: deletes {mine:?} must start with its MANIFEST.json, then data"
                ),
            );
        }
        let left = list_paths(t, C, &dir).await;
        if !left.is_empty() {
            fail(t, C, format!("step {step} was deleted but {left:?} remain"));
        }
    }
    for step in [3u64, 5, 6, 9] {
        let dir = format!("{}/", layout::step_dir(run, step));
        if let Some(p) = deletes.iter().find(|p| p.starts_with(&dir)) {
            fail(
                t,
                C,
                format!("gc deleted {p} of step {step}, which it must keep"),
            );
        }
    }
    if get(t, C, &in_progress).await.as_ref() != b"writing" {
        fail(t, C, "gc touched a newer uncommitted step");
    }
    let steps = ok(
        t,
        C,
        "committed_steps",
        store::committed_steps(t, run).await,
    );
    if steps != [3, 5, 6] {
        fail(t, C, format!("committed steps after gc: {steps:?}"));
    }
    let again = ok(t, C, "second gc", store::gc(t, run, &retention).await);
    if !again.deleted_steps.is_empty() || !again.removed_leftovers.is_empty() {
        fail(t, C, format!("a second gc deleted more: {again:?}"));
    }
    // The newest always survives, even keep-last 1 (and 0, clamped to 1).
    for keep in [1, 0] {
        let r = ok(
            t,
            C,
            "gc keep-last",
            store::gc(t, run, &Retention::keep_last(keep)).await,
        );
        if r.kept_steps != [6] {
            fail(
                t,
                C,
                format!("keep-last {keep} must keep exactly the newest: {r:?}"),
            );
        }
    }
    let restored = blocking(move || {
        let sample = Sample::new(6);
        let r = sample.restore(&ckpt, &RestoreOptions::default());
        drop(ckpt);
        r
    })
    .await;
    match restored {
        Ok((r, true)) if r.step == 6 && !r.fell_back() => {}
        Ok((r, same)) => fail(
            t,
            C,
            format!(
                "after gc, restored step {} (identical: {same}), skipped {:?}",
                r.step, r.skipped
            ),
        ),
        Err(e) => fail(t, C, format!("restore after gc: {e}")),
    }
    cleanup(t, C, run).await;
}

/// A full checkpoint round trip through a [`Checkpointer`] on this tier
/// (staged and zero-copy tensors, a scalar, a pool smaller than the state):
/// the newest step and an older one restore bit-identically with their
/// loop state and verify completely; a byte flipped in the newest step's
/// shard makes restore fall back to the older step and name the file and
/// chunk.
pub async fn checkpoint_round_trip(tier: &Arc<dyn Tier>, run: &str) {
    const C: &str = "roundtrip";
    let t = tier.as_ref();
    let ckpt = ok(
        t,
        C,
        "build checkpointer",
        checkpointer(tier.clone(), run, TierPolicy::keep_last(3)),
    );
    let ckpt = blocking(move || {
        for step in [10, 20] {
            let report = Sample::new(step).save(&ckpt, step).map_err(|e| (step, e))?;
            if !report.is_durable() || report.tiers.iter().any(|t| !t.committed) {
                return Err((step, Error::InvalidState(format!("{report:?}"))));
            }
        }
        Ok(ckpt)
    })
    .await
    .unwrap_or_else(|(s, e)| fail(t, C, format!("save of step {s}: {e}")));

    for step in [10u64, 20] {
        let m = ok(
            t,
            C,
            "load manifest",
            store::load_manifest(t, run, step).await,
        );
        let v = store::verify_step(t, &m).await;
        if !v.is_ok() || v.chunks_ok == 0 {
            fail(
                t,
                C,
                format!("step {step} does not verify: {:?}", v.failures),
            );
        }
    }
    let (ckpt, newest, older) = blocking(move || {
        let newest = Sample::new(20).restore(&ckpt, &RestoreOptions::default());
        let older = Sample::new(10).restore(&ckpt, &RestoreOptions::default().step(10));
        (ckpt, newest, older)
    })
    .await;
    for (want, r) in [(20u64, newest), (10, older)] {
        match r {
            Ok((r, true))
                if r.step == want
                    && !r.fell_back()
                    && r.loop_state.data_loader::<u64>().ok() == Some(want * 10) => {}
            Ok((r, same)) => fail(
                t,
                C,
                format!(
                    "restore of step {want}: got step {} identical={same} {r:?}",
                    r.step
                ),
            ),
            Err(e) => fail(t, C, format!("restore of step {want}: {e}")),
        }
    }

    // Corrupt one byte of the newest shard (chunk 2 of tensor `w`).
    let m = ok(
        t,
        C,
        "load manifest",
        store::load_manifest(t, run, 20).await,
    );
    let shard = format!("{}/{}", layout::step_dir(run, 20), m.ranks[0].file);
    let w_off = m.tensors["w"].pieces[0].offset;
    let mut bytes = get(t, C, &shard).await.to_vec();
    bytes[(w_off + 2 * 4096 + 17) as usize] ^= 0x10;
    put(t, C, &shard, &bytes, PutMode::Overwrite).await;
    let fallback = blocking(move || {
        let r = Sample::new(10).restore(&ckpt, &RestoreOptions::default());
        drop(ckpt);
        r
    })
    .await;
    match fallback {
        Ok((r, true))
            if r.step == 10
                && r.skipped.len() == 1
                && r.skipped[0].step == Some(20)
                && matches!(&r.skipped[0].error, Error::Corrupt { path, chunk: 2, .. }
                    if *path == shard) => {}
        Ok((r, same)) => fail(
            t,
            C,
            format!(
                "after corrupting step 20: restored step {} identical={same}, skipped {:?}",
                r.step, r.skipped
            ),
        ),
        Err(e) => fail(t, C, format!("restore after corruption: {e}")),
    }
    cleanup(t, C, run).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalTier;
    use ckpt_core::MemoryTier;
    use ckpt_core::TierWriter;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_tier_conforms() {
        run_all(Arc::new(MemoryTier::new())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_tier_conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = Arc::new(LocalTier::new(dir.path()).expect("tier"));
        run_all(tier).await;
        // No file is left behind (an aborted upload may leave its empty
        // directory: directories are not objects).
        fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).expect("read dir").flatten() {
                if e.path().is_dir() {
                    files(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
        let mut left = Vec::new();
        files(dir.path(), &mut left);
        assert!(left.is_empty(), "the suite left {left:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn local_tier_conforms_on_a_current_thread_runtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        run_all(Arc::new(LocalTier::new(dir.path()).expect("tier"))).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fault_tier_without_faults_conforms() {
        run_all(Arc::new(FaultTier::new(Arc::new(MemoryTier::new())))).await;
    }

    /// A tier with one deliberate flaw, to check that the suite catches it.
    #[derive(Debug)]
    struct Flawed {
        inner: MemoryTier,
        flaw: Flaw,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Flaw {
        /// `put(Create)` replaces an existing object.
        CreateOverwrites,
        /// A streamed object is visible under its path while written.
        TornVisible,
        /// `list` only returns direct children of the prefix's directory.
        ListShallow,
        /// A range past the end returns the bytes that exist.
        ShortRanges,
    }

    struct VisibleWriter {
        tier: MemoryTier,
        path: String,
        buf: Vec<u8>,
    }

    impl TierWriter for VisibleWriter {
        fn write(&mut self, data: Bytes) -> futures::future::BoxFuture<'_, Result<()>> {
            self.buf.extend_from_slice(&data);
            let b = Bytes::from(self.buf.clone());
            Box::pin(async move { self.tier.put(&self.path, b, PutMode::Overwrite).await })
        }
        fn finish(self: Box<Self>) -> futures::future::BoxFuture<'static, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn abort(self: Box<Self>) -> futures::future::BoxFuture<'static, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    impl Tier for Flawed {
        fn location(&self) -> String {
            format!("flawed://{:?}", self.flaw)
        }
        fn capabilities(&self) -> ckpt_core::Capabilities {
            self.inner.capabilities()
        }
        fn create<'a>(
            &'a self,
            path: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Box<dyn TierWriter>>> {
            if self.flaw != Flaw::TornVisible {
                return self.inner.create(path);
            }
            Box::pin(async move {
                Ok(Box::new(VisibleWriter {
                    tier: self.inner.clone(),
                    path: path.to_string(),
                    buf: Vec::new(),
                }) as Box<dyn TierWriter>)
            })
        }
        fn put<'a>(
            &'a self,
            path: &'a str,
            data: Bytes,
            mode: PutMode,
        ) -> futures::future::BoxFuture<'a, Result<()>> {
            let mode = if self.flaw == Flaw::CreateOverwrites {
                PutMode::Overwrite
            } else {
                mode
            };
            self.inner.put(path, data, mode)
        }
        fn get<'a>(&'a self, path: &'a str) -> futures::future::BoxFuture<'a, Result<Bytes>> {
            self.inner.get(path)
        }
        fn get_range<'a>(
            &'a self,
            path: &'a str,
            range: std::ops::Range<u64>,
        ) -> futures::future::BoxFuture<'a, Result<Bytes>> {
            if self.flaw != Flaw::ShortRanges {
                return self.inner.get_range(path, range);
            }
            Box::pin(async move {
                let b = self.inner.get(path).await?;
                let end = (range.end as usize).min(b.len());
                Ok(b.slice((range.start as usize).min(end)..end))
            })
        }
        fn size<'a>(&'a self, path: &'a str) -> futures::future::BoxFuture<'a, Result<u64>> {
            self.inner.size(path)
        }
        fn list<'a>(
            &'a self,
            prefix: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Vec<ckpt_core::ObjectMeta>>> {
            Box::pin(async move {
                let all = self.inner.list(prefix).await?;
                if self.flaw != Flaw::ListShallow {
                    return Ok(all);
                }
                let depth = prefix.matches('/').count();
                Ok(all
                    .into_iter()
                    .filter(|o| o.path.matches('/').count() == depth)
                    .collect())
            })
        }
        fn delete<'a>(&'a self, path: &'a str) -> futures::future::BoxFuture<'a, Result<()>> {
            self.inner.delete(path)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_suite_rejects_flawed_tiers() {
        type Check = fn(Arc<dyn Tier>, String) -> futures::future::BoxFuture<'static, ()>;
        let cases: [(Flaw, &str, Check); 5] = [
            (Flaw::CreateOverwrites, "`create`", |t, p| {
                Box::pin(async move { create_is_exclusive(t.as_ref(), &p).await })
            }),
            (Flaw::CreateOverwrites, "`race`", |t, p| {
                Box::pin(async move { concurrent_commit_has_one_winner(&t, &p).await })
            }),
            (Flaw::TornVisible, "`torn`", |t, p| {
                Box::pin(async move { torn_upload_leaves_no_object(t.as_ref(), &p).await })
            }),
            (Flaw::ListShallow, "`list`", |t, p| {
                Box::pin(async move { list_is_recursive_and_prefix_filtered(t.as_ref(), &p).await })
            }),
            (Flaw::ShortRanges, "`ranges`", |t, p| {
                Box::pin(async move { ranged_reads(t.as_ref(), &p).await })
            }),
        ];
        for (flaw, name, check) in cases {
            let tier: Arc<dyn Tier> = Arc::new(Flawed {
                inner: MemoryTier::new(),
                flaw,
            });
            let err = tokio::spawn(check(tier, unique_prefix("flawed")))
                .await
                .expect_err("the check must reject the flawed tier");
            let payload = err.into_panic();
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert!(
                msg.contains(name) && msg.contains("flawed://"),
                "{flaw:?}: {msg}"
            );
        }
    }

    #[test]
    fn hidden_temporaries() {
        assert!(is_hidden_temporary(
            "r/s/.MANIFEST.json.1.2.tmp",
            "r/s/MANIFEST.json"
        ));
        assert!(!is_hidden_temporary(
            "r/s/MANIFEST.json",
            "r/s/MANIFEST.json"
        ));
        assert!(!is_hidden_temporary("r/.x", "r/s/MANIFEST.json"));
        assert!(!is_hidden_temporary("r/s/x.tmp", "r/s/MANIFEST.json"));
        let p = unique_prefix("a b/c");
        layout::validate_run(&p).expect("prefixes are valid run names");
    }
}
