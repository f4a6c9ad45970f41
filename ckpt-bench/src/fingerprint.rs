//! `ckpt-bench fingerprint`: the cost of comparing replicas between saves
//! (`Checkpointer::verify_replicas`) beside the memcpy floor of the same
//! bytes, in one run. A fingerprint reads the state once (crc32c per chunk,
//! on every core) and writes nothing, so it should cost about one parallel
//! memcpy, far less than the training step that a second, redundant
//! computation would repeat. The exchange is timed apart: `--replicas`
//! in-process ranks compare their fingerprints through the directory (the
//! storage agreement), as ranks without a collective of their own do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_core::{Checkpointer, TierPolicy};
use ckpt_io::LocalTier;
use clap::Args;
use serde_json::json;

use crate::floors;
use crate::synth;

/// Arguments of `fingerprint`.
#[derive(Debug, Args)]
pub struct FingerprintArgs {
    /// The state and the directory the exchange goes through.
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// Replicas comparing their fingerprints (in-process ranks sharing the
    /// state's memory, so they also share this machine's cores).
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(a: &FingerprintArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.replicas < 2 {
        return Err(format!("--replicas {}: comparing needs at least 2", a.replicas).into());
    }
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let views = synth::views(&tensors);
    let chunk = ckpt_core::format::checksum::DEFAULT_CHUNK_SIZE;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16);

    // The fingerprint alone (what each rank computes), then the floors.
    let state = synth::state(&views, 1)?;
    let (mut prints, mut floors1, mut floorsn) = (vec![], vec![], vec![]);
    for i in 0..=a.state.iters {
        let t = Instant::now();
        std::hint::black_box(ckpt_core::fingerprint(&state, chunk));
        if i > 0 {
            prints.push(t.elapsed().as_secs_f64());
        }
    }
    for _ in 0..a.state.iters {
        floors1.push(floors::memcpy(&tensors)?.as_secs_f64());
        floorsn.push(floors::memcpy_parallel(&tensors, threads)?.as_secs_f64());
    }

    // The whole check: every replica fingerprints and they compare.
    let run = format!("bench-fingerprint-{}", std::process::id());
    let tier = Arc::new(LocalTier::new(&a.state.dir)?);
    let group: Vec<u32> = (0..a.replicas).collect();
    let ckpts: Vec<Checkpointer> = group
        .iter()
        .map(|&r| {
            Checkpointer::builder(&run)
                .rank(r, a.replicas)
                .incarnation("bench")
                .replicas(group.iter().copied())
                .commit_timeout(Duration::from_secs(60))
                .tier(tier.clone(), TierPolicy::keep_last(1))
                .build()
        })
        .collect::<ckpt_core::Result<_>>()?;
    let (mut checks, mut exchanges) = (vec![], vec![]);
    for i in 0..=a.state.iters {
        let results: Vec<ckpt_core::Result<(f64, ckpt_core::ReplicaCheck)>> =
            std::thread::scope(|s| {
                let hs: Vec<_> = ckpts
                    .iter()
                    .map(|c| {
                        let views = &views;
                        s.spawn(move || {
                            let state = synth::state(views, 1)?;
                            let t = Instant::now();
                            let r = c.verify_replicas(&state)?;
                            Ok((t.elapsed().as_secs_f64(), r))
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(ckpt_core::Error::Internal(
                                "a replica thread panicked".into(),
                            ))
                        })
                    })
                    .collect()
            });
        let (total, check) = results.into_iter().next().ok_or("no replica")??;
        if i > 0 {
            checks.push(total);
            exchanges.push(check.exchange.as_secs_f64());
        }
    }
    drop(ckpts);
    let _ = std::fs::remove_dir_all(a.state.dir.join(&run));

    let (p, f1, fnn, c, x) = (
        floors::median(&mut prints),
        floors::median(&mut floors1),
        floors::median(&mut floorsn),
        floors::median(&mut checks),
        floors::median(&mut exchanges),
    );
    let result = json!({
        "bench": "fingerprint",
        "state_bytes": bytes,
        "tensors": a.state.tensors,
        "iters": a.state.iters,
        "threads": threads,
        "replicas": a.replicas,
        "fingerprint_s": p,
        "memcpy_floor_s": f1,
        "memcpy_parallel_floor_s": fnn,
        "fingerprint_over_memcpy": p / f1,
        "fingerprint_over_parallel_memcpy": p / fnn,
        "verify_replicas_s": c,
        "exchange_s": x,
    });
    if a.json {
        println!("{result}");
        return Ok(());
    }
    let gib = |s: f64| bytes as f64 / s / (1u64 << 30) as f64;
    println!(
        "fingerprint: {:.2} GiB in {} tensors, {} iterations (median), {threads} threads, {} replicas",
        bytes as f64 / (1u64 << 30) as f64,
        a.state.tensors,
        a.state.iters,
        a.replicas
    );
    println!("{:<44} {:>10} {:>10}", "", "seconds", "GiB/s");
    for (label, s) in [
        ("memcpy floor (1 thread)".to_string(), f1),
        (format!("memcpy floor ({threads} threads)"), fnn),
        ("fingerprint (crc32c per 4 MiB, all cores)".to_string(), p),
        (
            format!("verify_replicas, {} replicas sharing cores", a.replicas),
            c,
        ),
    ] {
        println!("{label:<44} {s:>10.4} {:>10.2}", gib(s));
    }
    println!(
        "  of which exchanging fingerprints through {}: {:.4} s",
        a.state.dir.display(),
        x
    );
    println!(
        "fingerprint = {:.2}x a 1-thread memcpy, {:.2}x a {threads}-thread memcpy of the same bytes",
        p / f1,
        p / fnn
    );
    Ok(())
}
