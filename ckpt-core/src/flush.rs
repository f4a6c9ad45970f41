//! The background half of a save: the dispatcher thread turns staged
//! blocks into the shard file's byte stream, and one task per tier writes
//! it, makes it durable, and commits.
//!
//! Commit protocol on every tier (see `docs/ARCHITECTURE.md`):
//! 1. refuse if the step is already committed there (never overwrite a
//!    committed checkpoint);
//! 2. remove this rank's own stale `rank-<r>.json` (uncommit its piece);
//! 3. stream the shard file and make it durable (`finish`: fsync or
//!    multipart complete);
//! 4. write `rank-<r>.json` (the rank's piece, with checksums);
//! 5. the coordinator (rank 0) waits until every rank's manifest of this
//!    incarnation is present, merges and validates them, and creates
//!    `MANIFEST.json` with a conditional create: the commit point;
//!    other ranks wait until they see it;
//! 6. retention (coordinator only), deleting only older steps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checksum;
use crate::dtype;
use crate::error::{Error, Result};
use crate::layout;
use crate::manifest::{
    FORMAT_VERSION, HeaderSum, Manifest, Piece, RankManifest, RankTensor, library_version,
};
use crate::policy::TierPolicy;
use crate::save_handle::TierReport;
use crate::state::{LoopState, TensorRole};
use crate::store;
use crate::tier::{PutMode, Tier};

/// Everything about one save that the background needs, owned.
#[derive(Debug)]
pub(crate) struct SaveCtx {
    pub run: String,
    pub step: u64,
    pub rank: u32,
    pub world_size: u32,
    pub incarnation: String,
    pub chunk_size: u64,
    pub created_unix_ms: u64,
    pub loop_state: LoopState,
    pub header: Bytes,
    pub file_len: u64,
    pub blake3: bool,
    /// Hold the flush until staging has finished. Set when the whole save
    /// fits in the pool: writing while copying would steal cores and memory
    /// bandwidth from the math-stop. A save larger than the pool must
    /// stream, so it flushes while it stages.
    pub defer_flush: bool,
    /// Whether staging computed the staged tensors' checksums.
    pub crc_while_staging: bool,
    pub commit_timeout: Duration,
    pub tensors: Vec<TensorCtx>,
}

#[derive(Debug)]
pub(crate) struct TensorCtx {
    pub name: String,
    pub dtype: dtype::DType,
    pub role: TensorRole,
    pub global_shape: Vec<u64>,
    pub global_offsets: Vec<u64>,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub len: u64,
    /// Zero-copy bytes, or `None` if the tensor was staged.
    pub shared: Option<Bytes>,
    /// Index among staged tensors.
    pub staged_index: Option<usize>,
}

impl SaveCtx {
    fn data_path(&self) -> String {
        format!(
            "{}/{}",
            layout::step_dir(&self.run, self.step),
            layout::rank_data_file(self.rank)
        )
    }
    fn rank_manifest_path(&self, rank: u32) -> String {
        format!(
            "{}/{}",
            layout::step_dir(&self.run, self.step),
            layout::rank_manifest_file(rank)
        )
    }
}

/// Messages from staging to the dispatcher.
pub(crate) enum StageMsg {
    Block(usize, Bytes),
    Done(Vec<Vec<u32>>),
    Failed(Error),
}

pub(crate) type ManifestCell = Option<Result<Arc<RankManifest>>>;

/// Runs on its own thread: reorders staged blocks, emits the shard file's
/// bytes in order to every tier, checksums zero-copy tensors, and finally
/// publishes the rank manifest.
pub(crate) fn dispatch(
    ctx: Arc<SaveCtx>,
    rx: std_mpsc::Receiver<StageMsg>,
    outs: Vec<mpsc::UnboundedSender<Bytes>>,
    manifest_tx: watch::Sender<ManifestCell>,
) {
    let result = dispatch_inner(&ctx, &rx, &outs);
    drop(outs);
    let cell = match result {
        Ok(m) => Ok(Arc::new(m)),
        Err(e) => Err(e),
    };
    let _ = manifest_tx.send(Some(cell));
}

