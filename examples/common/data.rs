//! The synthetic data set, its loader and the learning-rate schedule: all
//! loop state a checkpoint must hold for a resumed run to see the same
//! batches at the same learning rates.

use ckpt::rng::Rng;
use serde::{Deserialize, Serialize};

/// Inputs per sample.
pub const IN: usize = 32;

/// One sample: inputs and target.
pub type Sample = ([f32; IN], f32);

/// Global sample `index`: a pure function of its index, as if read from a
/// shuffled file. The target is a fixed smooth function of the inputs.
pub fn sample(index: u64) -> Sample {
    let mut r = Rng::seed_from_u64(index);
    let mut x = [0f32; IN];
    for v in &mut x {
        *v = symmetric(&mut r);
    }
    let y = (x
        .iter()
        .enumerate()
        .map(|(i, v)| v * ((i % 5) as f32 - 2.0) * 0.3)
        .sum::<f32>())
    .sin();
    (x, y)
}

/// A value in [-1, 1) from 24 random bits.
pub fn symmetric(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// One rank's data-loader position: the data set is sharded by rank,
/// sample `cursor` of rank r in an epoch is global sample
/// `epoch * 1_000_003 + cursor * world + r`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loader {
    pub epoch: u64,
    pub cursor: u64,
    /// Samples of one rank per epoch.
    pub per_rank: u64,
}

impl Loader {
    /// At the start of the first epoch.
    pub fn new(per_rank: u64) -> Self {
        Self {
            epoch: 0,
            cursor: 0,
            per_rank,
        }
    }

    /// The next `batch` samples of rank `rank` of `world`.
    pub fn next_batch(&mut self, rank: u32, world: u32, batch: usize) -> Vec<Sample> {
        let mut out = Vec::with_capacity(batch);
        for _ in 0..batch {
            let idx = self.epoch * 1_000_003 + self.cursor * u64::from(world) + u64::from(rank);
            out.push(sample(idx));
            self.cursor += 1;
            if self.cursor == self.per_rank {
                self.cursor = 0;
                self.epoch += 1;
            }
        }
        out
    }
}

/// Warm-up then cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub base: f32,
    pub warmup: u64,
    pub total: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (counting from 0).
    pub fn at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let p =
            (step - self.warmup) as f32 / (self.total.saturating_sub(self.warmup)).max(1) as f32;
        self.base * 0.5 * (1.0 + (std::f32::consts::PI * p.min(1.0)).cos())
    }
}
