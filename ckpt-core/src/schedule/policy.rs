//! The [`Scheduler`]: the one object a training loop asks "save now?".

use std::time::{Duration, Instant};

use super::error::ScheduleError;
use super::estimators::{MtbfEstimator, RestartEstimator, SaveTimeEstimator, secs_to_duration};
use super::failure_log::FailureStats;
use super::formulas;

/// Which rule sets the checkpoint interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Save every `n` training steps.
    FixedSteps(u64),
    /// Save every fixed wall-clock period.
    FixedSeconds(Duration),
    /// Young (1974): compute time √(2δM) between saves.
    Young,
    /// Daly (2006) higher-order estimate of the compute time between saves.
    Daly,
    /// Availability optimum (Saxena et al. 2024): period δ + √(δ² + 2δ(M + R)).
    Availability,
    /// Availability optimum with error-detection latency and a retention
    /// budget (Saxena et al. 2024, section 3): period
    /// max(τ*_L, L/(K − 1)).
    LatencyAware {
        /// Error-detection latency L.
        latency: Duration,
        /// Number of retained snapshots K (≥ 2 when `latency` > 0).
        keep: u64,
    },
}

impl Policy {
    /// Short name used by [`Scheduler::explain`] and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::FixedSteps(_) => "fixed-steps",
            Policy::FixedSeconds(_) => "fixed-seconds",
            Policy::Young => "young",
            Policy::Daly => "daly",
            Policy::Availability => "availability",
            Policy::LatencyAware { .. } => "latency-aware",
        }
    }

    /// Whether the interval follows the estimators.
    pub fn is_adaptive(&self) -> bool {
        !matches!(self, Policy::FixedSteps(_) | Policy::FixedSeconds(_))
    }
}

/// Configuration of a [`Scheduler`]. Build with [`SchedulerConfig::new`]
/// and the `with_*` methods; the fields are public for inspection.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The interval rule.
    pub policy: Policy,
    /// Prior job MTBF (e.g. node MTBF / number of nodes).
    pub prior_mtbf: Duration,
    /// Weight of the MTBF prior in pseudo-failures (default 2).
    pub prior_weight: f64,
    /// Interval used by adaptive policies until a save time has been
    /// measured (default 10 min).
    pub initial_interval: Duration,
    /// Configured restart time R, used until a restore is measured
    /// (default: none, then R = 0).
    pub restart: Option<Duration>,
    /// Lower bound on the interval of adaptive policies (default 1 s),
    /// guarding against δ ≈ 0.
    pub min_interval: Duration,
    /// Median window of the δ and R estimators (default 5).
    pub estimator_window: usize,
    /// EWMA weight of the δ and R estimators (default 0.3).
    pub estimator_alpha: f64,
}

impl SchedulerConfig {
    /// A configuration with the given policy and prior MTBF and defaults
    /// for everything else.
    pub fn new(policy: Policy, prior_mtbf: Duration) -> Self {
        Self {
            policy,
            prior_mtbf,
            prior_weight: MtbfEstimator::DEFAULT_PRIOR_WEIGHT,
            initial_interval: Duration::from_secs(600),
            restart: None,
            min_interval: Duration::from_secs(1),
            estimator_window: 5,
            estimator_alpha: 0.3,
        }
    }

    /// Sets the prior weight (pseudo-failures).
    pub fn with_prior_weight(mut self, weight: f64) -> Self {
        self.prior_weight = weight;
        self
    }

    /// Sets the interval used before the first measured save.
    pub fn with_initial_interval(mut self, interval: Duration) -> Self {
        self.initial_interval = interval;
        self
    }

    /// Sets the configured restart time.
    pub fn with_restart(mut self, restart: Duration) -> Self {
        self.restart = Some(restart);
        self
    }

    /// Sets the lower bound on adaptive intervals.
    pub fn with_min_interval(mut self, min: Duration) -> Self {
        self.min_interval = min;
        self
    }

