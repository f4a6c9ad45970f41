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
use std::time::{Duration, Instant};

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
    /// ckpt's overlapped save: step t's copy runs during step t+1's
    /// forward and backward passes (`Checkpointer::save_overlapped`).
    Overlapped,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Async => "async",
            Mode::Blocking => "blocking",
            Mode::Overlapped => "overlapped",
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
    /// Read-only passes over the whole state per step before the update:
    /// the forward and backward pass, which read parameters and optimizer
    /// state and write neither (default 0, or 2 with --overlap).
    #[arg(long)]
    pub fwd_passes: Option<u32>,
    /// Milliseconds of accelerator time per step in the forward and
    /// backward pass, during which the host only waits (a GPU job's
    /// step): what an overlapped copy hides behind without competing.
    #[arg(long, default_value_t = 0)]
    pub fwd_ms: u64,
    /// Also run the overlapped mode (and give each step a forward and
    /// backward pass for its copy to hide behind).
    #[arg(long)]
    pub overlap: bool,
    /// Copy threads of an overlapped save.
    #[arg(long, default_value_t = 1)]
    pub overlap_threads: usize,
    /// Bandwidth cap of an overlapped save's copy (e.g. 2G = 2 GiB/s;
    /// default: none).
    #[arg(long, value_parser = synth::parse_bytes)]
    pub overlap_bandwidth: Option<u64>,
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

/// The forward and backward pass: `passes` reads of every byte (a
/// reduction), memory-bound and read-only, as a step's passes over the
/// parameters are. Returns the reduction so it is not optimized away.
fn forward(tensors: &[Vec<u8>], passes: u32, threads: usize, accel: Duration) -> u64 {
    let start = Instant::now();
    let acc = read_passes(tensors, passes, threads);
    if let Some(rest) = accel.checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    acc
}

fn read_passes(tensors: &[Vec<u8>], passes: u32, threads: usize) -> u64 {
    let read = |part: &[u8]| {
        let mut acc = 0u64;
        for _ in 0..passes {
            for w in part.chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                acc = acc.wrapping_add(u64::from_le_bytes(b)).rotate_left(1);
            }
        }
        acc
    };
    if threads <= 1 {
        return tensors.iter().map(|t| read(t)).fold(0, u64::wrapping_add);
    }
    let per = tensors.len().div_ceil(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = tensors
            .chunks(per.max(1))
            .map(|group| s.spawn(move || group.iter().map(|t| read(t)).fold(0, u64::wrapping_add)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(0))
            .fold(0, u64::wrapping_add)
    })
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
    let fwd = fwd_passes(a);
    let accel = Duration::from_millis(a.fwd_ms);
    let last = first + a.steps - 1;
    // Overlapped: the step whose save runs during this step's forward and
    // backward pass.
    let mut due: Option<u64> = None;
    let mut sink = 0u64;
    let t = Instant::now();
    for step in first..first + a.steps {
        match due.take() {
            Some(saved) => {
                let views = synth::views(tensors);
                let state = synth::state(&views, saved)?;
                let (h, r) = ckpt
                    .save_overlapped(&state, || forward(tensors, fwd, a.compute_threads, accel));
                sink ^= r;
                stops.push(h?.math_stop().as_secs_f64());
            }
            None => sink ^= forward(tensors, fwd, a.compute_threads, accel),
        }
        compute(tensors, step, a.passes, a.compute_threads);
        if !step.is_multiple_of(a.every) {
            continue;
        }
        match mode {
            Mode::None => {}
            Mode::Overlapped if step < last => due = Some(step),
            Mode::Async | Mode::Overlapped => {
                let views = synth::views(tensors);
                let h = ckpt.save(&synth::state(&views, step)?)?;
                // The overlapped mode's last save (no next step to hide
                // behind) is a plain one: not counted as overlapped.
                if mode == Mode::Async {
                    stops.push(h.math_stop().as_secs_f64());
                }
            }
            Mode::Blocking => {
                stops.push(crate::stage::blocking_save(&a.state.dir, tensors, step)?);
            }
        }
    }
    std::hint::black_box(sink);
    Ok((t.elapsed().as_secs_f64(), stops))
}

