//! Checkpoint interval scheduling.

mod error;
mod estimators;
mod failure_log;
mod formulas;
mod policy;
mod rng;

pub use error::ScheduleError;
pub use estimators::{MtbfEstimator, RestartEstimator, RobustEstimator, SaveTimeEstimator};
pub use failure_log::{
    FailureEvent, FailureEventKind, FailureStats, failure_stats, parse_failure_log,
};
pub use formulas::*;
pub use policy::{Policy, Scheduler, SchedulerConfig};
pub use rng::{Rng, splitmix64};
