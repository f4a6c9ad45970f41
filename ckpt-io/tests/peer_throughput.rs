//! Peer tier throughput of one large object over loopback TCP: a streamed
//! write, a whole get, ranged gets and `read_into`. Ignored by default;
//! it prints MiB/s and asserts nothing about time:
//!
//! ```text
//! cargo test --release -p ckpt-io --features peer --test peer_throughput -- --ignored --nocapture
//! ```
#![cfg(feature = "peer")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::Tier;
use ckpt_io::peer::{PeerConfig, PeerServer, PeerServerConfig, PeerTier};

const SECRET: &[u8] = b"throughput secret of the peer group, 32+ bytes";
const MIB: usize = 1 << 20;
/// Size of the object moved.
const OBJECT: usize = 256 * MIB;
/// Size of each write, each ranged read.
const PIECE: usize = 8 * MIB;
const ROUNDS: usize = 3;

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

#[test]
#[ignore = "prints throughput; run with --release -- --ignored --nocapture"]
fn large_object_put_and_get_throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server =
            PeerServer::spawn(PeerServerConfig::new(SECRET, 2 * OBJECT as u64)).expect("server");
        let t = PeerTier::new(PeerConfig::new(vec![server.local_addr()], 0, SECRET)).expect("tier");
        let data: Bytes = (0..OBJECT)
            .map(|i| (i as u8).wrapping_mul(31))
            .collect::<Vec<u8>>()
            .into();
        let mut best = [Duration::MAX; 4];
        for round in 0..ROUNDS {
            let path = format!("bench/{round}.bin");
            let start = Instant::now();
            let mut w = t.create(&path).await.expect("create");
            for at in (0..OBJECT).step_by(PIECE) {
                w.write(data.slice(at..at + PIECE)).await.expect("write");
            }
            w.finish().await.expect("finish");
            best[0] = best[0].min(start.elapsed());

            let start = Instant::now();
            let got = t.get(&path).await.expect("get");
            best[1] = best[1].min(start.elapsed());
            assert!(got == data, "get returned other bytes");
            drop(got);

            let start = Instant::now();
            for at in (0..OBJECT).step_by(PIECE) {
                let r = t
                    .get_range(&path, at as u64..(at + PIECE) as u64)
                    .await
                    .expect("get_range");
                assert_eq!(r.len(), PIECE);
            }
            best[2] = best[2].min(start.elapsed());

            let mut buf = vec![0u8; PIECE];
            let start = Instant::now();
            for at in (0..OBJECT).step_by(PIECE) {
                t.read_into(&path, at as u64, &mut buf)
                    .await
                    .expect("read_into");
            }
            best[3] = best[3].min(start.elapsed());
            t.delete(&path).await.expect("delete");
        }
        for (what, d) in ["create+write", "get", "get_range 8 MiB", "read_into 8 MiB"]
            .iter()
            .zip(best)
        {
            println!(
                "peer {what:>16}: {:7.0} MiB/s ({} MiB in {d:?}, best of {ROUNDS})",
                mib_s(OBJECT, d),
                OBJECT / MIB
            );
        }
        server.shutdown().await;
    });
}
