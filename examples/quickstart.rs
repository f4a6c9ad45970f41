//! Quickstart: a real training loop (a two-layer MLP with Adam on synthetic
//! regression data) that checkpoints asynchronously to a local directory,
//! can crash on purpose, and resumes bit-exactly.
//!
//! ```text
//! cargo run --release --example quickstart -- --dir /tmp/ckpt-demo --steps 300 --crash-at-step 170
//! cargo run --release --example quickstart -- --dir /tmp/ckpt-demo --steps 300   # resumes
//! cargo run --release --example quickstart -- --dir /tmp/ckpt-fresh --steps 300  # same final digest
//! ```

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::Instant;

use ckpt::rng::Rng;
use ckpt::schedule::{Policy, SchedulerConfig, parse_duration};
use ckpt::{BusyPolicy, Checkpointer, SaveHandle, TensorMut, TensorRef, TierPolicy};
use clap::Parser;

mod common;

use common::data::{Loader, LrSchedule};
use common::model::{Shard, as_targets};
use common::ms;

/// Samples per step.
const BATCH: usize = 32;

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
    /// Frozen parameter megabytes (`frozen.tower`: a model tensor training
    /// never changes, as in fine-tuning), saved with everything else.
    #[arg(long, default_value_t = 0)]
    frozen_mb: u64,
    /// Incremental saves: each tier writes only the chunks that changed
    /// since its previous save (a whole save every 8).
    #[arg(long)]
    incremental: bool,
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
    /// Overlapped saves: the copy of step t's state runs during step t+1's
    /// forward and backward pass (`Checkpointer::save_overlapped`); the
    /// loop waits only for what is not hidden.
    #[arg(long)]
    overlap: bool,
}

