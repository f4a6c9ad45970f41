//! `ckpt-bench stage`: the math-stop of an async save against the memcpy
//! floor and a blocking save, all in one run. With `--device cuda` the
//! state lives in GPU memory instead (`stage_gpu.rs`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ckpt_core::{Checkpointer, TierPolicy};
use ckpt_io::LocalTier;
use clap::Args;
use serde_json::json;

use crate::floors;
use crate::synth;

/// Where the synthetic state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// GPU 0 (needs a build with `--features cuda` and a CUDA driver).
    Cuda,
}

/// Arguments of `stage`.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// The state and the directory.
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// Where the state lives: host memory, or GPU memory (compared with the
    /// device-to-host copy floor).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Staging copy threads (default: available cores, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Send blocks to the tier while the copy runs
    /// (`CheckpointerBuilder::flush_while_staging`): durable sooner, a
    /// longer math-stop.
    #[arg(long)]
    pub flush_while_staging: bool,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// A blocking save of `tensors` (safetensors layout, written and fsynced
/// on the caller's thread); returns its duration and leaves no file.
pub(crate) fn blocking_save(dir: &Path, tensors: &[Vec<u8>], step: u64) -> std::io::Result<f64> {
    let t = Instant::now();
    let specs: Vec<(String, Vec<u64>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("layer.{i}.w"), vec![v.len() as u64 / 4]))
        .collect();
    let specs_ref: Vec<(&str, ckpt_core::DType, &[u64])> = specs
        .iter()
        .map(|(n, s)| (n.as_str(), ckpt_core::DType::F32, s.as_slice()))
        .collect();
    let layout = ckpt_core::format::shard_file::layout(&specs_ref, &Default::default())
        .map_err(std::io::Error::other)?;
    let path = dir.join(format!("blocking-{step}.safetensors"));
    let mut f = std::fs::File::create(&path)?;
    f.write_all(&layout.header)?;
    for v in tensors {
        f.write_all(v)?;
    }
    f.sync_all()?;
    let d = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(d)
}

/// The checkpointer under test (one local tier, a pool of the state's
/// size, `--threads` copy threads) and its copy thread count; `configure`
/// adds what a variant needs (a CUDA device).
pub(crate) fn checkpointer(
    a: &StageArgs,
    run: &str,
    bytes: u64,
    configure: impl FnOnce(ckpt_core::CheckpointerBuilder) -> ckpt_core::CheckpointerBuilder,
) -> Result<(Checkpointer, usize), Box<dyn std::error::Error>> {
    let mut builder = Checkpointer::builder(run)
        .tier(
            Arc::new(LocalTier::new(&a.state.dir)?),
            TierPolicy::keep_last(1),
        )
        .staging_capacity(bytes)
        .flush_while_staging(a.flush_while_staging);
    if let Some(t) = a.threads {
        builder = builder.copy_threads(t);
    }
    let ckpt = configure(builder).build()?;
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().min(8))
            .unwrap_or(2)
    });
    Ok((ckpt, threads))
}

/// Runs the benchmark.
pub fn run(a: &StageArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.device == Device::Cuda {
        #[cfg(feature = "cuda")]
        return crate::stage_gpu::run(a);
        #[cfg(not(feature = "cuda"))]
        return Err("`--device cuda` needs a build with the `cuda` feature: cargo run -p ckpt-bench --release --features cuda -- stage --device cuda".into());
    }
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let views = synth::views(&tensors);
    let run = format!("bench-stage-{}", std::process::id());
    let (ckpt, threads) = checkpointer(a, &run, bytes, |b| b)?;

    // Async saves first, so the peak RSS read right after covers exactly
    // the caller's state + the staging pool (+ runtime), not the floors'
    // scratch buffers.
    let (mut asyncs, mut blocks, mut floors1, mut floorsn, mut durables) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..=a.state.iters {
        let state = synth::state(&views, i as u64 + 1)?;
        let h = ckpt.save(&state)?;
        let ms = h.math_stop().as_secs_f64();
        let report = h.wait()?;
        if i > 0 {
            asyncs.push(ms);
            durables.push(report.durable_after().ok_or("not committed")?.as_secs_f64());
        }
    }
    let peak = floors::peak_rss();
    for _ in 0..a.state.iters {
        floors1.push(floors::memcpy(&tensors)?.as_secs_f64());
        floorsn.push(floors::memcpy_parallel(&tensors, threads)?.as_secs_f64());
    }
    for i in 0..a.state.iters {
        blocks.push(blocking_save(&a.state.dir, &tensors, i as u64)?);
    }
    let pool_locked = ckpt.staging_stats().is_some_and(|p| p.locked);
    let (amin, amax) = (
        asyncs.iter().copied().fold(f64::MAX, f64::min),
        asyncs.iter().copied().fold(0.0, f64::max),
    );
    let (a_med, b_med, f1, fnn, d_med) = (
        floors::median(&mut asyncs),
        floors::median(&mut blocks),
        floors::median(&mut floors1),
        floors::median(&mut floorsn),
        floors::median(&mut durables),
    );
    let limit = (bytes + ckpt.staging_stats().map(|p| p.capacity).unwrap_or(bytes)) as f64;
    let result = json!({
        "bench": "stage",
        "flush_while_staging": a.flush_while_staging,
        "state_bytes": bytes,
        "tensors": a.state.tensors,
        "iters": a.state.iters,
        "copy_threads": threads,
        "async_math_stop_s": a_med,
        "async_math_stop_min_s": amin,
        "async_math_stop_max_s": amax,
        "blocking_math_stop_s": b_med,
        "memcpy_floor_s": f1,
        "memcpy_parallel_floor_s": fnn,
        "ratio_to_floor": a_med / f1,
        "ratio_to_parallel_floor": a_med / fnn,
        "speedup_vs_blocking": b_med / a_med,
        "async_durable_s": d_med,
        "peak_rss_bytes": peak,
        "peak_rss_over_state_plus_staging": peak as f64 / limit,
        "staging_locked": pool_locked,
    });
    if a.json {
        println!("{result}");
    } else {
        let gib = |s: f64| bytes as f64 / s / (1u64 << 30) as f64;
        println!(
            "stage: {:.2} GiB in {} tensors, {} iterations (median), {} copy threads{}",
            bytes as f64 / (1u64 << 30) as f64,
            a.state.tensors,
            a.state.iters,
            threads,
            if a.flush_while_staging {
                ", flushing while staging"
            } else {
                ""
            }
        );
        println!("{:<34} {:>10} {:>10}", "", "seconds", "GiB/s");
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            "memcpy floor (1 thread)",
            f1,
            gib(f1)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            format!("memcpy floor ({threads} threads)"),
            fnn,
            gib(fnn)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}   (min {amin:.4}, max {amax:.4})",
            "ckpt async save: math-stop",
            a_med,
            gib(a_med)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            "blocking save (write + fsync)",
            b_med,
            gib(b_med)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            "ckpt async save: time to durable",
            d_med,
            gib(d_med)
        );
        println!(
            "ratio to memcpy floor: {:.2}x (1 thread), {:.2}x ({threads} threads); {:.1}x faster than blocking",
            a_med / f1,
            a_med / fnn,
            b_med / a_med
        );
        println!(
            "peak RSS during save + flush {:.2} GiB = {:.3} x (state + staging); staging page-locked: {pool_locked}",
            peak as f64 / (1u64 << 30) as f64,
            peak as f64 / limit
        );
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}
