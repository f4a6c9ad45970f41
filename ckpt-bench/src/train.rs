//! `ckpt-bench train`: the slowdown a training loop feels. A synthetic loop
//! updates its whole state every step (like an optimizer step) and saves
//! every `k` steps; its wall time is compared with the same loop without
//! checkpoints and with blocking saves (write + fsync on the loop's thread).
//!
//! The last save is taken after the last step, so once the loop ends the
//! checkpoint must equal the state in memory: the run restores it and
//! compares every byte, proving the async saves captured the state of their
//! step even though the loop went on mutating it during the flush.

use std::sync::Arc;
use std::time::Instant;

use ckpt_core::{Checkpointer, TensorViewMut, TierPolicy};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::floors;
use crate::synth;

/// How the loop checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// No checkpoints: the baseline.
    None,
    /// ckpt's async save.
    Async,
    /// Serialize + write + fsync on the loop's thread.
    Blocking,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Async => "async",
            Mode::Blocking => "blocking",
        }
    }
}

/// Arguments of `train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The state and the directory (`--iters` = repetitions of each mode;
    /// medians are reported).
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// Training steps per run.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    /// Save every this many steps (the last save follows the last step).
    #[arg(long, default_value_t = 10)]
    pub every: u64,
    /// Passes over the whole state per step (more passes = more compute
    /// per checkpoint).
    #[arg(long, default_value_t = 1)]
    pub passes: u32,
    /// Threads of the synthetic compute. 1 models a GPU job, whose host
    /// side is mostly one busy thread; use all cores to see the flush
    /// competing with host compute.
    #[arg(long, default_value_t = 1)]
    pub compute_threads: usize,
    /// Modes to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "none,async,blocking"
    )]
    pub modes: Vec<Mode>,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// One optimizer-like update of every byte: memory-bound, so it competes
/// with the flush for memory bandwidth as a real host-side step would.
fn compute(tensors: &mut [Vec<u8>], step: u64, passes: u32, threads: usize) {
    let mut parts: Vec<&mut [u8]> = tensors.iter_mut().map(|t| t.as_mut_slice()).collect();
    let threads = threads.max(1);
    let update = |part: &mut [u8]| {
        for pass in 0..passes {
            let k = 0x9e37_79b9_7f4a_7c15u64 ^ (step << 8) ^ u64::from(pass);
            for w in part.chunks_exact_mut(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                let x = u64::from_le_bytes(b).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ k;
                w.copy_from_slice(&x.rotate_left(17).to_le_bytes());
            }
        }
    };
    if threads == 1 {
        parts.iter_mut().for_each(|p| update(p));
        return;
    }
    let per = parts.len().div_ceil(threads);
    std::thread::scope(|s| {
        for group in parts.chunks_mut(per.max(1)) {
            s.spawn(|| group.iter_mut().for_each(|p| update(p)));
        }
    });
}

/// One run of the loop, its steps numbered from `first`; returns (loop
/// seconds, per-save blocking seconds).
fn run_once(
    a: &TrainArgs,
    mode: Mode,
    tensors: &mut [Vec<u8>],
    ckpt: &Checkpointer,
    first: u64,
) -> Result<(f64, Vec<f64>), Box<dyn std::error::Error>> {
    let mut stops = Vec::new();
    let t = Instant::now();
    for step in first..first + a.steps {
        compute(tensors, step, a.passes, a.compute_threads);
        if !step.is_multiple_of(a.every) {
            continue;
        }
        match mode {
            Mode::None => {}
            Mode::Async => {
                let views = synth::views(tensors);
                let h = ckpt.save(&synth::state(&views, step)?)?;
                stops.push(h.math_stop().as_secs_f64());
            }
            Mode::Blocking => {
                stops.push(crate::stage::blocking_save(&a.state.dir, tensors, step)?);
            }
        }
    }
    Ok((t.elapsed().as_secs_f64(), stops))
}

