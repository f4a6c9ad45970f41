//! `ckpt-bench erasure`: Reed–Solomon encode and decode throughput (one
//! core and all cores) beside the memcpy floor of the same bytes, and, on
//! real peer servers on 127.0.0.1, the peer memory per rank and the
//! restore time of a shard for the buddy replica, 4+2 and 8+2 (healthy, and
//! with two servers gone).

use std::time::Instant;

use bytes::Bytes;
use ckpt_core::Tier;
use ckpt_io::peer::{PeerConfig, PeerServer, PeerServerConfig, PeerTier};
use clap::Args;
use serde_json::json;

use crate::floors::median;

/// Arguments of `erasure`.
#[derive(Debug, Args)]
pub struct ErasureArgs {
    /// Bytes encoded and decoded for the throughput runs (e.g. 512M).
    #[arg(long, default_value = "256M", value_parser = crate::synth::parse_bytes)]
    pub bytes: u64,
    /// Shard bytes per rank for the peer-server runs.
    #[arg(long, default_value = "32M", value_parser = crate::synth::parse_bytes)]
    pub shard_bytes: u64,
    /// Ranks (and servers) for the peer-server runs.
    #[arg(long, default_value_t = 10)]
    pub ranks: u32,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

const STRIPE: usize = 1 << 20;

/// GB/s of `bytes` of data encoded into `k + m` over `threads` threads.
fn encode_rate(data: &[u8], k: usize, m: usize, threads: usize) -> f64 {
    let stripe = k * STRIPE;
    let stripes: Vec<&[u8]> = data.chunks_exact(stripe).collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for part in stripes.chunks(stripes.len().div_ceil(threads).max(1)) {
            s.spawn(move || {
                let mut enc =
                    reed_solomon_simd::ReedSolomonEncoder::new(k, m, STRIPE).expect("encoder");
                for st in part {
                    for shard in st.chunks_exact(STRIPE) {
                        enc.add_original_shard(shard).expect("add");
                    }
                    let r = enc.encode().expect("encode");
                    std::hint::black_box(r.recovery_iter().count());
                }
            });
        }
    });
    (stripes.len() * stripe) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// GB/s of stripe data rebuilt with `m` data shards of every stripe lost.
fn decode_rate(data: &[u8], k: usize, m: usize, threads: usize) -> f64 {
    let stripe = k * STRIPE;
    let stripes: Vec<&[u8]> = data.chunks_exact(stripe).collect();
    // Parity of every stripe, computed once, outside the timing.
    let parity: Vec<Vec<Vec<u8>>> = stripes
        .iter()
        .map(|st| reed_solomon_simd::encode(k, m, st.chunks_exact(STRIPE)).expect("encode"))
        .collect();
    let work: Vec<(&[u8], &Vec<Vec<u8>>)> = stripes.iter().copied().zip(parity.iter()).collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for part in work.chunks(work.len().div_ceil(threads).max(1)) {
            s.spawn(move || {
                for (st, par) in part {
                    let originals = st.chunks_exact(STRIPE).enumerate().skip(m);
                    let restored =
                        reed_solomon_simd::decode(k, m, originals, par.iter().enumerate())
                            .expect("decode");
                    std::hint::black_box(restored.len());
                }
            });
        }
    });
    (stripes.len() * stripe) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// GB/s of one thread copying `data`.