    /// Sets the median window and EWMA weight of the δ and R estimators.
    pub fn with_estimator(mut self, window: usize, alpha: f64) -> Self {
        self.estimator_window = window;
        self.estimator_alpha = alpha;
        self
    }
}

/// Decides when a training loop saves.
///
/// Call [`should_save`](Self::should_save) once per step; feed it the
/// measurements of each save ([`record_save`](Self::record_save)), of each
/// restore ([`record_restore`](Self::record_restore)) and the failure log
/// ([`observe_failures`](Self::observe_failures)). Adaptive policies
/// recompute the interval from the current estimates on every call.
///
/// Semantics of `should_save(step, now)`:
/// * The first call starts the clock at (step, now) and returns `false`:
///   no policy asks for a checkpoint of the state it starts from (the
///   initial state, or one just restored).
/// * It returns `true` when, since the last `true` (or the first call),
///   the step has advanced and either `n` steps have passed
///   (`FixedSteps(n)`) or [`interval`](Self::interval) of wall time has
///   elapsed (all other policies). A `true` restarts the clock, so the
///   interval is a save *period* (start to start, blocking time included).
/// * No policy requests a save sooner than the last measured flush time
///   after the previous request (a save is never asked for faster than the
///   storage tiers absorb it).
/// * Adaptive policies use the configured initial interval until the
///   first save has been measured, and never go below `min_interval`.
/// * If `step` goes backwards (the loop rolled back), the clock restarts
///   there and `false` is returned.
///
/// ```
/// use std::time::{Duration, Instant};
/// use ckpt_core::schedule::{Policy, Scheduler, SchedulerConfig};
/// let cfg = SchedulerConfig::new(Policy::Young, Duration::from_secs(3600))
///     .with_initial_interval(Duration::from_secs(60));
/// let mut s = Scheduler::new(cfg)?;
/// let t0 = Instant::now();
/// assert!(!s.should_save(0, t0));
/// assert!(!s.should_save(59, t0 + Duration::from_secs(59)));
/// assert!(s.should_save(60, t0 + Duration::from_secs(60)));
/// // After a measured save of δ = 1 s, Young's period is √(2·1·3600) + 1 s.
/// s.record_save(Duration::from_secs(1), Duration::from_secs(5));
/// assert_eq!(s.interval().as_secs(), 85);
/// println!("{}", s.explain());
/// # Ok::<(), ckpt_core::schedule::ScheduleError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    delta: SaveTimeEstimator,
    restart: RestartEstimator,
    mtbf: MtbfEstimator,
    last_flush: Option<Duration>,
    anchor: Option<(u64, Instant)>,
    last_seen: Option<(u64, Instant)>,
    step_time_s: Option<f64>,
}

/// Why the current interval has its value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reason {
    /// A fixed policy.
    Fixed,
    /// An adaptive policy before the first measured save.
    Initial,
    /// The policy's formula.
    Formula,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Decision {
    /// What the policy alone asks for, seconds.
    target_s: f64,
    /// After the floors, seconds.
    period_s: f64,
    reason: Reason,
}

