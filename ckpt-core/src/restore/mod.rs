//! Restore: the newest committed step, read from the first tier (in the
//! caller's priority order) that has a verified copy, every chunk's crc32c
//! checked as it is read, straight into the caller's buffers.
//!
//! A corrupt, truncated or missing piece, or a garbage manifest, makes the
//! attempt fail with an error naming the file and chunk; restore then tries
//! the next tier, then the previous committed step, and reports what it
//! skipped and why. A caller error (a buffer of the wrong shape or dtype, a
//! tensor the checkpoint lacks) stops restore at once: falling back to an
//! older checkpoint would not fix it.

pub(crate) mod agree;
pub(crate) mod read;
pub mod reshard;
pub(crate) mod verify;

pub use agree::Agreement;
pub(crate) use agree::Numbered;
pub(crate) use read::read_targets;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result, TierFailure};
use crate::format::layout;
use crate::format::manifest::Manifest;
use crate::model::{LoopState, TensorViewMut};
use crate::store;
use crate::tier::Tier;

/// Options of a restore.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// Restore exactly this step instead of the newest.
    pub step: Option<u64>,
    /// Skip checkpoints created after this time (milliseconds since the
    /// Unix epoch): set it to `detection − L` when an error was detected
    /// with latency `L`, so no checkpoint that may hold the error is loaded.
    pub not_after_unix_ms: Option<u64>,
    /// Parallel reads (0: the checkpointer's `restore_threads`, else 4).
    pub threads: usize,
    /// Whose loop state to return (a checkpointer uses its own rank).
    pub rank: u32,
}

impl RestoreOptions {
    /// Restore exactly `step`.
    pub fn step(mut self, step: u64) -> Self {
        self.step = Some(step);
        self
    }

    /// Skip checkpoints created after `unix_ms`.
    pub fn not_after_unix_ms(mut self, unix_ms: u64) -> Self {
        self.not_after_unix_ms = Some(unix_ms);
        self
    }

    /// An error was detected at `detection_unix_ms` with detection latency
    /// `latency`: only checkpoints created at least `latency` before the
    /// detection can be trusted (Saxena et al. 2024, section 3).
    pub fn after_detected_error(self, detection_unix_ms: u64, latency: Duration) -> Self {
        self.not_after_unix_ms(detection_unix_ms.saturating_sub(latency.as_millis() as u64))
    }

    /// Number of parallel reads.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Return rank `rank`'s loop state (for a [`CheckpointStore`](crate::CheckpointStore);
    /// a checkpointer restores its own rank's).
    pub fn rank(mut self, rank: u32) -> Self {
        self.rank = rank;
        self
    }
}

/// A checkpoint that restore did not use, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Its step (`None` if the tier could not even be listed).
    pub step: Option<u64>,
    /// The tier.
    pub tier: String,
    /// The error that ruled it out (a data fault: corrupt chunk, missing
    /// file, invalid manifest, unreachable tier...).
    #[serde(rename = "reason", serialize_with = "crate::error::serialize_error")]
    pub error: Error,
}

/// What a restore loaded.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    /// The step loaded.
    pub step: u64,
    /// The tier it came from.
    pub tier: String,
    /// Index of that tier in the caller's list.
    pub tier_index: usize,
    /// This rank's loop state (rank 0's if the checkpoint has fewer ranks).
    pub loop_state: LoopState,
    /// Newer checkpoints (or copies on faster tiers) that failed
    /// verification or were excluded, newest first.
    pub skipped: Vec<Skipped>,
    /// Committed steps newer than the one restored (left behind: corrupt,
    /// not restorable by every rank, or excluded by the options). A
    /// checkpointer uncommits them before it saves again, so the run's
    /// lineage continues from the restored step.
    pub newer_committed: Vec<u64>,
    /// Tensors in the checkpoint that the caller did not ask for.
    pub unrequested: Vec<String>,
    /// Whether the job resumes from a step older than one some rank sees
    /// committed (the checkpointer records the rollback before its next
    /// save; the same on every rank).
    #[serde(skip)]
    pub(crate) rolls_back: bool,
    /// World size of the checkpoint.
    pub world_size: u32,
    /// When the restored step's save started (its manifest's
    /// `created_unix_ms`).
    pub saved_unix_ms: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Wall time of the restore.
    pub elapsed: Duration,
}

impl Restored {
    /// Whether restore had to skip anything.
    pub fn fell_back(&self) -> bool {
        !self.skipped.is_empty()
    }
}