fn memcpy_rate(data: &[u8]) -> f64 {
    let mut dst = vec![0u8; data.len()];
    dst.copy_from_slice(data); // fault the pages in first
    let t0 = Instant::now();
    dst.copy_from_slice(data);
    std::hint::black_box(&dst);
    data.len() as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// One peer-server configuration: peer memory per rank (bytes held per
/// server over the shard size) and restore seconds, healthy and with two
/// servers gone (`None` where the shard is lost).
fn peer_run(
    a: &ErasureArgs,
    ec: Option<(u32, u32)>,
) -> Result<(f64, f64, Option<f64>), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let secret = b"ckpt-bench erasure: a group secret of 32+ bytes".to_vec();
    let mut servers = {
        let _g = rt.enter();
        (0..a.ranks)
            .map(|_| {
                PeerServer::spawn(PeerServerConfig::new(
                    secret.clone(),
                    8 * a.shard_bytes + (64 << 20),
                ))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let addrs: Vec<_> = servers.iter().map(|s| s.local_addr()).collect();
    let tier = |rank: u32| {
        let mut c = PeerConfig::new(addrs.clone(), rank, secret.clone());
        if let Some((k, m)) = ec {
            c = c.erasure(k, m);
        }
        PeerTier::new(c)
    };
    let shard = Bytes::from(ckpt_core::rng::pattern(a.shard_bytes as usize, 3));
    let path = |r: u32| format!("bench/step-1/rank-{r:05}.safetensors");
    rt.block_on(async {
        for r in 0..a.ranks {
            let t = tier(r)?;
            let mut w = t.create(&path(r)).await?;
            for part in shard.chunks(8 << 20) {
                w.write(shard.slice_ref(part)).await?;
            }
            w.finish().await?;
        }
        Ok::<_, ckpt_core::Error>(())
    })?;
    let held: u64 = servers.iter().map(|s| s.used_bytes()).sum();
    let per_rank = held as f64 / a.ranks as f64 / a.shard_bytes as f64;
    let reader = tier(5 % a.ranks)?;
    let restore = |rt: &tokio::runtime::Runtime| -> Result<f64, ckpt_core::Error> {
        let mut buf = vec![0u8; a.shard_bytes as usize];
        let mut times = Vec::new();
        for _ in 0..a.iters {
            let t0 = Instant::now();
            rt.block_on(reader.read_into(&path(0), 0, &mut buf))?;
            times.push(t0.elapsed().as_secs_f64());
        }
        if buf[..] != shard[..] {
            return Err(ckpt_core::Error::Internal("restored bytes differ".into()));
        }
        Ok(median(&mut times))
    };
    let healthy = restore(&rt)?;
    // Rank 0's shard: its buddy (1) holds the replica; fragments 1 and 2 are
    // data fragments of the erasure codes. Stop those two servers.
    for idx in [2usize, 1] {
        let s = servers.remove(idx);
        rt.block_on(s.shutdown());
    }
    let degraded = restore(&rt).ok();
    for s in servers {
        rt.block_on(s.shutdown());
    }
    Ok((per_rank, healthy, degraded))
}

/// Runs the benchmark.
pub fn run(a: &ErasureArgs) -> Result<(), Box<dyn std::error::Error>> {
    let data = ckpt_core::rng::pattern(a.bytes as usize, 7);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut copy = (0..a.iters).map(|_| memcpy_rate(&data)).collect::<Vec<_>>();
    let copy = median(&mut copy);
    if !a.json {
        println!(
            "erasure: {} MiB, stripes of k x 1 MiB, {} runs (medians), {cores} cores; memcpy floor {copy:.2} GB/s (1 thread)",
            a.bytes >> 20,
            a.iters
        );
        println!(
            "{:<6} {:>14} {:>14} {:>14} {:>14}",
            "code", "encode 1 core", "encode all", "decode 1 core", "decode all"
        );
    }
    for (k, m) in [(4usize, 2usize), (8, 2)] {
        let mut rates = Vec::new();
        for f in [encode_rate, decode_rate] {
            for threads in [1, cores] {
                let mut v = (0..a.iters)
                    .map(|_| f(&data, k, m, threads))
                    .collect::<Vec<_>>();
                rates.push(median(&mut v));
            }
        }
        if a.json {
            println!(
                "{}",
                json!({"bench": "erasure", "code": format!("{k}+{m}"), "encode_gbs_1": rates[0],
                    "encode_gbs_all": rates[1], "decode_gbs_1": rates[2], "decode_gbs_all": rates[3],
                    "memcpy_gbs": copy, "cores": cores})
            );
        } else {
            println!(
                "{:<6} {:>9.2} GB/s {:>9.2} GB/s {:>9.2} GB/s {:>9.2} GB/s",
                format!("{k}+{m}"),
                rates[0],
                rates[1],
                rates[2],
                rates[3]
            );
        }
    }
    if !a.json {
        println!(
            "peer servers: {} ranks, {} MiB shard each; memory = bytes held per server / shard; restore of one shard (read_into), healthy and with 2 servers gone",
            a.ranks,
            a.shard_bytes >> 20
        );
        println!(
            "{:<8} {:>10} {:>12} {:>16}",
            "mode", "memory", "restore s", "2 servers gone"
        );
    }
    for (name, ec) in [
        ("replica", None),
        ("4+2", Some((4, 2))),
        ("8+2", Some((8, 2))),
    ] {
        let (mem, healthy, degraded) = peer_run(a, ec)?;
        if a.json {
            println!(
                "{}",
                json!({"bench": "erasure-peers", "mode": name, "memory_per_rank": mem,
                    "restore_s": healthy, "restore_degraded_s": degraded})
            );
        } else {
            let d = degraded.map_or("lost".to_string(), |d| format!("{d:.3}"));
            println!("{name:<8} {mem:>9.3}x {healthy:>12.3} {d:>16}");
        }
    }
    Ok(())
}
