//! Errors of the scheduling module.

/// Why a scheduler or estimator could not be set up.
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
}

impl ScheduleError {
    /// An [`ScheduleError::InvalidParameter`].
    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}
