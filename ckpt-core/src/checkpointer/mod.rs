//! The checkpointer: owns the staging pool, the background runtime and the
//! tiers; `save` is the math-stop, everything else runs in the background.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::format::checksum;
use crate::format::layout;
use crate::format::shard_file;
use crate::model::ShardSpec;
use crate::model::state::{TensorViewMut, TrainingState, view_len};
use crate::restore::{self, RestoreOptions, Restored};
use crate::save::commit::{self, TierJob};
use crate::save::copy::{self as stage, DeviceCopy, Source};
use crate::save::handle::{SaveHandle, SaveReport, Shared, TierReport};
use crate::save::health::{Health, ProbeBackoff, TierStatus};
use crate::save::policy::{BusyPolicy, TierPolicy};
use crate::save::pool::{DEFAULT_BLOCK_SIZE, StagingPool};
use crate::save::stream::{self, SaveCtx, StageMsg, TensorCtx};
use crate::schedule;
use crate::schedule::{FailureEvent, Policy, Scheduler, SchedulerConfig};
use crate::store::events as failure_events;
use crate::tier::Tier;

enum Runtime {
    Owned(tokio::runtime::Runtime),
    Borrowed(tokio::runtime::Handle),
}

impl Runtime {
    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            Runtime::Owned(rt) => rt.handle(),
            Runtime::Borrowed(h) => h,
        }
    }
}

/// The GPU saves copy device tensors from, and the size of the chunks the
/// staging pool is registered with it in.
#[cfg(feature = "cuda")]
type CudaStaging = (Arc<crate::cuda::CudaDevice>, usize);
/// Without the `cuda` feature a checkpointer has no GPU.
#[cfg(not(feature = "cuda"))]
type CudaStaging = std::convert::Infallible;

/// Allocates the staging pool and, with a GPU, registers it with the
/// driver (a refusal is a warning: copies then go through pageable memory).
fn new_pool(capacity: u64, block_size: usize, cuda: Option<&CudaStaging>) -> Result<StagingPool> {
    let pool = StagingPool::new(capacity, block_size)?;
    #[cfg(feature = "cuda")]
    if let Some((device, chunk)) = cuda {
        pool.register_cuda_or_warn(device, *chunk);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = cuda;
    Ok(pool)
}

struct TierSlot {
    tier: Arc<dyn Tier>,
    policy: TierPolicy,
    previous: Mutex<Option<oneshot::Receiver<()>>>,
    health: Arc<Health>,
}

/// One tier's part of a save: a flush task, or a report made up front for
/// a tier that is down.
enum TierRun {
    Flush(tokio::task::JoinHandle<TierReport>, Arc<Health>),
    Unavailable(TierReport),
}

/// Builds a [`Checkpointer`].
///
/// ```
/// use std::sync::Arc;
/// use ckpt_core::{Checkpointer, MemoryTier, TierPolicy};
/// let ckpt = Checkpointer::builder("demo")
///     .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
///     .staging_capacity(1 << 20)
///     .build()
///     .unwrap();
/// assert_eq!(ckpt.run(), "demo");
/// ```
#[must_use]
pub struct CheckpointerBuilder {
    run: String,
    tiers: Vec<(Arc<dyn Tier>, TierPolicy)>,
    rank: u32,
    world_size: u32,
    incarnation: Option<String>,
    staging_capacity: Option<u64>,
    block_size: usize,
    chunk_size: u64,
    busy: BusyPolicy,
    copy_threads: usize,
    restore_threads: usize,
    blake3: bool,
    crc_while_staging: bool,
    commit_timeout: Duration,
    block_timeout: Duration,
    runtime: Option<tokio::runtime::Handle>,
    schedule: Option<SchedulerConfig>,
    probe: ProbeBackoff,
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<crate::cuda::CudaDevice>>,
    #[cfg(feature = "cuda")]
    cuda_register_chunk: Option<usize>,
}

impl std::fmt::Debug for CheckpointerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointerBuilder")
            .field("run", &self.run)
            .field(
                "tiers",
                &self
                    .tiers
                    .iter()
                    .map(|(t, _)| t.location())
                    .collect::<Vec<_>>(),
            )
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("environment variable {name}={v} is not valid"))),
        Err(_) => Ok(None),
    }
}

