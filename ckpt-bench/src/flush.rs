//! `ckpt-bench flush`: time from save to durable on a local directory,
//! beside the raw sequential write bandwidth of the same directory.

use ckpt_core::{Checkpointer, TierPolicy};
use clap::Args;
use serde_json::json;

use crate::floors;
use crate::synth;

/// Arguments of `flush`.
#[derive(Debug, Args)]
pub struct FlushArgs {
    /// The state and the directory.
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// The tier under test.
    #[command(flatten)]
    pub target: crate::tiers::TierArgs,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(a: &FlushArgs) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let views = synth::views(&tensors);
    let run = format!("bench-flush-{}", std::process::id());
    let opened = crate::tiers::open(
        a.target.tier,
        &a.state.dir,
        a.target.s3_url.as_deref(),
        2 * bytes + (64 << 20),
    )?;
    let ckpt = Checkpointer::builder(run.clone())
        .tier(opened.tier.clone(), TierPolicy::keep_last(1))
        .staging_capacity(bytes)
        .build()?;
    let (mut durable, mut raw, mut direct) = (vec![], vec![], vec![]);
    for i in 0..a.state.iters {
        // Alternate so drift in the device's state affects both alike. The
        // raw floors are for a local directory only.
        if a.target.tier == crate::tiers::TierKind::Local {
            raw.push(floors::raw_write(&a.state.dir, &tensors)?.as_secs_f64());
            if let Some(d) = floors::raw_write_direct(&a.state.dir, &tensors) {
                direct.push(d.as_secs_f64());
            }
        }
        let state = synth::state(&views, i as u64 + 1)?;
        let report = ckpt.save(&state)?.wait()?;
        durable.push(report.durable_after().ok_or("not committed")?.as_secs_f64());
    }
    let (d, r) = (floors::median(&mut durable), floors::median(&mut raw));
    let od = (!direct.is_empty()).then(|| floors::median(&mut direct));
    let best = od.map_or(r, |o| if r.is_nan() { o } else { o.min(r) });
    let result = json!({
        "bench": "flush",
        "tier": format!("{:?}", a.target.tier).to_lowercase(),
        "location": opened.tier.location(),
        "state_bytes": bytes,
        "iters": a.state.iters,
        "durable_s": d,
        "raw_write_floor_s": r,
        "raw_write_direct_s": od,
        "ratio_to_floor": d / r,
        // The headline: against the faster of the two floors.
        "best_floor_s": best,
        "ratio_to_best_floor": d / best,
    });
    if a.json {
        println!("{result}");
    } else {
        let gib = |s: f64| bytes as f64 / s / (1u64 << 30) as f64;
        println!(
            "flush: {:.2} GiB to {} ({} iterations, median)",
            bytes as f64 / (1u64 << 30) as f64,
            opened.tier.location(),
            a.state.iters
        );
        if !r.is_nan() {
            println!(
                "{:<40} {:>10.3} s {:>8.2} GiB/s",
                "raw write + fsync (floor)",
                r,
                gib(r)
            );
        }
        if let Some(od) = od {
            println!(
                "{:<40} {:>10.3} s {:>8.2} GiB/s",
                "raw write O_DIRECT + fsync",
                od,
                gib(od)
            );
        }
        println!(
            "{:<40} {:>10.3} s {:>8.2} GiB/s",
            "ckpt save -> durable (crc32c on)",
            d,
            gib(d)
        );
        if !best.is_nan() {
            println!(
                "ratio to the best floor ({}): {:.2}x",
                if od == Some(best) {
                    "O_DIRECT"
                } else {
                    "buffered"
                },
                d / best
            );
        }
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}
