//! Quickstart: a real training loop (a two-layer MLP with Adam on synthetic
//! regression data) that checkpoints asynchronously to a local directory,
//! can crash on purpose, and resumes bit-exactly.
//!
//! ```text
//! cargo run --release --example quickstart -- --dir /tmp/ckpt-demo --steps 300 --crash-at-step 170
//! cargo run --release --example quickstart -- --dir /tmp/ckpt-demo --steps 300   # resumes
//! cargo run --release --example quickstart -- --dir /tmp/ckpt-fresh --steps 300  # same final digest
//! ```

// Index loops read like the math they implement (forward/backward, Adam).
#![allow(clippy::needless_range_loop)]

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::Instant;

use ckpt::schedule::{Policy, SchedulerConfig};
use ckpt::{
    BusyPolicy, Checkpointer, SaveHandle, TensorMut, TensorRef, TensorView, TierPolicy,
    TrainingState,
};
use clap::Parser;
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "Train a small MLP with async checkpoints, crash, and resume bit-exactly")]
struct Args {
    /// Where checkpoints go: a directory (or s3://bucket/prefix).
    #[arg(long)]
    dir: String,
    /// Total training steps.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Save every N steps. Without it, the interval comes from the
    /// scheduler (`--policy`), fed with measured save times.
    #[arg(long)]
    every: Option<u64>,
    /// Interval policy when `--every` is not given: availability, young,
    /// daly.
    #[arg(long, default_value = "availability")]
    policy: String,
    /// Prior MTBF of the whole job for the scheduler (s/m/h). Short by
    /// default so a demo run saves several times.
    #[arg(long, default_value = "2m")]
    mtbf: String,
    /// Expected restart time for the scheduler (s/m/h); replaced by the
    /// measured one after a restore.
    #[arg(long, default_value = "5s")]
    restart: String,
    /// Extra parameter megabytes (an embedding table updated every step),
    /// so saves move a realistic amount of state.
    #[arg(long, default_value_t = 64)]
    state_mb: u64,
    /// Abort the process right after this step, as a killed job would.
    #[arg(long)]
    crash_at_step: Option<u64>,
    /// Run name inside the location.
    #[arg(long, default_value = "quickstart")]
    run: String,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// A second tier every save also goes to (e.g. s3://bucket/prefix
    /// behind a local --dir): each tier commits on its own.
    #[arg(long)]
    mirror: Option<String>,
    /// Send only every N-th save to --mirror.
    #[arg(long, default_value_t = 1)]
    mirror_every: u64,
    /// Make every training step take at least this many milliseconds, as
    /// a step whose compute runs on an accelerator would.
    #[arg(long, default_value_t = 0)]
    step_ms: u64,
    /// What a save does when the staging pool is still held by an earlier
    /// flush: wait (the wait is part of the math-stop) or skip.
    #[arg(long, default_value = "wait")]
    when_busy: String,
    /// Print one JSON object per event (restore, save, durable, final)
    /// instead of text.
    #[arg(long)]
    json: bool,
    /// Print nothing but the final digest.
    #[arg(long)]
    quiet: bool,
}

const IN: usize = 32;
const HID: usize = 64;
const BATCH: usize = 32;

/// xoshiro256** (Blackman & Vigna): small, fast, and its whole state is
/// four words we can checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn seeded(seed: u64) -> Self {
        let mut z = seed;
        let mut s = [0u64; 4];
        for x in &mut s {
            // splitmix64
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut r = z;
            r = (r ^ (r >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            r = (r ^ (r >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *x = r ^ (r >> 31);
        }
        Self { s }
    }
    fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// The data loader's position: which sample comes next, in which epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Loader {
    epoch: u64,
    cursor: u64,
    dataset_len: u64,
}

impl Loader {
    /// The next batch: samples are a pure function of their index, as if
    /// read from a shuffled file.
    fn next_batch(&mut self) -> Vec<([f32; IN], f32)> {
        let mut out = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let idx = self.epoch * 1_000_003 + self.cursor;
            let mut r = Rng::seeded(idx);
            let mut x = [0f32; IN];
            for v in &mut x {
                *v = r.uniform();
            }
            let y = (x
                .iter()
                .enumerate()
                .map(|(i, v)| v * ((i % 5) as f32 - 2.0) * 0.3)
                .sum::<f32>())
            .sin();
            out.push((x, y));
            self.cursor += 1;
            if self.cursor == self.dataset_len {
                self.cursor = 0;
                self.epoch += 1;
            }
        }
        out
    }
}

/// Warm-up then cosine decay.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LrSchedule {
    base: f32,
    warmup: u64,
    total: u64,
}

