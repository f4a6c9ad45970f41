//! Discrete-event simulation of a synchronous training job with periodic
//! checkpoints and random failures.
//!
//! Model (all workers roll back together on any failure):
//! * the job must complete `total_steps` steps of `step_time_s` each;
//! * a checkpoint is taken every `interval` steps and after the last step;
//!   it costs `ckpt_cost_s`, of which the fraction `blocking_fraction` f
//!   stops the job (the exposed part) while the rest runs in the
//!   background; a checkpoint becomes *durable* (usable for recovery)
//!   only when the whole cost has elapsed. A checkpoint cannot start before
//!   the previous one is durable (the job stalls, counted as checkpoint
//!   time), and the final checkpoint is fully blocking;
//! * failures form a Poisson process in wall time with mean `mtbf_s`; they
//!   can strike during computation, checkpointing and restart. A failure
//!   discards non-durable checkpoints, rolls back to the newest durable one
//!   and costs a restart of `restart_s`, which starts over if a failure
//!   strikes during it.
//!
//! The simulation is event driven: it draws the next failure time instead
//! of flipping a coin per step, so its cost is proportional to the number
//! of checkpoints and failures, not steps.
//!
//! With f = 1 each segment of W = interval·step_time seconds of work and
//! its checkpoint C is an independent renewal, and its expected duration
//! is `ckpt_core::schedule::expected_segment_time`
//! M·e^{R/M}·(e^{(W+C)/M} − 1), which the tests check the simulator
//! against.

use serde::Serialize;

use ckpt_core::rng::Rng;
use ckpt_core::schedule::ScheduleError;

/// Why a simulation could not be set up or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// A parameter is out of its domain.
    #[error(transparent)]
    Invalid(#[from] ScheduleError),
    /// A simulated run saw more failures than the safety cap; the
    /// parameters make progress practically impossible.
    #[error(
        "simulation gave up after {0} failures in one run: failures are too frequent for the chosen interval to make progress"
    )]
    TooManyFailures(u64),
}

fn invalid(name: &'static str, reason: impl Into<String>) -> SimError {
    SimError::Invalid(ScheduleError::invalid(name, reason))
}

/// Safety cap on failures in one simulated run.
pub const MAX_FAILURES_PER_RUN: u64 = 10_000_000;

/// Parameters of the simulated job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SimParams {
    /// Steps to complete (≥ 1).
    pub total_steps: u64,
    /// Duration of one step, seconds (> 0).
    pub step_time_s: f64,
    /// Full cost of one checkpoint, seconds (≥ 0).
    pub ckpt_cost_s: f64,
    /// Restart time after a failure, seconds (≥ 0).
    pub restart_s: f64,
    /// Job MTBF, seconds (> 0, may be infinite).
    pub mtbf_s: f64,
    /// Fraction of the checkpoint cost that blocks the job, in [0, 1].
    pub blocking_fraction: f64,
}

impl SimParams {
    /// Checks every parameter's domain.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.total_steps == 0 {
            return Err(invalid("total_steps", "must be at least 1"));
        }
        let finite_nonneg = |name, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    name,
                    format!("must be a finite number ≥ 0, got {v}"),
                ))
            }
        };
        finite_nonneg("ckpt_cost", self.ckpt_cost_s)?;
        finite_nonneg("restart", self.restart_s)?;
        if !(self.step_time_s.is_finite() && self.step_time_s > 0.0) {
            return Err(invalid(
                "step_time",
                format!("must be positive and finite, got {}", self.step_time_s),
            ));
        }
        if self.mtbf_s.is_nan() || self.mtbf_s <= 0.0 {
            return Err(invalid(
                "mtbf",
                format!("must be positive, got {}", self.mtbf_s),
            ));
        }
        if !(0.0..=1.0).contains(&self.blocking_fraction) {
            return Err(invalid(
                "blocking_fraction",
                format!("must lie in [0, 1], got {}", self.blocking_fraction),
            ));
        }
        Ok(())
    }

    /// Exposed (blocking) part of a checkpoint, f·C: the δ of the formulas.
    pub fn exposed_cost_s(&self) -> f64 {
        self.blocking_fraction * self.ckpt_cost_s
    }

    /// Useful computation time, total_steps × step_time.
    pub fn useful_s(&self) -> f64 {
        self.total_steps as f64 * self.step_time_s
    }
}