impl CheckpointerBuilder {
    /// Adds a tier; tiers are written in parallel and restored from in the
    /// order added (put the fastest first).
    pub fn tier(mut self, tier: Arc<dyn Tier>, policy: TierPolicy) -> Self {
        self.tiers.push((tier, policy));
        self
    }

    /// This process's rank and the job's world size.
    pub fn rank(mut self, rank: u32, world_size: u32) -> Self {
        self.rank = rank;
        self.world_size = world_size;
        self
    }

    /// Reads `RANK`, `WORLD_SIZE` (torchrun's convention), `CKPT_RUN`,
    /// `CKPT_STAGING_BYTES` and `CKPT_INCARNATION` (else
    /// `TORCHELASTIC_RESTART_COUNT`) from the environment when set.
    pub fn from_env(mut self) -> Result<Self> {
        if let Some(r) = env_parse::<u32>("RANK")? {
            self.rank = r;
        }
        if let Some(w) = env_parse::<u32>("WORLD_SIZE")? {
            self.world_size = w;
        }
        if let Ok(run) = std::env::var("CKPT_RUN") {
            self.run = run;
        }
        if let Some(b) = env_parse::<u64>("CKPT_STAGING_BYTES")? {
            self.staging_capacity = Some(b);
        }
        if let Ok(i) = std::env::var("CKPT_INCARNATION")
            .or_else(|_| std::env::var("TORCHELASTIC_RESTART_COUNT"))
        {
            self.incarnation = Some(i);
        }
        Ok(self)
    }

    /// Identifies this incarnation of the job (the same on every rank,
    /// different after each restart, e.g. the launcher's restart count).
    /// Rank manifests of different incarnations are never merged.
    pub fn incarnation(mut self, id: impl Into<String>) -> Self {
        self.incarnation = Some(id.into());
        self
    }

    /// Staging pool size in bytes. Unset: sized to the first save. A save
    /// larger than the pool streams through it (its math-stop then
    /// includes waiting for the flush).
    pub fn staging_capacity(mut self, bytes: u64) -> Self {
        self.staging_capacity = Some(bytes);
        self
    }

    /// Staging block size (power of two, at least 4096; default 8 MiB).
    pub fn block_size(mut self, bytes: usize) -> Self {
        self.block_size = bytes;
        self
    }

    /// Checksum chunk size (default 4 MiB).
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// What to do when a save finds the pool still busy.
    pub fn when_busy(mut self, p: BusyPolicy) -> Self {
        self.busy = p;
        self
    }

    /// Threads copying into the staging pool (default: available cores, at
    /// most 8).
    pub fn copy_threads(mut self, n: usize) -> Self {
        self.copy_threads = n.max(1);
        self
    }

    /// Parallel reads during restore (default 4).
    pub fn restore_threads(mut self, n: usize) -> Self {
        self.restore_threads = n.max(1);
        self
    }

    /// Also record a blake3 digest of every tensor (computed in the
    /// background, from the staged copy).
    pub fn blake3(mut self, on: bool) -> Self {
        self.blake3 = on;
        self
    }

    /// Compute the crc32c tables during the copy (inside the math-stop,
    /// while the bytes are in cache) instead of in the background from the
    /// immutable staged copy before any byte is written (the default). On
    /// few cores the default keeps the math-stop at memcpy speed; both cover
    /// every byte from the staging pool to storage and back.
    pub fn checksum_while_staging(mut self, on: bool) -> Self {
        self.crc_while_staging = on;
        self
    }

    /// The checkpoint-interval policy behind [`Checkpointer::should_save`]
    /// (default: availability-optimal with a prior job MTBF of 24 h). The
    /// checkpointer feeds it the math-stop and flush time it measures, the
    /// restore time, and the failure log it keeps in the store.
    pub fn schedule(mut self, config: SchedulerConfig) -> Self {
        self.schedule = Some(config);
        self
    }

