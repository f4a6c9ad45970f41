//! The examples' model: a two-layer network (`mlp.w1`, `mlp.b1`, `mlp.w2`)
//! and an embedding table (`emb.table`) with Adam moments for each, split
//! along dimension 0 over the ranks of a job (the sharded-optimizer, ZeRO,
//! layout: every rank owns a block of hidden units, of embedding rows and
//! of their moments). Each rank fits its block, as a sub-network, to its
//! share of the target on its own slice of the data: a rank's update
//! depends only on the step and its own shard and loop state, so every run
//! is reproducible and every checkpoint is one consistent cut of all ranks.
//! With one rank, the shard is the whole model.

// Index loops read like the math they implement (forward/backward, Adam).
#![allow(clippy::needless_range_loop)]

use ckpt::rng::{Rng, splitmix64};
use ckpt::{ShardSpec, TensorMut, TensorRef, TensorView, TensorViewMut, TrainingState};
use serde::Serialize;

use super::data::{IN, Sample, symmetric};

/// Hidden units of the whole model.
pub const HID: u64 = 96;
/// Width of an embedding row.
pub const EMB_DIM: u64 = 64;

/// The Adam moments' name prefixes.
const MOMENTS: [&str; 2] = ["adam.m.", "adam.v."];

/// One rank's block of every parameter tensor and of its Adam moments.
pub struct Shard {
    /// Global tensor name and this rank's block of it.
    pub specs: Vec<(&'static str, ShardSpec)>,
    pub params: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

/// The gradients of one step, from [`Shard::backward`].
pub struct Grads(Vec<Vec<f32>>);

impl Shard {
    /// Rank `rank`'s block of a model with `state_mb` megabytes of
    /// embedding parameters in all. Initial values are a function of the
    /// global element index, so the whole model is the same for any number
    /// of ranks.
    pub fn new(rank: u32, world: u32, state_mb: u64) -> ckpt::Result<Self> {
        let emb_rows = (state_mb * (1 << 20) / 4 / EMB_DIM).max(u64::from(world));
        let globals: [(&'static str, Vec<u64>, f32); 4] = [
            ("mlp.w1", vec![HID, IN as u64], (1.0 / IN as f32).sqrt()),
            ("mlp.b1", vec![HID], 0.1),
            ("mlp.w2", vec![HID], 0.1),
            ("emb.table", vec![emb_rows, EMB_DIM], 0.1),
        ];
        let mut specs = Vec::new();
        let mut params = Vec::new();
        for (k, (name, global, scale)) in globals.into_iter().enumerate() {
            let spec = ShardSpec::split(global, 0, world.into(), rank.into())?;
            let row: u64 = spec.shape[1..].iter().product();
            let first = spec.offsets[0] * row;
            params.push(
                (first..first + spec.numel())
                    .map(|i| {
                        let mut z = ((k as u64) << 56) ^ i;
                        let bits = splitmix64(&mut z);
                        ((bits >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                    })
                    .collect::<Vec<f32>>(),
            );
            specs.push((name, spec));
        }
        let zeros: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.len()]).collect();
        Ok(Self {
            specs,
            params,
            m: zeros.clone(),
            v: zeros,
        })
    }

    fn hidden(&self) -> usize {
        self.params[1].len()
    }

    /// Forward and backward on this rank's block: reads the parameters
    /// only. Returns the loss and the gradients.
    pub fn backward(&self, batch: &[Sample], rng: &mut Rng) -> (f32, Grads) {
        let hid = self.hidden();
        // This block's share of the target.
        let share = hid as f32 / HID as f32;
        let mut grads: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0f32; p.len()]).collect();
        let mut loss = 0f32;
        let mut h = vec![0f32; hid];
        for (x, y) in batch {
            for j in 0..hid {
                let mut a = self.params[1][j];
                for i in 0..IN {
                    a += self.params[0][j * IN + i] * x[i];
                }
                h[j] = a.max(0.0);
            }
            let out: f32 = (0..hid).map(|j| self.params[2][j] * h[j]).sum();
            let d = out - y * share;
            loss += d * d / batch.len() as f32;
            let g = 2.0 * d / batch.len() as f32;
            for j in 0..hid {
                grads[2][j] += g * h[j];
                if h[j] > 0.0 {
                    let gh = g * self.params[2][j];
                    grads[1][j] += gh;
                    for i in 0..IN {
                        grads[0][j * IN + i] += gh * x[i];
                    }
                }
            }
        }
        // A few embedding rows of this block, picked by the rank's RNG, get
        // a small update, like sparse embedding gradients.
        let dim = EMB_DIM as usize;
        let rows = self.params[3].len() / dim;
        if rows > 0 {
            for _ in 0..4 {
                let r = (rng.next_u64() % rows as u64) as usize;
                for j in 0..dim {
                    grads[3][r * dim + j] += symmetric(rng) * 1e-3;
                }
            }
        }
        (loss, Grads(grads))
    }

    /// The optimizer step: Adam (Kingma & Ba 2015) at learning rate `lr`,
    /// step `t` (counting from 1), on this rank's shard of the moments. The
    /// only place parameters and moments are written.
    pub fn update(&mut self, grads: &Grads, lr: f32, t: u64) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for k in 0..self.params.len() {
            let (p, m, v, g) = (
                &mut self.params[k],
                &mut self.m[k],
                &mut self.v[k],
                &grads.0[k],
            );
            for i in 0..p.len() {
                if g[i] == 0.0 && m[i] == 0.0 {
                    continue;
                }
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            }
        }
    }

