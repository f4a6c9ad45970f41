//! The peer tier against real peer servers on 127.0.0.1: tier semantics,
//! authentication, hostile input, the memory budget, and a two-rank
//! checkpoint through the unchanged commit protocol.
//!
//! Every server listens on a loopback port chosen by the kernel; every
//! network wait is bounded by a timeout, and every loop by a count. The
//! attacks on the wire are in `peer_integrity.rs`, hostile and buggy
//! clients against the server's limits in `peer_hostile.rs`.

mod peer_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{
    Checkpointer, Error, PutMode, ShardSpec, TensorMut, TensorRef, Tier, TierPolicy, TrainingState,
    format::checksum, format::layout, store,
};
use ckpt_io::peer::protocol::{ErrorKind, Opcode, ProtocolError};
use ckpt_io::peer::{CHUNK_OVERHEAD, OBJECT_OVERHEAD, PeerServer, PeerTier};
use peer_support::*;

fn paths(list: &[ckpt_core::ObjectMeta]) -> Vec<&str> {
    let mut v: Vec<&str> = list.iter().map(|o| o.path.as_str()).collect();
    v.sort_unstable();
    v
}

/// What every tier must do, checked through `dyn Tier` only.
async fn tier_semantics(t: Arc<dyn Tier>) {
    // put / get / size, both modes.
    t.put("sem/a.json", Bytes::from_static(b"one"), PutMode::Overwrite)
        .await
        .expect("put");
    assert_eq!(t.get("sem/a.json").await.expect("get"), "one");
    t.put(
        "sem/a.json",
        Bytes::from_static(b"two!"),
        PutMode::Overwrite,
    )
    .await
    .expect("overwrite");
    assert_eq!(t.get("sem/a.json").await.expect("get"), "two!");
    assert_eq!(t.size("sem/a.json").await.expect("size"), 4);
    t.put("sem/m.json", Bytes::from_static(b"first"), PutMode::Create)
        .await
        .expect("create");
    let again = t
        .put("sem/m.json", Bytes::from_static(b"second"), PutMode::Create)
        .await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { ref path }) if path == "sem/m.json"),
        "{again:?}"
    );
    assert_eq!(t.get("sem/m.json").await.expect("get"), "first");

    // A put larger than one frame, in both modes.
    let large = pattern(9 * MIB, 5);
    t.put("sem/large.json", large.clone(), PutMode::Create)
        .await
        .expect("large create");
    let again = t
        .put("sem/large.json", pattern(9 * MIB, 6), PutMode::Create)
        .await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    assert!(t.get("sem/large.json").await.expect("get") == large);
    t.put(
        "sem/large.json",
        Bytes::from_static(b"small"),
        PutMode::Overwrite,
    )
    .await
    .expect("overwrite");
    assert_eq!(t.get("sem/large.json").await.expect("get"), "small");

    // Concurrent creates of one path: exactly one wins.
    let results = futures::future::join_all((0..8u8).map(|i| {
        let t = t.clone();
        async move {
            t.put("sem/race.json", Bytes::from(vec![i]), PutMode::Create)
                .await
        }
    }))
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.is_ok() || matches!(r, Err(Error::AlreadyExists { .. })))
    );

    // Missing objects.
    for r in [
        t.get("sem/missing").await.map(|_| ()),
        t.size("sem/missing").await.map(|_| ()),
        t.get_range("sem/missing", 0..1).await.map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }

    // Streamed writes: many pieces, one larger than a frame.
    let big = pattern(9 * MIB + 123, 7);
    let mut w = t.create("sem/data.bin").await.expect("create");
    w.write(big.slice(..10)).await.expect("write");
    w.write(Bytes::new()).await.expect("empty write");
    w.write(big.slice(10..4 * MIB)).await.expect("write");
    w.write(big.slice(4 * MIB..)).await.expect("write");
    // Not visible before finish.
    assert!(matches!(
        t.size("sem/data.bin").await,
        Err(Error::NotFound { .. })
    ));
    w.finish().await.expect("finish");
    assert!(t.get("sem/data.bin").await.expect("get") == big);
    assert_eq!(
        t.size("sem/data.bin").await.expect("size"),
        big.len() as u64
    );
    for (a, b) in [
        (0, 0),
        (0, 1),
        (5, 9 * MIB + 100),
        (8 * MIB - 3, 8 * MIB + 3),
    ] {
        let got = t
            .get_range("sem/data.bin", a as u64..b as u64)
            .await
            .expect("range");
        assert!(got == big.slice(a..b), "range {a}..{b}");
    }
    let mut buf = vec![0u8; 3 * MIB];
    t.read_into("sem/data.bin", MIB as u64, &mut buf)
        .await
        .expect("read_into");
    assert!(buf[..] == big[MIB..4 * MIB]);
    let past = t.get_range("sem/data.bin", 0..big.len() as u64 + 1).await;
    assert!(matches!(past, Err(Error::Incomplete { .. })), "{past:?}");
    let mut buf = vec![0u8; 16];
    let past = t
        .read_into("sem/data.bin", big.len() as u64 - 8, &mut buf)
        .await;
    assert!(matches!(past, Err(Error::Incomplete { .. })), "{past:?}");

    // Torn writes never become visible, nor replace the old object.
    let mut w = t.create("sem/data.bin").await.expect("create");
    w.write(pattern(MIB, 1)).await.expect("write");
    w.abort().await.expect("abort");
    let mut w = t.create("sem/data.bin").await.expect("create");
    w.write(pattern(2 * MIB, 2)).await.expect("write");
    drop(w);
    let mut w = t.create("sem/torn.bin").await.expect("create");
    w.write(pattern(100, 3)).await.expect("write");
    drop(w);
    assert!(t.get("sem/data.bin").await.expect("old object") == big);
    assert!(matches!(
        t.get("sem/torn.bin").await,
        Err(Error::NotFound { .. })
    ));
    // An empty object.
    t.create("sem/empty")
        .await
        .expect("create")
        .finish()
        .await
        .expect("finish");
    assert_eq!(t.get("sem/empty").await.expect("get").len(), 0);

    // Listing: prefix as a string, recursive.
    t.put("sem/sub/x", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .expect("put");
    t.put("semantics", Bytes::from_static(b"y"), PutMode::Overwrite)
        .await
        .expect("put");
    let all = t.list("sem/").await.expect("list");
    assert_eq!(
        paths(&all),
        [
            "sem/a.json",
            "sem/data.bin",
            "sem/empty",
            "sem/large.json",
            "sem/m.json",
            "sem/race.json",
            "sem/sub/x"
        ]
    );
    let data = all.iter().find(|o| o.path == "sem/data.bin");
    assert_eq!(data.map(|o| o.size), Some(big.len() as u64));
    assert_eq!(paths(&t.list("sem/s").await.expect("list")), ["sem/sub/x"]);
    assert_eq!(
        paths(&t.list("sem").await.expect("list")).len(),
        all.len() + 1
    );
    assert!(t.list("nothing/").await.expect("list").is_empty());

    // Deletes, also of absent objects.
    for p in paths(&t.list("sem").await.expect("list")) {
        t.delete(p).await.expect("delete");
    }
    t.delete("sem/a.json").await.expect("delete absent");
    assert!(t.list("sem").await.expect("list").is_empty());
    assert!(matches!(
        t.get("sem/a.json").await,
        Err(Error::NotFound { .. })
    ));

    // Paths that could escape are refused.
    for bad in ["/abs", "a/../b", "", "a//b"] {
        assert!(t.get(bad).await.is_err(), "{bad:?}");
        assert!(t.put(bad, Bytes::new(), PutMode::Overwrite).await.is_err());
    }
}

