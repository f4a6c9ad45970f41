//! What a save returns: the math-stop right away, the per-tier outcome when
//! the background flush is done.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result, TierFailure};
use crate::sync::{lock, wait};

/// Outcome of one save on one tier.
#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    /// The tier's location.
    pub tier: String,
    /// Time from the start of this tier's flush (when the save started,
    /// or when this tier's previous save finished) until the shard was
    /// durable.
    pub flush: Duration,
    /// Time spent committing (rank manifest, waiting for other ranks,
    /// MANIFEST).
    pub commit: Duration,
    /// Time spent applying retention after the commit (not part of the
    /// time to durable).
    pub retention: Duration,
    /// Bytes of this rank's shard file written to the tier.
    pub written: u64,
    /// Bytes of this rank's data the tier already held (an incremental
    /// save's unchanged chunks), not written again.
    pub referenced: u64,
    /// Time from the start of the save (the call) until the step's commit
    /// marker was durable on this tier (for a rank other than the
    /// coordinator: its own piece); `None` if it did not commit. The
    /// math-stop is part of it.
    pub durable_at: Option<Duration>,
    /// Whether this rank's data and the step's commit marker are durable on
    /// the tier. For a rank other than the coordinator: its own piece.
    pub committed: bool,
    /// Why not, if not: a typed error naming the tier and the step's
    /// object ([`Error::Unavailable`] if the tier was left out because it
    /// is down).
    #[serde(serialize_with = "crate::error::serialize_opt_error")]
    pub error: Option<Error>,
}

/// The full account of one save.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    /// Step saved.
    pub step: u64,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Bytes copied into the staging pool (the rest was zero-copy).
    pub staged_bytes: u64,
    /// The blocking part of the save: the time the training loop stopped.
    pub math_stop: Duration,
    /// Part of the math-stop the copy stood still, waiting for staging
    /// blocks a flush still held: an earlier save's (policy `Wait`), or this
    /// save's own when it is larger than the pool and streams through it.
    pub waited: Duration,
    /// How long the copy into the staging pool took. For a plain save it
    /// is most of the math-stop; for an overlapped one
    /// ([`Checkpointer::save_overlapped`](crate::Checkpointer::save_overlapped))
    /// `copy - math_stop` (about) was hidden behind the caller's work.
    pub copy: Duration,
    /// Whether the copy overlapped the caller's work.
    pub overlapped: bool,
    /// Whether the save was skipped because the pool was busy (policy
    /// `Skip`); then nothing was written.
    pub skipped: bool,
    /// Per-tier outcome, in tier order (tiers whose policy skipped this
    /// step are absent).
    pub tiers: Vec<TierReport>,
    /// Time from the start of the save until every tier finished,
    /// retention included.
    pub total: Duration,
    /// The staging pool's occupancy from the start of the save until every
    /// tier finished (at most [`STAGING_SAMPLES`] points): beside each
    /// tier's `durable_at` it shows which tier held the staged blocks, and
    /// for how long. Blocks of an earlier save a slow tier still holds
    /// count too.
    pub staging: Vec<crate::StagingSample>,
}

/// Most points in [`SaveReport::staging`].
pub const STAGING_SAMPLES: usize = 64;

impl TierReport {
    /// The report of a tier that did not run this save (down, or a failed
    /// task).
    pub(crate) fn not_run(tier: String, error: Error) -> Self {
        Self {
            tier,
            flush: Duration::ZERO,
            commit: Duration::ZERO,
            retention: Duration::ZERO,
            written: 0,
            referenced: 0,
            durable_at: None,
            committed: false,
            error: Some(error),
        }
    }
}

impl SaveReport {
    /// A report for a save that is starting.
    pub(crate) fn new(step: u64, bytes: u64, staged_bytes: u64) -> Self {
        Self {
            step,
            bytes,
            staged_bytes,
            math_stop: Duration::ZERO,
            copy: Duration::ZERO,
            overlapped: false,
            waited: Duration::ZERO,
            skipped: false,
            tiers: Vec::new(),
            total: Duration::ZERO,
            staging: Vec::new(),
        }
    }

