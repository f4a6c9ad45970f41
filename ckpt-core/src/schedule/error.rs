//! Errors of the scheduling module.

/// Why a scheduler, estimator or simulation could not be set up or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A parameter is out of its domain (zero, negative, not finite, ...).
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// Name of the offending parameter.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A simulated run saw more failures than the safety cap; the
    /// parameters make progress practically impossible.
    #[error(
        "simulation gave up after {0} failures in one run: failures are too frequent for the chosen interval to make progress"
    )]
    TooManyFailures(u64),
}

impl ScheduleError {
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}
