//! `ckpt-bench compress`: ratio and throughput of per-chunk zstd (after
//! byte-plane grouping) through real saves, for the kinds of tensors a
//! checkpoint holds, beside a random control; and time to durable on the
//! tier under test with compression off, on and auto.

use ckpt_core::rng::splitmix64;
use ckpt_core::{Checkpointer, Compression, DType, TensorRef, TierPolicy, TrainingState};
use clap::Args;
use serde_json::json;

use crate::floors;

/// Arguments of `compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Bytes of each tensor kind (e.g. 256M).
    #[arg(long, default_value = "128M", value_parser = crate::synth::parse_bytes)]
    pub bytes: u64,
    /// Measured saves per configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Directory for a local tier.
    #[arg(long, default_value = "target/bench-ckpt")]
    pub dir: std::path::PathBuf,
    /// The tier under test.
    #[command(flatten)]
    pub target: crate::tiers::TierArgs,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
    /// Take the tensors from a checkpoint instead (a local directory, say
    /// the quickstart's after a run): the newest step's trained weights
    /// (frozen ones left out), Adam first and second moments, each kind's
    /// tensors back to back, the weights also as bf16; then the synthetic
    /// kinds of `--bytes` each.
    #[arg(long)]
    pub from: Option<std::path::PathBuf>,
}

