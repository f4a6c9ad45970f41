//! `ckpt-bench staging-size`: the staging-pool trade-off. Saves arrive at a
//! fixed interval of compute; for each pool capacity (a fraction of the
//! state) and each busy policy, report the math-stop and how many saves
//! waited for staging memory or were skipped: the smallest pool with no
//! waits and no skips is the one that stops a checkpoint storm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_core::{BusyPolicy, Checkpointer, SaveHandle, TierPolicy};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::floors;
use crate::synth;

/// Which busy policies to sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policies {
    /// Wait for staging memory (the wait is part of the math-stop).
    Wait,
    /// Skip a save the pool cannot take at once.
    Skip,
    /// Both, one after the other.
    Both,
}

/// Arguments of `staging-size`.
#[derive(Debug, Args)]
pub struct StagingSizeArgs {
    /// The state and the directory (`--iters` is unused: see `--saves`).
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// Pool capacities to try, as fractions of the state.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1,2")]
    pub fractions: Vec<f64>,
    /// Compute time between the end of one save's math-stop and the next
    /// save (e.g. 500ms, 2s).
    #[arg(long, default_value = "1s", value_parser = ckpt_core::schedule::parse_duration)]
    pub interval: Duration,
    /// Saves per configuration.
    #[arg(long, default_value_t = 8)]
    pub saves: usize,
    /// Busy policies to sweep.
    #[arg(long, value_enum, default_value_t = Policies::Both)]
    pub when_busy: Policies,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// What one configuration measured.
struct Outcome {
    fraction: f64,
    policy: BusyPolicy,
    pool_bytes: u64,
    math_stop: Vec<f64>,
    waited: Vec<f64>,
    skipped: usize,
    durable: usize,
    loop_s: f64,
}

fn policy_name(p: BusyPolicy) -> &'static str {
    match p {
        BusyPolicy::Skip => "skip",
        _ => "wait",
    }
}

fn one(
    a: &StagingSizeArgs,
    views: &[ckpt_core::TensorRef<'_>],
    bytes: u64,
    fraction: f64,
    policy: BusyPolicy,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let run = format!(
        "bench-staging-{}-{}-{}",
        std::process::id(),
        policy_name(policy),
        (fraction * 1000.0) as u64
    );
    let capacity = ((bytes as f64 * fraction) as u64).max(8 << 20);
    let ckpt = Checkpointer::builder(run.clone())
        .tier(
            Arc::new(ckpt_io::LocalTier::new(&a.state.dir)?),
            TierPolicy::keep_last(2),
        )
        .staging_capacity(capacity)
        .when_busy(policy)
        .build()?;
    let pool_bytes = ckpt.staging_stats().map(|p| p.capacity).unwrap_or(capacity);
    let mut handles: Vec<SaveHandle> = Vec::with_capacity(a.saves);
    let mut math_stop = Vec::with_capacity(a.saves);
    let mut waited = Vec::with_capacity(a.saves);
    let t = Instant::now();
    for i in 0..a.saves {
        // The compute between saves: the training loop is busy, the flush
        // runs in the background.
        std::thread::sleep(a.interval);
        let h = ckpt.save(&synth::state(views, i as u64 + 1)?)?;
        math_stop.push(h.math_stop().as_secs_f64());
        handles.push(h);
    }
    let loop_s = t.elapsed().as_secs_f64();
    let (mut skipped, mut durable) = (0, 0);
    for h in &handles {
        let r = h.wait()?;
        waited.push(r.waited.as_secs_f64());
        skipped += usize::from(r.skipped);
        durable += usize::from(r.is_durable());
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(Outcome {
        fraction,
        policy,
        pool_bytes,
        math_stop,
        waited,
        skipped,
        durable,
        loop_s,
    })
}

/// Runs the sweep.
pub fn run(a: &StagingSizeArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.fractions.iter().any(|f| !f.is_finite() || *f <= 0.0) {
        return Err(format!(
            "--fractions must be positive numbers, got {:?}",
            a.fractions
        )
        .into());
    }
    if a.saves == 0 {
        return Err("--saves must be at least 1".into());
    }
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let views = synth::views(&tensors);
    let policies: &[BusyPolicy] = match a.when_busy {
        Policies::Wait => &[BusyPolicy::Wait],
        Policies::Skip => &[BusyPolicy::Skip],
        Policies::Both => &[BusyPolicy::Wait, BusyPolicy::Skip],
    };
    // The floor every math-stop is bounded by, measured in the same run.
    let mut floor = Vec::with_capacity(3);
    for _ in 0..3 {
        floor.push(floors::memcpy(&tensors)?.as_secs_f64());
    }
    let floor = floors::median(&mut floor);
    let ideal_loop = a.interval.as_secs_f64() * a.saves as f64;
    if !a.json {
        println!(
            "staging-size: {:.2} GiB state, a save after every {:?} of compute, {} saves per row; memcpy floor {:.3} s",
            bytes as f64 / (1u64 << 30) as f64,
            a.interval,
            a.saves,
            floor
        );
        println!(
            "{:>6} {:>5} {:>10} {:>10} {:>10} {:>7} {:>7} {:>7} {:>9}",
            "pool",
            "when",
            "pool GiB",
            "med stop",
            "max stop",
            "waited",
            "skipped",
            "durable",
            "loop +%"
        );
    }
    for &policy in policies {
        for &fraction in &a.fractions {
            let mut o = one(a, &views, bytes, fraction, policy)?;
            let waited_saves = o.waited.iter().filter(|w| **w > 1e-3).count();
            let waited_total: f64 = o.waited.iter().sum();
            let max_stop = o.math_stop.iter().copied().fold(0.0, f64::max);
            let med_stop = floors::median(&mut o.math_stop);
            let overhead = (o.loop_s - ideal_loop) / ideal_loop;
            if a.json {
                println!(
                    "{}",
                    json!({
                        "bench": "staging-size",
                        "state_bytes": bytes,
                        "pool_fraction": o.fraction,
                        "pool_bytes": o.pool_bytes,
                        "when_busy": policy_name(o.policy),
                        "interval_s": a.interval.as_secs_f64(),
                        "saves": a.saves,
                        "math_stop_median_s": med_stop,
                        "math_stop_max_s": max_stop,
                        "memcpy_floor_s": floor,
                        "waited_saves": waited_saves,
                        "waited_total_s": waited_total,
                        "skipped_saves": o.skipped,
                        "durable_saves": o.durable,
                        "loop_s": o.loop_s,
                        "loop_overhead": overhead,
                    })
                );
            } else {
                println!(
                    "{:>5.0}% {:>5} {:>10.2} {:>10.3} {:>10.3} {:>7} {:>7} {:>7} {:>8.1}%",
                    o.fraction * 100.0,
                    policy_name(o.policy),
                    o.pool_bytes as f64 / (1u64 << 30) as f64,
                    med_stop,
                    max_stop,
                    waited_saves,
                    o.skipped,
                    o.durable,
                    overhead * 100.0
                );
            }
        }
    }
    Ok(())
}