/// Restores `targets` for `rank` from `tiers` (priority order). Returns
/// `Ok(None)` if no tier holds any committed checkpoint of `run` (a fresh
/// start); fails if checkpoints exist but none verifies. With `agreement`
/// (a job of several ranks), every rank ends on the same step: the newest
/// one every rank can verify its pieces of.
///
/// On an error every target is zeroed: attempts that failed verification
/// may have left unverified bytes of several steps in them, and a caller
/// that starts fresh after an error must not train from those.
pub(crate) fn restore(
    handle: &tokio::runtime::Handle,
    tiers: &[Arc<dyn Tier>],
    run: &str,
    rank: u32,
    targets: &mut [&mut dyn TensorViewMut],
    opts: &RestoreOptions,
    agreement: Option<&dyn Agreement>,
) -> Result<Option<Restored>> {
    let out = restore_inner(handle, tiers, run, rank, targets, opts, agreement);
    if out.is_err() {
        for t in targets.iter_mut() {
            t.bytes_mut().fill(0);
        }
    }
    out
}

fn restore_inner(
    handle: &tokio::runtime::Handle,
    tiers: &[Arc<dyn Tier>],
    run: &str,
    rank: u32,
    targets: &mut [&mut dyn TensorViewMut],
    opts: &RestoreOptions,
    agreement: Option<&dyn Agreement>,
) -> Result<Option<Restored>> {
    let start = Instant::now();
    crate::phase("restore", opts.step.unwrap_or(0));
    let mut r = Restorer::list(handle, tiers, run, rank, opts)?;
    let found = match agreement {
        None => r.newest_at_most(opts.step, targets)?,
        Some(a) => agree::restore_agreed(&mut r, a, opts.step, targets)?,
    };
    let Some(found) = found else {
        return r.nothing();
    };
    let restored = r.restored(found, targets, start);
    if restored.fell_back() {
        tracing::warn!(step = restored.step, tier = %restored.tier, skipped = %describe(&restored.skipped), "restored an older or slower copy");
    }
    Ok(Some(restored))
}

/// A checkpoint one rank read and verified.
pub(crate) struct Found {
    step: u64,
    tier_index: usize,
    manifest: Manifest,
    /// Whether some rank of the job (this one alone without an agreement)
    /// sees a committed step newer than this one: then the job rolls back.
    pub(crate) job_newer: bool,
    bytes_read: u64,
}

/// One rank's restore: the committed steps each tier lists, and the tries
/// that failed.
pub(crate) struct Restorer<'a> {
    handle: &'a tokio::runtime::Handle,
    tiers: &'a [Arc<dyn Tier>],
    run: &'a str,
    rank: u32,
    opts: &'a RestoreOptions,
    /// Per tier, its committed steps.
    listed: Vec<Vec<u64>>,
    unlisted: Vec<TierFailure>,
    skipped: Vec<Skipped>,
}

impl<'a> Restorer<'a> {
    fn list(
        handle: &'a tokio::runtime::Handle,
        tiers: &'a [Arc<dyn Tier>],
        run: &'a str,
        rank: u32,
        opts: &'a RestoreOptions,
    ) -> Result<Self> {
        let mut r = Self {
            handle,
            tiers,
            run,
            rank,
            opts,
            listed: Vec::with_capacity(tiers.len()),
            unlisted: Vec::new(),
            skipped: Vec::new(),
        };
        // Every tier's steps under the run's longest lineage record, so a
        // tier that missed a rollback does not offer its abandoned steps.
        let lineage = block_on(handle, store::lineage::longest(tiers, run));
        for tier in tiers {
            match block_on(
                handle,
                store::committed_in(tier.as_ref(), run, Some(&lineage)),
            ) {
                Ok(s) => r.listed.push(s),
                Err(e) => {
                    r.skipped.push(Skipped {
                        step: None,
                        tier: tier.location(),
                        error: e.clone(),
                    });
                    r.unlisted.push(TierFailure {
                        tier: tier.location(),
                        error: e,
                    });
                    r.listed.push(Vec::new());
                }
            }
        }
        if let Some(want) = opts.step
            && !r.candidates().contains(&want)
        {
            return Err(Error::NotFound {
                path: format!(
                    "{} (committed steps: {:?})",
                    layout::manifest_path(run, want),
                    r.candidates()
                ),
            });
        }
        Ok(r)
    }

    /// Every committed step on any tier, newest first.
    fn candidates(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = self.listed.iter().flatten().copied().collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        steps.dedup();
        steps
    }