struct Reorder<'a> {
    rx: &'a std_mpsc::Receiver<StageMsg>,
    pending: BTreeMap<usize, Bytes>,
    next: usize,
    current: Bytes,
    crcs: Option<Vec<Vec<u32>>>,
}

impl Reorder<'_> {
    fn recv(&mut self) -> Result<()> {
        match self.rx.recv() {
            Ok(StageMsg::Block(k, b)) => {
                self.pending.insert(k, b);
                Ok(())
            }
            Ok(StageMsg::Done(crcs)) => {
                self.crcs = Some(crcs);
                Ok(())
            }
            Ok(StageMsg::Failed(e)) => Err(e),
            Err(_) => Err(Error::InvalidState(
                "staging ended without finishing".into(),
            )),
        }
    }

    /// Takes the next `n` bytes of the staged stream as one or more slices.
    fn take(&mut self, mut n: usize, out: &mut impl FnMut(Bytes)) -> Result<()> {
        while n > 0 {
            if self.current.is_empty() {
                while !self.pending.contains_key(&self.next) {
                    self.recv()?;
                }
                self.current = self.pending.remove(&self.next).unwrap_or_default();
                self.next += 1;
                continue;
            }
            let k = n.min(self.current.len());
            out(self.current.split_to(k));
            n -= k;
        }
        Ok(())
    }
}

fn dispatch_inner(
    ctx: &SaveCtx,
    rx: &std_mpsc::Receiver<StageMsg>,
    outs: &[mpsc::UnboundedSender<Bytes>],
) -> Result<RankManifest> {
    let emit = |b: Bytes| {
        for o in outs {
            // A tier that gave up has closed its channel; the others go on.
            let _ = o.send(b.clone());
        }
    };
    let mut reorder = Reorder {
        rx,
        pending: BTreeMap::new(),
        next: 0,
        current: Bytes::new(),
        crcs: None,
    };
    if ctx.defer_flush {
        while reorder.crcs.is_none() {
            reorder.recv()?;
        }
    }
    emit(ctx.header.clone());
    let mut shared_crcs: Vec<Option<Vec<u32>>> = Vec::with_capacity(ctx.tensors.len());
    let mut hashes: Vec<Option<String>> = Vec::with_capacity(ctx.tensors.len());
    for t in &ctx.tensors {
        let mut hasher = ctx.blake3.then(blake3::Hasher::new);
        if let Some(bytes) = &t.shared {
            shared_crcs.push(Some(checksum::chunk_crcs(bytes, ctx.chunk_size)));
            if let Some(h) = hasher.as_mut() {
                h.update(bytes);
            }
            emit(bytes.clone());
        } else {
            let len = usize::try_from(t.len).map_err(|_| Error::tensor(&t.name, "too large"))?;
            // Checksum the staged copy here unless staging already did: it is
            // immutable, and no byte reaches a tier before it is summed.
            let mut crc =
                (!ctx.crc_while_staging).then(|| checksum::ChunkedCrc::new(ctx.chunk_size));
            reorder.take(len, &mut |b: Bytes| {
                if let Some(c) = crc.as_mut() {
                    c.update(&b);
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&b);
                }
                emit(b);
            })?;
            shared_crcs.push(crc.map(checksum::ChunkedCrc::finish));
        }
        hashes.push(hasher.map(|h| h.finalize().to_hex().to_string()));
    }
    while reorder.crcs.is_none() {
        reorder.recv()?;
    }
    let staged_crcs = reorder.crcs.take().unwrap_or_default();
    let file = layout::rank_data_file(ctx.rank);
    let mut tensors = Vec::with_capacity(ctx.tensors.len());
    for ((t, shared), blake3) in ctx.tensors.iter().zip(shared_crcs).zip(hashes) {
        let crc32c = match (shared, t.staged_index) {
            (Some(c), _) => c,
            (None, Some(i)) => staged_crcs.get(i).cloned().ok_or_else(|| {
                Error::InvalidState(format!("no checksums for tensor `{}`", t.name))
            })?,
            (None, None) => {
                return Err(Error::InvalidState(format!(
                    "tensor `{}` has no data source",
                    t.name
                )));
            }
        };
        tensors.push(RankTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            global_shape: t.global_shape.clone(),
            role: t.role,
            piece: Piece {
                rank: ctx.rank,
                file: file.clone(),
                offset: t.offset,
                length: t.len,
                global_offsets: t.global_offsets.clone(),
                shape: t.shape.clone(),
                crc32c,
                blake3,
            },
        });
    }
    Ok(RankManifest {
        format: FORMAT_VERSION,
        library: library_version(),
        run: ctx.run.clone(),
        step: ctx.step,
        world_size: ctx.world_size,
        rank: ctx.rank,
        incarnation: ctx.incarnation.clone(),
        chunk_size: ctx.chunk_size,
        created_unix_ms: ctx.created_unix_ms,
        file,
        file_len: ctx.file_len,
        header: Some(HeaderSum {
            len: ctx.header.len() as u64,
            crc32c: crc32c::crc32c(&ctx.header),
        }),
        loop_state: ctx.loop_state.clone(),
        tensors,
    })
}

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
}