    /// One training step: backward, then update. Returns the loss.
    pub fn train_step(&mut self, batch: &[Sample], lr: f32, t: u64, rng: &mut Rng) -> f32 {
        let (loss, grads) = self.backward(batch, rng);
        self.update(&grads, lr, t);
        loss
    }

    /// Bytes of parameters and moments.
    pub fn nbytes(&self) -> u64 {
        self.params.iter().map(|p| p.len() as u64 * 12).sum()
    }

    /// Tensors saved: parameters and moments.
    pub fn tensor_count(&self) -> usize {
        self.specs.len() * 3
    }

    /// Views of every parameter and its two moments, with their shards.
    pub fn views(&self) -> Vec<[TensorRef<'_>; 3]> {
        self.specs
            .iter()
            .enumerate()
            .map(|(k, (name, spec))| {
                [
                    ("", &self.params[k]),
                    (MOMENTS[0], &self.m[k]),
                    (MOMENTS[1], &self.v[k]),
                ]
                .map(|(prefix, data)| {
                    TensorRef::from_slice(format!("{prefix}{name}"), &spec.shape, data)
                        .with_shard(spec.clone())
                })
            })
            .collect()
    }

    /// The whole training state of this rank at `step`, over `views`.
    pub fn state<'a>(
        views: &'a [[TensorRef<'a>; 3]],
        step: u64,
        rng: &impl Serialize,
        loader: &impl Serialize,
        lr: &impl Serialize,
    ) -> ckpt::Result<TrainingState<'a>> {
        Self::state_with_frozen(views, None, step, rng, loader, lr)
    }

    /// [`Shard::state`] with frozen parameters too (a model tensor that
    /// training never changes, and that has no optimizer state).
    pub fn state_with_frozen<'a>(
        views: &'a [[TensorRef<'a>; 3]],
        frozen: Option<&'a TensorRef<'a>>,
        step: u64,
        rng: &impl Serialize,
        loader: &impl Serialize,
        lr: &impl Serialize,
    ) -> ckpt::Result<TrainingState<'a>> {
        TrainingState::builder(step)
            .model(
                views
                    .iter()
                    .map(|[p, _, _]| p as &dyn TensorView)
                    .chain(frozen.map(|f| f as &dyn TensorView)),
            )
            .optimizer(
                views
                    .iter()
                    .flat_map(|[_, m, v]| [m as &dyn TensorView, v as &dyn TensorView]),
            )
            .rng(rng)
            .data_loader(loader)
            .lr_schedule(lr)
            .build()
    }

    /// Restore destinations for every parameter and moment, with their
    /// shards.
    pub fn targets(&mut self) -> Vec<TensorMut<'_>> {
        let Shard {
            specs,
            params,
            m,
            v,
        } = self;
        let mut out = Vec::with_capacity(specs.len() * 3);
        for (((name, spec), p), (mm, vv)) in specs
            .iter()
            .zip(params.iter_mut())
            .zip(m.iter_mut().zip(v.iter_mut()))
        {
            for (prefix, data) in [("", p), (MOMENTS[0], mm), (MOMENTS[1], vv)] {
                out.push(
                    TensorMut::from_slice(format!("{prefix}{name}"), &spec.shape, data)
                        .with_shard(spec.clone()),
                );
            }
        }
        out
    }

    /// blake3 over this rank's whole state: its parameter and moment
    /// blocks, and its loop state (RNG, data-loader position).
    pub fn digest(&self, loop_state: &impl Serialize) -> String {
        let mut h = blake3::Hasher::new();
        for buf in self.params.iter().chain(&self.m).chain(&self.v) {
            h.update(ckpt::as_bytes(buf));
        }
        h.update(&serde_json::to_vec(loop_state).expect("the loop state is plain data"));
        h.finalize().to_hex().to_string()
    }
}

/// `targets` as the trait objects restore takes.
pub fn as_targets<'a, 'b>(targets: &'a mut [TensorMut<'b>]) -> Vec<&'a mut dyn TensorViewMut> {
    targets
        .iter_mut()
        .map(|t| t as &mut dyn TensorViewMut)
        .collect()
}
