//! One tier's part of a save: write the shard file from the stream, make
//! it durable, and commit.
//!
//! Commit protocol on every tier (see `docs/ARCHITECTURE.md`):
//! 1. refuse if the step is already committed there (never overwrite a
//!    committed checkpoint);
//! 2. remove this rank's own stale `rank-<r>.json` (uncommit its piece);
//! 3. stream the shard file and make it durable (`finish`: fsync or
//!    multipart complete);
//! 4. write `rank-<r>.json` (the rank's piece, with checksums);
//! 5. the coordinator (rank 0) waits until every rank's manifest of this
//!    incarnation is present, merges and validates them, checks that every
//!    shard file they name is there at its length, and creates
//!    `MANIFEST.json` with a conditional create: the commit point;
//!    other ranks wait until they see it;
//! 6. retention (coordinator only), deleting only older steps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::format::layout;
use crate::format::manifest::{Manifest, RankManifest, StepAborted};
use crate::save::handle::TierReport;
use crate::save::policy::TierPolicy;
use crate::save::stream::{ManifestCell, SaveCtx};
use crate::store;
use crate::tier::{PutMode, Tier};

/// How many blocks the chunk hasher may run ahead of a tier's writer.
const CUT_AHEAD: usize = 4;

/// One tier's part of a save.
pub(crate) struct TierJob {
    pub tier: Arc<dyn Tier>,
    pub policy: TierPolicy,
    pub data: mpsc::UnboundedReceiver<Bytes>,
    pub manifest: watch::Receiver<ManifestCell>,
    /// Completion of this tier's previous save: saves are flushed to a tier
    /// in order, so retention never races an older in-flight save.
    pub previous: Option<oneshot::Receiver<()>>,
    pub done: oneshot::Sender<()>,
    /// What the previous save committed on this tier holds (incremental
    /// saves compare against it; replaced after this one commits).
    pub base: crate::save::incremental::BaseCell,
}

pub(crate) async fn flush_tier(ctx: Arc<SaveCtx>, mut job: TierJob) -> TierReport {
    if let Some(prev) = job.previous.take() {
        let _ = prev.await;
    }
    let location = job.tier.location();
    let start = Instant::now();
    let mut flush = Duration::ZERO;
    let mut committed_at = None;
    let mut bytes = (0, 0);
    let result = run_tier(
        &ctx,
        &mut job,
        start,
        &mut flush,
        &mut committed_at,
        &mut bytes,
    )
    .await;
    let total = start.elapsed();
    if result.is_err() {
        // What this save compared against may be what made it fail (a step
        // its chunks point into, deleted by a gc run from outside): the
        // next save on this tier is whole.
        *crate::sync::lock(&job.base) = None;
    }
    let _ = job.done.send(());
    let durable = committed_at.unwrap_or(total);
    let report = TierReport {
        tier: location,
        flush,
        commit: durable.saturating_sub(flush),
        retention: total.saturating_sub(durable),
        written: bytes.0,
        referenced: bytes.1,
        durable_at: committed_at
            .filter(|_| result.is_ok())
            .map(|c| (start + c).saturating_duration_since(ctx.started)),
        committed: result.is_ok(),
        error: result.err(),
    };
    match &report.error {
        None => {
            tracing::debug!(tier = %report.tier, step = ctx.step, flush = ?report.flush, commit = ?report.commit, "checkpoint committed")
        }
        Some(e) => {
            tracing::warn!(tier = %report.tier, step = ctx.step, error = %e, "checkpoint not committed on tier")
        }
    }
    report
}

async fn wait_manifest(rx: &mut watch::Receiver<ManifestCell>) -> Result<Arc<RankManifest>> {
    let cell = rx
        .wait_for(|c| c.is_some())
        .await
        .map_err(|_| Error::InvalidState("save was abandoned".into()))?
        .clone();
    match cell {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(e),
        None => Err(Error::InvalidState("save was abandoned".into())),
    }
}