pub(crate) async fn flush_tier(ctx: Arc<SaveCtx>, mut job: TierJob) -> TierReport {
    if let Some(prev) = job.previous.take() {
        let _ = prev.await;
    }
    let location = job.tier.location();
    let start = Instant::now();
    let mut flush = Duration::ZERO;
    let mut committed_at = None;
    let result = run_tier(&ctx, &mut job, start, &mut flush, &mut committed_at).await;
    let total = start.elapsed();
    let _ = job.done.send(());
    let durable = committed_at.unwrap_or(total);
    let report = TierReport {
        tier: location,
        flush,
        commit: durable.saturating_sub(flush),
        retention: total.saturating_sub(durable),
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
    ctx: &SaveCtx,
    job: &mut TierJob,
    start: Instant,
    flush: &mut Duration,
    committed_at: &mut Option<Duration>,
) -> Result<()> {
    let tier = job.tier.as_ref();
    let manifest_path = layout::manifest_path(&ctx.run, ctx.step);
    if tier.size(&manifest_path).await.is_ok() {
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
    while let Some(b) = job.data.recv().await {
        written += b.len() as u64;
        if let Err(e) = writer.write(b).await {
            let _ = writer.abort().await;
            return Err(e);
        }
        if let Some(rate) = job.policy.rate_limit {
            let due = Duration::from_secs_f64(written as f64 / rate as f64);
            let elapsed = rate_start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    let rank_manifest = match wait_manifest(&mut job.manifest).await {
        Ok(m) => m,
        Err(e) => {
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    if written != rank_manifest.file_len {
        let _ = writer.abort().await;
        return Err(Error::Incomplete {
            path: data_path,
            reason: format!("wrote {written} of {} bytes", rank_manifest.file_len),
        });
    }
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
        let manifest = gather(tier, ctx, &rank_manifest).await?;
        tier.put(
            &manifest_path,
            Bytes::from(manifest.to_json()?),
            PutMode::Create,
        )
        .await?;
        *committed_at = Some(start.elapsed());
        crate::phase("gc", ctx.step);
        match store::gc(tier, &ctx.run, &job.policy.retention).await {
            Ok(r) if !r.deleted_steps.is_empty() || !r.removed_leftovers.is_empty() => {
                tracing::debug!(tier = %tier.location(), deleted = ?r.deleted_steps, leftovers = ?r.removed_leftovers, "retention");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(tier = %tier.location(), error = %e, "retention failed; older checkpoints kept")
            }
        }
    } else {
        wait_for(
            ctx,
            || async { Ok(tier.size(&manifest_path).await.is_ok()) },
            "the coordinator's MANIFEST",
        )
        .await?;
        *committed_at = Some(start.elapsed());
    }
    Ok(())
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
                Err(Error::NotFound { .. }) => continue,
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
