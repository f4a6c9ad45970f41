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

pub mod reshard;
pub(crate) mod verify;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result, TierFailure};
use crate::format::checksum::verify_chunks;
use crate::format::layout;
use crate::format::manifest::{Manifest, Piece};
use crate::model::spec::{ShardSpec, checked_nbytes};
use crate::model::{LoopState, TensorViewMut};
use crate::restore::reshard::plan_runs;
use crate::store;
use crate::tier::Tier;

/// Bytes per parallel read of a large tensor (rounded up to a multiple of
/// the chunk size). Small enough that the reads in flight at any moment are
/// neighbours in the file: together they form one forward sequential stream,
/// which storage (and a virtual disk's host-side readahead) serves far better
/// than several streams far apart.
const READ_UNIT: u64 = 8 << 20;

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

enum Unit<'a> {
    Direct {
        path: String,
        offset: u64,
        buf: &'a mut [u8],
        first_chunk: usize,
        crcs: &'a [u32],
    },
    Scatter {
        name: String,
        buf: &'a mut [u8],
        region: ShardSpec,
        global_shape: Vec<u64>,
        pieces: Vec<&'a Piece>,
        elem: u64,
    },
}

/// Reads every target from one checkpoint on one tier, verifying every
/// chunk it reads. Returns the bytes read.
pub(crate) fn read_targets(
    handle: &tokio::runtime::Handle,
    tier: &dyn Tier,
    m: &Manifest,
    targets: &mut [&mut dyn TensorViewMut],
    threads: usize,
) -> Result<u64> {
    // Validate every target before touching storage or the caller's memory.
    let mut regions = Vec::with_capacity(targets.len());
    for t in targets.iter() {
        let name = t.name();
        let entry = m.tensors.get(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!("not in checkpoint step {} of run {}", m.step, m.run),
            )
        })?;
        if entry.dtype != t.dtype() {
            return Err(Error::tensor(
                name,
                format!(
                    "checkpoint holds {}, the buffer is {}",
                    entry.dtype,
                    t.dtype()
                ),
            ));
        }
        let region = match t.shard() {
            Some(s) => {
                s.validate()
                    .map_err(|e| Error::tensor(name, e.to_string()))?;
                if s.global_shape != entry.shape {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "shard of global shape {:?}, checkpoint has {:?}",
                            s.global_shape, entry.shape
                        ),
                    ));
                }
                if s.shape != t.shape() {
                    return Err(Error::tensor(
                        name,
                        format!("shard shape {:?} but buffer shape {:?}", s.shape, t.shape()),
                    ));
                }
                s.clone()
            }
            None => {
                if t.shape() != entry.shape.as_slice() {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "checkpoint shape {:?}, buffer shape {:?}",
                            entry.shape,
                            t.shape()
                        ),
                    ));
                }
                ShardSpec::full(entry.shape.clone())
            }
        };
        regions.push(region);
    }
    let dir = layout::step_dir(&m.run, m.step);
    // Only the files holding pieces these targets need: a rank restores its
    // shard even when another rank's file is gone from this tier.
    let mut needed = std::collections::BTreeSet::new();
    for (t, region) in targets.iter().zip(&regions) {
        for p in &m.tensors[t.name()].pieces {
            if p.shard(&region.global_shape).intersect(region).is_some() {
                needed.insert(p.rank);
            }
        }
    }
    block_on(
        handle,
        store::check_rank_files(tier, m, |r| needed.contains(&r)),
    )?;

    let mut units: Vec<Unit<'_>> = Vec::new();
    for (t, region) in targets.iter_mut().zip(regions) {
        let name = t.name().to_string();
        let entry = &m.tensors[&name];
        let want = checked_nbytes(&region.shape, entry.dtype)
            .ok_or_else(|| Error::tensor(&name, "size overflows"))?;
        let buf = t.bytes_mut();
        if buf.len() as u64 != want {
            return Err(Error::tensor(
                &name,
                format!("buffer holds {} bytes, {want} needed", buf.len()),
            ));
        }
        let exact = entry
            .pieces
            .iter()
            .find(|p| p.global_offsets == region.offsets && p.shape == region.shape);
        match exact {
            Some(p) => {
                let path = format!("{dir}/{}", p.file);
                let unit = READ_UNIT.max(m.chunk_size) / m.chunk_size * m.chunk_size;
                for (i, part) in buf.chunks_mut(unit as usize).enumerate() {
                    let rel = i as u64 * unit;
                    units.push(Unit::Direct {
                        path: path.clone(),
                        offset: p.offset + rel,
                        buf: part,
                        first_chunk: (rel / m.chunk_size) as usize,
                        crcs: &p.crc32c,
                    });
                }
            }
            None => {
                let pieces: Vec<&Piece> = entry
                    .pieces
                    .iter()
                    .filter(|p| p.shard(&entry.shape).intersect(&region).is_some())
                    .collect();
                units.push(Unit::Scatter {
                    name,
                    buf,
                    region,
                    global_shape: entry.shape.clone(),
                    pieces,
                    elem: entry.dtype.size() as u64,
                });
            }
        }
    }

    // Direct reads in file order, so the reads in flight move forward
    // through the file together; scattered (resharded) pieces after them.
    // Reversed, because workers pop from the end.
    units.sort_by(|a, b| match (a, b) {
        (
            Unit::Direct {
                path: pa,
                offset: oa,
                ..
            },
            Unit::Direct {
                path: pb,
                offset: ob,
                ..
            },
        ) => (pa, oa).cmp(&(pb, ob)),
        (Unit::Direct { .. }, Unit::Scatter { .. }) => std::cmp::Ordering::Less,
        (Unit::Scatter { .. }, Unit::Direct { .. }) => std::cmp::Ordering::Greater,
        (Unit::Scatter { buf: x, .. }, Unit::Scatter { buf: y, .. }) => y.len().cmp(&x.len()),
    });
    units.reverse();
    let queue = Mutex::new(units);
    let total = Mutex::new(0u64);
    let threads = threads.clamp(1, 64);
    let chunk_size = m.chunk_size;
    // Readers only read, so `threads` reads stay in flight at all times;
    // verification runs on its own threads, overlapping the next reads
    // instead of stalling them (a reader that verified its own buffer would
    // leave the device idle for the length of every crc pass).
    let verifiers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16);
    let (verify_tx, verify_rx) = std::sync::mpsc::channel::<Verify<'_>>();
    let verify_rx = Mutex::new(verify_rx);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let mut workers = Vec::with_capacity(threads + verifiers);
        for _ in 0..verifiers {
            workers.push(s.spawn(|| -> Result<()> {
                loop {
                    let job = verify_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(v) = job else { return Ok(()) };
                    if let Err(e) = verify_chunks(&v.path, v.buf, chunk_size, v.first_chunk, v.crcs)
                    {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }));
        }
        for _ in 0..threads {
            let verify_tx = verify_tx.clone();
            workers.push(s.spawn(|| -> Result<()> {
                let verify_tx = verify_tx;
                loop {
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(());
                    }
                    let unit = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some(unit) = unit else { return Ok(()) };
                    let r = handle.block_on(run_unit(tier, &dir, unit, chunk_size));
                    let (n, verify) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(e);
                        }
                    };
                    *total.lock().unwrap_or_else(|e| e.into_inner()) += n;
                    if let Some(v) = verify {
                        // The verifiers outlive every reader, so the send
                        // only fails if one of them failed already.
                        if verify_tx.send(v).is_err() {
                            return Ok(());
                        }
                    }
                }
            }));
        }
        drop(verify_tx);
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a restore thread panicked".into())))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(total.into_inner().unwrap_or(0))
}

