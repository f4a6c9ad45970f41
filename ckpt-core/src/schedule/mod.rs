//! Checkpoint interval scheduling: when should a training job save?
//!
//! Saving too often wastes time writing; saving too rarely wastes time
//! recomputing after a failure. This module chooses the interval from the
//! exposed save time δ, the job MTBF M, the restart time R and, optionally,
//! the error-detection latency L. See `docs/scheduler.md` for the
//! derivations.
//!
//! * **Formulas** (pure `f64` seconds): [`young`] (Young 1974), [`daly`]
//!   (Daly 2006), [`availability`] / [`availability_optimum`] and the
//!   latency-aware [`availability_with_latency`],
//!   [`latency_aware_interval`], [`retention_floor`],
//!   [`checkpoint_is_trustworthy`] (Saxena et al. 2024), plus
//!   [`fleet_mtbf`], [`expected_overhead`] and [`expected_segment_time`].
//! * **Estimators**: [`RobustEstimator`] (median-of-window + EWMA, for δ
//!   and R), [`RestartEstimator`], and the Bayesian [`MtbfEstimator`] fed
//!   by [`failure_stats`] of a failure log of [`FailureEvent`]s.
//! * **Scheduler**: [`Scheduler::should_save`] is the one call a training
//!   loop makes per step; [`Scheduler::explain`] says why.
//! * **Simulator**: `ckpt-bench simulate` replays a synchronous job with
//!   random failures to compare intervals (it lives in the benchmark crate:
//!   no training loop needs it).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use ckpt_core::schedule::{Policy, Scheduler, SchedulerConfig};
//!
//! let cfg = SchedulerConfig::new(Policy::Availability, Duration::from_secs(3600))
//!     .with_restart(Duration::from_secs(240));
//! let mut sched = Scheduler::new(cfg)?;
//! let start = Instant::now();
//! for step in 0..3u64 {
//!     if sched.should_save(step, start + Duration::from_secs(step)) {
//!         // save, then report how long it blocked and how long it took to flush
//!         sched.record_save(Duration::from_secs(1), Duration::from_secs(20));
//!     }
//! }
//! println!("{}", sched.explain());
//! # Ok::<(), ckpt_core::schedule::ScheduleError>(())
//! ```

mod duration;
mod error;
mod estimators;
mod failure_log;
mod formulas;
mod policy;

pub use duration::{format_secs, parse_duration, parse_seconds};
pub use error::ScheduleError;
pub use estimators::{MtbfEstimator, RestartEstimator, RobustEstimator, SaveTimeEstimator};
pub use failure_log::{
    FailureEvent, FailureEventKind, FailureStats, failure_stats, parse_failure_log,
};
pub use formulas::{
    availability, availability_optimum, availability_with_latency, checkpoint_is_trustworthy,
    cost_terms, daly, expected_overhead, expected_segment_time, failure_prob_per_step, fleet_mtbf,
    latency_aware_interval, latency_aware_optimum, mtbf_from_failure_prob, retention_floor, young,
};
pub use policy::{Policy, Scheduler, SchedulerConfig};