async fn run_tier(
    ctx: &Arc<SaveCtx>,
    job: &mut TierJob,
    start: Instant,
    flush: &mut Duration,
    committed_at: &mut Option<Duration>,
    bytes: &mut (u64, u64),
) -> Result<()> {
    let tier = job.tier.as_ref();
    let manifest_path = layout::manifest_path(&ctx.run, ctx.step);
    // Every rank looks (followers too): the coordinator uncommits a step a
    // rollback abandoned that is still in the way.
    if tier.size(&manifest_path).await.is_ok()
        && !(if ctx.rank == 0 {
            uncommit_abandoned(tier, ctx).await
        } else {
            is_abandoned(tier, ctx).await
        })
    {
        return Err(Error::AlreadyExists {
            path: manifest_path,
        });
    }
    let own_manifest = ctx.rank_manifest_path(ctx.rank);
    tier.delete(&own_manifest).await?;
    if !job.policy.stagger.is_zero() {
        tokio::time::sleep(job.policy.stagger * ctx.rank).await;
    }
    let data_path = ctx.data_path();
    crate::phase("flush", ctx.step);
    let mut writer = tier.create(&data_path).await?;
    let mut written: u64 = 0;
    let rate_start = Instant::now();
    let compression = job.policy.compression;
    let mut base = crate::sync::lock(&job.base).clone();
    if let Some(step) = base.as_ref().and_then(|b| b.pending) {
        // This process restored `step`: its chunk hashes on this tier are
        // the base (none there, or unreadable: a whole save).
        base = match store::load_manifest(tier, &ctx.run, step).await {
            // This tier may still hold a step of that number that a
            // rollback abandoned (its uncommit failed there): never a base.
            Ok(m) if ctx.lineage.abandons(step, m.lineage) => {
                tracing::debug!(tier = %tier.location(), step, "no incremental base: the tier's step is an abandoned one");
                None
            }
            Ok(m) => crate::save::incremental::Base::from_manifest(&m, ctx.rank).map(Arc::new),
            Err(e) => {
                tracing::debug!(tier = %tier.location(), step, error = %e, "no incremental base: a whole save");
                None
            }
        };
        *crate::sync::lock(&job.base) = base.clone();
    }
    let dedup = (job.policy.incremental.is_some()
        || compression != crate::save::policy::Compression::Off)
        .then(|| {
            // A whole save every `full_every`: no base to skip against
            // (its write rate still counts for Auto).
            let skip = job
                .policy
                .incremental
                .is_some_and(|n| base.as_ref().is_none_or(|b| b.chain + 1 < n));
            let hash = job.policy.incremental.is_some();
            crate::save::incremental::Dedup::new(ctx.clone(), base, skip, hash, compression)
        });
    // Hashing, comparing and compressing run on a thread of their own, a
    // few blocks ahead of the writer: the tier writes chunk i while chunk
    // i+1 is hashed, so an incremental save that finds nothing to skip
    // costs what a plain one does (one core hashes while the disk or the
    // network works).
    let mut cutter = dedup.map(|mut d| {
        let mut input = std::mem::replace(&mut job.data, mpsc::unbounded_channel().1);
        let (tx, rx) = mpsc::channel::<Vec<Bytes>>(CUT_AHEAD);
        let task = tokio::task::spawn_blocking(move || {
            while let Some(b) = input.blocking_recv() {
                if tx.blocking_send(d.push(b)).is_err() {
                    // The writer gave up (its error is the save's).
                    break;
                }
            }
            d
        });
        (rx, task)
    });
    loop {
        let next = match cutter.as_mut() {
            Some((rx, _)) => rx.recv().await,
            None => job.data.recv().await.map(|b| vec![b]),
        };
        let Some(parts) = next else { break };
        for b in parts {
            written += b.len() as u64;
            if let Err(e) = writer.write(b).await {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        if let Some(rate) = job.policy.rate_limit {
            let due = Duration::from_secs_f64(written as f64 / rate as f64);
            let elapsed = rate_start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    let dedup = match cutter {
        Some((_, task)) => match task.await {
            Ok(d) => Some(d),
            Err(e) => {
                let _ = writer.abort().await;
                return Err(Error::Internal(format!(
                    "the chunk hasher of step {} stopped: {e}",
                    ctx.step
                )));
            }
        },
        None => None,
    };
    let rank_manifest = match wait_manifest(&mut job.manifest).await {
        Ok(m) => m,
        Err(e) => {
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    let received = dedup.as_ref().map_or(written, |d| d.received());
    *bytes = (written, dedup.as_ref().map_or(0, |d| d.referenced));
    if received != rank_manifest.file_len {
        let _ = writer.abort().await;
        return Err(Error::Incomplete {
            path: data_path,
            reason: format!("wrote {received} of {} bytes", rank_manifest.file_len),
        });
    }
    // Where chunks were skipped, this tier's manifest has chunk maps and
    // the file's own length.
    let (rank_manifest, next_base) = match dedup {
        Some(d) => match d.finish(&rank_manifest) {
            Ok((m, b)) => (Arc::new(m), Some(b)),
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        },
        None => (rank_manifest, None),
    };
    writer.finish().await?;
    *flush = start.elapsed();
    crate::phase("commit", ctx.step);
    tier.put(
        &own_manifest,
        Bytes::from(rank_manifest.to_json()?),
        PutMode::Overwrite,
    )
    .await?;
    if ctx.rank == 0 {
        let gathered = async {
            let mut m = gather(tier, ctx, &rank_manifest).await?;
            check_shard_files(tier, &m).await?;
            m.lineage = store::lineage::for_commit(tier, &ctx.run, &ctx.lineage).await?;
            Ok::<_, Error>(m)
        };
        let manifest = match gathered.await {
            Ok(m) => m,
            Err(e) => {
                // The other ranks wait for this step's MANIFEST: tell them
                // at once that it will not come, and why.
                abort_step(tier, ctx, &e).await;
                return Err(e);
            }
        };
        let guarantee = tier.create_guarantee().await;
        let mut manifest = manifest;
        manifest.commit = Some(ctx.attempt.clone());
        let json = Bytes::from(manifest.to_json()?);
        let put_start = Instant::now();
        if !guarantee.is_atomic()
            && tier.size(&manifest_path).await.is_ok()
            && !uncommit_abandoned(tier, ctx).await
        {
            // The single-writer rule: look before writing where the create
            // itself does not refuse.
            return Err(Error::AlreadyExists {
                path: manifest_path,
            });
        }
        let mut created = tier
            .put(&manifest_path, json.clone(), PutMode::Create)
            .await;
        if matches!(created, Err(Error::AlreadyExists { .. }))
            && guarantee.is_atomic()
            && uncommit_abandoned(tier, ctx).await
        {
            created = tier
                .put(&manifest_path, json.clone(), PutMode::Create)
                .await;
        }
        match created {
            Ok(()) => {}
            // A create whose reply was lost and retried (object_store
            // retrying a 5xx and getting 412; NFS retransmitting `link`)
            // reports AlreadyExists for the object it created itself.
            Err(Error::AlreadyExists { .. })
                if tier.get(&manifest_path).await.is_ok_and(|b| b == json) =>
            {
                tracing::debug!(
                    step = ctx.step,
                    "the MANIFEST already there is this commit's"
                );
            }
            Err(e) => return Err(e),
        }
        if guarantee.is_atomic() {
            // The probe can only find a race by seeing one: read the
            // MANIFEST back once anyway (one small get), which catches a
            // racer that overwrote it before now.
            if let Ok(found) = tier.get(&manifest_path).await
                && found != json
            {
                return Err(Error::CommitConflict {
                    path: manifest_path,
                    reason: format!(
                        "another coordinator's MANIFEST replaced this one's on {} (incarnation {}, commit {})",
                        tier.location(),
                        ctx.incarnation,
                        ctx.attempt
                    ),
                });
            }
        } else {
            confirm_commit(tier, ctx, &manifest_path, &json, put_start.elapsed()).await?;
        }
        // A gc from elsewhere (`ckpt gc`, a newer incarnation's retention)
        // may have removed this step's files, or those its chunks point
        // into, as leftovers between the check above and the MANIFEST:
        // look again now that the step is visible, and uncommit it rather
        // than leave a committed step with missing data.
        if let Err(e) = check_shard_files(tier, &manifest).await {
            tracing::warn!(tier = %tier.location(), step = ctx.step, error = %e, "files of the step went missing while it was committed: uncommitted");
            let _ = tier.delete(&manifest_path).await;
            return Err(e);
        }
        *committed_at = Some(start.elapsed());
        crate::phase("gc", ctx.step);
        match store::gc_running(
            tier,
            &ctx.run,
            &job.policy.retention,
            Some(&ctx.incarnation),
            &|_, _| {},
        )
        .await
        {
            Ok(r) if !r.deleted_steps.is_empty() || !r.removed_leftovers.is_empty() => {
                tracing::debug!(tier = %tier.location(), deleted = ?r.deleted_steps, leftovers = ?r.removed_leftovers, "retention");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(tier = %tier.location(), error = %e, "retention failed; older checkpoints kept")
            }
        }
    } else {
        let aborted_path = format!(
            "{}/{}",
            layout::step_dir(&ctx.run, ctx.step),
            layout::ABORTED
        );
        wait_for(
            ctx,
            || async {
                if tier.size(&manifest_path).await.is_ok() {
                    return Ok(true);
                }
                match tier.get(&aborted_path).await {
                    Ok(b) => match StepAborted::parse(&aborted_path, &b) {
                        Ok(a) if a.incarnation == ctx.incarnation => Err(a.into_error(ctx.step)),
                        _ => Ok(false),
                    },
                    Err(_) => Ok(false),
                }
            },
            "the coordinator's MANIFEST",
        )
        .await?;
        *committed_at = Some(start.elapsed());
    }
    if let Some(mut b) = next_base {
        let secs = flush.as_secs_f64();
        b.write_bps = (secs > 0.0 && bytes.0 > 0).then(|| bytes.0 as f64 / secs);
        *crate::sync::lock(&job.base) = Some(Arc::new(b));
    }
    Ok(())
}

/// A MANIFEST already at this step's path that a rollback abandoned (the
/// uncommit missed this tier, and the process that would have retried it
/// is gone): uncommitted now, with its audit copy, so the step number can
/// be reused. Returns whether it was.
async fn uncommit_abandoned(tier: &dyn Tier, ctx: &SaveCtx) -> bool {
    if !is_abandoned(tier, ctx).await {
        return false;
    }
    match store::abandon_steps(tier, &ctx.run, &[ctx.step], &ctx.incarnation).await {
        Ok(done) => {
            tracing::info!(tier = %tier.location(), step = ctx.step, "a step a rollback abandoned was still committed here: uncommitted");
            !done.is_empty()
        }
        Err(e) => {
            tracing::warn!(tier = %tier.location(), step = ctx.step, error = %e, "cannot uncommit the abandoned step in the way of this commit");
            false
        }
    }
}

/// Whether the MANIFEST at this step's path is one a rollback abandoned.
async fn is_abandoned(tier: &dyn Tier, ctx: &SaveCtx) -> bool {
    store::load_manifest(tier, &ctx.run, ctx.step)
        .await
        .is_ok_and(|old| ctx.lineage.abandons(ctx.step, old.lineage))
}

/// Records why the coordinator gives up on this step (`ABORTED.json`), so
/// the other ranks stop waiting for its MANIFEST; best effort.
async fn abort_step(tier: &dyn Tier, ctx: &SaveCtx, e: &Error) {
    let marker = StepAborted::of(&ctx.incarnation, e);
    let path = format!(
        "{}/{}",
        layout::step_dir(&ctx.run, ctx.step),
        layout::ABORTED
    );
    let put = match marker.to_json() {
        Ok(json) => tier.put(&path, Bytes::from(json), PutMode::Overwrite).await,
        Err(e) => Err(e),
    };
    if let Err(put) = put {
        tracing::warn!(tier = %tier.location(), step = ctx.step, error = %put, "cannot record the aborted step; the other ranks wait for their timeout");
    }
}

/// Where rank `rank` notes that it skipped `step` (for the coordinator).
pub(crate) fn skip_note_path(run: &str, step: u64, rank: u32) -> String {
    format!(
        "{}/rank-{rank:05}.skipped.json",
        layout::step_dir(run, step)
    )
}

/// Tells the other ranks that this rank skipped `step`: the coordinator
/// (rank 0) marks the step aborted at once; another rank leaves a note
/// that the coordinator, gathering the rank manifests, turns into the
/// abort. Best effort: without it, the step times out as before.
pub(crate) async fn announce_skip(
    tier: &dyn Tier,
    run: &str,
    step: u64,
    rank: u32,
    incarnation: &str,
    why: &Error,
) {
    let marker = StepAborted::of(incarnation, why);
    let path = if rank == 0 {
        format!("{}/{}", layout::step_dir(run, step), layout::ABORTED)
    } else {
        skip_note_path(run, step, rank)
    };
    let put = match marker.to_json() {
        Ok(json) => tier.put(&path, Bytes::from(json), PutMode::Overwrite).await,
        Err(e) => Err(e),
    };
    if let Err(e) = put {
        tracing::warn!(tier = %tier.location(), step, error = %e, "cannot announce the skipped save");
    }
}

/// Polls `ready` with backoff until it is true or the commit timeout passes.
async fn wait_for<F, Fut>(ctx: &SaveCtx, mut ready: F, what: &str) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if ready().await? {
            return Ok(());
        }
        if start.elapsed() > ctx.commit_timeout {
            return Err(Error::Incomplete {
                path: layout::step_dir(&ctx.run, ctx.step),
                reason: format!("gave up waiting for {what} after {:?}", ctx.commit_timeout),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// On a store whose conditional create is not atomic, a racing
/// coordinator may have written the MANIFEST too (the last write wins):
/// wait until every create that could have raced ours has landed (several
/// times the create's own latency, 250 ms to 5 s), read the MANIFEST back,
/// and own the commit only if it is byte for byte ours.
async fn confirm_commit(
    tier: &dyn Tier,
    ctx: &SaveCtx,
    path: &str,
    ours: &Bytes,
    put_took: Duration,
) -> Result<()> {
    let settle = (put_took * 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    tokio::time::sleep(settle).await;
    let found = tier.get(path).await?;
    if found == *ours {
        return Ok(());
    }
    let theirs = Manifest::parse(path, &found)
        .map(|m| {
            format!(
                "incarnation {}, commit {}",
                m.incarnation,
                m.commit.as_deref().unwrap_or("-")
            )
        })
        .unwrap_or_else(|e| format!("an unreadable MANIFEST ({e})"));
    Err(Error::CommitConflict {
        path: path.to_string(),
        reason: format!(
            "{} does not make conditional creates atomic and another coordinator's MANIFEST \
             is there ({theirs}), not this one's (incarnation {}, commit {}): run one \
             coordinator per run on this store",
            tier.location(),
            ctx.incarnation,
            ctx.attempt
        ),
    })
}

/// Before the commit, every shard file the merged manifest names must be
/// on the tier at its recorded length: a rank manifest can outlive its
/// data (a tier that lost a file, an operator's cleanup).
async fn check_shard_files(tier: &dyn Tier, m: &Manifest) -> Result<()> {
    let dir = layout::step_dir(&m.run, m.step);
    let wanted: Vec<(String, u32, u64)> = m
        .ranks
        .iter()
        .map(|r| (format!("{dir}/{}", r.file), r.rank, r.file_len))
        .collect();
    for batch in wanted.chunks(32) {
        futures::future::try_join_all(
            batch
                .iter()
                .map(|(path, rank, want)| check_shard_file(tier, path.clone(), *rank, *want)),
        )
        .await?;
    }
    // The older steps its chunks point into (incremental saves): still
    // committed, their files at least as long as the chunks need.
    let mut older: BTreeMap<(u64, String), u64> = BTreeMap::new();
    for p in m.tensors.values().flat_map(|t| &t.pieces) {
        for (k, loc) in p.chunks.iter().enumerate() {
            if let Some(s) = loc.step.filter(|s| *s != m.step) {
                let len = loc
                    .zstd
                    .unwrap_or_else(|| m.chunk_size.min(p.length - k as u64 * m.chunk_size));
                let need = older.entry((s, loc.file.clone())).or_default();
                *need = (*need).max(loc.offset + len);
            }
        }
    }
    for ((s, file), need) in older {
        let path = format!("{}/{file}", layout::step_dir(&m.run, s));
        let fault = |reason: String| Error::Incomplete {
            path: path.clone(),
            reason,
        };
        if tier.size(&layout::manifest_path(&m.run, s)).await.is_err() {
            return Err(fault(format!(
                "step {} points into step {s}, which is no longer committed",
                m.step
            )));
        }
        match tier.size(&path).await {
            Ok(len) if len >= need => {}
            Ok(len) => {
                return Err(fault(format!(
                    "step {} needs {need} bytes of it, it has {len}",
                    m.step
                )));
            }
            Err(Error::NotFound { .. }) => {
                return Err(fault(format!(
                    "step {} points into it, it is missing",
                    m.step
                )));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn check_shard_file(tier: &dyn Tier, path: String, rank: u32, want: u64) -> Result<()> {
    match tier.size(&path).await {
        Ok(len) if len == want => Ok(()),
        Ok(len) => Err(Error::Incomplete {
            reason: format!("rank {rank}'s shard file is {len} bytes, its manifest says {want}"),
            path,
        }),
        Err(Error::NotFound { .. }) => Err(Error::Incomplete {
            reason: format!("rank {rank}'s shard file is missing"),
            path,
        }),
        Err(e) => Err(e),
    }
}

/// The coordinator's wait: every rank's manifest of this incarnation.
async fn gather(tier: &dyn Tier, ctx: &SaveCtx, own: &RankManifest) -> Result<Manifest> {
    if ctx.world_size == 1 {
        return Manifest::from_ranks(vec![own.clone()]);
    }
    let mut found: BTreeMap<u32, RankManifest> = BTreeMap::from([(0, own.clone())]);
    let begin = Instant::now();
    let mut pause = Duration::from_millis(5);
    while found.len() < ctx.world_size as usize {
        for r in 1..ctx.world_size {
            if found.contains_key(&r) {
                continue;
            }
            let path = ctx.rank_manifest_path(r);
            let bytes = match tier.get(&path).await {
                Ok(b) => b,
                Err(Error::NotFound { .. }) => {
                    // A rank that skipped this save says so: give up now.
                    let note = skip_note_path(&ctx.run, ctx.step, r);
                    if let Ok(b) = tier.get(&note).await
                        && let Ok(a) = StepAborted::parse(&note, &b)
                        && a.incarnation == ctx.incarnation
                    {
                        return Err(a.into_error(ctx.step));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match RankManifest::parse(&path, &bytes) {
                Ok(m)
                    if m.incarnation == ctx.incarnation
                        && m.step == ctx.step
                        && m.run == ctx.run =>
                {
                    found.insert(r, m);
                }
                Ok(_) => {} // a stale manifest of an earlier incarnation
                Err(e) => tracing::warn!(path, error = %e, "ignoring unreadable rank manifest"),
            }
        }
        if found.len() == ctx.world_size as usize {
            break;
        }
        if begin.elapsed() > ctx.commit_timeout {
            let missing: Vec<u32> = (0..ctx.world_size)
                .filter(|r| !found.contains_key(r))
                .collect();
            return Err(Error::Incomplete {
                path: layout::step_dir(&ctx.run, ctx.step),
                reason: format!(
                    "ranks {missing:?} did not finish within {:?}",
                    ctx.commit_timeout
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    Manifest::from_ranks(found.into_values().collect())
}