    /// The newest committed step, if any tier lists one.
    fn newest_committed(&self) -> Option<u64> {
        self.candidates().first().copied()
    }

    /// Restores the newest step not above `ceiling` that verifies, trying
    /// tiers in priority order and older steps after data faults (each
    /// recorded in `skipped`). A caller error stops at once.
    fn newest_at_most(
        &mut self,
        ceiling: Option<u64>,
        targets: &mut [&mut dyn TensorViewMut],
    ) -> Result<Option<Found>> {
        let floor = self.opts.step;
        for step in self.candidates() {
            if ceiling.is_some_and(|c| step > c) || floor.is_some_and(|f| step != f) {
                continue;
            }
            for (i, tier) in self.tiers.iter().enumerate() {
                if !self.listed[i].contains(&step) {
                    continue;
                }
                match self.attempt(tier.as_ref(), step, targets) {
                    Ok((manifest, bytes_read)) => {
                        return Ok(Some(Found {
                            job_newer: false,
                            step,
                            tier_index: i,
                            manifest,
                            bytes_read,
                        }));
                    }
                    Err(e) if e.is_data_fault() => {
                        tracing::warn!(step, tier = %tier.location(), error = %e, "checkpoint failed verification; falling back");
                        self.skipped.push(Skipped {
                            step: Some(step),
                            tier: tier.location(),
                            error: e,
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(None)
    }

    fn attempt(
        &self,
        tier: &dyn Tier,
        step: u64,
        targets: &mut [&mut dyn TensorViewMut],
    ) -> Result<(Manifest, u64)> {
        let m = block_on(self.handle, store::load_manifest(tier, self.run, step))?;
        if let Some(limit) = self.opts.not_after_unix_ms
            && m.created_unix_ms > limit
        {
            return Err(Error::AfterTrustLimit {
                step,
                created_unix_ms: m.created_unix_ms,
                limit_unix_ms: limit,
            });
        }
        let bytes = read_targets(self.handle, tier, &m, targets, self.opts.threads.max(1))?;
        Ok((m, bytes))
    }

    /// Nothing restorable: a fresh start only if no tier lists a checkpoint
    /// and every tier could be listed.
    fn nothing(self) -> Result<Option<Restored>> {
        if !self.candidates().is_empty() {
            return Err(Error::Incomplete {
                path: self.run.to_string(),
                reason: format!(
                    "no committed checkpoint verified: {}",
                    describe(&self.skipped)
                ),
            });
        }
        if self.unlisted.is_empty() {
            return Ok(None);
        }
        // A tier that cannot be listed may hold the run's checkpoints:
        // starting fresh would silently throw its progress away.
        Err(Error::Unlisted {
            run: self.run.to_string(),
            failures: self.unlisted,
        })
    }

    fn restored(
        self,
        found: Found,
        targets: &[&mut dyn TensorViewMut],
        start: Instant,
    ) -> Restored {
        let m = &found.manifest;
        let requested: Vec<&str> = targets.iter().map(|t| t.name()).collect();
        let loop_state = m
            .ranks
            .get(self.rank as usize)
            .or(m.ranks.first())
            .map(|r| r.loop_state.clone())
            .unwrap_or_default();
        let newer: Vec<u64> = self
            .candidates()
            .into_iter()
            .filter(|s| *s > found.step)
            .collect();
        let rolls_back = found.job_newer || !newer.is_empty();
        Restored {
            saved_unix_ms: m.created_unix_ms,
            step: found.step,
            tier: self.tiers[found.tier_index].location(),
            tier_index: found.tier_index,
            loop_state,
            unrequested: m
                .tensors
                .keys()
                .filter(|k| !requested.contains(&k.as_str()))
                .cloned()
                .collect(),
            skipped: self.skipped,
            newer_committed: newer,
            rolls_back,
            world_size: m.world_size,
            bytes_read: found.bytes_read,
            elapsed: start.elapsed(),
        }
    }
}

fn describe(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(|s| match s.step {
            Some(step) => format!("step {step} on {}: {}", s.tier, s.error),
            None => format!("{}: cannot list: {}", s.tier, s.error),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs a future to completion from synchronous code. Never called on a
/// runtime worker thread: restore's reads run on their own scoped threads.
pub(crate) fn block_on<F: std::future::Future + Send>(
    handle: &tokio::runtime::Handle,
    f: F,
) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| handle.block_on(f))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