impl LrSchedule {
    fn at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let p =
            (step - self.warmup) as f32 / (self.total.saturating_sub(self.warmup)).max(1) as f32;
        self.base * 0.5 * (1.0 + (std::f32::consts::PI * p.min(1.0)).cos())
    }
}

/// Parameters and Adam moments, one flat buffer each, named.
struct Model {
    names: Vec<(&'static str, Vec<u64>)>,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Model {
    fn new(rng: &mut Rng, extra_mb: u64) -> Self {
        let emb_rows = (extra_mb * (1 << 20) / 4 / HID as u64).max(1);
        let names = vec![
            ("mlp.w1", vec![HID as u64, IN as u64]),
            ("mlp.b1", vec![HID as u64]),
            ("mlp.w2", vec![HID as u64]),
            ("mlp.b2", vec![1]),
            ("emb.table", vec![emb_rows, HID as u64]),
        ];
        let params: Vec<Vec<f32>> = names
            .iter()
            .map(|(n, shape)| {
                let len = shape.iter().product::<u64>() as usize;
                let scale = if n.ends_with('1') && n.contains(".w") {
                    (1.0 / IN as f32).sqrt()
                } else {
                    0.1
                };
                (0..len).map(|_| rng.uniform() * scale).collect()
            })
            .collect();
        let zeros: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.len()]).collect();
        Self {
            names,
            params,
            m: zeros.clone(),
            v: zeros,
        }
    }

    /// One step of forward, backward and Adam. Returns the loss.
    fn train_step(&mut self, batch: &[([f32; IN], f32)], lr: f32, t: u64, rng: &mut Rng) -> f32 {
        let mut grads: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0f32; p.len()]).collect();
        let mut loss = 0f32;
        for (x, y) in batch {
            let mut h = [0f32; HID];
            for j in 0..HID {
                let mut a = self.params[1][j];
                for i in 0..IN {
                    a += self.params[0][j * IN + i] * x[i];
                }
                h[j] = a.max(0.0);
            }
            let out: f32 =
                self.params[3][0] + (0..HID).map(|j| self.params[2][j] * h[j]).sum::<f32>();
            let d = out - y;
            loss += d * d / batch.len() as f32;
            let g = 2.0 * d / batch.len() as f32;
            grads[3][0] += g;
            for j in 0..HID {
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
        // The embedding table: a few rows picked by the RNG get a small
        // update, like sparse embedding gradients.
        let rows = self.params[4].len() / HID;
        for _ in 0..4 {
            let r = (rng.next_u64() % rows as u64) as usize;
            for j in 0..HID {
                grads[4][r * HID + j] += rng.uniform() * 1e-3;
            }
        }
        // Adam (Kingma & Ba 2015).
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for k in 0..self.params.len() {
            let (p, m, v, g) = (
                &mut self.params[k],
                &mut self.m[k],
                &mut self.v[k],
                &grads[k],
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
        loss
    }

    fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        for buf in self.params.iter().chain(&self.m).chain(&self.v) {
            h.update(ckpt::as_bytes(buf));
        }
        h.finalize().to_hex().to_string()
    }

    fn nbytes(&self) -> u64 {
        self.params.iter().map(|p| p.len() as u64 * 12).sum()
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90s, 5m or 2h"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in `{s}`")),
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the run prints: text lines, or one JSON object per event.
struct Out {
    quiet: bool,
    json: bool,
    start: Instant,
}

impl Out {
    fn say(&self, s: String) {
        if !self.quiet && !self.json {
            println!("{s}");
        }
    }

    fn event(&self, kind: &str, mut v: serde_json::Value) {
        if self.json {
            v["event"] = kind.into();
            v["t_ms"] = (self.start.elapsed().as_secs_f64() * 1e3).into();
            println!("{v}");
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let out = Out {
        quiet: args.quiet,
        json: args.json,
        start: Instant::now(),
    };
    let tier = ckpt::open_location(&args.dir)?;
    let policy = match (args.every, args.policy.as_str()) {
        (Some(n), _) => Policy::FixedSteps(n),
        (None, "availability") => Policy::Availability,
        (None, "young") => Policy::Young,
        (None, "daly") => Policy::Daly,
        (None, other) => {
            return Err(format!("unknown --policy `{other}` (availability, young, daly)").into());
        }
    };
    let busy = match args.when_busy.as_str() {
        "wait" => BusyPolicy::Wait,
        "skip" => BusyPolicy::Skip,
        other => return Err(format!("unknown --when-busy `{other}` (wait, skip)").into()),
    };
    let schedule = SchedulerConfig::new(policy, parse_duration(&args.mtbf)?)
        .with_restart(parse_duration(&args.restart)?)
        .with_initial_interval(std::time::Duration::from_secs(1))
        .with_min_interval(std::time::Duration::from_millis(500));
    let mut rng = Rng::seeded(42);
    let mut model = Model::new(&mut rng, args.state_mb);
    let mut builder = Checkpointer::builder(args.run.clone())
        .tier(tier, TierPolicy::keep_last(args.keep))
        .schedule(schedule)
        .when_busy(busy)
        // Allocated, pre-faulted and locked once, here, not inside a save.
        .staging_capacity(model.nbytes());
    if let Some(m) = &args.mirror {
        builder = builder.tier(
            ckpt::open_location(m)?,
            TierPolicy::keep_last(args.keep).every(args.mirror_every),
        );
    }
    let ckpt = builder.build()?;

    let mut loader = Loader {
        epoch: 0,
        cursor: 0,
        dataset_len: 10_000,
    };
    let sched = LrSchedule {
        base: 3e-3,
        warmup: 20,
        total: args.steps,
    };
    let mut step: u64 = 0;
    out.say(format!(
        "state: {} tensors, {:.1} MiB (params + Adam m + v); checkpoints in {}{}",
        model.names.len() * 3,
        model.nbytes() as f64 / (1 << 20) as f64,
        args.dir,
        args.mirror
            .as_ref()
            .map(|m| format!(" and {m}"))
            .unwrap_or_default()
    ));

    // Resume from the newest verified checkpoint, if any.
    {
        let Model {
            names,
            params,
            m,
            v,
        } = &mut model;
        let mut targets: Vec<TensorMut<'_>> = Vec::new();
        for (((name, shape), p), (mm, vv)) in names
            .iter()
            .zip(params.iter_mut())
            .zip(m.iter_mut().zip(v.iter_mut()))
        {
            targets.push(TensorMut::from_slice(*name, shape, p));
            targets.push(TensorMut::from_slice(format!("adam.m.{name}"), shape, mm));
            targets.push(TensorMut::from_slice(format!("adam.v.{name}"), shape, vv));
        }
        let mut refs: Vec<&mut dyn ckpt::TensorViewMut> =
            targets.iter_mut().map(|t| t as _).collect();
        let t0 = Instant::now();
        if let Some(r) = ckpt.restore(&mut refs)? {
            step = r.step;
            rng = r.loop_state.rng()?;
            loader = r.loop_state.data_loader()?;
            let _: LrSchedule = r.loop_state.lr_schedule()?;
            out.say(format!(
                "resumed from step {} on {} in {:.1} ms ({} bytes verified){}",
                r.step,
                r.tier,
                ms(t0.elapsed()),
                r.bytes_read,
                if r.skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; skipped: {}",
                        r.skipped
                            .iter()
                            .map(|s| format!("step {:?}: {}", s.step, s.error))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            ));
            out.event(
                "restored",
                serde_json::json!({"step": r.step, "tier": r.tier, "ms": ms(t0.elapsed()),
                    "bytes": r.bytes_read,
                    "skipped": r.skipped.iter().map(|s| serde_json::json!({"step": s.step, "tier": s.tier, "reason": s.error.to_string()})).collect::<Vec<_>>()}),
            );
        } else {
            out.say("no checkpoint found: starting fresh".to_string());
            out.event("fresh", serde_json::json!({}));
        }
    }

    out.say(format!("schedule: {}", ckpt.explain_schedule()));
    // Saves whose flush is still running: reported when done, without
    // ever waiting for them in the loop.
    let mut pending: VecDeque<SaveHandle> = VecDeque::new();
    while step < args.steps {
        let step_start = Instant::now();
        let batch = loader.next_batch();
        let lr = sched.at(step);
        let loss = model.train_step(&batch, lr, step + 1, &mut rng);
        step += 1;
        if let Some(rest) =
            std::time::Duration::from_millis(args.step_ms).checked_sub(step_start.elapsed())
        {
            std::thread::sleep(rest);
        }
        if step.is_multiple_of(50) {
            out.say(format!("step {step:>5}  loss {loss:.5}  lr {lr:.2e}"));
        }
        while pending.front().is_some_and(SaveHandle::is_done) {
            if let Some(h) = pending.pop_front() {
                report_durable(&h, &out, args.every.is_none().then_some(&ckpt));
            }
        }
        let due = match args.every {
            Some(n) => step.is_multiple_of(n),
            None => ckpt.should_save(step),
        };
        if due || step == args.steps {
            let views: Vec<(TensorRef<'_>, TensorRef<'_>, TensorRef<'_>)> = model
                .names
                .iter()
                .enumerate()
                .map(|(k, (name, shape))| {
                    (
                        TensorRef::from_slice(*name, shape, &model.params[k]),
                        TensorRef::from_slice(format!("adam.m.{name}"), shape, &model.m[k]),
                        TensorRef::from_slice(format!("adam.v.{name}"), shape, &model.v[k]),
                    )
                })
                .collect();
            let state = TrainingState::builder(step)
                .model(views.iter().map(|(p, _, _)| p as &dyn TensorView))
                .optimizer(
                    views
                        .iter()
                        .flat_map(|(_, m, v)| [m as &dyn TensorView, v as &dyn TensorView]),
                )
                .rng(&rng)
                .data_loader(&loader)
                .lr_schedule(&sched)
                .build()?;
            let h = ckpt.save(&state)?;
            let r = h.report();
            out.say(format!(
                "step {step:>5}  save: math-stop {:.2} ms for {:.1} MiB{}",
                ms(h.math_stop()),
                state.nbytes() as f64 / (1 << 20) as f64,
                if r.skipped {
                    " (skipped: the staging pool is still held by an earlier flush)".to_string()
                } else if r.waited.is_zero() {
                    String::new()
                } else {
                    format!(" (waited {:?} for the previous flush)", r.waited)
                }
            ));
            out.event(
                "save",
                serde_json::json!({"step": step, "math_stop_ms": ms(r.math_stop),
                    "waited_ms": ms(r.waited), "skipped": r.skipped, "bytes": r.bytes}),
            );
            pending.push_back(h);
        }
        if args.crash_at_step == Some(step) {
            out.say(format!(
                "step {step:>5}  crashing on purpose (abort), a save may be in flight"
            ));
            std::process::abort();
        }
    }
    for h in pending.drain(..) {
        report_durable(&h, &out, None);
    }
    ckpt.close();
    println!("final-state-blake3: {}", model.digest());
    out.event(
        "final",
        serde_json::json!({"step": step, "digest": model.digest()}),
    );
    Ok(())
}

/// Reports a finished save (waits for it if it is not finished).
fn report_durable(h: &SaveHandle, out: &Out, schedule: Option<&Checkpointer>) {
    let result = h.wait();
    let r = h.report();
    let tiers: Vec<serde_json::Value> = r
        .tiers
        .iter()
        .map(|t| {
            serde_json::json!({
                "tier": t.tier,
                "committed": t.committed,
                "flush_ms": ms(t.flush),
                "commit_ms": ms(t.commit),
                "durable_ms": ms(r.math_stop + t.flush + t.commit),
                "error": t.error.as_ref().map(ToString::to_string),
                "error_kind": t.error.as_ref().map(ckpt::Error::kind),
                "storage_full": t.error.as_ref().is_some_and(ckpt::Error::is_storage_full),
            })
        })
        .collect();
    out.event(
        "durable",
        serde_json::json!({"step": r.step, "skipped": r.skipped, "tiers": tiers,
            "error": result.as_ref().err().map(ToString::to_string),
            "error_kind": result.as_ref().err().map(ckpt::Error::kind)}),
    );
    match result {
        Ok(r) if r.skipped => {}
        Ok(r) => {
            for t in &r.tiers {
                match &t.error {
                    None => out.say(format!(
                        "step {:>5}  durable on {}: flush {:.1} ms, commit {:.1} ms",
                        r.step,
                        t.tier,
                        ms(t.flush),
                        ms(t.commit)
                    )),
                    Some(e) => out.say(format!("step {:>5}  not saved on {}: {e}", r.step, t.tier)),
                }
            }
        }
        Err(e) => out.say(format!("step {:>5}  save failed: {e}", h.step())),
    }
    if let Some(c) = schedule {
        out.say(format!("             schedule: {}", c.explain_schedule()));
    }
}