/// Where the wall time of one simulated run went.
/// `wall_s = useful_s + checkpoint_s + wasted_s + restart_s`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct RunOutcome {
    /// Total wall time, seconds.
    pub wall_s: f64,
    /// Computation that survived: total_steps × step_time.
    pub useful_s: f64,
    /// Time the job was blocked by checkpoints (exposed parts and stalls,
    /// including checkpoints later lost).
    pub checkpoint_s: f64,
    /// Computation lost to rollbacks.
    pub wasted_s: f64,
    /// Time spent restarting (including interrupted restarts).
    pub restart_s: f64,
    /// Number of failures.
    pub failures: u64,
    /// Number of checkpoints whose exposed part completed.
    pub checkpoints: u64,
}

impl RunOutcome {
    /// Useful time / wall time.
    pub fn efficiency(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.useful_s / self.wall_s
        } else {
            1.0
        }
    }
}

#[derive(Clone, Copy)]
enum Activity {
    Compute,
    Checkpoint,
    Restart,
}

struct Sim<'a, G: FnMut() -> f64> {
    p: &'a SimParams,
    next_gap: G,
    t: f64,
    next_fail: f64,
    compute_s: f64,
    out: RunOutcome,
}

impl<G: FnMut() -> f64> Sim<'_, G> {
    /// Spends `d` seconds on `a`. Returns `Ok(false)` if a failure struck
    /// first (the clock is then at the failure).
    fn spend(&mut self, d: f64, a: Activity) -> Result<bool, SimError> {
        let end = self.t + d;
        let (done, ok) = if self.next_fail < end {
            (self.next_fail - self.t, false)
        } else {
            (d, true)
        };
        match a {
            Activity::Compute => self.compute_s += done,
            Activity::Checkpoint => self.out.checkpoint_s += done,
            Activity::Restart => self.out.restart_s += done,
        }
        if ok {
            self.t = end;
        } else {
            self.t = self.next_fail;
            self.next_fail = self.t + (self.next_gap)();
            self.out.failures += 1;
            if self.out.failures > MAX_FAILURES_PER_RUN {
                return Err(SimError::TooManyFailures(MAX_FAILURES_PER_RUN));
            }
        }
        Ok(ok)
    }

    /// Restarts until a restart completes without failure.
    fn restart(&mut self) -> Result<(), SimError> {
        while !self.spend(self.p.restart_s, Activity::Restart)? {}
        Ok(())
    }
}

/// Runs the job once with checkpoints every `interval_steps` steps,
/// drawing failure inter-arrival gaps from `next_gap`.
fn run_with_gaps(
    p: &SimParams,
    interval_steps: u64,
    next_gap: impl FnMut() -> f64,
) -> Result<RunOutcome, SimError> {
    p.validate()?;
    if interval_steps == 0 {
        return Err(invalid("interval", "must be at least 1 step"));
    }
    let mut sim = Sim {
        p,
        next_gap,
        t: 0.0,
        next_fail: 0.0,
        compute_s: 0.0,
        out: RunOutcome::default(),
    };
    sim.next_fail = (sim.next_gap)();
    let total = p.total_steps;
    let exposed = p.exposed_cost_s();
    let background = p.ckpt_cost_s - exposed;
    let mut step = 0u64; // always a checkpoint boundary
    let mut durable = 0u64;
    let mut pending: Option<(u64, f64)> = None; // (step, durable at)

    loop {
        let ok = 'segment: {
            let b = step.saturating_add(interval_steps).min(total);
            if !sim.spend((b - step) as f64 * p.step_time_s, Activity::Compute)? {
                break 'segment false;
            }
            step = b;
            if let Some((s, at)) = pending {
                if at > sim.t && !sim.spend(at - sim.t, Activity::Checkpoint)? {
                    break 'segment false;
                }
                durable = s;
                pending = None;
            }
            let last = b == total;
            let blocking = if last { p.ckpt_cost_s } else { exposed };
            if !sim.spend(blocking, Activity::Checkpoint)? {
                break 'segment false;
            }
            sim.out.checkpoints += 1;
            if last || background <= 0.0 {
                durable = b;
            } else {
                pending = Some((b, sim.t + background));
            }
            true
        };
        if ok {
            if durable == total {
                break;
            }
            continue;
        }
        // A failure at sim.t: keep a pending checkpoint only if durable.
        if let Some((s, at)) = pending.take()
            && at <= sim.t
        {
            durable = s;
        }
        step = durable;
        sim.restart()?;
    }

    let mut out = sim.out;
    out.wall_s = sim.t;
    out.useful_s = p.useful_s();
    out.wasted_s = (sim.compute_s - out.useful_s).max(0.0);
    Ok(out)
}

