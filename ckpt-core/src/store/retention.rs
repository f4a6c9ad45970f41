//! Which committed checkpoints a tier keeps.
//!
//! Rules: keep the newest `keep_last`; keep every step that is a multiple
//! of `keep_every_steps`; never fewer than `floor` (the detection-latency
//! floor ⌈L/τ⌉+1, see the scheduler); never the newest committed
//! checkpoint. Deletion happens only after a newer checkpoint committed,
//! and uncommits first (MANIFEST removed before data), so a crash in the
//! middle of a deletion leaves an uncommitted leftover, never a committed
//! checkpoint with missing data.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A tier's retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Retention {
    /// Newest committed checkpoints to keep (at least 1).
    pub keep_last: usize,
    /// Also keep every step divisible by this (long-term snapshots).
    pub keep_every_steps: Option<u64>,
    /// Lower bound on `keep_last` from the detection-latency floor.
    pub floor: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self::keep_last(2)
    }
}

impl Retention {
    /// Keep the newest `n` (at least 1: the newest checkpoint is never
    /// deleted).
    pub const fn keep_last(n: usize) -> Self {
        Self {
            keep_last: n,
            keep_every_steps: None,
            floor: 1,
        }
    }

    /// Also keep every step divisible by `k` (at least 1).
    pub const fn with_keep_every(mut self, k: u64) -> Self {
        self.keep_every_steps = Some(k);
        self
    }

    /// Checks the policy: `keep_last` and `keep_every` of 0 are errors, not
    /// silently raised.
    pub fn validate(&self) -> Result<()> {
        if self.keep_last == 0 {
            return Err(Error::Config(
                "retention must keep at least the newest checkpoint (keep_last >= 1)".into(),
            ));
        }
        if self.keep_every_steps == Some(0) {
            return Err(Error::Config("keep_every must be at least 1".into()));
        }
        Ok(())
    }

    /// Never keep fewer than `floor` (see
    /// [`retention_floor`](crate::schedule) for the detection-latency floor).
    pub const fn with_floor(mut self, floor: usize) -> Self {
        self.floor = floor;
        self
    }

    /// Splits `committed` steps into (keep, delete).
    ///
    /// ```
    /// use ckpt_core::Retention;
    /// let (keep, delete) = Retention::keep_last(2).with_keep_every(100).select(&[50, 100, 150, 200, 250]);
    /// assert_eq!(keep, vec![100, 200, 250]);
    /// assert_eq!(delete, vec![50, 150]);
    /// ```
    pub fn select(&self, committed: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let mut steps = committed.to_vec();
        steps.sort_unstable();
        steps.dedup();
        let n = self.keep_last.max(self.floor).max(1);
        let newest_start = steps.len().saturating_sub(n);
        let (mut keep, mut delete) = (Vec::new(), Vec::new());
        for (i, &s) in steps.iter().enumerate() {
            let long_term = self.keep_every_steps.is_some_and(|k| k > 0 && s % k == 0);
            if i >= newest_start || long_term {
                keep.push(s);
            } else {
                delete.push(s);
            }
        }
        (keep, delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_is_always_kept_and_floor_wins() {
        // Even a policy that fails validation never deletes the newest.
        assert_eq!(
            Retention::keep_last(0).select(&[3, 1, 2]),
            (vec![3], vec![1, 2])
        );
        assert!(Retention::keep_last(0).validate().is_err());
        assert!(
            Retention::keep_last(1)
                .with_keep_every(0)
                .validate()
                .is_err()
        );
        assert_eq!(
            Retention::keep_last(1).with_floor(3).select(&[1, 2, 3, 4]),
            (vec![2, 3, 4], vec![1])
        );
        assert_eq!(Retention::keep_last(5).select(&[]), (vec![], vec![]));
    }
}