    /// How long the coordinator waits for the other ranks (default 10 min).
    pub fn commit_timeout(mut self, d: Duration) -> Self {
        self.commit_timeout = d;
        self
    }

    /// How a tier that failed with a transient error (server down,
    /// timeouts) is probed until it answers again; meanwhile saves leave it
    /// out and report [`Error::Unavailable`] for it. Default: from 250 ms,
    /// doubling up to 2 s, each probe bounded to 10 s: a tier that comes back
    /// takes part in the first save that starts once a probe saw it answer.
    pub fn probe_backoff(mut self, backoff: ProbeBackoff) -> Self {
        self.probe = backoff;
        self
    }

    /// Runs the background flush on an existing runtime instead of a
    /// private one.
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Saves tensors in GPU memory ([`crate::TensorView::device`]) by
    /// copying them from `device` into the staging pool, and registers the
    /// pool with its driver (page-locked for DMA) in chunks of
    /// [`CheckpointerBuilder::cuda_register_chunk`]. If the driver refuses
    /// the registration, a warning is logged once and device copies go
    /// through pageable memory: correct, slower
    /// ([`StagingPool::is_cuda_registered`] says which).
    #[cfg(feature = "cuda")]
    pub fn cuda(mut self, device: Arc<crate::cuda::CudaDevice>) -> Self {
        self.cuda = Some(device);
        self
    }

    /// Size of each CUDA host registration of the staging pool (default
    /// 256 MiB, or one block if blocks are larger); a multiple of the block
    /// size, so no block straddles two registrations.
    #[cfg(feature = "cuda")]
    pub fn cuda_register_chunk(mut self, bytes: usize) -> Self {
        self.cuda_register_chunk = Some(bytes);
        self
    }

    /// Validates the configuration and starts the checkpointer. The staging
    /// pool is allocated here when its capacity was given.
    pub fn build(self) -> Result<Checkpointer> {
        layout::validate_run(&self.run)?;
        if self.tiers.is_empty() {
            return Err(Error::Config(
                "a checkpointer needs at least one tier".into(),
            ));
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Config(format!(
                "rank {} is outside world size {}",
                self.rank, self.world_size
            )));
        }
        if !(4096..=1 << 30).contains(&self.chunk_size) {
            return Err(Error::Config(format!(
                "chunk size {} must be within 4 KiB..1 GiB",
                self.chunk_size
            )));
        }
        if self.block_size < 4096 || !self.block_size.is_power_of_two() {
            return Err(Error::Config(format!(
                "staging block size {} must be a power of two >= 4096",
                self.block_size
            )));
        }
        #[cfg(feature = "cuda")]
        let cuda: Option<CudaStaging> = match self.cuda {
            Some(device) => {
                let chunk = match self.cuda_register_chunk {
                    Some(c) if c == 0 || !c.is_multiple_of(self.block_size) => {
                        return Err(Error::Config(format!(
                            "CUDA registration chunk of {c} bytes must be a positive multiple of the staging block size {}",
                            self.block_size
                        )));
                    }
                    Some(c) => c,
                    None => crate::save::pool::DEFAULT_CUDA_REGISTER_CHUNK.max(self.block_size),
                };
                Some((device, chunk))
            }
            None => None,
        };
        #[cfg(not(feature = "cuda"))]
        let cuda: Option<CudaStaging> = None;
        let pool = match self.staging_capacity {
            Some(c) => Some(new_pool(c, self.block_size, cuda.as_ref())?),
            None => None,
        };
        let runtime = match self.runtime {
            Some(h) => Runtime::Borrowed(h),
            None => Runtime::Owned(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("ckpt-flush")
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("<tokio runtime>", e))?,
            ),
        };
        let incarnation = self.incarnation.unwrap_or_else(|| "0".to_string());
        let schedule = self.schedule.unwrap_or_else(|| {
            SchedulerConfig::new(Policy::Availability, Duration::from_secs(24 * 3600))
        });
        let scheduler =
            Scheduler::new(schedule).map_err(|e| Error::Config(format!("schedule: {e}")))?;
        let run = self.run;
        let probe = self.probe;
        Ok(Checkpointer {
            run: run.clone(),
            rank: self.rank,
            world_size: self.world_size,
            incarnation,
            tiers: self
                .tiers
                .into_iter()
                .map(|(tier, policy)| TierSlot {
                    health: Health::new(tier.clone(), &run, probe),
                    tier,
                    policy,
                    previous: Mutex::new(None),
                })
                .collect(),
            pool: Mutex::new(pool),
            block_size: self.block_size,
            chunk_size: self.chunk_size,
            busy: self.busy,
            copy_threads: self.copy_threads,
            restore_threads: self.restore_threads,
            blake3: self.blake3,
            crc_while_staging: self.crc_while_staging,
            commit_timeout: self.commit_timeout,
            block_timeout: self.block_timeout,
            cuda,
            saves: Mutex::new(0),
            inflight: Mutex::new(Vec::new()),
            scheduler: Arc::new(Mutex::new(scheduler)),
            started: Mutex::new(false),
            start_log: Mutex::new(None),
            runtime: Some(runtime),
        })
    }
}

