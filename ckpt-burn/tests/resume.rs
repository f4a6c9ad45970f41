//! A burn MLP trained with Adam, checkpointed through ckpt to real files,
//! restored into a fresh model and optimizer: training goes on bit-exactly.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use ckpt_burn::BurnSnapshot;
use ckpt_core::{Checkpointer, Error, TensorBytes, TensorView, TierPolicy};

#[derive(Module, Debug)]
struct Mlp {
    input: Linear,
    hidden: Vec<Linear>,
    output: Linear,
    act: Relu,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            input: LinearConfig::new(8, 16).init(device),
            hidden: vec![LinearConfig::new(16, 16).init(device)],
            output: LinearConfig::new(16, 1).init(device),
            act: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut h = self.act.forward(self.input.forward(x));
        for l in &self.hidden {
            h = self.act.forward(l.forward(h));
        }
        self.output.forward(h)
    }
}

fn batch(step: u64, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let xs: Vec<f32> = (0..32 * 8)
        .map(|i| (((i as u64 * 2654435761 + step * 40503) % 1000) as f32) / 500.0 - 1.0)
        .collect();
    let ys: Vec<f32> = xs.chunks(8).map(|r| r.iter().sum::<f32>().sin()).collect();
    (
        Tensor::from_data(TensorData::new(xs, [32, 8]), device),
        Tensor::from_data(TensorData::new(ys, [32, 1]), device),
    )
}

fn train(mut model: Mlp, optim: &mut ModuleOptimizer, steps: std::ops::Range<u64>) -> Mlp {
    let device = Device::default().autodiff();
    for step in steps {
        let (x, y) = batch(step, &device);
        let loss = (model.forward(x) - y).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    model
}

/// Every parameter and optimizer tensor, by name, as bytes.
fn state(model: &Mlp, optim: &ModuleOptimizer) -> Vec<(String, Vec<u8>)> {
    let snap = BurnSnapshot::capture(model, optim).expect("test setup");
    snap.tensors()
        .map(|t| match t.bytes() {
            TensorBytes::Shared(b) => (t.spec().name.clone(), b.to_vec()),
            _ => panic!("captured tensors are shared bytes"),
        })
        .collect()
}

fn checkpointer(dir: &std::path::Path) -> Checkpointer {
    let tier = Arc::new(ckpt_io::LocalTier::new(dir).expect("test setup"));
    Checkpointer::builder("burn-test")
        .tier(tier, TierPolicy::keep_last(3))
        .build()
        .expect("test setup")
}

#[test]
fn crash_and_resume_is_bit_exact() {
    let device = Device::default().autodiff();
    let dir = tempfile::tempdir().expect("test setup");

    // The uninterrupted run.
    let init = Mlp::new(&device);
    let mut optim = AdamConfig::new().init();
    let reference = train(init.clone(), &mut optim, 0..20);
    let reference = state(&reference, &optim);

    // The same start, checkpointed at step 12, then "crashed".
    let mut optim = AdamConfig::new().init();
    let at_12 = train(init, &mut optim, 0..12);
    {
        let ckpt = checkpointer(dir.path());
        let snap = BurnSnapshot::capture(&at_12, &optim).expect("test setup");
        let state = snap
            .state(12)
            .rng(&0u64)
            .data_loader(&12u64)
            .lr_schedule(&1e-2f64)
            .build()
            .expect("test setup");
        let report = ckpt
            .save(&state)
            .expect("test setup")
            .wait()
            .expect("test setup");
        assert!(report.bytes > snap.nbytes() / 2, "{report:?}");
        drop(ckpt);
    }
    drop((at_12, optim));

    // A new process: a model with other random weights, a fresh Adam.
    let ckpt = checkpointer(dir.path());
    let fresh = Mlp::new(&device);
    let back = ckpt_burn::restore(&ckpt, fresh, AdamConfig::new().init())
        .expect("test setup")
        .expect("a checkpoint");
    assert_eq!(back.restored.step, 12);
    assert_eq!(
        back.restored
            .loop_state
            .data_loader::<u64>()
            .expect("test setup"),
        12
    );
    // Without the optimizer's moments the run would diverge: they matter.
    let mut adam_reset = AdamConfig::new().init();
    let diverged = train(back.model.clone(), &mut adam_reset, 12..20);
    let mut optim = back.optimizer;
    let resumed = train(back.model, &mut optim, 12..20);
    let resumed = state(&resumed, &optim);
    assert_eq!(resumed.len(), reference.len());
    assert!(resumed.len() >= 6 * 3, "parameters and both Adam moments");
    for ((name, got), (want_name, want)) in resumed.iter().zip(&reference) {
        assert_eq!(name, want_name);
        assert!(got == want, "{name} differs after the resume");
    }
    let diverged = state(&diverged, &adam_reset);
    assert_ne!(
        diverged[0].1, reference[0].1,
        "a reset optimizer changes the run"
    );
}

#[test]
fn names_follow_the_module_path() {
    let device = Device::default().autodiff();
    let mut optim = AdamConfig::new().init();
    let model = train(Mlp::new(&device), &mut optim, 0..1);
    let snap = BurnSnapshot::capture(&model, &optim).expect("test setup");
    let names = snap.tensor_names();
    for want in [
        "model.input.weight",
        "model.hidden.0.bias",
        "model.output.weight",
        "optimizer.input.weight.momentum.moment_1",
        "optimizer.hidden.0.weight.momentum.moment_2",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
}

#[test]
fn a_model_of_another_shape_is_refused_by_name() {
    let device = Device::default().autodiff();
    let dir = tempfile::tempdir().expect("test setup");
    let ckpt = checkpointer(dir.path());
    let mut optim = AdamConfig::new().init();
    let model = train(Mlp::new(&device), &mut optim, 0..2);
    let snap = BurnSnapshot::capture(&model, &optim).expect("test setup");
    ckpt.save(
        &snap
            .state(2)
            .without_loop_state()
            .build()
            .expect("test setup"),
    )
    .expect("test setup")
    .wait()
    .expect("test setup");

    let mut other = Mlp::new(&device);
    other.hidden.push(LinearConfig::new(16, 16).init(&device));
    let Err(err) = ckpt_burn::restore(&ckpt, other, AdamConfig::new().init()) else {
        panic!("a model with an extra layer cannot restore")
    };
    assert!(matches!(err, Error::TensorMismatch { .. }), "{err}");
    assert!(err.to_string().contains("model.hidden.1.weight"), "{err}");

    let mut wide = Mlp::new(&device);
    wide.output = LinearConfig::new(16, 2).init(&device);
    let Err(err) = ckpt_burn::restore(&ckpt, wide, AdamConfig::new().init()) else {
        panic!("a wider output layer cannot restore")
    };
    assert!(err.to_string().contains("model.output"), "{err}");
}

#[test]
fn an_empty_store_is_a_fresh_start() {
    let device = Device::default().autodiff();
    let dir = tempfile::tempdir().expect("test setup");
    let ckpt = checkpointer(dir.path());
    let r =
        ckpt_burn::restore(&ckpt, Mlp::new(&device), AdamConfig::new().init()).expect("test setup");
    assert!(r.is_none());
}
