//! The peer server under hostile or buggy clients, and the client with a
//! hostile server in its group: idle sockets do not lock clients out, a
//! server with another secret is skipped, and the memory budget counts
//! what the server really holds (empty objects, a trickled payload, a
//! removed object a slow reader still receives) within a count limit; a
//! `keep_last(1)` tier fits a budget of two shards.
//!
//! Real TCP on 127.0.0.1 only; every wait is bounded.
#![cfg(feature = "peer")]

mod peer_support;

use std::io::{ErrorKind as IoKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::{
    Checkpointer, Error, PutMode, TensorMut, TensorRef, Tier, TierPolicy, TrainingState,
};
use ckpt_io::peer::protocol::{ErrorKind, Opcode};
use ckpt_io::peer::{OBJECT_OVERHEAD, PeerServerConfig};
use peer_support::*;

#[test]
fn idle_sockets_do_not_lock_clients_out() {
    let rt = rt();
    // Default handshake limits: 64 at once, 2 s each.
    let mut config = PeerServerConfig::new(SECRET, 64 << 20);
    config.io_timeout = Duration::from_secs(5);
    let server = spawn(&rt, config);
    let addr = server.local_addr();
    // More idle sockets than the server serves at once, authenticated or
    // not; they never say a word.
    let idle: Vec<TcpStream> = (0..1100)
        .map(|_| TcpStream::connect_timeout(&addr, RAW_TIMEOUT).expect("idle socket"))
        .collect();
    let t = tier(&[addr], 0);
    let served = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), async {
            t.put("x", Bytes::from_static(b"through"), PutMode::Overwrite)
                .await?;
            t.get("x").await
        })
        .await
    });
    let got = served.expect("served within 3 s").expect("put and get");
    assert_eq!(got, "through");
    // The server closed all but the newest few of them.
    eventually("idle sockets closed", || {
        let open = idle
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).expect("nonblocking");
                matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == IoKind::WouldBlock)
            })
            .count();
        open <= 64
    });
}

#[test]
fn a_server_with_another_secret_is_skipped() {
    let rt = rt();
    let mut servers = spawn_servers(&rt, 2, 64 << 20);
    let mut other = server_config(64 << 20);
    other.secret = b"another group's secret, 32+ bytes long".to_vec();
    servers.push(spawn(&rt, other));
    let addrs = addrs(&servers);
    // Rank 0's buddy is server 1; server 2 answers every handshake with a
    // proof this group cannot check.
    let t = tier(&addrs, 0);
    block_on(&rt, async {
        t.put("m.json", Bytes::from_static(b"{}"), PutMode::Overwrite)
            .await
            .expect("metadata: the bad copy is skipped");
        t.put("c.json", Bytes::from_static(b"1"), PutMode::Create)
            .await
            .expect("create decided by the buddy");
        let mut w = t.create("data.bin").await.expect("create");
        w.write(pattern(100_000, 1)).await.expect("write");
        w.finish().await.expect("finish");
        for _ in 0..3 {
            assert_eq!(t.get("m.json").await.expect("get"), "{}");
            assert_eq!(t.size("data.bin").await.expect("size"), 100_000);
            let mut buf = [0u8; 10];
            t.read_into("data.bin", 5, &mut buf).await.expect("read");
            let listed = t.list("").await.expect("list");
            assert_eq!(listed.len(), 3, "{listed:?}");
            let missing = t.get("missing").await;
            assert!(
                matches!(missing, Err(Error::NotFound { .. })),
                "{missing:?}"
            );
        }
        t.delete("c.json").await.expect("delete");
        assert_eq!(t.list("").await.expect("list").len(), 2);
        // A rank whose buddy is the bad server cannot write its data, and
        // is told which server and why.
        let rank1 = tier(&addrs, 1);
        let e = rank1.create("r1.bin").await.err().expect("bad buddy");
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains(&addrs[2].to_string()), "{e}");
        assert!(e.to_string().contains("failed the handshake"), "{e}");
        // It still reads what the good servers hold.
        assert_eq!(rank1.get("m.json").await.expect("get"), "{}");
    });
    assert_eq!(servers[2].object_count(), 0);
}

fn charge(path: &str, len: usize) -> u64 {
    (len + path.len()) as u64 + OBJECT_OVERHEAD
}

