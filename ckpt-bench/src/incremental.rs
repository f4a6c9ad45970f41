//! `ckpt-bench incremental`: bytes written and time to durable of
//! incremental saves, beside whole saves of the same state on the same
//! tier, for two shapes: fine-tuning (most tensors frozen) and full
//! training (every chunk changes every step).

use ckpt_core::{Checkpointer, TierPolicy};
use clap::Args;
use serde_json::json;

use crate::floors;
use crate::synth;

/// Arguments of `incremental`.
#[derive(Debug, Args)]
pub struct IncrementalArgs {
    /// The state and the directory.
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// Percent of the tensors that never change (fine-tuning shape).
    #[arg(long, default_value_t = 90)]
    pub frozen_pct: u32,
    /// The tier under test.
    #[command(flatten)]
    pub target: crate::tiers::TierArgs,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// One configuration's medians.
struct Case {
    name: &'static str,
    durable_s: f64,
    math_stop_s: f64,
    written: f64,
}

/// Changes every chunk of `t` (one word per 4 KiB), as a training step does.
fn touch(t: &mut [u8], step: u64) {
    for at in (0..t.len().saturating_sub(8)).step_by(4096) {
        t[at..at + 8].copy_from_slice(&step.to_le_bytes());
    }
}

/// Saves `iters + 1` times (the first, whole, is not measured) with
/// `frozen` of the tensors never changing.
fn measure(
    a: &IncrementalArgs,
    tier: &std::sync::Arc<dyn ckpt_core::Tier>,
    name: &'static str,
    incremental: bool,
    frozen: usize,
) -> Result<Case, Box<dyn std::error::Error>> {
    let mut tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let run = format!("bench-incremental-{name}-{}", std::process::id());
    let policy = TierPolicy::keep_last(2);
    let ckpt = Checkpointer::builder(run.clone())
        .tier(
            tier.clone(),
            if incremental {
                policy.incremental(u32::MAX)
            } else {
                policy
            },
        )
        .staging_capacity(bytes)
        .build()?;
    let (mut durable, mut stop, mut written) = (vec![], vec![], vec![]);
    for i in 0..=a.state.iters {
        for t in tensors.iter_mut().skip(frozen) {
            touch(t, i as u64 + 1);
        }
        let views = synth::views(&tensors);
        let state = synth::state(&views, i as u64 + 1)?;
        let h = ckpt.save(&state)?;
        let report = h.wait()?;
        if i == 0 {
            continue;
        }
        durable.push(report.durable_after().ok_or("not committed")?.as_secs_f64());
        stop.push(report.math_stop.as_secs_f64());
        written.push(report.tiers[0].written as f64);
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(&run));
    Ok(Case {
        name,
        durable_s: floors::median(&mut durable),
        math_stop_s: floors::median(&mut stop),
        written: floors::median(&mut written),
    })
}

/// Runs the benchmark.
pub fn run(a: &IncrementalArgs) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.state.dir)?;
    let bytes = (a.state.state_bytes / a.state.tensors.max(1) as u64 / 4 * 4)
        * a.state.tensors.max(1) as u64;
    let opened = crate::tiers::open(
        a.target.tier,
        &a.state.dir,
        &a.target,
        4 * bytes + (64 << 20),
    )?;
    let n = a.state.tensors.max(1);
    let frozen = (n * a.frozen_pct.min(100) as usize).div_ceil(100).min(n);
    let cases = [
        measure(a, &opened.tier, "whole-finetune", false, frozen)?,
        measure(a, &opened.tier, "incremental-finetune", true, frozen)?,
        measure(a, &opened.tier, "whole-full", false, 0)?,
        measure(a, &opened.tier, "incremental-full", true, 0)?,
    ];
    let floor = (a.target.tier == crate::tiers::TierKind::Local)
        .then(|| {
            let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
            let mut v: Vec<f64> = (0..a.state.iters)
                .filter_map(|_| floors::raw_write(&a.state.dir, &tensors).ok())
                .map(|d| d.as_secs_f64())
                .collect();
            floors::median(&mut v)
        })
        .filter(|f| !f.is_nan());
    let results: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            json!({"bench": "incremental", "case": c.name, "tier": opened.tier.location(),
                "state_bytes": bytes, "frozen_pct": a.frozen_pct, "iters": a.state.iters,
                "durable_s": c.durable_s, "math_stop_s": c.math_stop_s,
                "written_bytes": c.written, "written_fraction": c.written / bytes as f64,
                "raw_write_floor_s": floor})
        })
        .collect();
    if a.json {
        for r in results {
            println!("{r}");
        }
        return Ok(());
    }
    println!(
        "incremental: {:.2} GiB in {} tensors to {} ({} saves after the first, medians; fine-tuning: {}% of the tensors frozen)",
        bytes as f64 / (1u64 << 30) as f64,
        n,
        opened.tier.location(),
        a.state.iters,
        a.frozen_pct
    );
    if let Some(f) = floor {
        println!(
            "{:<24} {:>10.3} s  (raw write + fsync of the whole state)",
            "floor", f
        );
    }
    println!(
        "{:<24} {:>12} {:>10} {:>12}",
        "case", "durable s", "written", "math-stop ms"
    );
    for c in &cases {
        println!(
            "{:<24} {:>12.3} {:>9.1}% {:>12.2}",
            c.name,
            c.durable_s,
            100.0 * c.written / bytes as f64,
            c.math_stop_s * 1e3
        );
    }
    println!(
        "fine-tuning: incremental writes {:.1}% of a whole save, durable in {:.2}x its time; full training: incremental durable in {:.3}x a whole save's time",
        100.0 * cases[1].written / cases[0].written,
        cases[1].durable_s / cases[0].durable_s,
        cases[3].durable_s / cases[2].durable_s
    );
    Ok(())
}