/// A buffer read but not yet verified.
struct Verify<'a> {
    path: String,
    buf: &'a mut [u8],
    first_chunk: usize,
    crcs: &'a [u32],
}

/// Reads one unit. A direct read is returned for verification by the
/// caller's verifier threads; a scattered one is verified here, before its
/// pieces are copied out of the scratch buffer.
async fn run_unit<'a>(
    tier: &dyn Tier,
    dir: &str,
    unit: Unit<'a>,
    chunk_size: u64,
) -> Result<(u64, Option<Verify<'a>>)> {
    match unit {
        Unit::Direct {
            path,
            offset,
            buf,
            first_chunk,
            crcs,
        } => {
            tier.read_into(&path, offset, buf).await?;
            let n = buf.len() as u64;
            Ok((
                n,
                Some(Verify {
                    path,
                    buf,
                    first_chunk,
                    crcs,
                }),
            ))
        }
        Unit::Scatter {
            name,
            buf,
            region,
            global_shape,
            pieces,
            elem,
        } => {
            let mut read = 0u64;
            for p in pieces {
                let runs = plan_runs(&p.shard(&global_shape), &region);
                let (Some(lo), Some(hi)) = (
                    runs.iter().map(|r| r.src * elem).min(),
                    runs.iter().map(|r| (r.src + r.len) * elem).max(),
                ) else {
                    continue;
                };
                let c0 = lo / chunk_size;
                let start = c0 * chunk_size;
                let end = (hi.div_ceil(chunk_size) * chunk_size).min(p.length);
                let mut scratch = vec![0u8; (end - start) as usize];
                let path = format!("{dir}/{}", p.file);
                tier.read_into(&path, p.offset + start, &mut scratch)
                    .await?;
                verify_chunks(&path, &scratch, chunk_size, c0 as usize, &p.crc32c)?;
                read += scratch.len() as u64;
                for r in runs {
                    let s = (r.src * elem - start) as usize;
                    let d = (r.dst * elem) as usize;
                    let n = (r.len * elem) as usize;
                    let (Some(src), Some(dst)) = (scratch.get(s..s + n), buf.get_mut(d..d + n))
                    else {
                        return Err(Error::tensor(&name, "resharding plan out of bounds"));
                    };
                    dst.copy_from_slice(src);
                }
            }
            Ok((read, None))
        }
    }
}
