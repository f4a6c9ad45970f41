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

mod read;
pub mod reshard;
pub(crate) mod verify;

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
    /// Tensors in the checkpoint that the caller did not ask for.
    pub unrequested: Vec<String>,
    /// World size of the checkpoint.
    pub world_size: u32,
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
/// start); fails if checkpoints exist but none verifies.
pub(crate) fn restore(
    handle: &tokio::runtime::Handle,
    tiers: &[Arc<dyn Tier>],
    run: &str,
    rank: u32,
    targets: &mut [&mut dyn TensorViewMut],
    opts: &RestoreOptions,
) -> Result<Option<Restored>> {
    let start = Instant::now();
    crate::phase("restore", opts.step.unwrap_or(0));
    let mut skipped = Vec::new();
    let mut unlisted = Vec::new();
    let mut steps_per_tier = Vec::with_capacity(tiers.len());
    for tier in tiers {
        let tier_ref = tier.as_ref();
        match block_on(handle, store::committed_steps(tier_ref, run)) {
            Ok(s) => steps_per_tier.push(s),
            Err(e) => {
                skipped.push(Skipped {
                    step: None,
                    tier: tier.location(),
                    error: e.clone(),
                });
                unlisted.push(TierFailure {
                    tier: tier.location(),
                    error: e,
                });
                steps_per_tier.push(Vec::new());
            }
        }
    }
    let mut steps: Vec<u64> = steps_per_tier.iter().flatten().copied().collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    if let Some(want) = opts.step {
        if !steps.contains(&want) {
            return Err(Error::NotFound {
                path: format!(
                    "{} (committed steps: {steps:?})",
                    layout::manifest_path(run, want)
                ),
            });
        }
        steps.retain(|s| *s == want);
    }
    if steps.is_empty() {
        // A tier that cannot be listed may hold the run's checkpoints:
        // starting fresh would silently throw its progress away.
        return if unlisted.is_empty() {
            Ok(None)
        } else {
            Err(Error::Unlisted {
                run: run.to_string(),
                failures: unlisted,
            })
        };
    }
    for step in steps {
        for (i, tier) in tiers.iter().enumerate() {
            if !steps_per_tier[i].contains(&step) {
                continue;
            }
            match attempt(handle, tier.as_ref(), run, step, rank, targets, opts) {
                Ok((m, bytes_read)) => {
                    let requested: Vec<&str> = targets.iter().map(|t| t.name()).collect();
                    let loop_state = m
                        .ranks
                        .get(rank as usize)
                        .or(m.ranks.first())
                        .map(|r| r.loop_state.clone())
                        .unwrap_or_default();
                    let restored = Restored {
                        step,
                        tier: tier.location(),
                        tier_index: i,
                        loop_state,
                        unrequested: m
                            .tensors
                            .keys()
                            .filter(|k| !requested.contains(&k.as_str()))
                            .cloned()
                            .collect(),
                        skipped,
                        world_size: m.world_size,
                        bytes_read,
                        elapsed: start.elapsed(),
                    };
                    if restored.fell_back() {
                        tracing::warn!(step, tier = %restored.tier, skipped = %describe(&restored.skipped), "restored an older or slower copy");
                    }
                    return Ok(Some(restored));
                }
                Err(e) if e.is_data_fault() => {
                    tracing::warn!(step, tier = %tier.location(), error = %e, "checkpoint failed verification; falling back");
                    skipped.push(Skipped {
                        step: Some(step),
                        tier: tier.location(),
                        error: e,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(Error::Incomplete {
        path: run.to_string(),
        reason: format!("no committed checkpoint verified: {}", describe(&skipped)),
    })
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
fn block_on<F: std::future::Future + Send>(handle: &tokio::runtime::Handle, f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| handle.block_on(f))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn attempt(
    handle: &tokio::runtime::Handle,
    tier: &dyn Tier,
    run: &str,
    step: u64,
    rank: u32,
    targets: &mut [&mut dyn TensorViewMut],
    opts: &RestoreOptions,
) -> Result<(Manifest, u64)> {
    let m = block_on(handle, store::load_manifest(tier, run, step))?;
    if let Some(limit) = opts.not_after_unix_ms
        && m.created_unix_ms > limit
    {
        return Err(Error::AfterTrustLimit {
            step,
            created_unix_ms: m.created_unix_ms,
            limit_unix_ms: limit,
        });
    }
    let _ = rank;
    let bytes = read_targets(handle, tier, &m, targets, opts.threads.max(1))?;
    Ok((m, bytes))
}