#[test]
fn empty_objects_and_paths_are_charged() {
    const BUDGET: u64 = 16 << 10;
    let rt = rt();
    let server = spawn(&rt, server_config(BUDGET));
    let t = tier(&[server.local_addr()], 0);
    let long = "k".repeat(500);
    let (stored, err) = block_on(&rt, async {
        for i in 0..1000 {
            let p = format!("empty/{i:04}-{long}");
            if let Err(e) = t.put(&p, Bytes::new(), PutMode::Overwrite).await {
                return (i, e);
            }
        }
        panic!("1000 empty objects with 500-byte paths fit in {BUDGET} bytes");
    });
    assert!(refused_with(&err, ErrorKind::Budget), "{err:?}");
    let each = charge(&format!("empty/0000-{long}"), 0);
    assert_eq!(stored as u64, BUDGET / each, "{err}");
    assert_eq!(server.used_bytes(), stored as u64 * each);
    // An empty streamed object is charged the same way.
    block_on(&rt, async {
        t.delete(&format!("empty/0000-{long}"))
            .await
            .expect("delete");
        t.create("e")
            .await
            .expect("create")
            .finish()
            .await
            .expect("finish");
    });
    assert_eq!(
        server.used_bytes(),
        (stored as u64 - 1) * each + charge("e", 0)
    );
}

#[test]
fn the_object_count_is_capped() {
    let rt = rt();
    let mut config = server_config(64 << 20);
    config.max_objects = 8;
    let server = spawn(&rt, config);
    let t = tier(&[server.local_addr()], 0);
    block_on(&rt, async {
        for i in 0..8 {
            t.put(&format!("o/{i}"), Bytes::from_static(b"x"), PutMode::Create)
                .await
                .expect("within the count");
        }
        let e = t
            .put("o/8", Bytes::from_static(b"x"), PutMode::Overwrite)
            .await
            .expect_err("one too many");
        assert!(refused_with(&e, ErrorKind::Budget), "{e:?}");
        assert!(e.to_string().contains("object count limit of 8"), "{e}");
        let e = t.create("o/9").await.err().expect("a streamed one too");
        assert!(refused_with(&e, ErrorKind::Budget), "{e:?}");
        // Replacing an object is fine; a delete makes room.
        t.put("o/0", Bytes::from_static(b"y"), PutMode::Overwrite)
            .await
            .expect("overwrite");
        t.delete("o/1").await.expect("delete");
        let mut w = t.create("o/9").await.expect("room again");
        w.write(pattern(10, 1)).await.expect("write");
        w.finish().await.expect("finish");
    });
    assert_eq!(server.object_count(), 8);
}