/// Read passes per step: as given, else 2 with --overlap and no
/// accelerator time (the copy needs a forward and backward pass to hide
/// behind), else 0.
fn fwd_passes(a: &TrainArgs) -> u32 {
    a.fwd_passes
        .unwrap_or(if a.overlap && a.fwd_ms == 0 { 2 } else { 0 })
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
    let mut modes = a.modes.clone();
    if a.overlap && !modes.contains(&Mode::Overlapped) {
        modes.push(Mode::Overlapped);
    }
    if modes.is_empty() {
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
        .overlap_copy_threads(a.overlap_threads);
    let ckpt = match a.overlap_bandwidth {
        Some(b) => ckpt.overlap_copy_bandwidth(b),
        None => ckpt,
    }
    .build()?;
    let iters = a.state.iters.max(1);
    let saves = a.steps / a.every;
    let mut loops: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut stops: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // Interleave the modes so drift (page cache, thermal) hits them alike.
    // Steps keep counting across runs, as a resumed job's would, so every
    // save is a new step of the same run.
    let mut first = 1;
    for _ in 0..iters {
        for (m, &mode) in modes.iter().enumerate() {
            let (l, s) = run_once(a, mode, &mut tensors, &ckpt, first)?;
            first += a.steps;
            if matches!(mode, Mode::Async | Mode::Overlapped) {
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
            "train: {:.2} GiB state, {} steps, a save every {} ({} saves), {} read + {} update pass(es) and {} ms of accelerator time per step, {} compute thread(s), {} runs per mode (median){}",
            bytes as f64 / (1u64 << 30) as f64,
            a.steps,
            a.every,
            saves,
            fwd_passes(a),
            a.passes,
            a.fwd_ms,
            a.compute_threads,
            iters,
            if modes.contains(&Mode::Overlapped) {
                format!(
                    "; overlapped copy: {} thread(s){}",
                    a.overlap_threads,
                    a.overlap_bandwidth
                        .map(|b| format!(", capped at {:.2} GiB/s", b as f64 / (1u64 << 30) as f64))
                        .unwrap_or_default()
                )
            } else {
                String::new()
            }
        );
        println!(
            "{:<10} {:>10} {:>10} {:>14} {:>12} {:>12}",
            "mode", "loop s", "step s", "stop/save s", "max stop s", "slowdown"
        );
    }
    for (m, &mode) in modes.iter().enumerate() {
        let l = floors::median(&mut loops[m]);
        let s = if stops[m].is_empty() {
            0.0
        } else {
            floors::median(&mut stops[m])
        };
        let max_stop = stops[m].iter().copied().fold(0.0, f64::max);
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
                    "fwd_passes": fwd_passes(a),
                    "fwd_ms": a.fwd_ms,
                    "overlap_threads": a.overlap_threads,
                    "overlap_bandwidth": a.overlap_bandwidth,
                    "compute_threads": a.compute_threads,
                    "iters": iters,
                    "loop_s": l,
                    "step_s": l / a.steps as f64,
                    "math_stop_per_save_s": s,
                    "math_stop_max_s": max_stop,
                    "saves_measured": stops[m].len(),
                    "slowdown": slowdown,
                    "verified": matches!(mode, Mode::Async | Mode::Overlapped),
                })
            );
        } else {
            println!(
                "{:<10} {:>10.3} {:>10.4} {:>14.4} {:>12.4} {:>12}",
                mode.name(),
                l,
                l / a.steps as f64,
                s,
                max_stop,
                slowdown.map_or("-".to_string(), |x| format!("{:+.1}%", x * 100.0))
            );
        }
    }
    if !a.json && (modes.contains(&Mode::Async) || modes.contains(&Mode::Overlapped)) {
        println!("async checkpoints verified: the last one equals the final state byte for byte");
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}