fn main() -> ExitCode {
    common::init_logging();
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
    let mut rng = Rng::seed_from_u64(42);
    let mut model = Shard::new(0, 1, args.state_mb)?;
    let mut frozen = frozen_tower(args.frozen_mb);
    let tier_policy = |p: TierPolicy| {
        if args.incremental {
            p.incremental(8)
        } else {
            p
        }
    };
    let mut builder = Checkpointer::builder(args.run.clone())
        .tier(tier, tier_policy(TierPolicy::keep_last(args.keep)))
        .schedule(schedule)
        .when_busy(busy)
        // Allocated, pre-faulted and locked once, here, not inside a save.
        .staging_capacity(model.nbytes() + 4 * frozen.len() as u64);
    if let Some(m) = &args.mirror {
        builder = builder.tier(
            ckpt::open_location(m)?,
            tier_policy(TierPolicy::keep_last(args.keep).every(args.mirror_every)),
        );
    }
    let ckpt = builder.build()?;

    let mut loader = Loader::new(10_000);
    let sched = LrSchedule {
        base: 3e-3,
        warmup: 20,
        total: args.steps,
    };
    let mut step: u64 = 0;
    out.say(format!(
        "state: {} tensors, {:.1} MiB (params + Adam m + v); checkpoints in {}{}",
        model.tensor_count(),
        model.nbytes() as f64 / (1 << 20) as f64,
        args.dir,
        args.mirror
            .as_ref()
            .map(|m| format!(" and {m}"))
            .unwrap_or_default()
    ));

    // Resume from the newest verified checkpoint, if any.
    {
        let mut targets = model.targets();
        let frozen_len = frozen.len() as u64;
        if frozen_len > 0 {
            targets.push(TensorMut::from_slice(
                "frozen.tower",
                &[frozen_len],
                &mut frozen,
            ));
        }
        let mut refs = as_targets(&mut targets);
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
    // With --overlap: a save of the current step waits for the next
    // step's forward and backward pass to run beside its copy.
    let mut overlap_due = false;
    while step < args.steps {
        let step_start = Instant::now();
        let lr = sched.at(step);
        let loss = if overlap_due {
            overlap_due = false;
            // The loop state of `step` (serialized as the state is built),
            // before this step's batch is drawn.
            let (rng_at, loader_at) = (rng.clone(), loader.clone());
            let batch = loader.next_batch(0, 1, BATCH);
            let (h, (loss, grads)) = with_state(
                &model,
                &frozen,
                (step, &rng_at, &loader_at, &sched),
                |state| {
                    // Forward and backward read the parameters being
                    // copied; the update below may change them only once
                    // the copy is done.
                    let (h, r) = ckpt.save_overlapped(state, || {
                        let r = model.backward(&batch, &mut rng);
                        // --step-ms stands for an accelerator's forward
                        // and backward.
                        if let Some(rest) = std::time::Duration::from_millis(args.step_ms)
                            .checked_sub(step_start.elapsed())
                        {
                            std::thread::sleep(rest);
                        }
                        r
                    });
                    Ok((h?, r))
                },
            )?;
            announce(&h, &out);
            model.update(&grads, lr, step + 1);
            pending.push_back(h);
            loss
        } else {
            let batch = loader.next_batch(0, 1, BATCH);
            model.train_step(&batch, lr, step + 1, &mut rng)
        };
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
        if due && args.overlap && step < args.steps {
            overlap_due = true;
        } else if due || step == args.steps {
            let h = with_state(&model, &frozen, (step, &rng, &loader, &sched), |state| {
                ckpt.save(state)
            })?;
            announce(&h, &out);
            pending.push_back(h);
        }
        if args.crash_at_step == Some(step) {
            out.say(format!(
                "step {step:>5}  crashing on purpose (abort), a save may be in flight"
            ));
            // As a fatal-error path would: the failure log learns the step
            // and time lost (`ckpt report`); a SIGKILL records nothing.
            if let Err(e) = ckpt.record_crash(step) {
                eprintln!("quickstart: cannot record the crash: {e}");
            }
            std::process::abort();
        }
    }
    for h in pending.drain(..) {
        report_durable(&h, &out, None);
    }
    let failed = ckpt.saves_failed_in_a_row();
    ckpt.close();
    let mut digest = model.digest(&(&rng, &loader));
    if !frozen.is_empty() {
        let mut h = blake3::Hasher::new();
        h.update(digest.as_bytes());
        h.update(ckpt::as_bytes(&frozen));
        digest = h.finalize().to_hex().to_string();
    }
    println!("final-state-blake3: {digest}");
    out.event("final", serde_json::json!({"step": step, "digest": digest}));
    // The training went to the end; a run whose last saves all failed must
    // not end as if its state were kept.
    if failed > 0 {
        return Err(format!(
            "the last {failed} save(s), the final one included, committed on no tier: no checkpoint of step {step} exists"
        )
        .into());
    }
    Ok(())
}

/// Builds the state of the model (and the frozen tower, if any) at `step`
/// with its loop state, and hands it to `f`.
fn with_state<R>(
    model: &Shard,
    frozen: &[f32],
    (step, rng, loader, sched): (u64, &Rng, &Loader, &LrSchedule),
    f: impl FnOnce(&ckpt::TrainingState<'_>) -> ckpt::Result<R>,
) -> ckpt::Result<R> {
    let views = model.views();
    let tower = TensorRef::from_slice("frozen.tower", &[frozen.len() as u64], frozen);
    let state = Shard::state_with_frozen(
        &views,
        (!frozen.is_empty()).then_some(&tower),
        step,
        rng,
        loader,
        sched,
    )?;
    f(&state)
}

/// Says a save was made: its math-stop (and, overlapped, the copy it hid).
fn announce(h: &SaveHandle, out: &Out) {
    let r = h.report();
    let nbytes = r.bytes;
    out.say(format!(
        "step {:>5}  save: math-stop {:.2} ms for {:.1} MiB{}{}",
        r.step,
        ms(r.math_stop),
        nbytes as f64 / (1 << 20) as f64,
        if r.overlapped {
            format!(" (overlapped: copy {:.2} ms)", ms(r.copy))
        } else {
            String::new()
        },
        if r.skipped {
            " (skipped: the staging pool is still held by an earlier flush)".to_string()
        } else if r.waited.is_zero() {
            String::new()
        } else {
            format!(
                " (of which {:?} waiting for staging blocks a flush still held)",
                r.waited
            )
        }
    ));
    out.event(
        "save",
        serde_json::json!({"step": r.step, "math_stop_ms": ms(r.math_stop),
            "copy_ms": ms(r.copy), "overlapped": r.overlapped,
            "waited_ms": ms(r.waited), "skipped": r.skipped, "bytes": r.bytes}),
    );
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
                "durable_ms": ms(t.durable_at.unwrap_or(r.math_stop + t.flush + t.commit)),
                "written": t.written,
                "referenced": t.referenced,
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
                        "step {:>5}  durable on {}: flush {:.1} ms, commit {:.1} ms, wrote {:.1} MiB{}",
                        r.step,
                        t.tier,
                        ms(t.flush),
                        ms(t.commit),
                        t.written as f64 / (1 << 20) as f64,
                        if t.referenced > 0 {
                            format!(
                                " ({:.1} MiB unchanged, not written again)",
                                t.referenced as f64 / (1 << 20) as f64
                            )
                        } else {
                            String::new()
                        }
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

/// `mb` megabytes of frozen parameters, the same in every run.
fn frozen_tower(mb: u64) -> Vec<f32> {
    let n = (mb << 20) / 4;
    let mut z = 0xF0_2E_17u64;
    (0..n)
        .map(|_| ((ckpt::rng::splitmix64(&mut z) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02)
        .collect()
}