/// Sends `head` then trickles one byte every 50 ms until the server
/// closes (or 5 s pass).
fn trickle(raw: &mut Raw, head: &[u8]) -> std::thread::JoinHandle<()> {
    let mut s = raw.s.try_clone().expect("clone");
    let head = head.to_vec();
    std::thread::spawn(move || {
        let _ = s.write_all(&head);
        let deadline = Instant::now() + RAW_TIMEOUT;
        while Instant::now() < deadline && s.write_all(&[0]).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

#[test]
fn a_trickled_payload_is_dropped_and_its_reservation_released() {
    let rt = rt();
    let mut config = server_config(64 << 20);
    config.io_timeout = Duration::from_millis(500);
    config.min_payload_rate = 1 << 20;
    let server = spawn(&rt, config);
    let addr = server.local_addr();
    // A Put declaring 1 MiB, then a WriteChunk declaring 1 MiB: each must
    // be in within 0.5 s + 1 MiB at 1 MiB/s.
    for streamed in [false, true] {
        let mut raw = Raw::authed(addr);
        if streamed {
            raw.send_frame(&frame(Opcode::BeginWrite, 0, b"slow", 0, &[]));
            assert_eq!(raw.reply().0, Opcode::Ok);
        }
        let head = if streamed {
            frame(Opcode::WriteChunk, 0, b"", MIB as u64, &[])
        } else {
            frame(Opcode::Put, 0, b"slow", MIB as u64, &[])
        };
        let start = Instant::now();
        let sender = trickle(&mut raw, &head);
        eventually("the payload reserved", || server.used_bytes() >= MIB as u64);
        raw.expect_refusal(ErrorKind::Protocol, "slower than the minimum rate");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1400), "{took:?}");
        eventually("the reservation released", || server.used_bytes() == 0);
        assert_eq!(server.object_count(), 0);
        sender.join().expect("trickle thread");
    }
    // A client that keeps up is served.
    block_on(&rt, async {
        tier(&[addr], 0)
            .put("fast", pattern(4 * MIB, 1), PutMode::Overwrite)
            .await
            .expect("fast put");
    });
}

#[test]
fn a_removed_object_stays_charged_until_its_last_reader_lets_go() {
    const BUDGET: u64 = 100 << 20;
    const BIG: usize = 48 << 20;
    let rt = rt();
    let server = spawn(&rt, server_config(BUDGET));
    let addr = server.local_addr();
    let t = tier(&[addr], 0);
    block_on(&rt, async {
        let mut w = t.create("big").await.expect("create");
        w.write(pattern(BIG, 1)).await.expect("write");
        w.finish().await.expect("finish");
    });
    // A reader that asks for it and reads nothing: the server is stuck
    // sending it (far more than the sockets buffer).
    let mut slow = Raw::authed(addr);
    slow.send_frame(&frame(Opcode::Get, 0, b"big", 0, &[]));
    let mut first = [0u8; 1];
    slow.s.read_exact(&mut first).expect("data starts");
    block_on(&rt, async {
        t.delete("big").await.expect("delete");
        assert!(matches!(t.get("big").await, Err(Error::NotFound { .. })));
    });
    assert_eq!(server.object_count(), 0);
    // Still in memory, so still charged: a write that would need it is
    // refused.
    assert!(server.used_bytes() >= BIG as u64, "{}", server.used_bytes());
    let refused = block_on(&rt, t.put("next", pattern(60 << 20, 2), PutMode::Overwrite));
    let e = refused.expect_err("the removed object still holds its memory");
    assert!(refused_with(&e, ErrorKind::Budget), "{e:?}");
    // The reader goes away: the memory, and the charge, are released.
    drop(slow);
    eventually("the charge released", || server.used_bytes() == 0);
    block_on(&rt, t.put("next", pattern(60 << 20, 2), PutMode::Overwrite)).expect("fits now");
}

#[test]
fn keep_last_1_fits_a_budget_of_two_shards() {
    const N: usize = 256 << 10; // f32: a 1 MiB shard
    // Two shards (the newest arrives before retention deletes the oldest)
    // and the metadata, not three shards.
    const BUDGET: u64 = 2 * (MIB as u64 + (64 << 10)) + (64 << 10);
    let rt = rt();
    let big = spawn(&rt, server_config(64 << 20));
    let tight = spawn(&rt, server_config(BUDGET));
    // Rank 0's buddy (server 1) holds its shards.
    let addrs = vec![big.local_addr(), tight.local_addr()];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ckpt = Checkpointer::builder("keep-one")
                .tier(Arc::new(tier(&addrs, 0)), TierPolicy::keep_last(1))
                .build()?;
            let mut committed = Vec::new();
            for step in 1..=4u64 {
                let w: Vec<f32> = (0..N).map(|i| (i as u64 * step) as f32).collect();
                let t = TensorRef::from_slice("w", &[N as u64], &w);
                let state = TrainingState::builder(step)
                    .model([&t])
                    .without_optimizer()
                    .without_loop_state()
                    .build()?;
                let report = ckpt.save(&state)?.wait()?;
                committed.push(report.tiers[0].committed);
            }
            let mut out = vec![0f32; N];
            let r = ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[N as u64], &mut out)])?;
            let want: Vec<f32> = (0..N).map(|i| (i as u64 * 4) as f32).collect();
            Ok::<_, Error>((committed, r.map(|r| r.step), out == want))
        })();
        let _ = tx.send(result);
    });
    let (committed, step, same) = rx
        .recv_timeout(TEST_TIMEOUT)
        .expect("the saves finished in time")
        .expect("save and restore");
    assert_eq!(
        committed, [true; 4],
        "every save committed on the peer tier"
    );
    assert_eq!((step, same), (Some(4), true));
    // One shard left, and the budget could not have held three.
    let used = tight.used_bytes();
    assert!(
        (MIB as u64..BUDGET / 2 + (64 << 10)).contains(&used),
        "{used}"
    );
    assert!(3 * MIB as u64 > BUDGET);
}

/// Resident memory of this process, from /proc.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Extra resident memory a flood may cost beyond what the server holds
/// for clients (connection tasks and socket buffers, the test's own
/// threads and sockets).
const FLOOD_OVERHEAD: u64 = 96 << 20;