/// Simulates one run with checkpoints every `interval_steps` steps and
/// exponential failure gaps drawn from `rng`.
///
/// ```text
/// use ckpt_core::schedule::{simulate_run, Rng, SimParams};
/// let p = SimParams { total_steps: 1000, step_time_s: 1.0, ckpt_cost_s: 10.0,
///     restart_s: 30.0, mtbf_s: f64::INFINITY, blocking_fraction: 1.0 };
/// let out = simulate_run(&p, 100, &mut Rng::seed_from_u64(1))?;
/// assert_eq!(out.wall_s, 1000.0 + 10.0 * 10.0);
/// assert_eq!(out.failures, 0);
/// # Ok::<(), ckpt_core::schedule::ScheduleError>(())
/// ```
pub fn simulate_run(
    params: &SimParams,
    interval_steps: u64,
    rng: &mut Rng,
) -> Result<RunOutcome, SimError> {
    let mtbf = params.mtbf_s;
    run_with_gaps(params, interval_steps, || rng.exponential(mtbf))
}

/// A sample mean with the half-width of its 95 % confidence interval
/// (Student t). `ci95` is NaN with fewer than two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanCi {
    /// Sample mean.
    pub mean: f64,
    /// Half-width of the 95 % confidence interval of the mean.
    pub ci95: f64,
}