/// A uniform value in [-1, 1).
fn unit(z: &mut u64) -> f32 {
    (splitmix64(z) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// An approximately normal value (sum of four uniforms).
fn normal(z: &mut u64) -> f32 {
    (unit(z) + unit(z) + unit(z) + unit(z)) * 0.866
}

/// A tensor kind: name, dtype and bytes.
type Kind = (String, DType, Vec<u8>);

/// The tensor kinds: name, dtype and bytes.
fn kinds(bytes: u64) -> Vec<Kind> {
    let n = (bytes / 4) as usize;
    let mut z = 0x5eed_u64;
    let f32s = |f: &mut dyn FnMut(&mut u64) -> f32, z: &mut u64| -> Vec<u8> {
        (0..n).flat_map(|_| f(z).to_le_bytes()).collect()
    };
    // Weights of a trained layer: normal, scale 0.02; a long-tailed init:
    // normal scaled by a heavy tail.
    let weights = f32s(&mut |z| normal(z) * 0.02, &mut z);
    let tailed = f32s(&mut |z| normal(z) * 0.02 / (unit(z).abs() + 0.05), &mut z);
    // Adam: m ~ small gradients, v ~ their squares.
    let m = f32s(&mut |z| normal(z) * 1e-4, &mut z);
    let v = f32s(&mut |z| (normal(z) * 1e-4).powi(2), &mut z);
    let bf16: Vec<u8> = (0..n * 2)
        .flat_map(|_| {
            let x = normal(&mut z) * 0.02;
            ((x.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect();
    let random: Vec<u8> = (0..n)
        .flat_map(|_| (splitmix64(&mut z) as u32).to_le_bytes())
        .collect();
    vec![
        ("weights.f32".into(), DType::F32, weights),
        ("weights-long-tail.f32".into(), DType::F32, tailed),
        ("adam.m.f32".into(), DType::F32, m),
        ("adam.v.f32".into(), DType::F32, v),
        ("weights.bf16".into(), DType::BF16, bf16),
        ("random.f32".into(), DType::F32, random),
    ]
}

/// The f32 tensors of the newest step in the checkpoint at `dir`, by kind:
/// trained weights (model tensors whose name does not start with
/// `frozen`), Adam `m` and `v` (names starting `adam.m.` / `adam.v.`),
/// each kind's tensors back to back; and the weights rounded to bf16.
fn kinds_from(dir: &std::path::Path) -> Result<Vec<Kind>, Box<dyn std::error::Error>> {
    let store = ckpt_core::CheckpointStore::new(std::sync::Arc::new(
        ckpt_io::LocalTier::open_existing(dir)?,
    ))?;
    let run = store
        .runs()?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: no checkpoint", dir.display()))?;
    let step = *store
        .steps(&run)?
        .last()
        .ok_or_else(|| format!("{}: run {run} has no committed step", dir.display()))?;
    let m = store.manifest(&run, step)?;
    let kind = |name: &str, role: ckpt_core::TensorRole| {
        if name.starts_with("adam.m.") {
            Some("adam.m")
        } else if name.starts_with("adam.v.") {
            Some("adam.v")
        } else if role == ckpt_core::TensorRole::Model && !name.starts_with("frozen") {
            Some("weights")
        } else {
            None
        }
    };
    let mut out: Vec<Kind> = Vec::new();
    for k in ["weights", "adam.m", "adam.v"] {
        let mut bytes = Vec::new();
        for (name, t) in &m.tensors {
            if t.dtype != DType::F32 || kind(name, t.role) != Some(k) {
                continue;
            }
            let n: u64 = t.shape.iter().product::<u64>() * 4;
            let mut buf = vec![0u8; n as usize];
            let mut target = ckpt_core::TensorMut::new(name, DType::F32, &t.shape, &mut buf);
            store.read(&m, &mut [&mut target])?;
            bytes.extend_from_slice(&buf);
        }
        if bytes.is_empty() {
            continue;
        }
        if k == "weights" {
            let bf16: Vec<u8> = bytes
                .chunks_exact(4)
                .flat_map(|b| {
                    let x = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    ((x >> 16) as u16).to_le_bytes()
                })
                .collect();
            out.push((format!("{run}@{step} weights.bf16"), DType::BF16, bf16));
        }
        out.push((format!("{run}@{step} {k}.f32"), DType::F32, bytes));
    }
    if out.is_empty() {
        return Err(format!(
            "{}: step {step} has no f32 weights or Adam moments",
            dir.display()
        )
        .into());
    }
    out.sort_by_key(|k| k.0.contains("bf16"));
    Ok(out)
}

/// Saves `data` `iters` times on `tier` with `compression`; returns the
/// medians of time to durable and bytes written.
fn saves(
    tier: &std::sync::Arc<dyn ckpt_core::Tier>,
    name: &str,
    dtype: DType,
    data: &[u8],
    compression: Compression,
    iters: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let run = format!(
        "bench-compress-{}-{compression:?}-{}",
        name.replace(['.', ' ', '@'], "-"),
        std::process::id()
    );
    let ckpt = Checkpointer::builder(run)
        .tier(
            tier.clone(),
            TierPolicy::keep_last(1).compression(compression),
        )
        .staging_capacity(data.len() as u64)
        .build()?;
    let elems = data.len() as u64 / dtype.size() as u64;
    let (mut durable, mut written) = (vec![], vec![]);
    // One more save than measured: Auto decides from the previous save's
    // write rate.
    for i in 0..=iters {
        let t = TensorRef::new(name, dtype, &[elems], data);
        let state = TrainingState::builder(i as u64 + 1)
            .model([&t as &dyn ckpt_core::TensorView])
            .without_optimizer()
            .without_rng()
            .data_loader(&i)
            .without_lr_schedule()
            .build()?;
        let r = ckpt.save(&state)?.wait()?;
        if i > 0 {
            durable.push(r.durable_after().ok_or("not committed")?.as_secs_f64());
            written.push(r.tiers[0].written as f64);
        }
    }
    Ok((floors::median(&mut durable), floors::median(&mut written)))
}

/// Runs the benchmark.
pub fn run(a: &CompressArgs) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.dir)?;
    let opened = crate::tiers::open(a.target.tier, &a.dir, &a.target, 8 * a.bytes + (64 << 20))?;
    if !a.json {
        println!(
            "compress: {} MiB per tensor kind to {} ({} saves each, medians); ratio = bytes written / raw",
            a.bytes >> 20,
            opened.tier.location(),
            a.iters
        );
        println!(
            "{:<32} {:>7} {:>12} {:>10} {:>10} {:>10}",
            "tensor", "ratio", "zstd MiB/s", "off s", "on s", "auto s"
        );
    }
    let mut all = match &a.from {
        Some(dir) => kinds_from(dir)?,
        None => Vec::new(),
    };
    all.extend(kinds(a.bytes));
    for (name, dtype, data) in all {
        let name = name.as_str();
        // zstd level 1 alone on one core, over the raw chunks (the save
        // groups byte planes first): the order of the cost it adds.
        let t0 = std::time::Instant::now();
        let mut out = 0usize;
        for chunk in data.chunks(4 << 20) {
            out += zstd::bulk::compress(chunk, 1)?.len();
        }
        let speed = data.len() as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64;
        let _ = out;
        let (off, raw) = saves(&opened.tier, name, dtype, &data, Compression::Off, a.iters)?;
        let (on, written) = saves(&opened.tier, name, dtype, &data, Compression::On, a.iters)?;
        let (auto, _) = saves(&opened.tier, name, dtype, &data, Compression::Auto, a.iters)?;
        let ratio = written / raw;
        if a.json {
            println!(
                "{}",
                json!({"bench": "compress", "tensor": name, "tier": opened.tier.location(),
                    "bytes": data.len(), "ratio": ratio, "zstd_mib_s": speed,
                    "durable_off_s": off, "durable_on_s": on, "durable_auto_s": auto})
            );
        } else {
            println!("{name:<32} {ratio:>7.3} {speed:>12.0} {off:>10.3} {on:>10.3} {auto:>10.3}");
        }
    }
    Ok(())
}