/// Four kinds of hostile connection at once, for about two seconds:
/// unauthenticated sockets that stay open, frames claiming a huge length,
/// truncated frames, and handshakes of a peer with another group's secret
/// (its proof is a valid HMAC, under the wrong key). Meanwhile an
/// authenticated client puts and gets 1 MiB objects and every request is
/// served; the server's charged memory stays within its budget and the
/// process grows by no more than what the server holds plus
/// `FLOOD_OVERHEAD`.
#[test]
fn a_flood_of_hostile_connections_leaves_an_authenticated_client_served() {
    // Resident memory is per process: run alone, in a process of its own
    // (the other tests of this file allocate in parallel).
    if std::env::var_os("CKPT_FLOOD_ALONE").is_none() {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "a_flood_of_hostile_connections_leaves_an_authenticated_client_served",
                "--exact",
                "--nocapture",
            ])
            .env("CKPT_FLOOD_ALONE", "1")
            .output()
            .expect("run the flood alone");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the flood did not run:\n{text}");
        return;
    }
    let rt = rt();
    let budget: u64 = 64 << 20;
    let server = spawn(&rt, server_config(budget));
    let addr = server.local_addr();
    let before = rss_bytes();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers: Vec<_> = (0..4u8)
        .map(|kind| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 3000 {
                    n += 1;
                    let Ok(mut s) = TcpStream::connect_timeout(&addr, RAW_TIMEOUT) else {
                        continue;
                    };
                    let _ = s.set_write_timeout(Some(RAW_TIMEOUT));
                    match kind {
                        // Says nothing; kept open (up to 200 at a time).
                        0 => {
                            held.push(s);
                            if held.len() > 200 {
                                held.remove(0);
                            }
                        }
                        // A ClientHello claiming 2^62 bytes of payload.
                        1 => {
                            let _ = s.write_all(&frame_id(
                                Opcode::ClientHello,
                                0,
                                0,
                                b"",
                                1 << 62,
                                &[],
                            ));
                        }
                        // Half a ClientHello, then gone.
                        2 => {
                            let hello = client_hello(&[3u8; 32], &addr.to_string());
                            let _ = s.write_all(&hello[..hello.len() / 2]);
                        }
                        // Another group: the server's proof does not check
                        // out under this secret, and the client's proof
                        // (a real HMAC, wrong key) is refused.
                        _ => {
                            let nc = [7u8; 32];
                            let id = addr.to_string();
                            let _ = s.write_all(&client_hello(&nc, &id));
                            let _ = s.set_read_timeout(Some(RAW_TIMEOUT));
                            let mut head = [0u8; 28];
                            if s.read_exact(&mut head).is_ok() {
                                let mut body = [0u8; 64];
                                if s.read_exact(&mut body).is_ok() {
                                    let mut ns = [0u8; 32];
                                    ns.copy_from_slice(&body[..32]);
                                    let t = transcript(&nc, &ns, &id);
                                    let wrong = proof(
                                        b"another group's secret, 32 bytes long",
                                        b"ckpt-peer-v2 client proof",
                                        &t,
                                    );
                                    let _ =
                                        s.write_all(&frame_id(Opcode::Auth, 0, 1, b"", 32, &wrong));
                                    let _ = s.read(&mut [0u8; 64]);
                                }
                            }
                        }
                    }
                }
                n
            })
        })
        .collect();
    // The authenticated client, throughout.
    let t = tier(&[addr], 0);
    let mut peak_used = 0u64;
    let mut peak_rss = before;
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(2) || served < 10 {
        let path = format!("flood/{}", served % 8);
        let data = pattern(MIB, served as u8);
        let r = rt.block_on(async {
            // A hang guard: under the flood a request still takes far less.
            tokio::time::timeout(Duration::from_secs(60), async {
                t.put(&path, data.clone(), PutMode::Overwrite).await?;
                t.get(&path).await
            })
            .await
        });
        let got = r
            .unwrap_or_else(|_| panic!("request {served} not served within 60 s under the flood"))
            .unwrap_or_else(|e| panic!("request {served} failed under the flood: {e}"));
        assert!(got == data, "request {served}: wrong bytes");
        served += 1;
        peak_used = peak_used.max(server.used_bytes());
        peak_rss = peak_rss.max(rss_bytes());
        assert!(served < 10_000, "bounded");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts: Vec<u32> = attackers
        .into_iter()
        .map(|h| h.join().expect("attacker"))
        .collect();
    eprintln!(
        "flood: {attempts:?} hostile connections; {served} requests served; peak charged {peak_used} of {budget}; RSS {before} -> peak {peak_rss}"
    );
    // Every kind ran (under load a full accept queue slows some down).
    assert!(
        attempts.iter().all(|n| *n >= 1) && attempts.iter().sum::<u32>() >= 100,
        "the flood ran: {attempts:?}"
    );
    assert!(peak_used <= budget);
    assert!(
        peak_rss.saturating_sub(before) <= peak_used + FLOOD_OVERHEAD,
        "RSS grew {} bytes while the server held {peak_used}",
        peak_rss - before
    );
    // What the client stored, and nothing else, is charged.
    eventually("hostile charges released", || {
        server.used_bytes() <= 8 * (MIB as u64 + 4096)
    });
}
