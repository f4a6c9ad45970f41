//! A burn training loop with ckpt: an MLP trained with burn's Adam on the
//! NdArray backend (synthetic regression data the example generates),
//! checkpointed asynchronously on the scheduler's interval, crashable on
//! purpose, resumed bit-exactly into a freshly initialized model and
//! optimizer.
//!
//! ```text
//! cargo run --release --features burn-ndarray --example burn_train -- --dir /tmp/ckpt-burn --steps 300 --crash-at-step 170
//! cargo run --release --features burn-ndarray --example burn_train -- --dir /tmp/ckpt-burn --steps 300   # resumes
//! cargo run --release --features burn-ndarray --example burn_train -- --dir /tmp/ckpt-burn-fresh --steps 300  # same digest
//! ```

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ckpt::burn::{BurnSnapshot, PendingSnapshot};
use ckpt::rng::Rng;
use ckpt::schedule::{Policy, SchedulerConfig, parse_duration};
use ckpt::{Checkpointer, SaveHandle, TierPolicy};
use ckpt_burn::burn;
use clap::Parser;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};

mod common;

use common::data::{IN, Loader, LrSchedule};
use common::ms;

/// Samples per step.
const BATCH: usize = 32;

#[derive(Parser, Debug)]
#[command(about = "Train a burn MLP with async ckpt checkpoints, crash, and resume bit-exactly")]
struct Args {
    /// Where checkpoints go: a directory (or s3://bucket/prefix).
    #[arg(long)]
    dir: String,
    /// Total training steps.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Save every N steps. Without it, the interval comes from the
    /// scheduler (availability-optimal), fed with measured save times.
    #[arg(long)]
    every: Option<u64>,
    /// Prior MTBF of the whole job for the scheduler (s/m/h).
    #[arg(long, default_value = "2m")]
    mtbf: String,
    /// Width of the two hidden layers.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Abort the process right after this step, as a killed job would.
    #[arg(long)]
    crash_at_step: Option<u64>,
    /// Run name inside the location.
    #[arg(long, default_value = "burn")]
    run: String,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Print nothing but the final digest.
    #[arg(long)]
    quiet: bool,
    /// Read the model and optimizer out of burn on a thread of their own
    /// (`BurnSnapshot::capture_in_background`) while training goes on;
    /// the save follows when the capture is done.
    #[arg(long)]
    background_capture: bool,
}

/// The model: two hidden layers with ReLU.
#[derive(Module, Debug)]
struct Mlp {
    input: Linear,
    hidden: Linear,
    output: Linear,
    act: Relu,
}

