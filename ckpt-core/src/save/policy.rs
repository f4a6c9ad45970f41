//! Per-tier and per-save policies.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::retention::Retention;

/// What `save` does when the staging pool is still held by an earlier
/// flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BusyPolicy {
    /// Wait for staging memory; the wait is part of the math-stop and is
    /// reported as [`SaveReport::waited`](crate::SaveReport::waited).
    #[default]
    Wait,
    /// Skip this save if the pool cannot take all of it right now; the
    /// handle reports `skipped`.
    Skip,
}

/// How one tier takes part in saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierPolicy {
    /// Write every `every`-th save (1 = every save).
    pub every: u64,
    /// Which committed checkpoints to keep.
    pub retention: Retention,
    /// Upper bound on write bandwidth, bytes per second.
    pub rate_limit: Option<u64>,
    /// Delay before rank `r` starts writing: `r × stagger`, so N ranks do not
    /// hit shared storage at the same instant.
    pub stagger: Duration,
}

impl Default for TierPolicy {
    fn default() -> Self {
        Self {
            every: 1,
            retention: Retention::default(),
            rate_limit: None,
            stagger: Duration::ZERO,
        }
    }
}

impl TierPolicy {
    /// Every save, keeping the newest `n`.
    pub fn keep_last(n: usize) -> Self {
        Self {
            retention: Retention::keep_last(n),
            ..Self::default()
        }
    }

    /// Writes only every `k`-th save (at least 1).
    pub fn every(mut self, k: u64) -> Self {
        self.every = k;
        self
    }

    /// Sets the retention policy.
    pub fn retention(mut self, r: Retention) -> Self {
        self.retention = r;
        self
    }

    /// Limits write bandwidth to `bytes_per_s` (more than 0).
    pub fn rate_limit(mut self, bytes_per_s: u64) -> Self {
        self.rate_limit = Some(bytes_per_s);
        self
    }

    /// Staggers the start of each rank's flush by `rank × d`.
    pub fn stagger(mut self, d: Duration) -> Self {
        self.stagger = d;
        self
    }

    /// Whether save number `index` (counting from 0) goes to this tier.
    pub(crate) fn takes(&self, index: u64) -> bool {
        index.is_multiple_of(self.every)
    }

    /// Checks the policy of the tier at `location`.
    pub fn validate(&self, location: &str) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("tier {location}: {m}")));
        if self.every == 0 {
            return bad("`every` must be at least 1".into());
        }
        if self.rate_limit == Some(0) {
            return bad("a rate limit of 0 bytes/s would never write".into());
        }
        self.retention
            .validate()
            .map_err(|e| Error::Config(format!("tier {location}: {e}")))
    }
}
