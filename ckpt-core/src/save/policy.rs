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
    /// Incremental saves: a chunk whose content (blake3) equals the same
    /// chunk of the previous save committed on this tier is not written
    /// again, the manifest points at the bytes already there; every
    /// `full_every`-th save is written whole, so chains stay short.
    /// `None`: every save is whole.
    pub incremental: Option<u32>,
    /// Per-chunk zstd compression on this tier.
    pub compression: Compression,
}

/// Whether a tier stores chunks compressed: each chunk is its own zstd
/// frame (after grouping the bytes of 2- and 4-byte elements by
/// significance), so any chunk decodes alone and ranged reads and
/// resharding read only the chunks they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw chunks.
    #[default]
    Off,
    /// Every chunk that compresses to under 90% of its size.
    On,
    /// Compress a tensor's chunks only when its first chunk's measured
    /// ratio and compression speed would shorten this tier's time to
    /// durable at the write rate measured on its previous save (so on a
    /// slow object store, rarely on local NVMe). The first save on a tier
    /// is raw.
    Auto,
}

impl Default for TierPolicy {
    fn default() -> Self {
        Self {
            every: 1,
            retention: Retention::default(),
            rate_limit: None,
            stagger: Duration::ZERO,
            incremental: None,
            compression: Compression::Off,
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

    /// Writes only the chunks that changed since the previous save on this
    /// tier, and a whole save after `full_every - 1` incremental ones (at
    /// least 2). The first save after a restore compares against the
    /// restored step as this tier holds it (from the chunk hashes its
    /// manifest records), so a restarted process goes on incrementally;
    /// the first save of a process that restored nothing is whole. Chunk
    /// hashing runs on its own thread ahead of the writer, after staging:
    /// never in the math-stop.
    ///
    /// ```
    /// use ckpt_core::TierPolicy;
    /// let p = TierPolicy::keep_last(3).incremental(8);
    /// assert_eq!(p.incremental, Some(8));
    /// ```
    pub fn incremental(mut self, full_every: u32) -> Self {
        self.incremental = Some(full_every);
        self
    }

    /// Stores chunks compressed on this tier (see [`Compression`]).
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
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
        if matches!(self.incremental, Some(n) if n < 2) {
            return bad("incremental saves need a whole save at most every 2 or more saves".into());
        }
        if self.rate_limit == Some(0) {
            return bad("a rate limit of 0 bytes/s would never write".into());
        }
        self.retention
            .validate()
            .map_err(|e| Error::Config(format!("tier {location}: {e}")))
    }
}