impl Mlp {
    fn new(width: usize, device: &Device) -> Self {
        Self {
            input: LinearConfig::new(IN, width).init(device),
            hidden: LinearConfig::new(width, width).init(device),
            output: LinearConfig::new(width, 1).init(device),
            act: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.act.forward(self.input.forward(x));
        let h = self.act.forward(self.hidden.forward(h));
        self.output.forward(h)
    }
}

fn main() -> ExitCode {
    common::init_logging();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burn_train: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let say = |s: String| {
        if !args.quiet {
            println!("{s}");
        }
    };
    let device = Device::default().autodiff();
    // The initial weights are a function of the seed, so an uninterrupted
    // run and a resumed one start from the same model.
    device.seed(7);
    let mut model = Mlp::new(args.hidden, &device);
    let mut optim: ModuleOptimizer = AdamConfig::new().init();

    let policy = match args.every {
        Some(n) => Policy::FixedSteps(n),
        None => Policy::Availability,
    };
    let schedule = SchedulerConfig::new(policy, parse_duration(&args.mtbf)?)
        .with_initial_interval(std::time::Duration::from_secs(1))
        .with_min_interval(std::time::Duration::from_millis(500));
    let ckpt = Checkpointer::builder(args.run.clone())
        .tier(
            ckpt::open_location(&args.dir)?,
            TierPolicy::keep_last(args.keep),
        )
        .schedule(schedule)
        .build()?;

    // Loop state: the data-loader position, the RNG that picks the noise
    // of each batch, the LR schedule.
    let mut loader = Loader::new(10_000);
    let mut rng = Rng::seed_from_u64(42);
    let sched = LrSchedule {
        base: 3e-3,
        warmup: 20,
        total: args.steps,
    };
    let mut step: u64 = 0;

    let t0 = Instant::now();
    match ckpt::burn::restore(&ckpt, model.clone(), optim.clone())? {
        Some(back) => {
            step = back.restored.step;
            loader = back.restored.loop_state.data_loader()?;
            rng = back.restored.loop_state.rng()?;
            let _: LrSchedule = back.restored.loop_state.lr_schedule()?;
            say(format!(
                "resumed from step {} on {} in {:.1} ms ({} bytes verified)",
                back.restored.step,
                back.restored.tier,
                ms(t0.elapsed()),
                back.restored.bytes_read
            ));
            model = back.model;
            optim = back.optimizer;
        }
        None => say("no checkpoint found: starting fresh".to_string()),
    }
    let first = BurnSnapshot::capture(&model, &optim)?;
    say(format!(
        "burn 0.22 MLP {IN}-{w}-{w}-1 with Adam: {} tensors, {:.2} MiB with the optimizer state; checkpoints in {}",
        first.tensor_names().len(),
        first.nbytes() as f64 / (1 << 20) as f64,
        args.dir,
        w = args.hidden,
    ));
    drop(first);
    say(format!("schedule: {}", ckpt.explain_schedule()));

    let mut pending: VecDeque<SaveHandle> = VecDeque::new();
    // --background-capture: a capture under way, with the step and loop
    // state it belongs to, and how long the loop stopped to start it.
    let mut capturing: Option<(PendingSnapshot, u64, Rng, Loader, Duration)> = None;
    while step < args.steps {
        if capturing.as_ref().is_some_and(|c| c.0.is_ready())
            && let Some((snap, at, rng_at, loader_at, started)) = capturing.take()
        {
            let snap = snap.wait()?;
            let h = save(&ckpt, &snap, (at, &rng_at, &loader_at, &sched))?;
            say(format!(
                "step {at:>5}  save: captured in the background (the loop stopped {:.2} ms to start it) + math-stop {:.2} ms for {:.2} MiB",
                ms(started),
                ms(h.math_stop()),
                snap.nbytes() as f64 / (1 << 20) as f64
            ));
            pending.push_back(h);
        }
        let batch = loader.next_batch(0, 1, BATCH);
        let mut xs = Vec::with_capacity(BATCH * IN);
        let mut ys = Vec::with_capacity(BATCH);
        for (x, y) in &batch {
            xs.extend_from_slice(x);
            // Label noise from the checkpointed RNG.
            ys.push(y + 0.01 * common::data::symmetric(&mut rng));
        }
        let x = Tensor::<2>::from_data(TensorData::new(xs, [BATCH, IN]), &device);
        let y = Tensor::<2>::from_data(TensorData::new(ys, [BATCH, 1]), &device);
        let loss = (model.forward(x) - y).square().mean();
        let loss_value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(f64::from(sched.at(step)), model, grads);
        step += 1;
        if step.is_multiple_of(50) {
            say(format!("step {step:>5}  loss {loss_value:.5}"));
        }
        while pending.front().is_some_and(SaveHandle::is_done) {
            if let Some(h) = pending.pop_front() {
                report(&h, &say);
            }
        }
        let due = match args.every {
            Some(n) => step.is_multiple_of(n),
            None => ckpt.should_save(step),
        };
        if (due || step == args.steps) && args.background_capture && step < args.steps {
            // Only one capture at a time: a due save while one is under way
            // is left to the next interval.
            if capturing.is_none() {
                let t = Instant::now();
                let c = BurnSnapshot::capture_in_background(model.clone(), optim.clone())?;
                capturing = Some((c, step, rng.clone(), loader.clone(), t.elapsed()));
            }
        } else if due || step == args.steps {
            // The training loop waits for the capture (burn's tensors read
            // to host memory) and the save call; the flush runs behind.
            let t = Instant::now();
            let snap = BurnSnapshot::capture(&model, &optim)?;
            let capture = t.elapsed();
            let h = save(&ckpt, &snap, (step, &rng, &loader, &sched))?;
            say(format!(
                "step {step:>5}  save: capture {:.2} ms + math-stop {:.2} ms for {:.2} MiB",
                ms(capture),
                ms(h.math_stop()),
                snap.nbytes() as f64 / (1 << 20) as f64
            ));
            pending.push_back(h);
        }
        if args.crash_at_step == Some(step) {
            say(format!(
                "step {step:>5}  crashing on purpose (abort), a save may be in flight"
            ));
            if let Err(e) = ckpt.record_crash(step) {
                eprintln!("burn_train: cannot record the crash: {e}");
            }
            std::process::abort();
        }
    }
    // A capture still under way is abandoned: the last step is saved
    // inline above.
    drop(capturing);
    for h in pending.drain(..) {
        report(&h, &say);
    }
    ckpt.close();

    // Every parameter, every Adam moment, and the loop state.
    let snap = BurnSnapshot::capture(&model, &optim)?;
    let mut h = blake3::Hasher::new();
    for t in snap.tensors() {
        use ckpt::TensorView;
        h.update(t.spec().name.as_bytes());
        if let ckpt::TensorBytes::Shared(b) = t.bytes() {
            h.update(&b);
        }
    }
    h.update(&serde_json::to_vec(&(&rng, &loader))?);
    println!("final-state-blake3: {}", h.finalize().to_hex());
    Ok(())
}

/// Saves `snap` as step `step` with its loop state.
fn save(
    ckpt: &Checkpointer,
    snap: &BurnSnapshot,
    (step, rng, loader, sched): (u64, &Rng, &Loader, &LrSchedule),
) -> ckpt::Result<SaveHandle> {
    let state = snap
        .state(step)
        .rng(rng)
        .data_loader(loader)
        .lr_schedule(sched)
        .build()?;
    ckpt.save(&state)
}

fn report(h: &SaveHandle, say: &dyn Fn(String)) {
    let result = h.wait();
    let r = h.report();
    match result {
        Ok(_) => say(format!(
            "step {:>5}  durable in {:.1} ms",
            r.step,
            ms(r.total)
        )),
        Err(e) => say(format!("step {:>5}  save failed: {e}", r.step)),
    }
}
