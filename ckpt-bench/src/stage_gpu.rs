//! `ckpt-bench stage --device cuda`: the math-stop of an async save of a
//! state in GPU memory against the pinned device-to-host copy floor (the
//! same bytes into a registered host buffer of the same size), with
//! pageable device-to-host for reference, all in one run. The saved bytes
//! are restored to host memory and compared with the source.

use ckpt_core::cuda::PinnedBuffer;
use ckpt_core::cuda::{CudaDevice, DeviceBuffer, DeviceTensor};
use ckpt_core::{DType, TensorMut, TensorView, TensorViewMut};
use serde_json::json;

use crate::floors;
use crate::stage::StageArgs;
use crate::synth;

/// Runs the benchmark on GPU 0.
pub fn run(a: &StageArgs) -> Result<(), Box<dyn std::error::Error>> {
    let dev = CudaDevice::open(0)?;
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let bufs = tensors
        .iter()
        .map(|t| DeviceBuffer::from_host(&dev, t))
        .collect::<ckpt_core::Result<Vec<_>>>()?;
    let names: Vec<String> = (0..bufs.len()).map(|i| format!("layer.{i}.w")).collect();
    let device_views: Vec<DeviceTensor<'_>> = bufs
        .iter()
        .zip(&names)
        .map(|(b, n)| b.tensor(n.clone(), DType::F32, &[b.len() as u64 / 4]))
        .collect();
    let views: Vec<&dyn TensorView> = device_views.iter().map(|v| v as _).collect();

    let run = format!("bench-stage-gpu-{}", std::process::id());
    let (ckpt, threads) = crate::stage::checkpointer(a, &run, bytes, |b| b.cuda(dev.clone()))?;

    // The first save is a warm-up (driver and page-table setup).
    let (mut asyncs, mut durables) = (vec![], vec![]);
    let mut last_step = 0;
    for i in 0..=a.state.iters {
        last_step = i as u64 + 1;
        let state = synth::state_of(&views, last_step)?;
        let h = ckpt.save(&state)?;
        let ms = h.math_stop().as_secs_f64();
        let report = h.wait()?;
        if i > 0 {
            asyncs.push(ms);
            durables.push(report.durable_after().ok_or("not committed")?.as_secs_f64());
        }
    }

    // What was staged from the GPU is what the GPU holds.
    let mut back: Vec<Vec<u8>> = tensors.iter().map(|t| vec![0u8; t.len()]).collect();
    {
        let mut targets: Vec<TensorMut<'_>> = back
            .iter_mut()
            .zip(&names)
            .map(|(b, n)| {
                let shape = [b.len() as u64 / 4];
                TensorMut::new(n.clone(), DType::F32, &shape, b)
            })
            .collect();
        let mut refs: Vec<&mut dyn TensorViewMut> = targets.iter_mut().map(|t| t as _).collect();
        let restored = ckpt.restore(&mut refs)?.ok_or("no checkpoint to restore")?;
        if restored.step != last_step {
            return Err(format!(
                "restored step {} instead of the last saved {last_step}",
                restored.step
            )
            .into());
        }
    }
    for ((b, t), n) in back.iter().zip(&tensors).zip(&names) {
        if b != t {
            return Err(
                format!("tensor `{n}` restored from the GPU save differs from its source").into(),
            );
        }
    }
    drop(back);

    let staging_registered = ckpt.staging_stats().is_some_and(|p| p.cuda_registered);
    let staging_locked = ckpt.staging_stats().is_some_and(|p| p.locked);
    let mut pinned = PinnedBuffer::new(&dev, bytes as usize)?;
    let mut pageable = vec![1u8; bytes as usize];
    let (mut pins, mut pages) = (vec![], vec![]);
    // One untimed copy each, so first-touch costs are not timed.
    floors::d2h(&dev, &bufs, pinned.as_mut_slice())?;
    floors::d2h(&dev, &bufs, &mut pageable)?;
    for _ in 0..a.state.iters.max(1) {
        pins.push(floors::d2h(&dev, &bufs, pinned.as_mut_slice())?.as_secs_f64());
        pages.push(floors::d2h(&dev, &bufs, &mut pageable)?.as_secs_f64());
    }

    let (amin, amax) = (
        asyncs.iter().copied().fold(f64::MAX, f64::min),
        asyncs.iter().copied().fold(0.0, f64::max),
    );
    let (a_med, pin, page, d_med) = (
        floors::median(&mut asyncs),
        floors::median(&mut pins),
        floors::median(&mut pages),
        floors::median(&mut durables),
    );
    let result = json!({
        "bench": "stage",
        "device": "cuda",
        "gpu_name": dev.name(),
        "state_bytes": bytes,
        "tensors": a.state.tensors,
        "iters": a.state.iters,
        "copy_threads": threads,
        "async_math_stop_s": a_med,
        "async_math_stop_min_s": amin,
        "async_math_stop_max_s": amax,
        "d2h_pinned_floor_s": pin,
        "d2h_pageable_s": page,
        "ratio_to_floor": a_med / pin,
        "async_durable_s": d_med,
        "staging_cuda_registered": staging_registered,
        "staging_locked": staging_locked,
        "verified": true,
    });
    if a.json {
        println!("{result}");
    } else {
        let gib = |s: f64| bytes as f64 / s / (1u64 << 30) as f64;
        println!(
            "stage --device cuda on {}: {:.2} GiB in {} tensors, {} iterations (median), {} copy threads",
            dev.name(),
            bytes as f64 / (1u64 << 30) as f64,
            a.state.tensors,
            a.state.iters,
            threads
        );
        println!("{:<34} {:>10} {:>10}", "", "seconds", "GiB/s");
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            "D2H floor (pinned)",
            pin,
            gib(pin)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            "D2H pageable (reference)",
            page,
            gib(page)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}   (min {amin:.4}, max {amax:.4})",
            "ckpt async save: math-stop",
            a_med,
            gib(a_med)
        );
        println!(
            "{:<34} {:>10.4} {:>10.2}",
            "ckpt async save: time to durable",
            d_med,
            gib(d_med)
        );
        println!(
            "ratio to pinned D2H floor: {:.2}x; staging registered with the driver: {staging_registered}; restored bytes match the GPU source",
            a_med / pin
        );
    }
    drop(ckpt);
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}
