//! `ckpt-bench restore`: a cold restore with full crc32c verification
//! beside a raw cold sequential read of the same file.

use std::time::Instant;

use ckpt_core::{Checkpointer, TensorViewMut, TierPolicy, format::layout};
use clap::Args;
use serde_json::json;

use crate::floors;
use crate::synth;

/// Arguments of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The state and the directory.
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// Parallel reads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// The tier under test.
    #[command(flatten)]
    pub target: crate::tiers::TierArgs,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(a: &RestoreArgs) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let run = format!("bench-restore-{}", std::process::id());
    let opened = crate::tiers::open(
        a.target.tier,
        &a.state.dir,
        &a.target,
        2 * bytes + (64 << 20),
    )?;
    let ckpt = Checkpointer::builder(run.clone())
        .tier(opened.tier.clone(), TierPolicy::keep_last(1))
        .staging_capacity(bytes)
        .restore_threads(a.threads)
        .build()?;
    {
        let views = synth::views(&tensors);
        ckpt.save(&synth::state(&views, 1)?)?.wait()?;
    }
    let local = a.target.tier == crate::tiers::TierKind::Local;
    // The shard file's name carries its save attempt.
    let step_dir = a.state.dir.join(layout::step_dir(&run, 1));
    let shard = match local {
        true => std::fs::read_dir(&step_dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| layout::is_rank_data_file(&n.to_string_lossy(), 0))
            })
            .ok_or_else(|| format!("no shard file in {}", step_dir.display()))?,
        false => step_dir,
    };
    let mut outs: Vec<Vec<u8>> = tensors.iter().map(|t| vec![0u8; t.len()]).collect();
    let (mut restore, mut raw, mut rawp, mut rawd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.state.iters {
        // Raw floors exist for files only; a peer's RAM or a bucket has no
        // cold cache to measure against.
        if local {
            let (r, _) = floors::raw_read(&shard)?;
            raw.push(r.as_secs_f64());
            rawp.push(floors::raw_read_parallel(&shard, a.threads, 64 << 20)?.as_secs_f64());
            if let Some(d) = floors::raw_read_direct(&shard, a.threads, 8 << 20) {
                rawd.push(d.as_secs_f64());
            }
            floors::evict(&shard);
        }
        let mut targets = synth::targets(&mut outs);
        let mut refs: Vec<&mut dyn TensorViewMut> = targets.iter_mut().map(|t| t as _).collect();
        let t = Instant::now();
        let got = ckpt.restore(&mut refs)?.ok_or("checkpoint vanished")?;
        restore.push(t.elapsed().as_secs_f64());
        assert_eq!(got.step, 1);
    }
    if outs != tensors {
        return Err("restored bytes differ from the saved state".into());
    }
    let (rs, rr) = (floors::median(&mut restore), floors::median(&mut raw));
    let rp = floors::median(&mut rawp);
    let rd = (!rawd.is_empty()).then(|| floors::median(&mut rawd));
    // The floor is the fastest way of reading the same bytes.
    let floor = rr.min(rp).min(rd.unwrap_or(f64::INFINITY));
    let result = json!({
        "bench": "restore",
        "tier": format!("{:?}", a.target.tier).to_lowercase(),
        "location": opened.tier.location(),
        "state_bytes": bytes,
        "iters": a.state.iters,
        "threads": a.threads,
        "restore_s": rs,
        "raw_read_floor_s": floor,
        "raw_read_sequential_s": rr,
        "raw_read_parallel_s": rp,
        "raw_read_direct_s": rd,
        "bandwidth_ratio": floor / rs,
    });
    if a.json {
        println!("{result}");
    } else {
        let gib = |s: f64| bytes as f64 / s / (1u64 << 30) as f64;
        println!(
            "restore: {:.2} GiB from {} (cold page cache, {} iterations, median)",
            bytes as f64 / (1u64 << 30) as f64,
            opened.tier.location(),
            a.state.iters
        );
        if local {
            println!(
                "{:<44} {:>8.3} s {:>8.2} GiB/s",
                "raw sequential read, 1 stream of 8 MiB",
                rr,
                gib(rr)
            );
            println!(
                "{:<44} {:>8.3} s {:>8.2} GiB/s",
                format!("raw read, {} threads x 64 MiB pread", a.threads),
                rp,
                gib(rp)
            );
            if let Some(rd) = rd {
                println!(
                    "{:<44} {:>8.3} s {:>8.2} GiB/s",
                    format!("raw O_DIRECT read, {} threads x 8 MiB", a.threads),
                    rd,
                    gib(rd)
                );
            }
        }
        println!(
            "{:<44} {:>8.3} s {:>8.2} GiB/s",
            format!("ckpt restore, crc32c verified, {} threads", a.threads),
            rs,
            gib(rs)
        );
        if local {
            println!(
                "restore bandwidth = {:.2}x the raw read floor (the fastest raw read)",
                floor / rs
            );
        }
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}