/// Mean and 95 % confidence half-width t₀.₉₇₅,ₙ₋₁ · s / √n of `xs`.
///
/// ```text
/// use ckpt_core::schedule::mean_ci95;
/// let m = mean_ci95(&[1.0, 2.0, 3.0]);
/// assert_eq!(m.mean, 2.0);
/// assert!((m.ci95 - 4.302_652_73 / 3f64.sqrt()).abs() < 1e-6);
/// ```
pub fn mean_ci95(xs: &[f64]) -> MeanCi {
    let n = xs.len();
    if n == 0 {
        return MeanCi {
            mean: f64::NAN,
            ci95: f64::NAN,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return MeanCi {
            mean,
            ci95: f64::NAN,
        };
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    MeanCi {
        mean,
        ci95: student_t_975((n - 1) as u64) * (var / n as f64).sqrt(),
    }
}

/// 97.5 % quantile of Student's t distribution with `df` degrees of
/// freedom: exact table values for df ≤ 4, otherwise the Cornish–Fisher
/// expansion of Abramowitz & Stegun 26.7.5 (relative error < 2e-4).
/// `df == 0` gives infinity.
///
/// ```text
/// use ckpt_core::schedule::student_t_975;
/// assert!((student_t_975(49) - 2.0096).abs() < 1e-4);
/// ```
pub fn student_t_975(df: u64) -> f64 {
    const TABLE: [f64; 5] = [
        f64::INFINITY,
        12.706_204_736,
        4.302_652_730,
        3.182_446_305,
        2.776_445_105,
    ];
    if let Some(t) = TABLE.get(df as usize) {
        return *t;
    }
    let z = 1.959_963_984_540_054_f64;
    let v = df as f64;
    let z3 = z.powi(3);
    let z5 = z.powi(5);
    let z7 = z.powi(7);
    let z9 = z.powi(9);
    let g1 = (z3 + z) / 4.0;
    let g2 = (5.0 * z5 + 16.0 * z3 + 3.0 * z) / 96.0;
    let g3 = (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / 384.0;
    let g4 = (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z) / 92_160.0;
    z + g1 / v + g2 / (v * v) + g3 / v.powi(3) + g4 / v.powi(4)
}

/// Summary over seeds of the runs for one interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IntervalSummary {
    /// Checkpoint interval, steps.
    pub interval_steps: u64,
    /// Wall time, seconds.
    pub wall_s: MeanCi,
    /// Useful time / wall time.
    pub efficiency: MeanCi,
    /// 100 × (1 − efficiency): share of wall time not useful, percent.
    pub overhead_pct: MeanCi,
    /// Mean useful time, seconds.
    pub mean_useful_s: f64,
    /// Mean blocking checkpoint time, seconds.
    pub mean_checkpoint_s: f64,
    /// Mean computation lost to rollbacks, seconds.
    pub mean_wasted_s: f64,
    /// Mean restart time, seconds.
    pub mean_restart_s: f64,
    /// Mean number of failures per run.
    pub mean_failures: f64,
}

/// Simulates every interval in `intervals` for `seeds` runs each (seeds
/// `base_seed`, `base_seed + 1`, ...). The same seeds are used for every
/// interval; as failures are drawn in wall time independently of the
/// schedule, all intervals see the same failure times (common random
/// numbers), which sharpens comparisons between intervals.
pub fn sweep(
    params: &SimParams,
    intervals: &[u64],
    seeds: u64,
    base_seed: u64,
) -> Result<Vec<IntervalSummary>, SimError> {
    params.validate()?;
    if seeds == 0 {
        return Err(invalid("seeds", "must be at least 1"));
    }
    intervals
        .iter()
        .map(|&interval| {
            let runs = (0..seeds)
                .map(|i| {
                    simulate_run(
                        params,
                        interval,
                        &mut Rng::seed_from_u64(base_seed.wrapping_add(i)),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(summarize(interval, &runs))
        })
        .collect()
}

fn summarize(interval_steps: u64, runs: &[RunOutcome]) -> IntervalSummary {
    let col = |f: fn(&RunOutcome) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let mean = |f: fn(&RunOutcome) -> f64| mean_ci95(&col(f)).mean;
    IntervalSummary {
        interval_steps,
        wall_s: mean_ci95(&col(|r| r.wall_s)),
        efficiency: mean_ci95(&col(RunOutcome::efficiency)),
        overhead_pct: mean_ci95(&col(|r| 100.0 * (1.0 - r.efficiency()))),
        mean_useful_s: mean(|r| r.useful_s),
        mean_checkpoint_s: mean(|r| r.checkpoint_s),
        mean_wasted_s: mean(|r| r.wasted_s),
        mean_restart_s: mean(|r| r.restart_s),
        mean_failures: mean(|r| r.failures as f64),
    }
}

/// The interval with the smallest mean wall time.
pub fn best_interval(summaries: &[IntervalSummary]) -> Option<&IntervalSummary> {
    summaries
        .iter()
        .min_by(|a, b| a.wall_s.mean.total_cmp(&b.wall_s.mean))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_core::schedule::expected_segment_time;

    fn params(mtbf: f64, f: f64) -> SimParams {
        SimParams {
            total_steps: 1000,
            step_time_s: 1.0,
            ckpt_cost_s: 60.0,
            restart_s: 10.0,
            mtbf_s: mtbf,
            blocking_fraction: f,
        }
    }

    fn check_sum(o: &RunOutcome) {
        let sum = o.useful_s + o.checkpoint_s + o.wasted_s + o.restart_s;
        assert!((sum - o.wall_s).abs() <= 1e-9 * o.wall_s.max(1.0), "{o:?}");
    }

    #[test]
    fn no_failures_blocking() -> Result<(), SimError> {
        let p = params(f64::INFINITY, 1.0);
        let o = simulate_run(&p, 100, &mut Rng::seed_from_u64(0))?;
        assert_eq!((o.wall_s, o.checkpoints, o.failures), (1600.0, 10, 0));
        // Interval not dividing the total: 333, 666, 999, then 1000.
        let o = simulate_run(&p, 333, &mut Rng::seed_from_u64(0))?;
        assert_eq!((o.wall_s, o.checkpoints), (1240.0, 4));
        // Interval beyond the end: only the final checkpoint.
        let o = simulate_run(&p, u64::MAX, &mut Rng::seed_from_u64(0))?;
        assert_eq!((o.wall_s, o.checkpoints), (1060.0, 1));
        check_sum(&o);
        Ok(())
    }

    #[test]
    fn no_failures_async() -> Result<(), SimError> {
        let p = params(f64::INFINITY, 0.5);
        // 9 async checkpoints (30 s exposed, background 30 s < 100 s of
        // compute) and a fully blocking final one.
        let o = simulate_run(&p, 100, &mut Rng::seed_from_u64(0))?;
        assert_eq!(o.wall_s, 1000.0 + 9.0 * 30.0 + 60.0);
        // Interval 10: the background (30 s) outlasts the compute (10 s),
        // so every checkpoint after the first stalls 20 s.
        let o = simulate_run(&p, 10, &mut Rng::seed_from_u64(0))?;
        assert_eq!(o.wall_s, 1000.0 + 99.0 * 30.0 + 99.0 * 20.0 + 60.0);
        check_sum(&o);
        // Fully asynchronous saves cost only the final checkpoint.
        let o = simulate_run(&params(f64::INFINITY, 0.0), 100, &mut Rng::seed_from_u64(0))?;
        assert_eq!(o.wall_s, 1060.0);
        Ok(())
    }

    /// Scripted failure gaps: the first failure at `first`, no more.
    fn once(first: f64) -> impl FnMut() -> f64 {
        let mut gaps = vec![f64::INFINITY, first];
        move || gaps.pop().unwrap_or(f64::INFINITY)
    }

    #[test]
    fn failure_during_background_loses_that_checkpoint() -> Result<(), SimError> {
        let p = SimParams {
            total_steps: 300,
            step_time_s: 1.0,
            ckpt_cost_s: 60.0,
            restart_s: 10.0,
            mtbf_s: 1.0,
            blocking_fraction: 0.5,
        };
        // Checkpoint at step 100 is exposed over [100, 130] and durable at
        // 160; a failure at 150 loses it and rolls back to step 0.
        let o = run_with_gaps(&p, 100, once(150.0))?;
        assert_eq!(o.failures, 1);
        assert_eq!(o.wall_s, 580.0);
        assert_eq!(o.wasted_s, 120.0);
        assert_eq!(o.checkpoint_s, 150.0);
        assert_eq!(o.restart_s, 10.0);
        check_sum(&o);
        // At 170 it is durable: roll back to step 100 only.
        let o = run_with_gaps(&p, 100, once(170.0))?;
        assert_eq!((o.wall_s, o.wasted_s, o.checkpoint_s), (470.0, 40.0, 120.0));
        check_sum(&o);
        Ok(())
    }

    #[test]
    fn failure_during_restart_restarts() -> Result<(), SimError> {
        let p = params(1.0, 1.0);
        // Failures at 50 and 55 (during the 10 s restart), then none.
        let mut gaps = vec![f64::INFINITY, 5.0, 50.0];
        let o = run_with_gaps(&p, 100, move || gaps.pop().unwrap_or(f64::INFINITY))?;
        assert_eq!(o.failures, 2);
        assert_eq!(o.restart_s, 15.0);
        assert_eq!(o.wall_s, 50.0 + 15.0 + 1600.0);
        check_sum(&o);
        Ok(())
    }

    #[test]
    fn invalid_parameters() {
        let mut r = Rng::seed_from_u64(0);
        let good = params(100.0, 1.0);
        assert!(simulate_run(&good, 0, &mut r).is_err());
        for bad in [
            SimParams {
                total_steps: 0,
                ..good
            },
            SimParams {
                step_time_s: 0.0,
                ..good
            },
            SimParams {
                ckpt_cost_s: -1.0,
                ..good
            },
            SimParams {
                restart_s: f64::NAN,
                ..good
            },
            SimParams {
                mtbf_s: 0.0,
                ..good
            },
            SimParams {
                blocking_fraction: 1.5,
                ..good
            },
        ] {
            assert!(simulate_run(&bad, 10, &mut r).is_err(), "{bad:?}");
        }
        assert!(sweep(&good, &[10], 0, 0).is_err());
    }

    #[test]
    fn hopeless_parameters_give_up() {
        let p = SimParams {
            mtbf_s: 1e-3,
            restart_s: 1.0,
            ..params(1.0, 1.0)
        };
        let r = simulate_run(&p, 10, &mut Rng::seed_from_u64(0));
        assert_eq!(r, Err(SimError::TooManyFailures(MAX_FAILURES_PER_RUN)));
    }

    /// The simulated mean wall time matches the exact expectation
    /// n·M·e^{R/M}·(e^{(W+C)/M} − 1) for blocking checkpoints (failures
    /// during checkpoints and restarts included) within 2 % over 400
    /// seeds; the per-run coefficient of variation is ≲ 10 %, so the
    /// standard error of the mean is ≲ 0.5 %.
    #[test]
    fn matches_analytic_expectation() -> Result<(), SimError> {
        for (interval, cost, restart, mtbf) in [
            (100u64, 10.0, 20.0, 500.0),
            (50, 5.0, 30.0, 200.0),
            (400, 30.0, 60.0, 2000.0),
        ] {
            let segments = 40;
            let p = SimParams {
                total_steps: interval * segments,
                step_time_s: 1.0,
                ckpt_cost_s: cost,
                restart_s: restart,
                mtbf_s: mtbf,
                blocking_fraction: 1.0,
            };
            let s = sweep(&p, &[interval], 400, 12_345)?;
            let expected =
                segments as f64 * expected_segment_time(interval as f64, cost, restart, mtbf);
            let got = s[0].wall_s.mean;
            let rel = (got / expected - 1.0).abs();
            assert!(
                rel < 0.02,
                "interval {interval}: simulated {got}, expected {expected}"
            );
            // The CI should cover the truth most of the time; allow 3 half-widths.
            assert!((got - expected).abs() < 3.0 * s[0].wall_s.ci95);
        }
        Ok(())
    }

    #[test]
    fn async_saves_reduce_overhead() -> Result<(), SimError> {
        let blocking = sweep(&params(5000.0, 1.0), &[100], 50, 0)?;
        let half = sweep(&params(5000.0, 0.5), &[100], 50, 0)?;
        assert!(half[0].wall_s.mean < blocking[0].wall_s.mean);
        Ok(())
    }

    #[test]
    fn sweep_optimum_near_young() -> Result<(), SimError> {
        let p = SimParams {
            total_steps: 20_000,
            step_time_s: 1.0,
            ckpt_cost_s: 20.0,
            restart_s: 30.0,
            mtbf_s: 2500.0,
            blocking_fraction: 1.0,
        };
        // Young: √(2·20·2500) ≈ 316 steps.
        let s = sweep(&p, &[20, 80, 320, 1280, 5120], 200, 7)?;
        assert_eq!(best_interval(&s).map(|b| b.interval_steps), Some(320));
        for x in &s {
            let sum = x.mean_useful_s + x.mean_checkpoint_s + x.mean_wasted_s + x.mean_restart_s;
            assert!((sum - x.wall_s.mean).abs() < 1e-6 * sum);
            assert!((x.overhead_pct.mean - 100.0 * (1.0 - x.efficiency.mean)).abs() < 1e-9);
        }
        Ok(())
    }

    #[test]
    fn student_t_values() {
        for (df, t) in [
            (1, 12.7062),
            (2, 4.3027),
            (5, 2.5706),
            (10, 2.2281),
            (30, 2.0423),
            (49, 2.0096),
            (1000, 1.9623),
        ] {
            assert!((student_t_975(df) / t - 1.0).abs() < 2e-4, "{df}");
        }
        assert!(student_t_975(0).is_infinite());
        assert!(mean_ci95(&[]).mean.is_nan());
        assert!(mean_ci95(&[3.0]).ci95.is_nan());
    }
}