/// Restores the newest checkpoint and checks it equals `tensors`.
fn verify(ckpt: &Checkpointer, tensors: &[Vec<u8>], step: u64) -> Result<(), String> {
    let mut outs: Vec<Vec<u8>> = tensors.iter().map(|t| vec![0u8; t.len()]).collect();
    let mut targets = synth::targets(&mut outs);
    let mut refs: Vec<&mut dyn TensorViewMut> = targets.iter_mut().map(|t| t as _).collect();
    let got = ckpt
        .restore(&mut refs)
        .map_err(|e| e.to_string())?
        .ok_or("no checkpoint to verify")?;
    drop(targets);
    if got.step != step {
        return Err(format!("restored step {}, expected {step}", got.step));
    }
    if outs != tensors {
        return Err(format!(
            "the checkpoint of step {step} differs from the state the loop ended with"
        ));
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(a: &TrainArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.every == 0 || a.steps == 0 || !a.steps.is_multiple_of(a.every) {
        return Err(format!(
            "--steps ({}) must be a positive multiple of --every ({}), so the last save follows the last step",
            a.steps, a.every
        )
        .into());
    }
    if a.modes.is_empty() {
        return Err("--modes is empty".into());
    }
    std::fs::create_dir_all(&a.state.dir)?;
    let mut tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let run = format!("bench-train-{}", std::process::id());
    let ckpt = Checkpointer::builder(run.clone())
        .tier(
            Arc::new(ckpt_io::LocalTier::new(&a.state.dir)?),
            TierPolicy::keep_last(2),
        )
        .staging_capacity(bytes)
        .build()?;
    let iters = a.state.iters.max(1);
    let saves = a.steps / a.every;
    let mut loops: Vec<Vec<f64>> = vec![Vec::new(); a.modes.len()];
    let mut stops: Vec<Vec<f64>> = vec![Vec::new(); a.modes.len()];
    // Interleave the modes so drift (page cache, thermal) hits them alike.
    // Steps keep counting across runs, as a resumed job's would, so every
    // save is a new step of the same run.
    let mut first = 1;
    for _ in 0..iters {
        for (m, &mode) in a.modes.iter().enumerate() {
            let (l, s) = run_once(a, mode, &mut tensors, &ckpt, first)?;
            first += a.steps;
            if mode == Mode::Async {
                // Drain before the next run so runs do not overlap, then
                // check the last checkpoint is the state the loop ended with.
                for r in ckpt.wait_all() {
                    r?;
                }
                verify(&ckpt, &tensors, first - 1)?;
            }
            loops[m].push(l);
            stops[m].extend(s);
        }
    }
    let baseline = a
        .modes
        .iter()
        .position(|m| *m == Mode::None)
        .map(|i| floors::median(&mut loops[i].clone()));
    if !a.json {
        println!(
            "train: {:.2} GiB state, {} steps, a save every {} ({} saves), {} pass(es) per step, {} compute thread(s), {} runs per mode (median)",
            bytes as f64 / (1u64 << 30) as f64,
            a.steps,
            a.every,
            saves,
            a.passes,
            a.compute_threads,
            iters
        );
        println!(
            "{:<10} {:>10} {:>10} {:>14} {:>12}",
            "mode", "loop s", "step s", "stop/save s", "slowdown"
        );
    }
    for (m, &mode) in a.modes.iter().enumerate() {
        let l = floors::median(&mut loops[m]);
        let s = if stops[m].is_empty() {
            0.0
        } else {
            floors::median(&mut stops[m])
        };
        let slowdown = baseline.map(|b| l / b - 1.0);
        if a.json {
            println!(
                "{}",
                json!({
                    "bench": "train",
                    "mode": mode.name(),
                    "state_bytes": bytes,
                    "steps": a.steps,
                    "every": a.every,
                    "passes": a.passes,
                    "compute_threads": a.compute_threads,
                    "iters": iters,
                    "loop_s": l,
                    "step_s": l / a.steps as f64,
                    "math_stop_per_save_s": s,
                    "slowdown": slowdown,
                    "verified": mode == Mode::Async,
                })
            );
        } else {
            println!(
                "{:<10} {:>10.3} {:>10.4} {:>14.4} {:>12}",
                mode.name(),
                l,
                l / a.steps as f64,
                s,
                slowdown.map_or("-".to_string(), |x| format!("{:+.1}%", x * 100.0))
            );
        }
    }
    if !a.json && a.modes.contains(&Mode::Async) {
        println!("async checkpoints verified: the last one equals the final state byte for byte");
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}