impl Scheduler {
    /// Creates a scheduler, validating the configuration.
    pub fn new(config: SchedulerConfig) -> Result<Self, ScheduleError> {
        match config.policy {
            Policy::FixedSteps(0) => {
                return Err(ScheduleError::invalid(
                    "FixedSteps",
                    "must be at least 1 step",
                ));
            }
            Policy::FixedSeconds(d) if d.is_zero() => {
                return Err(ScheduleError::invalid("FixedSeconds", "must be positive"));
            }
            Policy::LatencyAware { latency, keep }
                if keep == 0 || (keep == 1 && !latency.is_zero()) =>
            {
                return Err(ScheduleError::invalid(
                    "keep",
                    format!(
                        "{keep} retained snapshot(s) cannot cover a detection latency of {latency:?}; keep at least 2"
                    ),
                ));
            }
            _ => {}
        }
        if config.policy.is_adaptive() && config.initial_interval.is_zero() {
            return Err(ScheduleError::invalid(
                "initial_interval",
                "must be positive",
            ));
        }
        let mtbf = MtbfEstimator::new(config.prior_mtbf, config.prior_weight)?;
        Ok(Self {
            delta: SaveTimeEstimator::new(config.estimator_window, config.estimator_alpha),
            restart: RestartEstimator::with_window(
                config.restart,
                config.estimator_window,
                config.estimator_alpha,
            ),
            mtbf,
            config,
            last_flush: None,
            anchor: None,
            last_seen: None,
            step_time_s: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.config.policy
    }

    /// Whether the training loop should save at `step`, observed at `now`.
    /// See the type-level documentation for the exact semantics.
    pub fn should_save(&mut self, step: u64, now: Instant) -> bool {
        self.observe_step(step, now);
        let Some((s0, t0)) = self.anchor else {
            self.anchor = Some((step, now));
            return false;
        };
        if step <= s0 {
            if step < s0 {
                self.anchor = Some((step, now));
            }
            return false;
        }
        let elapsed = now.saturating_duration_since(t0);
        let due = match self.config.policy {
            Policy::FixedSteps(n) => step - s0 >= n && elapsed >= self.flush_floor(),
            _ => elapsed >= self.interval(),
        };
        if due {
            self.anchor = Some((step, now));
        }
        due
    }

    /// Restarts the clock at (step, now) after a save that was not
    /// requested by [`should_save`](Self::should_save) (e.g. at the end of
    /// an epoch).
    pub fn mark_saved(&mut self, step: u64, now: Instant) {
        self.anchor = Some((step, now));
    }

    /// Records one save: `math_stop` is the time training was blocked (the
    /// exposed save time δ), `flush_time` the time until the save was
    /// absorbed by the storage tiers.
    pub fn record_save(&mut self, math_stop: Duration, flush_time: Duration) {
        self.delta.record(math_stop);
        self.last_flush = Some(flush_time);
    }

    /// Records one measured restore (process start to restored state).
    pub fn record_restore(&mut self, restore: Duration) {
        self.restart.record(restore);
    }

    /// Sets the failure data (from
    /// [`failure_stats`](super::failure_stats) of the failure log) that the
    /// MTBF estimate is based on.
    pub fn observe_failures(&mut self, stats: FailureStats) {
        self.mtbf.observe(stats);
    }

    /// Current estimate of the exposed save time δ.
    pub fn save_time_estimate(&self) -> Option<Duration> {
        self.delta.estimate()
    }

    /// Current estimate of the restart time R (measured, else configured).
    pub fn restart_estimate(&self) -> Option<Duration> {
        self.restart.estimate()
    }

    /// Current MTBF estimate.
    pub fn mtbf_estimate(&self) -> Duration {
        self.mtbf.estimate()
    }

    /// Current wall-clock save period. For `FixedSteps(n)` it is the wall
    /// time of `n` steps at the step time measured between calls of
    /// `should_save` (zero until measured), floored by the last flush.
    pub fn interval(&self) -> Duration {
        secs_to_duration(self.decide().period_s)
    }

    /// One line describing the policy, its inputs and the chosen interval.
    pub fn explain(&self) -> String {
        let d = self.decide();
        let policy = self.config.policy;
        let mut line = format!("{}: ", policy.name());
        match (policy, d.reason) {
            (Policy::FixedSteps(n), _) => {
                line += &format!("save every {n} steps");
                if let Some(st) = self.step_time_s {
                    line += &format!(" (≈{} at {}/step)", fmt_s(n as f64 * st), fmt_s(st));
                }
            }
            (Policy::FixedSeconds(_), _) => {
                line += &format!("save every {} (fixed)", fmt_s(d.target_s));
            }
            (_, Reason::Initial) => {
                line += &format!(
                    "save every {} (initial interval: no save measured yet)",
                    fmt_s(d.target_s)
                );
            }
            (_, _) => {
                line += &format!(
                    "save every {} = {}",
                    fmt_s(d.target_s),
                    formula_text(policy)
                );
            }
        }
        if policy.is_adaptive() {
            let delta = match self.delta.estimate_s() {
                Some(s) => format!(
                    "{} (median-EWMA of {} saves)",
                    fmt_s(s),
                    self.delta.samples()
                ),
                None => "unmeasured".to_string(),
            };
            let stats = self.mtbf.stats();
            let r = match (self.restart.estimate(), self.restart.samples()) {
                (Some(r), 0) => format!("{} (configured)", fmt_s(r.as_secs_f64())),
                (Some(r), n) => format!("{} (median-EWMA of {n} restores)", fmt_s(r.as_secs_f64())),
                (None, _) => "0s (not configured)".to_string(),
            };
            line += &format!(
                "; δ={delta}, M={} (prior {}, {} failures in {} exposure), R={r}",
                fmt_s(self.mtbf.estimate_s()),
                fmt_s(self.mtbf.prior_mtbf_s()),
                stats.failures,
                fmt_s(stats.exposure_s),
            );
            if let Policy::LatencyAware { latency, keep } = policy {
                line += &format!(", L={}, K={keep}", fmt_s(latency.as_secs_f64()));
            }
        }
        if d.period_s > d.target_s {
            let flush = self.flush_floor().as_secs_f64();
            if flush >= d.period_s && flush > 0.0 {
                line += &format!(
                    "; raised to {}: the last flush took that long",
                    fmt_s(flush)
                );
            } else {
                line += &format!("; raised to the minimum interval {}", fmt_s(d.period_s));
            }
        }
        line
    }

    fn flush_floor(&self) -> Duration {
        self.last_flush.unwrap_or(Duration::ZERO)
    }

    fn observe_step(&mut self, step: u64, now: Instant) {
        if let Some((s, t)) = self.last_seen
            && step > s
        {
            let per_step = now.saturating_duration_since(t).as_secs_f64() / (step - s) as f64;
            self.step_time_s = Some(match self.step_time_s {
                None => per_step,
                Some(prev) => 0.3 * per_step + 0.7 * prev,
            });
        }
        self.last_seen = Some((step, now));
    }

    fn decide(&self) -> Decision {
        let policy = self.config.policy;
        let m = self.mtbf.estimate_s();
        let r = self.restart.estimate().map_or(0.0, |d| d.as_secs_f64());
        let (target_s, reason) = match (policy, self.delta.estimate_s()) {
            (Policy::FixedSteps(n), _) => {
                (self.step_time_s.unwrap_or(0.0) * n as f64, Reason::Fixed)
            }
            (Policy::FixedSeconds(d), _) => (d.as_secs_f64(), Reason::Fixed),
            (_, None) => (self.config.initial_interval.as_secs_f64(), Reason::Initial),
            (_, Some(delta)) => (adaptive_period(policy, delta, m, r), Reason::Formula),
        };
        let mut period_s = target_s.max(self.flush_floor().as_secs_f64());
        if policy.is_adaptive() {
            period_s = period_s.max(self.config.min_interval.as_secs_f64());
        }
        Decision {
            target_s,
            period_s,
            reason,
        }
    }
}

/// Save period (start to start) of an adaptive policy. Young's and Daly's
/// formulas give compute time between saves, so δ is added to them.
fn adaptive_period(policy: Policy, delta: f64, m: f64, r: f64) -> f64 {
    match policy {
        Policy::Young => formulas::young(delta, m) + delta,
        Policy::Daly => formulas::daly(delta, m) + delta,
        Policy::Availability => formulas::availability_optimum(delta, m, r),
        Policy::LatencyAware { latency, keep } => {
            formulas::latency_aware_interval(delta, m, r, latency.as_secs_f64(), keep)
                // Unreachable after validation in `Scheduler::new`; fall
                // back to the unconstrained optimum.
                .unwrap_or_else(|| {
                    formulas::latency_aware_optimum(delta, m, r, latency.as_secs_f64())
                })
        }
        Policy::FixedSteps(_) | Policy::FixedSeconds(_) => 0.0,
    }
}

fn formula_text(policy: Policy) -> &'static str {
    match policy {
        Policy::Young => "√(2δM) + δ [Young 1974]",
        Policy::Daly => "Daly 2006 higher-order estimate + δ",
        Policy::Availability => "δ + √(δ² + 2δ(M+R)) [availability optimum, Saxena et al. 2024]",
        Policy::LatencyAware { .. } => {
            "max(δ + √(δ² + 2δ(M+L+R)), L/(K−1)) [latency-aware, Saxena et al. 2024]"
        }
        Policy::FixedSteps(_) | Policy::FixedSeconds(_) => "fixed",
    }
}

/// Compact human-readable seconds: "0.250s", "88.6s", "3600s".
fn fmt_s(s: f64) -> String {
    if !s.is_finite() {
        "∞".to_string()
    } else if s < 10.0 {
        format!("{s:.3}s")
    } else if s < 1000.0 {
        format!("{s:.1}s")
    } else {
        format!("{s:.0}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn sched(policy: Policy) -> Scheduler {
        let cfg = SchedulerConfig::new(policy, HOUR)
            .with_initial_interval(secs(100))
            .with_restart(secs(240));
        match Scheduler::new(cfg) {
            Ok(s) => s,
            Err(e) => panic!("valid config rejected: {e}"),
        }
    }

    /// Steps of 1 s from `t0`, returns the steps at which a save was requested.
    fn run(s: &mut Scheduler, t0: Instant, steps: std::ops::Range<u64>) -> Vec<u64> {
        steps.filter(|&k| s.should_save(k, t0 + secs(k))).collect()
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for p in [
            Policy::FixedSteps(0),
            Policy::FixedSeconds(Duration::ZERO),
            Policy::LatencyAware {
                latency: secs(10),
                keep: 1,
            },
            Policy::LatencyAware {
                latency: secs(0),
                keep: 0,
            },
        ] {
            assert!(
                Scheduler::new(SchedulerConfig::new(p, HOUR)).is_err(),
                "{p:?}"
            );
        }
        assert!(Scheduler::new(SchedulerConfig::new(Policy::Young, Duration::ZERO)).is_err());
        let cfg = SchedulerConfig::new(Policy::Young, HOUR).with_initial_interval(Duration::ZERO);
        assert!(Scheduler::new(cfg).is_err());
        let cfg = SchedulerConfig::new(Policy::Young, HOUR).with_prior_weight(-1.0);
        assert!(Scheduler::new(cfg).is_err());
        let ok = Policy::LatencyAware {
            latency: secs(0),
            keep: 1,
        };
        assert!(Scheduler::new(SchedulerConfig::new(ok, HOUR)).is_ok());
    }

    #[test]
    fn fixed_steps_counts_from_first_call() {
        let mut s = sched(Policy::FixedSteps(10));
        let t0 = Instant::now();
        assert_eq!(run(&mut s, t0, 0..35), vec![10, 20, 30]);
        let mut s = sched(Policy::FixedSteps(10));
        assert_eq!(run(&mut s, t0, 5..30), vec![15, 25]);
        assert_eq!(s.interval(), secs(10));
        assert!(
            s.explain().starts_with("fixed-steps: save every 10 steps"),
            "{}",
            s.explain()
        );
    }

    #[test]
    fn first_call_never_saves_and_same_step_not_twice() {
        let t0 = Instant::now();
        let mut s = sched(Policy::FixedSeconds(secs(5)));
        assert!(!s.should_save(0, t0 + secs(1000)));
        assert!(s.should_save(1, t0 + secs(1005)));
        assert!(!s.should_save(1, t0 + secs(2000)));
        assert!(s.should_save(2, t0 + secs(2000)));
    }

    #[test]
    fn fixed_seconds_period() {
        let mut s = sched(Policy::FixedSeconds(secs(30)));
        assert_eq!(run(&mut s, Instant::now(), 0..100), vec![30, 60, 90]);
    }

    #[test]
    fn rollback_restarts_the_clock() {
        let mut s = sched(Policy::FixedSteps(10));
        let t0 = Instant::now();
        assert_eq!(run(&mut s, t0, 0..15), vec![10]);
        // Restored to step 10 at t = 100 s.
        assert!(!s.should_save(10, t0 + secs(100)));
        assert!(!s.should_save(5, t0 + secs(101)));
        assert!(!s.should_save(14, t0 + secs(110)));
        assert!(s.should_save(15, t0 + secs(111)));
    }

    #[test]
    fn adaptive_uses_initial_interval_then_formula() {
        let t0 = Instant::now();
        let mut s = sched(Policy::Young);
        assert_eq!(s.interval(), secs(100));
        assert!(s.explain().contains("initial interval"), "{}", s.explain());
        assert_eq!(run(&mut s, t0, 0..250), vec![100, 200]);
        s.record_save(secs(1), secs(2));
        let young = (7200f64).sqrt() + 1.0;
        assert!((s.interval().as_secs_f64() - young).abs() < 1e-6);
        assert!(s.explain().contains("Young 1974"), "{}", s.explain());
    }

    #[test]
    fn each_adaptive_policy_matches_its_formula() {
        let (d, m, r) = (2.0, 3600.0, 240.0);
        let cases = [
            (Policy::Young, formulas::young(d, m) + d),
            (Policy::Daly, formulas::daly(d, m) + d),
            (
                Policy::Availability,
                formulas::availability_optimum(d, m, r),
            ),
            (
                Policy::LatencyAware {
                    latency: secs(120),
                    keep: 2,
                },
                120f64.max(formulas::latency_aware_optimum(d, m, r, 120.0)),
            ),
            (
                Policy::LatencyAware {
                    latency: secs(120),
                    keep: 4,
                },
                formulas::latency_aware_optimum(d, m, r, 120.0),
            ),
        ];
        for (p, want) in cases {
            let mut s = sched(p);
            s.record_save(secs(2), secs(1));
            let got = s.interval().as_secs_f64();
            assert!((got - want).abs() < 1e-6, "{p:?}: {got} vs {want}");
            assert!(s.explain().starts_with(p.name()));
        }
    }

    #[test]
    fn never_faster_than_last_flush() {
        let mut s = sched(Policy::Young);
        s.record_save(secs(1), secs(500));
        assert_eq!(s.interval(), secs(500));
        assert!(s.explain().contains("last flush"), "{}", s.explain());
        let mut f = sched(Policy::FixedSteps(10));
        f.record_save(secs(1), secs(25));
        assert_eq!(run(&mut f, Instant::now(), 0..80), vec![25, 50, 75]);
    }

    #[test]
    fn minimum_interval_guards_tiny_delta() {
        let mut s = sched(Policy::Availability);
        s.record_save(Duration::from_nanos(1), Duration::ZERO);
        assert_eq!(s.interval(), secs(1));
        assert!(s.explain().contains("minimum interval"), "{}", s.explain());
    }

    #[test]
    fn interval_follows_estimates() {
        let mut s = sched(Policy::Availability);
        s.record_save(secs(4), secs(1));
        let before = s.interval();
        // Many failures: the MTBF estimate drops, so does the interval.
        s.observe_failures(FailureStats {
            failures: 50,
            exposure_s: 50.0 * 600.0,
        });
        assert!(s.mtbf_estimate() < secs(720)); // (2·3600 + 30000)/52
        let after_failures = s.interval();
        assert!(after_failures < before);
        // A slower save lengthens it again.
        for _ in 0..10 {
            s.record_save(secs(16), secs(1));
        }
        assert!(s.interval() > after_failures);
        // Measured restores replace the configured R.
        let r_before = s.interval();
        for _ in 0..10 {
            s.record_restore(secs(3600));
        }
        assert_eq!(s.restart_estimate(), Some(secs(3600)));
        assert!(s.interval() > r_before);
    }

    #[test]
    fn latency_aware_keeps_at_least_latency_with_two_snapshots() {
        let mut s = sched(Policy::LatencyAware {
            latency: secs(900),
            keep: 2,
        });
        s.record_save(secs(1), secs(1));
        assert_eq!(s.interval(), secs(900));
        assert!(s.explain().contains("K=2"));
    }

    #[test]
    fn explain_example() {
        let mut s = sched(Policy::Availability);
        assert_eq!(
            s.explain(),
            "availability: save every 100.0s (initial interval: no save measured yet); \
             δ=unmeasured, M=3600s (prior 3600s, 0 failures in 0.000s exposure), R=240.0s (configured)"
        );
        for _ in 0..5 {
            s.record_save(secs(1), secs(20));
        }
        s.observe_failures(FailureStats {
            failures: 3,
            exposure_s: 5.0 * 3600.0,
        });
        s.record_restore(secs(180));
        assert_eq!(
            s.explain(),
            "availability: save every 103.2s = δ + √(δ² + 2δ(M+R)) [availability optimum, Saxena et al. 2024]; \
             δ=1.000s (median-EWMA of 5 saves), M=5040s (prior 3600s, 3 failures in 18000s exposure), R=180.0s (median-EWMA of 1 restores)"
        );
        let mut l = sched(Policy::LatencyAware {
            latency: secs(120),
            keep: 2,
        });
        l.record_save(secs(1), secs(200));
        assert!(
            l.explain()
                .ends_with("L=120.0s, K=2; raised to 200.0s: the last flush took that long"),
            "{}",
            l.explain()
        );
    }

    #[test]
    fn explain_is_one_line() {
        for p in [
            Policy::FixedSteps(5),
            Policy::FixedSeconds(secs(60)),
            Policy::Young,
            Policy::Daly,
            Policy::Availability,
            Policy::LatencyAware {
                latency: secs(60),
                keep: 3,
            },
        ] {
            let mut s = sched(p);
            assert!(!s.explain().contains('\n'));
            s.record_save(secs(1), secs(1));
            s.should_save(0, Instant::now());
            assert!(!s.explain().contains('\n'));
        }
    }

    proptest! {
        /// Consecutive save requests are never closer than the interval
        /// (with the flush floor) in force when the second one is granted.
        #[test]
        fn requests_respect_interval(
            deltas in proptest::collection::vec(1u64..5000, 1..20),
            flushes in proptest::collection::vec(0u64..200_000, 1..20),
            policy in 0usize..4,
        ) {
            let p = [Policy::Young, Policy::Daly, Policy::Availability,
                     Policy::LatencyAware { latency: secs(120), keep: 2 }][policy];
            let mut s = sched(p);
            let t0 = Instant::now();
            let mut last: Option<Duration> = None;
            let mut i = 0;
            for k in 0..20_000u64 {
                let now = t0 + Duration::from_millis(k * 500);
                let interval = s.interval();
                if s.should_save(k, now) {
                    let at = Duration::from_millis(k * 500);
                    if let Some(prev) = last {
                        prop_assert!(at - prev >= interval);
                    }
                    last = Some(at);
                    s.record_save(Duration::from_millis(deltas[i % deltas.len()]),
                                  Duration::from_millis(flushes[i % flushes.len()]));
                    i += 1;
                }
            }
        }
    }
}