    /// Time from the start of the save until the last tier that committed
    /// had its commit marker durable (retention excluded).
    pub fn durable_after(&self) -> Option<Duration> {
        self.tiers.iter().filter_map(|t| t.durable_at).max()
    }

    /// Whether at least one tier committed the checkpoint.
    pub fn is_durable(&self) -> bool {
        self.tiers.iter().any(|t| t.committed)
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) report: Mutex<(SaveReport, bool)>,
    pub(crate) done: Condvar,
    pub(crate) notify: tokio::sync::Notify,
}

impl Shared {
    pub(crate) fn new(report: SaveReport) -> Arc<Self> {
        Arc::new(Self {
            report: Mutex::new((report, false)),
            done: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn finish(
        &self,
        tiers: Vec<TierReport>,
        total: Duration,
        staging: Vec<crate::StagingSample>,
    ) {
        let mut g = lock(&self.report);
        g.0.tiers = tiers;
        g.0.total = total;
        g.0.staging = staging;
        g.1 = true;
        drop(g);
        self.done.notify_all();
        self.notify.notify_waiters();
    }

    fn snapshot(&self) -> (SaveReport, bool) {
        lock(&self.report).clone()
    }
}

/// Handle to a save whose flush may still be running.
#[derive(Debug, Clone)]
pub struct SaveHandle {
    pub(crate) shared: Arc<Shared>,
}

fn outcome(report: SaveReport) -> Result<SaveReport> {
    if report.skipped || report.tiers.is_empty() || report.is_durable() {
        return Ok(report);
    }
    let failures = report
        .tiers
        .iter()
        .map(|t| TierFailure {
            tier: t.tier.clone(),
            error: t.error.clone().unwrap_or_else(|| {
                Error::Internal(format!(
                    "step {} not committed and no reason given",
                    report.step
                ))
            }),
        })
        .collect();
    Err(Error::NotCommitted {
        step: report.step,
        failures,
    })
}

impl SaveHandle {
    /// A handle whose flush is still to come.
    pub(crate) fn pending(report: SaveReport) -> Self {
        Self {
            shared: Shared::new(report),
        }
    }

    /// A handle for a save that is over before it started (skipped, or no
    /// tier to write to).
    pub(crate) fn finished(report: SaveReport, tiers: Vec<TierReport>, total: Duration) -> Self {
        let h = Self::pending(report);
        h.finish(tiers, total, Vec::new());
        h
    }

    /// Completes the save with every tier's report (and the pool's
    /// occupancy during it).
    pub(crate) fn finish(
        &self,
        tiers: Vec<TierReport>,
        total: Duration,
        staging: Vec<crate::StagingSample>,
    ) {
        self.shared.finish(tiers, total, staging);
    }

    /// Step of the save.
    pub fn step(&self) -> u64 {
        self.shared.snapshot().0.step
    }

    /// The math-stop of this save (known as soon as `save` returns).
    pub fn math_stop(&self) -> Duration {
        self.shared.snapshot().0.math_stop
    }

    /// Whether the save was skipped (busy pool, policy `Skip`).
    pub fn skipped(&self) -> bool {
        self.shared.snapshot().0.skipped
    }

    /// Whether the flush has finished (successfully or not).
    pub fn is_done(&self) -> bool {
        self.shared.snapshot().1
    }

    /// The report as it stands now.
    pub fn report(&self) -> SaveReport {
        self.shared.snapshot().0
    }

    /// Blocks until every tier has finished, and returns the report. Fails
    /// if no tier committed the checkpoint.
    pub fn wait(&self) -> Result<SaveReport> {
        let mut g = lock(&self.shared.report);
        while !g.1 {
            g = wait(&self.shared.done, g);
        }
        outcome(g.0.clone())
    }

    /// Async form of [`SaveHandle::wait`].
    pub async fn durable(&self) -> Result<SaveReport> {
        loop {
            let notified = self.shared.notify.notified();
            let (report, done) = self.shared.snapshot();
            if done {
                return outcome(report);
            }
            notified.await;
        }
    }
}
