//! A synthetic training state: `n` tensors of about equal size filled with
//! non-trivial bytes (so nothing is compressible or zero-page backed).

use std::path::PathBuf;

use ckpt_core::{TensorRef, TensorView, TrainingState};

/// The synthetic state and where it goes, shared by `stage`, `flush` and
/// `restore`.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// Total state size (e.g. 2G, 512M).
    #[arg(long, default_value = "2G", value_parser = parse_bytes)]
    pub state_bytes: u64,
    /// Number of tensors.
    #[arg(long, default_value_t = 16)]
    pub tensors: usize,
    /// Measured iterations (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Directory for checkpoints and floors (the device under test).
    #[arg(long, default_value = "target/bench-ckpt")]
    pub dir: PathBuf,
}

/// Parses sizes like `2G`, `512M`, `64k`, `1000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..]
                .to_ascii_lowercase()
                .trim_end_matches("ib")
                .trim_end_matches('b')
            {
                "k" => 1u64 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "" => 1,
                other => return Err(format!("unknown size suffix `{other}` in `{s}`")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 2G or 512M"))?;
    Ok((n * mult as f64) as u64)
}

/// `count` tensors totalling `bytes`, each a multiple of 4 bytes.
pub fn tensors(bytes: u64, count: usize) -> Vec<Vec<u8>> {
    let count = count.max(1);
    let each = (bytes / count as u64 / 4 * 4) as usize;
    (0..count)
        .map(|i| ckpt_core::rng::pattern(each, i as u64))
        .collect()
}

/// Views over the tensors, named `layer.<i>.w`, f32, one dimension.
pub fn views(tensors: &[Vec<u8>]) -> Vec<TensorRef<'_>> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            TensorRef::new(
                format!("layer.{i}.w"),
                ckpt_core::DType::F32,
                &[t.len() as u64 / 4],
                t,
            )
        })
        .collect()
}

/// Restore targets over `outs`, named and shaped like [`views`].
pub fn targets(outs: &mut [Vec<u8>]) -> Vec<ckpt_core::TensorMut<'_>> {
    outs.iter_mut()
        .enumerate()
        .map(|(i, o)| {
            let n = o.len() as u64 / 4;
            ckpt_core::TensorMut::new(format!("layer.{i}.w"), ckpt_core::DType::F32, &[n], o)
        })
        .collect()
}

/// A training state over the views at `step`.
pub fn state<'a>(views: &'a [TensorRef<'a>], step: u64) -> ckpt_core::Result<TrainingState<'a>> {
    let views: Vec<&dyn TensorView> = views.iter().map(|v| v as _).collect();
    state_of(&views, step)
}

/// A training state over any views (host or device) at `step`.
pub fn state_of<'a>(
    views: &[&'a dyn TensorView],
    step: u64,
) -> ckpt_core::Result<TrainingState<'a>> {
    TrainingState::builder(step)
        .model(views.iter().copied())
        .without_optimizer()
        .rng(&step)
        .data_loader(&step)
        .without_lr_schedule()
        .build()
}