/// Saves and restores one rank's training state through a list of tiers.
/// See the crate docs for a complete example.
pub struct Checkpointer {
    run: String,
    rank: u32,
    world_size: u32,
    incarnation: String,
    tiers: Vec<TierSlot>,
    pool: Mutex<Option<StagingPool>>,
    block_size: usize,
    chunk_size: u64,
    busy: BusyPolicy,
    copy_threads: usize,
    restore_threads: usize,
    blake3: bool,
    crc_while_staging: bool,
    commit_timeout: Duration,
    block_timeout: Duration,
    cuda: Option<CudaStaging>,
    saves: Mutex<u64>,
    inflight: Mutex<Vec<SaveHandle>>,
    scheduler: Arc<Mutex<Scheduler>>,
    /// Whether the start of this process was logged (rank 0).
    started: Mutex<bool>,
    /// The background write of the start event, awaited by `close`.
    start_log: Mutex<Option<tokio::task::JoinHandle<()>>>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("run", &self.run)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("tiers", &self.tier_locations())
            .finish_non_exhaustive()
    }
}

/// Why a save of a tensor in GPU memory cannot run on this checkpointer.
fn no_gpu_message(step: u64, tensor: &str) -> String {
    if cfg!(feature = "cuda") {
        format!(
            "step {step}: tensor `{tensor}` is in GPU memory but this checkpointer has no CUDA device: build it with `.cuda(CudaDevice::open(ordinal)?)`"
        )
    } else {
        format!(
            "step {step}: tensor `{tensor}` is in GPU memory but ckpt was built without the `cuda` feature"
        )
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Checkpointer {
    /// Starts building a checkpointer for `run` (a name safe as a path
    /// component: `[A-Za-z0-9._-]`).
    pub fn builder(run: impl Into<String>) -> CheckpointerBuilder {
        CheckpointerBuilder {
            run: run.into(),
            tiers: Vec::new(),
            rank: 0,
            world_size: 1,
            incarnation: None,
            staging_capacity: None,
            block_size: DEFAULT_BLOCK_SIZE,
            chunk_size: checksum::DEFAULT_CHUNK_SIZE,
            busy: BusyPolicy::Wait,
            copy_threads: std::thread::available_parallelism()
                .map(|n| n.get().min(8))
                .unwrap_or(2),
            restore_threads: 4,
            blake3: false,
            crc_while_staging: false,
            commit_timeout: Duration::from_secs(600),
            block_timeout: Duration::from_secs(3600),
            runtime: None,
            schedule: None,
            probe: ProbeBackoff::default(),
            #[cfg(feature = "cuda")]
            cuda: None,
            #[cfg(feature = "cuda")]
            cuda_register_chunk: None,
        }
    }

    /// The run name.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// This rank.
    pub fn rank_id(&self) -> u32 {
        self.rank
    }

    /// The world size.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The tiers' locations, in priority order.
    pub fn tier_locations(&self) -> Vec<String> {
        self.tiers.iter().map(|t| t.tier.location()).collect()
    }

    /// Whether each tier takes part in saves now (a tier whose save failed
    /// with a transient error is left out until a background probe gets an
    /// answer), in priority order.
    pub fn tier_status(&self) -> Vec<TierStatus> {
        self.tiers.iter().map(|t| t.health.status()).collect()
    }

    /// The tiers, in priority order.
    pub fn tiers(&self) -> Vec<Arc<dyn Tier>> {
        self.tiers.iter().map(|t| t.tier.clone()).collect()
    }

    /// The staging pool, once allocated.
    pub fn staging_pool(&self) -> Option<StagingPool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The GPU device tensors are copied from, if any.
    fn gpu(&self) -> Option<&dyn DeviceCopy> {
        #[cfg(feature = "cuda")]
        {
            self.cuda
                .as_ref()
                .map(|(device, _)| device.as_ref() as &dyn DeviceCopy)
        }
        #[cfg(not(feature = "cuda"))]
        None
    }

    fn handle(&self) -> Result<&tokio::runtime::Handle> {
        self.runtime
            .as_ref()
            .map(Runtime::handle)
            .ok_or_else(|| Error::InvalidState("checkpointer is closed".into()))
    }

    /// Saves `state`: copies it into the staging pool (the math-stop, the
    /// only time the caller waits) and returns while the flush to every
    /// tier runs in the background. [`SaveHandle::wait`] blocks until it is
    /// durable.
    pub fn save(&self, state: &TrainingState<'_>) -> Result<SaveHandle> {
        self.log_start(state.step());
        let t0 = Instant::now();
        let handle = self.handle()?.clone();
        let mut saves = self.saves.lock().unwrap_or_else(|e| e.into_inner());
        let index = *saves;
        let step = state.step();
        let _span = tracing::info_span!("save", run = %self.run, rank = self.rank, step).entered();

        // Lay out the shard file.
        let mut specs: Vec<(&str, crate::DType, &[u64])> = Vec::with_capacity(state.tensors.len());
        for t in &state.tensors {
            specs.push((t.view.name(), t.view.dtype(), t.view.shape()));
        }
        let metadata = std::collections::BTreeMap::from([
            ("format".to_string(), "ckpt/1".to_string()),
            ("run".to_string(), self.run.clone()),
            ("step".to_string(), step.to_string()),
            ("rank".to_string(), self.rank.to_string()),
        ]);
        let layout = shard_file::layout(&specs, &metadata)?;

        // What is copied (from host or GPU memory), what is kept by
        // reference.
        let gpu = self.gpu();
        let mut sources: Vec<Source<'_>> = Vec::new();
        let mut tensors = Vec::with_capacity(state.tensors.len());
        for (i, t) in state.tensors.iter().enumerate() {
            let v = t.view;
            let shard = v
                .shard()
                .cloned()
                .unwrap_or_else(|| ShardSpec::full(v.shape().to_vec()));
            let device = v.device();
            if device.is_some() && gpu.is_none() {
                return Err(Error::Config(no_gpu_message(step, v.name())));
            }
            let shared = if device.is_none() {
                v.shared_bytes()
            } else {
                None
            };
            let staged_index = if shared.is_none() {
                sources.push(match device {
                    Some(src) => Source::Device {
                        src,
                        tensor: v.name(),
                    },
                    None => Source::Host(v.data()),
                });
                Some(sources.len() - 1)
            } else {
                None
            };
            tensors.push(TensorCtx {
                name: v.name().to_string(),
                dtype: v.dtype(),
                role: t.role,
                global_shape: shard.global_shape,
                global_offsets: shard.offsets,
                shape: v.shape().to_vec(),
                offset: layout.offsets[i],
                len: view_len(v) as u64,
                shared,
                staged_index,
            });
        }
        let staged_bytes: u64 = sources.iter().map(|s| s.len() as u64).sum();
        let pool = {
            let mut guard = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(p) => p.clone(),
                None => {
                    let p = new_pool(
                        staged_bytes.max(self.block_size as u64),
                        self.block_size,
                        self.cuda.as_ref(),
                    )?;
                    *guard = Some(p.clone());
                    p
                }
            }
        };
        let blocks_needed = staged_bytes.div_ceil(pool.block_size() as u64) as usize;
        if staged_bytes > pool.capacity() {
            // Streaming: the flush must hand blocks back before staging can
            // finish, so no tier may hold more than the pool minus a block.
            for slot in &self.tiers {
                let held = slot.tier.capabilities().buffered_write;
                let need = held.saturating_add(pool.block_size() as u64);
                if held > 0 && need > pool.capacity() {
                    return Err(Error::Config(format!(
                        "step {step}: {staged_bytes} bytes must stream through a staging pool of {} bytes, but tier {} holds up to {held} bytes per upload; raise the staging capacity to at least {need} bytes (or to the state's size)",
                        pool.capacity(),
                        slot.tier.location()
                    )));
                }
            }
        }
        let mut report = SaveReport {
            step,
            bytes: state.nbytes(),
            staged_bytes,
            math_stop: Duration::ZERO,
            waited: Duration::ZERO,
            skipped: false,
            tiers: Vec::new(),
            total: Duration::ZERO,
        };
        if self.busy == BusyPolicy::Skip && pool.free_blocks() < blocks_needed.min(pool.blocks()) {
            report.skipped = true;
            report.math_stop = t0.elapsed();
            tracing::info!(
                step,
                "save skipped: staging pool still held by an earlier flush"
            );
            let shared = Shared::new(report);
            shared.finish(Vec::new(), t0.elapsed());
            return Ok(SaveHandle { shared });
        }
        *saves += 1;

        let ctx = Arc::new(SaveCtx {
            run: self.run.clone(),
            step,
            rank: self.rank,
            world_size: self.world_size,
            incarnation: self.incarnation.clone(),
            chunk_size: self.chunk_size,
            created_unix_ms: unix_ms(),
            loop_state: state.loop_state.clone(),
            header: Bytes::from(layout.header),
            file_len: layout.file_len,
            blake3: self.blake3,
            defer_flush: staged_bytes <= pool.capacity(),
            crc_while_staging: self.crc_while_staging,
            commit_timeout: self.commit_timeout,
            tensors,
        });

        // A latency-aware schedule needs enough snapshots that one taken at
        // least L before a detected error is still retained.
        let latency_floor = {
            let s = self.scheduler.lock().unwrap_or_else(|e| e.into_inner());
            match s.policy() {
                Policy::LatencyAware { latency, .. } => {
                    schedule::retention_floor(s.interval().as_secs_f64(), latency.as_secs_f64())
                        as usize
                }
                _ => 1,
            }
        };
        // Start one flush task per tier that takes this save; a tier that is
        // down gets its report right away.
        let (manifest_tx, manifest_rx) = watch::channel(None);
        let mut outs = Vec::new();
        let mut runs = Vec::new();
        for slot in &self.tiers {
            if !index.is_multiple_of(slot.policy.every) {
                continue;
            }
            if let Some(e) = slot.health.unavailable() {
                tracing::debug!(step, tier = %slot.tier.location(), "tier left out of the save: unavailable");
                runs.push(TierRun::Unavailable(TierReport {
                    tier: slot.tier.location(),
                    flush: Duration::ZERO,
                    commit: Duration::ZERO,
                    retention: Duration::ZERO,
                    committed: false,
                    error: Some(e),
                }));
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            outs.push(tx);
            let (done_tx, done_rx) = oneshot::channel();
            let previous = slot
                .previous
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(done_rx);
            let mut policy = slot.policy;
            policy.retention = policy
                .retention
                .with_floor(policy.retention.floor.max(latency_floor));
            let job = TierJob {
                tier: slot.tier.clone(),
                policy,
                data: rx,
                manifest: manifest_rx.clone(),
                previous,
                done: done_tx,
            };
            runs.push(TierRun::Flush(
                handle.spawn(commit::flush_tier(ctx.clone(), job)),
                slot.health.clone(),
            ));
        }
        if outs.is_empty() && !runs.is_empty() {
            // Every tier this save goes to is down: nothing to copy for.
            report.math_stop = t0.elapsed();
            drop(saves);
            let reports = runs
                .into_iter()
                .filter_map(|r| match r {
                    TierRun::Unavailable(r) => Some(r),
                    TierRun::Flush(..) => None,
                })
                .collect();
            tracing::warn!(
                step,
                "save not staged: every tier it goes to is unavailable"
            );
            let shared = Shared::new(report);
            shared.finish(reports, t0.elapsed());
            return Ok(SaveHandle { shared });
        }
        let (stage_tx, stage_rx) = std_mpsc::channel::<StageMsg>();
        {
            let ctx = ctx.clone();
            std::thread::Builder::new()
                .name("ckpt-dispatch".into())
                .spawn(move || stream::dispatch(ctx, stage_rx, outs, manifest_tx))
                .map_err(|e| Error::io("<dispatch thread>", e))?;
        }

        // The math-stop: copy (host memcpy, device DMA) + checksum.
        crate::phase("stage", step);
        let sink = |k: usize, b: Bytes| {
            let _ = stage_tx.send(StageMsg::Block(k, b));
        };
        let staged = stage::stage(
            &pool,
            &sources,
            self.chunk_size,
            self.crc_while_staging,
            self.copy_threads,
            self.block_timeout,
            gpu,
            &sink,
        );
        let math_stop = t0.elapsed();
        match staged {
            Ok(s) => {
                report.waited = s.waited;
                let _ = stage_tx.send(StageMsg::Done(s.crcs));
            }
            Err(e) => {
                let _ = stage_tx.send(StageMsg::Failed(e.clone()));
                drop(stage_tx);
                return Err(e);
            }
        }
        drop(stage_tx);
        drop(saves);
        report.math_stop = math_stop;
        tracing::info!(step, bytes = report.bytes, staged = staged_bytes, math_stop = ?math_stop, waited = ?report.waited, "staged");

        let shared = Shared::new(report);
        let finisher = shared.clone();
        let scheduler = self.scheduler.clone();
        handle.spawn(async move {
            let mut reports = Vec::with_capacity(runs.len());
            for run in runs {
                match run {
                    TierRun::Unavailable(r) => reports.push(r),
                    TierRun::Flush(task, health) => {
                        let r = task.await.unwrap_or_else(|e| TierReport {
                            tier: "?".into(),
                            flush: Duration::ZERO,
                            commit: Duration::ZERO,
                            retention: Duration::ZERO,
                            committed: false,
                            error: Some(Error::Internal(format!("flush task failed: {e}"))),
                        });
                        health.record(r.error.as_ref());
                        reports.push(r);
                    }
                }
            }
            if reports.iter().any(|r| r.committed) {
                let absorbed = reports
                    .iter()
                    .map(|r| r.flush + r.commit)
                    .max()
                    .unwrap_or_default();
                scheduler
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_save(math_stop, absorbed);
            }
            finisher.finish(reports, t0.elapsed());
        });
        let h = SaveHandle { shared };
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        inflight.retain(|h| !h.is_done());
        inflight.push(h.clone());
        Ok(h)
    }

    /// Async form of [`Checkpointer::save`]. The copy itself is the
    /// math-stop and runs on the calling task.
    pub async fn save_async(&self, state: &TrainingState<'_>) -> Result<SaveHandle> {
        self.save(state)
    }

    /// Restores the newest verified checkpoint into `targets`. `Ok(None)`
    /// means no tier holds a checkpoint of this run (a fresh start).
    pub fn restore(&self, targets: &mut [&mut dyn TensorViewMut]) -> Result<Option<Restored>> {
        self.restore_with(targets, &RestoreOptions::default())
    }

    /// Restore with options (a given step, a trust limit for detected
    /// errors).
    pub fn restore_with(
        &self,
        targets: &mut [&mut dyn TensorViewMut],
        opts: &RestoreOptions,
    ) -> Result<Option<Restored>> {
        let handle = self.handle()?.clone();
        let tiers = self.tiers();
        let mut opts = opts.clone();
        if opts.threads == 0 {
            opts.threads = self.restore_threads;
        }
        let restored = restore::restore(&handle, &tiers, &self.run, self.rank, targets, &opts)?;
        let step = restored.as_ref().map(|r| r.step).unwrap_or(0);
        self.log_start(step);
        if let (Some(_), Some(age)) = (&restored, failure_events::process_age()) {
            self.scheduler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record_restore(age);
        }
        Ok(restored)
    }

    /// The tier that keeps the failure log: the most durable one.
    fn log_tier(&self) -> Arc<dyn Tier> {
        let caps = |t: &TierSlot| t.tier.capabilities();
        self.tiers
            .iter()
            .find(|t| caps(t).survives_node)
            .or_else(|| self.tiers.iter().find(|t| caps(t).survives_process))
            .unwrap_or(&self.tiers[0])
            .tier
            .clone()
    }

    /// Rank 0 logs this process's start once (at the first restore or
    /// save) and feeds the failure statistics to the scheduler.
    fn log_start(&self, step: u64) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        if *started || self.rank != 0 {
            return;
        }
        *started = true;
        let Ok(handle) = self.handle() else { return };
        let tier = self.log_tier();
        let run = self.run.clone();
        let scheduler = self.scheduler.clone();
        // In the background: the first save must not wait on the store (an
        // object store round trip) before its math-stop even starts.
        let event = FailureEvent::start(failure_events::now_unix_s(), step);
        let task = handle.spawn(async move {
            let logged = async {
                failure_events::append(tier.as_ref(), &run, &event).await?;
                failure_events::read(tier.as_ref(), &run).await
            };
            match logged.await {
                Ok(events) => {
                    let stats = schedule::failure_stats(&events, Some(failure_events::now_unix_s()));
                    tracing::debug!(failures = stats.failures, exposure_s = stats.exposure_s, "failure log read");
                    scheduler
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .observe_failures(stats);
                }
                Err(e) => tracing::warn!(error = %e, "cannot update the failure log; MTBF stays at its prior"),
            }
        });
        *self.start_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Whether the training loop should save at `step`: the interval policy
    /// of [`CheckpointerBuilder::schedule`], fed with this checkpointer's
    /// own measurements.
    ///
    /// Never true while an earlier save is still flushing: a save is never
    /// requested faster than the tiers absorb them.
    pub fn should_save(&self, step: u64) -> bool {
        let busy = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|h| !h.is_done());
        if busy {
            return false;
        }
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .should_save(step, Instant::now())
    }

    /// The current checkpoint period chosen by the schedule.
    pub fn checkpoint_interval(&self) -> Duration {
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interval()
    }

    /// One line: the schedule's policy, its inputs (δ, M, R) and the
    /// interval it chose, and why.
    pub fn explain_schedule(&self) -> String {
        self.scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .explain()
    }

    /// Waits for every in-flight save and returns their reports.
    pub fn wait_all(&self) -> Vec<Result<SaveReport>> {
        let handles: Vec<SaveHandle> = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        handles.iter().map(SaveHandle::wait).collect()
    }

    /// Waits for in-flight saves and shuts the background runtime down.
    pub fn close(mut self) -> Vec<Result<SaveReport>> {
        let reports = self.wait_all();
        if self.rank == 0
            && *self.started.lock().unwrap_or_else(|e| e.into_inner())
            && let Ok(handle) = self.handle()
        {
            let tier = self.log_tier();
            let run = self.run.clone();
            let step = reports
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|r| r.step)
                .max()
                .unwrap_or(0);
            let event = FailureEvent::clean_stop(failure_events::now_unix_s(), step);
            let start_log = self
                .start_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let r = std::thread::scope(|s| {
                s.spawn(|| {
                    handle.block_on(async {
                        // The start event first, so the log is complete.
                        if let Some(t) = start_log {
                            let _ = t.await;
                        }
                        failure_events::append(tier.as_ref(), &run, &event).await
                    })
                })
                .join()
            });
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!("cannot record the clean stop in the failure log");
            }
        }
        self.shutdown();
        reports
    }

    fn shutdown(&mut self) {
        for t in &self.tiers {
            t.health.stop();
        }
        if let Some(Runtime::Owned(rt)) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.wait_all();
        self.shutdown();
    }
}