#[test]
fn tier_semantics_and_placement() {
    let rt = rt();
    let servers = spawn_servers(&rt, 3, 256 << 20);
    let addrs = addrs(&servers);
    let rank0 = tier(&addrs, 0);
    assert_eq!(rank0.buddy(), 1);
    assert_eq!(rank0.location(), format!("peer://{}", addrs[1]));
    let caps = rank0.capabilities();
    assert!(caps.atomic_create && caps.survives_process && !caps.survives_node);
    let dyn_tier: Arc<dyn Tier> = Arc::new(rank0.clone());
    block_on(&rt, async {
        // The conformance suite every tier passes.
        ckpt_io::conformance::run_all(dyn_tier.clone()).await;
        tier_semantics(dyn_tier).await;
    });
    for s in &servers {
        assert_eq!(s.object_count(), 0, "everything was deleted");
        eventually("every charge released", || s.used_bytes() == 0);
    }

    // Placement: data on the buddy only, metadata everywhere.
    let rank2 = tier(&addrs, 2);
    assert_eq!(rank2.buddy(), 0);
    block_on(&rt, async {
        let mut w = rank0.create("p/rank-0.safetensors").await.expect("create");
        w.write(pattern(MIB, 9)).await.expect("write");
        w.finish().await.expect("finish");
        rank0
            .put(
                "p/rank-0.json",
                Bytes::from_static(b"{}"),
                PutMode::Overwrite,
            )
            .await
            .expect("put");
        // Another rank reads both: the data from rank 0's buddy.
        assert!(rank2.get("p/rank-0.safetensors").await.expect("get") == pattern(MIB, 9));
        assert_eq!(rank2.size("p/rank-0.json").await.expect("size"), 2);
        assert_eq!(rank2.list("p/").await.expect("list").len(), 2);
    });
    assert_eq!(
        servers.iter().map(|s| s.object_count()).collect::<Vec<_>>(),
        [1, 2, 1]
    );
    assert!(servers[1].used_bytes() > MIB as u64);
    assert!(servers[0].used_bytes() < 1000, "metadata only");
    block_on(&rt, async {
        rank2.delete("p/rank-0.safetensors").await.expect("delete");
        rank2.delete("p/rank-0.json").await.expect("delete");
    });
    assert!(servers.iter().all(|s| s.object_count() == 0));

    // A server that goes away is skipped by reads and lists; an object
    // only it held is then not found.
    block_on(&rt, async {
        rank0
            .put("q/meta", Bytes::from_static(b"m"), PutMode::Overwrite)
            .await
            .expect("put");
        let mut w = rank0.create("q/data").await.expect("create");
        w.write(pattern(1000, 1)).await.expect("write");
        w.finish().await.expect("finish");
    });
    let mut servers = servers;
    let lost = servers.remove(1);
    block_on(&rt, lost.shutdown());
    block_on(&rt, async {
        assert_eq!(rank0.get("q/meta").await.expect("from another server"), "m");
        assert_eq!(paths(&rank0.list("q/").await.expect("list")), ["q/meta"]);
        let gone = rank0.get("q/data").await;
        assert!(matches!(gone, Err(Error::NotFound { .. })), "{gone:?}");
        // Writing data needs the buddy.
        let e = rank0.create("q/more").await.err().expect("buddy is down");
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains(&addrs[1].to_string()), "{e}");
    });
    for s in servers {
        block_on(&rt, s.shutdown());
    }
    // No server at all: a retryable error, not "not found".
    block_on(&rt, async {
        let e = rank0.get("q/meta").await.expect_err("nothing up");
        assert!(
            matches!(
                e,
                Error::Backend {
                    retryable: true,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(rank0.list("").await.is_err());
    });
}

#[test]
fn wrong_secret_is_rejected_both_ways() {
    let rt = rt();
    let servers = spawn_servers(&rt, 2, 64 << 20);
    let addrs = addrs(&servers);
    let mut cfg = peer_config(&addrs, 0);
    cfg.secret = b"not the secret of this peer group!".to_vec();
    let intruder = PeerTier::new(cfg).expect("tier");
    block_on(&rt, async {
        // The servers prove themselves first: the intruder finds that it
        // cannot check their proofs, and sends none of its own.
        let e = intruder.get("x").await.expect_err("wrong secret");
        assert!(!e.is_retryable(), "{e}");
        assert!(
            matches!(
                protocol_error(&e),
                Some(ProtocolError::BadServerProof { .. })
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("no peer server passed the handshake"), "{msg}");
        assert!(msg.contains(&addrs[1].to_string()), "{msg}");
        let e = intruder
            .put("x", Bytes::from_static(b"x"), PutMode::Overwrite)
            .await
            .expect_err("wrong secret");
        assert!(e.to_string().contains("failed the handshake"), "{e}");
        assert!(intruder.create("x").await.is_err());
        assert!(intruder.list("").await.is_err());
    });
    assert!(servers.iter().all(|s| s.object_count() == 0));

    // A client that passes the server's proof but sends a bad one of its
    // own is refused (by a hand-driven client: the crate's never would).
    let mut raw = Raw::connect(addrs[0]);
    let identity = addrs[0].to_string();
    raw.send_raw(&client_hello(&[3; 32], &identity));
    let (op, _, hello) = raw.reply();
    assert_eq!((op, hello.len()), (Opcode::Hello, 64));
    raw.send_raw(&frame_id(Opcode::Auth, 0, 1, b"", 32, &[0; 32]));
    let ns: [u8; 32] = hello[..32].try_into().expect("nonce");
    let (_, s2c) = frame_keys(SECRET, &transcript(&[3; 32], &ns, &identity));
    raw.recv = Some(Dir { key: s2c, seq: 0 });
    raw.expect_refusal(ErrorKind::Auth, "did not prove");

    // The real group still serves the right secret.
    let good = tier(&addrs, 0);
    block_on(&rt, async {
        good.put("ok", Bytes::from_static(b"1"), PutMode::Create)
            .await
            .expect("put");
        assert_eq!(good.get("ok").await.expect("get"), "1");
    });
}

#[test]
fn hostile_input_is_refused_and_the_server_keeps_serving() {
    let rt = rt();
    let servers = spawn_servers(&rt, 1, 64 << 20);
    let addr = servers[0].local_addr();
    let good = tier(&[addr], 0);
    let check_alive = |round: u8| {
        block_on(&rt, async {
            let p = format!("alive/{round}");
            good.put(&p, Bytes::from(vec![round]), PutMode::Overwrite)
                .await
                .expect("put");
            assert_eq!(good.get(&p).await.expect("get")[..], [round]);
        });
    };
    check_alive(0);

    // Random bytes instead of a ClientHello.
    let garbage = ckpt_core::rng::pattern(4096, 3);
    let mut raw = Raw::connect(addr);
    raw.send_raw(&garbage);
    raw.expect_closed();
    check_alive(1);

    // A request before the handshake.
    let mut raw = Raw::connect(addr);
    raw.send_raw(&frame(Opcode::Get, 0, b"alive/0", 0, &[]));
    raw.expect_refusal(ErrorKind::Protocol, "before the handshake");
    check_alive(2);

    // Saying nothing: closed after the handshake timeout.
    Raw::connect(addr).expect_closed();

    // Authenticated, then hostile: frames with valid tags, refused for
    // what they say.
    let cases: Vec<(Vec<Vec<u8>>, ErrorKind, &str)> = vec![
        // A header claiming a 1 TiB payload: refused before any allocation.
        (
            vec![frame(Opcode::Put, 0, b"huge", 1 << 40, &[])],
            ErrorKind::Protocol,
            "exceeds the limit",
        ),
        (
            vec![frame(Opcode::WriteChunk, 0, b"", 10, &[0; 10])],
            ErrorKind::Protocol,
            "no write open",
        ),
        (
            vec![frame(Opcode::FinishWrite, 0, b"", 0, &[])],
            ErrorKind::Protocol,
            "no write open",
        ),
        (
            vec![
                frame(Opcode::BeginWrite, 0, b"w", 0, &[]),
                frame(Opcode::BeginWrite, 0, b"w2", 0, &[]),
            ],
            ErrorKind::Protocol,
            "while a write is open",
        ),
        (
            vec![
                frame(Opcode::BeginWrite, 0, b"w", 0, &[]),
                frame(Opcode::Get, 0, b"alive/0", 0, &[]),
            ],
            ErrorKind::Protocol,
            "while a write is open",
        ),
        (
            vec![frame(Opcode::Auth, 0, b"", 32, &[0; 32])],
            ErrorKind::Protocol,
            "after the handshake",
        ),
        (
            vec![client_hello(&[0; 32], &addr.to_string())],
            ErrorKind::Protocol,
            "after the handshake",
        ),
        (
            vec![frame(Opcode::Get, 0, b"a/../../etc/passwd", 0, &[])],
            ErrorKind::InvalidPath,
            "invalid path",
        ),
        (
            vec![frame(Opcode::Get, 0, b"/etc/passwd", 0, &[])],
            ErrorKind::InvalidPath,
            "absolute",
        ),
        (
            vec![frame(Opcode::Get, 0, &[b'a'; 2000], 0, &[])],
            ErrorKind::InvalidPath,
            "longer than 1024",
        ),
        (
            vec![frame(Opcode::Data, 0, b"", 3, b"abc")],
            ErrorKind::Protocol,
            "wrong way",
        ),
        (
            vec![frame(Opcode::Get, 0, b"x", 5, b"extra")],
            ErrorKind::Protocol,
            "expected 0",
        ),
        (
            vec![frame(Opcode::Put, 7, b"x", 1, b"x")],
            ErrorKind::Protocol,
            "invalid flags",
        ),
        (
            vec![{
                let mut f = frame(Opcode::Get, 0, b"x", 0, &[]);
                f[5] = 0x42;
                f
            }],
            ErrorKind::Protocol,
            "unknown opcode",
        ),
        (
            vec![{
                let mut f = frame(Opcode::Get, 0, b"x", 0, &[]);
                f[4] = 9;
                f
            }],
            ErrorKind::Protocol,
            "version",
        ),
        (
            vec![{
                let mut f = frame(Opcode::Get, 0, b"x", 0, &[]);
                f[0] = b'G';
                f
            }],
            ErrorKind::Protocol,
            "magic",
        ),
    ];
    let ncases = cases.len();
    for (i, (frames, kind, needle)) in cases.into_iter().enumerate() {
        let mut raw = Raw::authed(addr);
        let n = frames.len();
        for (j, f) in frames.into_iter().enumerate() {
            raw.send_frame(&f);
            if j + 1 < n {
                let (op, _, _) = raw.reply();
                assert_eq!(op, Opcode::Ok, "case {i}: the first frame is fine");
            }
        }
        raw.expect_refusal(kind, needle);
        check_alive(10 + i as u8);
    }
    assert!(ncases >= 16);
    // A well-formed request with a wrong tag.
    let mut raw = Raw::authed(addr);
    raw.send_raw(&[&frame(Opcode::Delete, 0, b"alive/0", 0, &[])[..], &[0; 32]].concat());
    raw.expect_refusal(ErrorKind::Integrity, "failed its tag check");
    check_alive(99);
    // Nothing hostile was stored, and nothing staged is left counted.
    let tier_objects = block_on(&rt, good.list("")).expect("list");
    assert!(tier_objects.iter().all(|o| o.path.starts_with("alive/")));
    let charged: u64 = tier_objects
        .iter()
        .map(|o| o.size + o.path.len() as u64 + OBJECT_OVERHEAD)
        .sum();
    eventually("staged bytes released", || {
        servers[0].used_bytes() == charged
    });

    // A well-formed session by hand: the documented protocol works.
    let mut raw = Raw::authed(addr);
    raw.send_frame(&frame(Opcode::Size, 0, b"alive/0", 0, &[]));
    let (op, _, body) = raw.reply();
    assert_eq!((op, body), (Opcode::Ok, 1u64.to_le_bytes().to_vec()));
    raw.send_frame(&frame(Opcode::Get, 0, b"nope", 0, &[]));
    let (op, flags, _) = raw.reply();
    assert_eq!(
        (op, ErrorKind::from_u16(flags)),
        (Opcode::Err, Some(ErrorKind::NotFound))
    );
    raw.send_frame(&frame(
        Opcode::GetRange,
        0,
        b"alive/0",
        16,
        &[0u64.to_le_bytes(), 1u64.to_le_bytes()].concat(),
    ));
    let (op, _, body) = raw.reply();
    assert_eq!((op, body), (Opcode::Data, vec![0u8]));
    raw.send_frame(&frame(Opcode::BeginWrite, 0, b"by-hand", 0, &[]));
    assert_eq!(raw.reply().0, Opcode::Ok);
    raw.send_frame(&frame(Opcode::WriteChunk, 0, b"", 3, b"abc"));
    assert_eq!(raw.reply().0, Opcode::Ok);
    raw.send_frame(&frame(Opcode::FinishWrite, 1, b"", 0, &[]));
    assert_eq!(raw.reply().0, Opcode::Ok);
    assert_eq!(block_on(&rt, good.get("by-hand")).expect("get"), "abc");
    check_alive(100);
}

#[test]
fn memory_budget_refuses_writes_and_never_evicts() {
    const BUDGET: u64 = 4 << 20;
    let rt = rt();
    let servers = spawn_servers(&rt, 2, BUDGET);
    let addrs = addrs(&servers);
    // Frames of 1 MiB, so a write is staged on the server as it goes.
    let mut cfg = peer_config(&addrs, 0);
    cfg.max_frame = MIB as u64;
    let t = PeerTier::new(cfg).expect("tier");
    let buddy = &servers[1];
    let old = pattern(MIB, 4);
    block_on(&rt, async {
        t.put(
            "keep/meta.json",
            Bytes::from_static(b"{}"),
            PutMode::Overwrite,
        )
        .await
        .expect("put");
        let mut w = t.create("keep/old.bin").await.expect("create");
        w.write(old.clone()).await.expect("write");
        w.finish().await.expect("finish");
    });
    let before = buddy.used_bytes();
    // Data, paths and overheads: the metadata in one Put, the data in one
    // WriteChunk of 1 MiB.
    let charged = 2
        + "keep/meta.json".len() as u64
        + OBJECT_OVERHEAD
        + MIB as u64
        + CHUNK_OVERHEAD
        + "keep/old.bin".len() as u64
        + OBJECT_OVERHEAD;
    assert_eq!(before, charged);

    // 5 MiB do not fit in a 4 MiB budget that already holds 1 MiB.
    let err = block_on(&rt, async {
        let mut w = t.create("big/new.bin").await.expect("create");
        for i in 0..5u8 {
            if let Err(e) = w.write(pattern(MIB, i)).await {
                assert!(i >= 2, "refused too early, at MiB {i}: {e}");
                let again = w.write(pattern(1, 0)).await;
                assert!(again.is_err(), "a failed writer stays failed");
                let _ = w.abort().await;
                return e;
            }
        }
        w.finish().await.expect_err("over budget")
    });
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Backend {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
    for needle in [
        "memory budget of 4194304 bytes",
        "big/new.bin",
        &addrs[1].to_string(),
    ] {
        assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
    }
    // Nothing of it is visible, the staged bytes are released, the old
    // object is untouched.
    block_on(&rt, async {
        assert!(matches!(
            t.get("big/new.bin").await,
            Err(Error::NotFound { .. })
        ));
        assert!(t.get("keep/old.bin").await.expect("old") == old);
        assert_eq!(t.get("keep/meta.json").await.expect("meta"), "{}");
    });
    eventually("refused write released", || buddy.used_bytes() == before);

    // A write in progress counts against the budget.
    let other = tier(&addrs, 0);
    block_on(&rt, async {
        let mut w = t.create("big/staged.bin").await.expect("create");
        w.write(pattern(2 * MIB, 1)).await.expect("2 MiB staged");
        let e = other
            .put("big/put.bin", pattern(2 * MIB, 2), PutMode::Overwrite)
            .await
            .expect_err("staged bytes count");
        assert!(e.to_string().contains("memory budget"), "{e}");
        w.finish().await.expect("finish");
        assert_eq!(
            t.size("big/staged.bin").await.expect("size"),
            2 * MIB as u64
        );
        // 3 MiB held now: space comes back only through deletes.
        let e = other
            .put("big/put.bin", pattern(MIB, 2), PutMode::Overwrite)
            .await
            .expect_err("full");
        assert!(!e.is_retryable(), "{e}");
        assert!(t.get("keep/old.bin").await.expect("not evicted") == old);
        other.delete("keep/old.bin").await.expect("delete");
        other
            .put("big/put.bin", pattern(MIB, 2), PutMode::Overwrite)
            .await
            .expect("fits after the delete");
    });
}

const ROWS: u64 = 16;
const COLS: u64 = 131_072;
const RUN: &str = "peer-run";

/// The full tensor at `step`.
fn weights(step: u64) -> Vec<f32> {
    (0..ROWS * COLS)
        .map(|i| (i % 9973) as f32 * 0.5 + step as f32)
        .collect()
}

/// Rank `r`'s half of it.
fn shard_of(full: &[f32], r: u64) -> (ShardSpec, Vec<f32>) {
    let spec = ShardSpec::split(vec![ROWS, COLS], 0, 2, r).expect("split");
    let start = (spec.offsets[0] * COLS) as usize;
    let len = (spec.shape[0] * COLS) as usize;
    (spec, full[start..start + len].to_vec())
}

fn checkpointer(addrs: &[SocketAddr], rank: u32) -> Checkpointer {
    checkpointer_of(addrs, rank, "0")
}

/// A rank's checkpointer as part of incarnation `incarnation` of the job.
fn checkpointer_of(addrs: &[SocketAddr], rank: u32, incarnation: &str) -> Checkpointer {
    Checkpointer::builder(RUN)
        .tier(Arc::new(tier(addrs, rank)), TierPolicy::keep_last(2))
        .incarnation(incarnation)
        .rank(rank, 2)
        .chunk_size(256 << 10)
        .commit_timeout(Duration::from_secs(10))
        .build()
        .expect("checkpointer")
}

/// Both ranks restore together (the restore is a collective: the ranks
/// agree on the step), as a new incarnation of the job.
fn restore_both(
    addrs: &[SocketAddr],
    incarnation: &str,
) -> [ckpt_core::Result<(u64, Vec<f32>, u64)>; 2] {
    std::thread::scope(|s| {
        let hs = [0u32, 1].map(|r| {
            s.spawn(move || {
                let ckpt = Checkpointer::builder(RUN)
                    .tier(Arc::new(tier(addrs, r)), TierPolicy::keep_last(2))
                    .incarnation(incarnation)
                    .rank(r, 2)
                    .commit_timeout(Duration::from_secs(3))
                    .build()
                    .expect("checkpointer");
                restore_shard(&ckpt, u64::from(r))
            })
        });
        hs.map(|h| h.join().expect("restoring rank"))
    })
}

fn restore_shard(ckpt: &Checkpointer, r: u64) -> ckpt_core::Result<(u64, Vec<f32>, u64)> {
    let (spec, _) = shard_of(&weights(0), r);
    let mut out = vec![0f32; spec.numel() as usize];
    let shape = spec.shape.clone();
    let restored = ckpt
        .restore(&mut [&mut TensorMut::from_slice("w", &shape, &mut out).with_shard(spec)])?
        .expect("a checkpoint");
    let loader = restored.loop_state.data_loader::<u64>()?;
    Ok((restored.step, out, loader))
}

#[test]
fn two_ranks_checkpoint_and_restore_through_peers() {
    let rt = rt();
    let mut servers = spawn_servers(&rt, 2, 256 << 20);
    let addrs = addrs(&servers);

    // Two ranks in one process, each with its own PeerTier, saving their
    // own shard concurrently; steps 1..=3, keeping the last 2.
    std::thread::scope(|s| {
        for r in 0..2u32 {
            let addrs = &addrs;
            s.spawn(move || {
                let ckpt = checkpointer(addrs, r);
                for step in 1..=3u64 {
                    let (spec, local) = shard_of(&weights(step), u64::from(r));
                    let shape = spec.shape.clone();
                    let t = TensorRef::from_slice("w", &shape, &local).with_shard(spec);
                    let state = TrainingState::builder(step)
                        .model([&t])
                        .without_optimizer()
                        .without_rng()
                        .without_lr_schedule()
                        .data_loader(&(step * 100))
                        .build()
                        .expect("state");
                    let report = ckpt.save(&state).expect("save").wait().expect("durable");
                    assert!(report.tiers[0].committed, "rank {r}: {:?}", report.tiers);
                }
                for r in ckpt.close() {
                    r.expect("save");
                }
            });
        }
    });

    let observer = tier(&addrs, 0);
    block_on(&rt, async {
        let steps = store::committed_steps(&observer, RUN).await.expect("steps");
        assert_eq!(steps, [2, 3], "retention kept the last two");
        let step1 = format!("{}/", layout::step_dir(RUN, 1));
        assert!(observer.list(&step1).await.expect("list").is_empty());
    });
    // Each server holds the other rank's shards of steps 2 and 3 (4 MiB
    // each) plus the small metadata.
    for s in &servers {
        let used = s.used_bytes();
        assert!(
            (8 * MIB as u64..9 * MIB as u64).contains(&used),
            "{s:?}: {used}"
        );
    }

    // The job restarted (new tiers, new checkpointers): each rank restores
    // its shard, both at step 3.
    let (_, want1) = shard_of(&weights(3), 1);
    let [r0, r1] = restore_both(&addrs, "1");
    let (step, got, loader) = r1.expect("rank 1 restores");
    assert_eq!((step, loader), (3, 300));
    assert!(got == want1, "rank 1's shard differs");
    let (step, got, _) = r0.expect("rank 0 restores");
    assert_eq!(step, 3);
    assert!(got == shard_of(&weights(3), 0).1, "rank 0's shard differs");

    // Rank 1's own server dies. Its shard lives on its buddy (server 0),
    // which survives: a restarted rank 1 finds it there, whole and
    // verified against the committed manifest.
    block_on(&rt, servers.remove(1).shutdown());
    let survivor = tier(&addrs, 1);
    assert_eq!(survivor.buddy_addr(), addrs[0]);
    block_on(&rt, async {
        let steps = store::committed_steps(&survivor, RUN).await.expect("steps");
        assert_eq!(steps, [2, 3]);
        let m = store::load_manifest(&survivor, RUN, 3)
            .await
            .expect("manifest");
        let piece = m.tensors["w"]
            .pieces
            .iter()
            .find(|p| p.rank == 1)
            .expect("rank 1's piece");
        let path = format!("{}/{}", layout::step_dir(RUN, 3), piece.file);
        let bytes = survivor
            .get_range(&path, piece.offset..piece.offset + piece.length)
            .await
            .expect("rank 1's shard from its buddy");
        assert_eq!(checksum::chunk_crcs(&bytes, m.chunk_size), piece.crc32c);
        assert!(bytes[..] == *ckpt_core::as_bytes(&want1));
    });
    // Rank 0's shard was held only by the lost server (one replica per
    // shard), which was also rank 0's buddy, where its agreement proposal
    // must go: rank 0's restore fails naming the unreachable server, and
    // rank 1, which could restore its own shard from its buddy (restore
    // checks only the files its targets read), does not resume alone: it
    // gives up waiting for rank 0 within the bound, naming it.
    let [r0, r1] = restore_both(&addrs, "2");
    // (Whether rank 0's proposal, that it has nothing, gets through
    // depends on which servers its client reaches first: either way both
    // fail, naming rank 0.)
    let e0 = r0.expect_err("rank 0's replica and buddy are lost");
    let t0 = e0.to_string();
    assert!(
        t0.contains(&addrs[1].to_string()) || t0.contains("rank-00000."),
        "rank 0: {e0}"
    );
    let e1 = r1.expect_err("rank 1 must not resume alone");
    match &e1 {
        ckpt_core::Error::AgreementTimeout { missing, .. } => assert_eq!(missing, &[0]),
        ckpt_core::Error::NoCommonStep { ranks, .. } => {
            assert_eq!(ranks.len(), 1, "{e1}");
            assert_eq!(ranks[0].0, 0, "{e1}");
            assert!(ranks[0].1.contains("rank-00000."), "{e1}");
        }
        other => panic!("rank 1: {other:?}"),
    }

    // The lost server comes back, empty, on its old address: the next
    // checkpoint commits and restores in full again.
    let back = {
        let _guard = rt.enter();
        PeerServer::spawn(server_config(256 << 20).with_bind(addrs[1])).expect("rebind")
    };
    assert_eq!(back.object_count(), 0);
    std::thread::scope(|s| {
        for r in 0..2u32 {
            let addrs = &addrs;
            s.spawn(move || {
                let ckpt = checkpointer_of(addrs, r, "3");
                let (spec, local) = shard_of(&weights(4), u64::from(r));
                let shape = spec.shape.clone();
                let t = TensorRef::from_slice("w", &shape, &local).with_shard(spec);
                let state = TrainingState::builder(4)
                    .model([&t])
                    .without_optimizer()
                    .without_rng()
                    .without_lr_schedule()
                    .data_loader(&400u64)
                    .build()
                    .expect("state");
                let report = ckpt.save(&state).expect("save").wait().expect("durable");
                assert!(report.tiers[0].committed, "rank {r}: {:?}", report.tiers);
            });
        }
    });
    for (r, restored) in restore_both(&addrs, "4").into_iter().enumerate() {
        let r = r as u32;
        let (step, got, loader) = restored.expect("restore");
        assert_eq!((step, loader), (4, 400));
        assert!(got == shard_of(&weights(4), u64::from(r)).1, "rank {r}");
    }
    // A client from before the loss (its pooled connection to the old
    // server is dead) reads from the new one.
    block_on(&rt, async {
        let dir = layout::step_dir(RUN, 4);
        let rank0 = ckpt_core::store::shard_file(&observer, RUN, 4, 0)
            .await
            .expect("rank 0's shard of step 4");
        assert_eq!(observer.buddy_addr(), addrs[1]);
        let size = observer.size(&rank0).await.expect("on the new server");
        assert!(size > 4 * MIB as u64, "{size}");
        let listed = observer.list(&format!("{dir}/")).await.expect("list");
        assert!(listed.iter().any(|o| o.path == rank0), "{listed:?}");
    });
    servers.push(back);
}

/// A staging pool much smaller than one save: the save streams through
/// it, which only works if the tier lets go of each block once written.
#[test]
fn a_save_streams_through_a_small_staging_pool() {
    let rt = rt();
    let servers = spawn_servers(&rt, 2, 64 << 20);
    let addrs = addrs(&servers);
    let (tx, rx) = std::sync::mpsc::channel();
    let addrs2 = addrs.clone();
    // On a thread, so a stuck save fails the test instead of hanging it.
    std::thread::spawn(move || {
        let result = (|| {
            let ckpt = Checkpointer::builder("small-pool")
                .tier(Arc::new(tier(&addrs2, 0)), TierPolicy::keep_last(1))
                .chunk_size(4096)
                .block_size(8192)
                .staging_capacity(6 * 8192)
                .build()?;
            let w: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
            let t = TensorRef::from_slice("w", &[100_000], &w);
            let state = TrainingState::builder(1)
                .model([&t])
                .without_optimizer()
                .without_loop_state()
                .build()?;
            ckpt.save(&state)?.wait()?;
            let mut out = vec![0f32; 100_000];
            let r = ckpt
                .restore(&mut [&mut TensorMut::from_slice("w", &[100_000], &mut out)])?
                .map(|r| r.step);
            Ok::<_, Error>((r, out == w))
        })();
        let _ = tx.send(result);
    });
    let (step, same) = rx
        .recv_timeout(TEST_TIMEOUT)
        .expect("the save finished in time")
        .expect("save and restore");
    assert_eq!((step, same), (Some(1), true));
}

/// Reed–Solomon 4+2 across 6 servers: the conformance suite, memory of
/// 1.5x the object across the group, reads that rebuild from parity when
/// two servers are gone, and a typed error naming the fragments when a
/// third goes.
#[test]
fn erasure_coded_objects_survive_m_lost_servers() {
    let rt = rt();
    let servers = spawn_servers(&rt, 6, 256 << 20);
    let addrs = addrs(&servers);
    let ec = |rank| PeerTier::new(peer_config(&addrs, rank).erasure(4, 2)).expect("ec tier");
    let rank0 = ec(0);
    assert!(
        rank0.location().starts_with("peer-ec4+2://"),
        "{}",
        rank0.location()
    );
    assert!(rank0.capabilities().survives_node);
    let dyn_tier: Arc<dyn Tier> = Arc::new(rank0.clone());
    block_on(&rt, ckpt_io::conformance::run_all(dyn_tier));
    let left = block_on(&rt, tier(&addrs, 0).list("")).expect("list");
    assert!(left.is_empty(), "left behind: {left:?}");
    for s in &servers {
        assert_eq!(s.object_count(), 0, "everything was deleted");
        eventually("every charge released", || s.used_bytes() == 0);
    }
    // Too few nodes for 4+2 (6 servers, 2 ranks per node: 3 nodes).
    let mut cfg = peer_config(&addrs, 0).erasure(4, 2);
    cfg.ranks_per_node = 2;
    let e = PeerTier::new(cfg).expect_err("3 nodes for 6 fragments");
    assert!(e.to_string().contains("distinct nodes"), "{e}");

    // 10 MiB and a bit: 3 whole stripes of 4 MiB... and a short one.
    let len = 10 * MIB + 123;
    let data = pattern(len, 5);
    let path = "ec/step-1/rank-00000.abc.safetensors";
    block_on(&rt, async {
        let mut w = rank0.create(path).await.expect("create");
        for part in data.chunks(3 * MIB + 7) {
            w.write(Bytes::copy_from_slice(part)).await.expect("write");
        }
        w.finish().await.expect("finish");
    });
    let used: Vec<u64> = servers.iter().map(|s| s.used_bytes()).collect();
    let total: u64 = used.iter().sum();
    eprintln!("4+2 of {len} bytes: held per server {used:?}, total {total}");
    // Each server holds a quarter (one fragment) plus metadata: 1.5x in all.
    for u in &used {
        assert!((*u as f64) < len as f64 / 4.0 * 1.01 + 8192.0, "{used:?}");
    }
    assert!(
        (total as f64) < len as f64 * 1.5 * 1.01 + 65536.0,
        "{total}"
    );
    let rank3 = ec(3);
    let check = |t: &PeerTier| {
        block_on(&rt, async {
            assert!(t.get(path).await.expect("get") == data);
            assert_eq!(t.size(path).await.expect("size"), len as u64);
            for (a, b) in [
                (0u64, 1u64),
                (MIB as u64 - 3, MIB as u64 + 5),
                (4 * MIB as u64 - 1, 9 * MIB as u64),
                (len as u64 - 10, len as u64),
            ] {
                let got = t.get_range(path, a..b).await.expect("range");
                assert!(got == data.slice(a as usize..b as usize), "{a}..{b}");
                let mut buf = vec![0u8; (b - a) as usize];
                t.read_into(path, a, &mut buf).await.expect("read_into");
                assert!(buf == data[a as usize..b as usize], "{a}..{b}");
            }
            let listed = t.list("ec/").await.expect("list");
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!(
                (listed[0].path.as_str(), listed[0].size),
                (path, len as u64)
            );
        })
    };
    check(&rank0);
    check(&rank3);
    // Two servers gone (fragment 1, a data fragment, and 4, parity):
    // every read rebuilds from the other four.
    let mut servers = servers;
    for idx in [4usize, 1] {
        let s = servers.remove(idx);
        block_on(&rt, s.shutdown());
    }
    check(&rank3);
    // A third (fragment 2): 3 of 6 left, 4 needed.
    let s = servers.remove(1);
    block_on(&rt, s.shutdown());
    let e = block_on(&rt, rank3.get(path)).expect_err("3 of 6 fragments");
    let text = e.to_string();
    assert!(
        matches!(e, Error::Incomplete { .. })
            && text.contains("3 of 6 fragments")
            && text.contains("4 needed"),
        "{text}"
    );
    for s in servers {
        block_on(&rt, s.shutdown());
    }
}
