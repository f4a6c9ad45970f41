//! [`CheckpointerBuilder`]: every setter is infallible; [`build`] validates
//! the whole configuration and reports the first problem, naming it. No
//! value is clamped silently: a zero where zero makes no sense is an error.
//!
//! [`build`]: CheckpointerBuilder::build

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checkpointer::{Checkpointer, CudaStaging, Runtime, TierSlot, new_pool};
use crate::error::{Error, Result};
use crate::format::{checksum, layout};
use crate::restore::Agreement;
use crate::save::health::{Health, ProbeBackoff};
use crate::save::policy::{BusyPolicy, TierPolicy};
use crate::save::pool::DEFAULT_BLOCK_SIZE;
use crate::schedule::{Policy, Scheduler, SchedulerConfig};
use crate::tier::Tier;

/// What a checkpointer was built with, validated.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub run: String,
    pub rank: u32,
    pub world_size: u32,
    pub incarnation: String,
    pub staging_capacity: Option<u64>,
    pub block_size: usize,
    pub chunk_size: u64,
    pub busy: BusyPolicy,
    pub copy_threads: usize,
    /// Copy threads of an overlapped save (its copy shares the cores with
    /// the caller's forward and backward).
    pub overlap_copy_threads: usize,
    /// Most bytes per second an overlapped save's copy moves (`None`: no
    /// cap).
    pub overlap_copy_rate: Option<u64>,
    pub restore_threads: usize,
    pub blake3: bool,
    pub crc_while_staging: bool,
    pub flush_while_staging: bool,
    pub commit_timeout: Duration,
    pub block_timeout: Duration,
    pub probe: ProbeBackoff,
    /// The ranks holding this rank's state bit-identically (data-parallel
    /// replicas), sorted, this rank included; empty when not replicated.
    pub replicas: Vec<u32>,
}

impl Settings {
    fn defaults(run: String) -> Self {
        Self {
            run,
            rank: 0,
            world_size: 1,
            incarnation: "0".into(),
            staging_capacity: None,
            block_size: DEFAULT_BLOCK_SIZE,
            chunk_size: checksum::DEFAULT_CHUNK_SIZE,
            busy: BusyPolicy::Wait,
            copy_threads: std::thread::available_parallelism()
                .map(|n| n.get().min(8))
                .unwrap_or(2),
            overlap_copy_threads: 1,
            overlap_copy_rate: None,
            restore_threads: 4,
            blake3: false,
            crc_while_staging: false,
            flush_while_staging: false,
            commit_timeout: Duration::from_secs(600),
            block_timeout: Duration::from_secs(3600),
            probe: ProbeBackoff::default(),
            replicas: Vec::new(),
        }
    }

    fn validate(&self) -> Result<()> {
        layout::validate_run(&self.run)?;
        let bad = |m: String| Err(Error::Config(m));
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} is outside world size {}",
                self.rank, self.world_size
            ));
        }
        if !(4096..=1 << 30).contains(&self.chunk_size) {
            return bad(format!(
                "chunk size {} must be within 4 KiB..1 GiB",
                self.chunk_size
            ));
        }
        if self.block_size < 4096 || !self.block_size.is_power_of_two() {
            return bad(format!(
                "staging block size {} must be a power of two >= 4096",
                self.block_size
            ));
        }
        if self.staging_capacity == Some(0) {
            return bad("staging capacity must be at least one block, not 0".into());
        }
        if self.copy_threads == 0 {
            return bad("copy threads must be at least 1".into());
        }
        if self.overlap_copy_threads == 0 {
            return bad("overlapped-save copy threads must be at least 1".into());
        }
        if self.overlap_copy_rate == Some(0) {
            return bad("an overlapped save's copy bandwidth must be above 0 bytes/s".into());
        }
        if self.restore_threads == 0 {
            return bad("restore threads must be at least 1".into());
        }
        if self.commit_timeout.is_zero() {
            return bad("the commit timeout must be longer than 0".into());
        }
        if !self.replicas.is_empty() {
            let mut sorted = self.replicas.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != self.replicas.len()
                || !sorted.contains(&self.rank)
                || sorted.iter().any(|r| *r >= self.world_size)
                || sorted.len() < 2
            {
                return bad(format!(
                    "replica group {:?} of rank {} must hold it, at least one other rank, no rank twice, all below world size {}",
                    self.replicas, self.rank, self.world_size
                ));
            }
        }
        if self.probe.initial.is_zero() || self.probe.max < self.probe.initial {
            return bad(format!(
                "probe backoff {:?}..{:?} must start above 0 and not shrink",
                self.probe.initial, self.probe.max
            ));
        }
        Ok(())
    }
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
///
/// // Nothing is clamped: a zero is reported by `build`.
/// let err = Checkpointer::builder("demo")
///     .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
///     .copy_threads(0)
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, ckpt_core::Error::Config(_)));
/// ```
#[must_use]
pub struct CheckpointerBuilder {
    settings: Settings,
    tiers: Vec<(Arc<dyn Tier>, TierPolicy)>,
    runtime: Option<tokio::runtime::Handle>,
    schedule: Option<SchedulerConfig>,
    /// The first environment variable `from_env` could not parse.
    env_error: Option<Error>,
    agreement: Option<Arc<dyn Agreement>>,
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<crate::cuda::CudaDevice>>,
    #[cfg(feature = "cuda")]
    cuda_register_chunk: Option<usize>,
}

impl std::fmt::Debug for CheckpointerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointerBuilder")
            .field("settings", &self.settings)
            .field(
                "tiers",
                &self
                    .tiers
                    .iter()
                    .map(|(t, _)| t.location())
                    .collect::<Vec<_>>(),
            )
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
    pub(crate) fn new(run: String) -> Self {
        Self {
            settings: Settings::defaults(run),
            tiers: Vec::new(),
            runtime: None,
            schedule: None,
            env_error: None,
            agreement: None,
            #[cfg(feature = "cuda")]
            cuda: None,
            #[cfg(feature = "cuda")]
            cuda_register_chunk: None,
        }
    }

    /// Adds a tier; tiers are written in parallel and restored from in the
    /// order added (put the fastest first).
    pub fn tier(mut self, tier: Arc<dyn Tier>, policy: TierPolicy) -> Self {
        self.tiers.push((tier, policy));
        self
    }

    /// This process's rank and the job's world size.
    pub fn rank(mut self, rank: u32, world_size: u32) -> Self {
        self.settings.rank = rank;
        self.settings.world_size = world_size;
        self
    }

    /// Reads `RANK`, `WORLD_SIZE` (torchrun's convention), `CKPT_RUN`,
    /// `CKPT_STAGING_BYTES` and `CKPT_INCARNATION` (else
    /// `TORCHELASTIC_RESTART_COUNT`) from the environment when set. A
    /// variable that does not parse is reported by [`build`](Self::build).
    pub fn from_env(mut self) -> Self {
        let mut read = || -> Result<()> {
            if let Some(r) = env_parse::<u32>("RANK")? {
                self.settings.rank = r;
            }
            if let Some(w) = env_parse::<u32>("WORLD_SIZE")? {
                self.settings.world_size = w;
            }
            if let Ok(run) = std::env::var("CKPT_RUN") {
                self.settings.run = run;
            }
            if let Some(b) = env_parse::<u64>("CKPT_STAGING_BYTES")? {
                self.settings.staging_capacity = Some(b);
            }
            if let Ok(i) = std::env::var("CKPT_INCARNATION")
                .or_else(|_| std::env::var("TORCHELASTIC_RESTART_COUNT"))
            {
                self.settings.incarnation = i;
            }
            Ok(())
        };
        if let Err(e) = read() {
            self.env_error.get_or_insert(e);
        }
        self
    }

    /// Identifies this incarnation of the job (the same on every rank,
    /// different after each restart, e.g. the launcher's restart count).
    /// Rank manifests of different incarnations are never merged.
    pub fn incarnation(mut self, id: impl Into<String>) -> Self {
        self.settings.incarnation = id.into();
        self
    }

    /// Staging pool size in bytes. Unset: sized to the first save. A save
    /// larger than the pool streams through it (its math-stop then
    /// includes waiting for the flush).
    pub fn staging_capacity(mut self, bytes: u64) -> Self {
        self.settings.staging_capacity = Some(bytes);
        self
    }

    /// Staging block size (power of two, at least 4096; default 8 MiB).
    pub fn block_size(mut self, bytes: usize) -> Self {
        self.settings.block_size = bytes;
        self
    }

    /// Checksum chunk size (4 KiB..1 GiB; default 4 MiB).
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.settings.chunk_size = bytes;
        self
    }

    /// What to do when a save finds the pool still busy.
    pub fn when_busy(mut self, p: BusyPolicy) -> Self {
        self.settings.busy = p;
        self
    }

    /// Threads copying into the staging pool (at least 1; default:
    /// available cores, at most 8).
    pub fn copy_threads(mut self, n: usize) -> Self {
        self.settings.copy_threads = n;
        self
    }

    /// Copy threads of [`save_overlapped`](crate::Checkpointer::save_overlapped)
    /// while the caller's closure runs (default 1: the forward and backward
    /// pass use the cores too). Once the closure has returned and the
    /// caller waits, the blocks left are copied by all
    /// [`copy_threads`](Self::copy_threads), so the part not hidden costs
    /// what a plain save's copy would.
    pub fn overlap_copy_threads(mut self, n: usize) -> Self {
        self.settings.overlap_copy_threads = n;
        self
    }

    /// Caps the bandwidth of an overlapped save's copy at `bytes_per_s`, so
    /// that it leaves memory bandwidth to the training step (default: no
    /// cap). The copy then takes at least `bytes / bytes_per_s`.
    pub fn overlap_copy_bandwidth(mut self, bytes_per_s: u64) -> Self {
        self.settings.overlap_copy_rate = Some(bytes_per_s);
        self
    }

    /// Parallel reads during restore (at least 1; default 4).
    pub fn restore_threads(mut self, n: usize) -> Self {
        self.settings.restore_threads = n;
        self
    }

    /// Also record a blake3 digest of every tensor (computed in the
    /// background, from the staged copy).
    pub fn blake3(mut self, on: bool) -> Self {
        self.settings.blake3 = on;
        self
    }

    /// Compute the crc32c tables during the copy (inside the math-stop,
    /// while the bytes are in cache) instead of in the background from the
    /// immutable staged copy before any byte is written (the default). On
    /// few cores the default keeps the math-stop at memcpy speed; both cover
    /// every byte from the staging pool to storage and back.
    pub fn checksum_while_staging(mut self, on: bool) -> Self {
        self.settings.crc_while_staging = on;
        self
    }

    /// Send staged blocks to the tiers while the copy is still running, and
    /// checksum them once it has ended (default off). By default a save
    /// that fits the staging pool holds its flush until the copy ends, so
    /// the copy has the cores and the memory bandwidth to itself: the
    /// math-stop stays at memcpy speed, and the checkpoint is durable the
    /// copy's time later. On turns that around: the first block goes to
    /// the disk as soon as it is staged, and the math-stop pays for the
    /// tiers' work beside the copy (on a 2-core VM, 2 GiB to a local
    /// directory: durable about 0.13 s sooner, at 0.99–1.05x the raw
    /// `O_DIRECT` write floor; math-stop 2–26% longer, about 10% in the
    /// median of 4 runs). Either way the
    /// manifest, which makes the checkpoint visible, is written only after
    /// every byte is checksummed, and the checksums are the same. A save
    /// larger than the pool streams through it either way.
    pub fn flush_while_staging(mut self, on: bool) -> Self {
        self.settings.flush_while_staging = on;
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
        self.settings.commit_timeout = d;
        self
    }

    /// How a tier that failed with a transient error (server down,
    /// timeouts) is probed until it answers again; meanwhile saves leave it
    /// out and report [`Error::Unavailable`] for it. Default: from 250 ms,
    /// doubling up to 2 s, each probe bounded to 10 s: a tier that comes
    /// back takes part in the first save that starts once a probe saw it
    /// answer.
    pub fn probe_backoff(mut self, backoff: ProbeBackoff) -> Self {
        self.settings.probe = backoff;
        self
    }

    /// Declares that the ranks of `group` (this one included) hold
    /// bit-identical copies of this rank's tensors: data-parallel replicas
    /// of one shard (every replica of a shard lists the same group). Each
    /// tensor is then written by one replica only, the bytes balanced
    /// across them; every replica still stages and checksums its copy, and
    /// the commit compares the copies' chunk checksums: replicas that
    /// differ (silent data corruption) fail the save on every tier with
    /// [`Error::ReplicaMismatch`] naming the tensor, the chunk and the odd
    /// ranks out. Loop states (RNG, data loader) stay per rank.
    pub fn replicas(mut self, group: impl IntoIterator<Item = u32>) -> Self {
        self.settings.replicas = group.into_iter().collect();
        self.settings.replicas.sort_unstable();
        self
    }

    /// How the ranks agree on the step to restore (with more than one
    /// rank): an all-gather over the job's own collective. Default: through
    /// the coordination tier (the first tier that survives a node loss,
    /// else the last), each round bounded by the commit timeout.
    pub fn agreement(mut self, a: Arc<dyn Agreement>) -> Self {
        self.agreement = Some(a);
        self
    }

    /// Runs the background flush on an existing runtime instead of a
    /// private one.
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Saves tensors in GPU memory ([`crate::TensorBytes::Device`]) by
    /// copying them from `device` into the staging pool, and registers the
    /// pool with its driver (page-locked for DMA) in chunks of
    /// [`CheckpointerBuilder::cuda_register_chunk`]. If the driver refuses
    /// the registration, a warning is logged once and device copies go
    /// through pageable memory: correct, slower
    /// ([`crate::StagingStats::cuda_registered`] says which).
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

    #[cfg(feature = "cuda")]
    fn cuda_staging(&self) -> Result<Option<CudaStaging>> {
        let Some(device) = self.cuda.clone() else {
            return Ok(None);
        };
        let block = self.settings.block_size;
        let chunk = match self.cuda_register_chunk {
            Some(c) if c == 0 || !c.is_multiple_of(block) => {
                return Err(Error::Config(format!(
                    "CUDA registration chunk of {c} bytes must be a positive multiple of the staging block size {block}"
                )));
            }
            Some(c) => c,
            None => crate::save::pool::DEFAULT_CUDA_REGISTER_CHUNK.max(block),
        };
        Ok(Some((device, chunk)))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_staging(&self) -> Result<Option<CudaStaging>> {
        Ok(None)
    }

    /// Validates the configuration and starts the checkpointer. The staging
    /// pool is allocated here when its capacity was given.
    pub fn build(self) -> Result<Checkpointer> {
        if let Some(e) = self.env_error {
            return Err(e);
        }
        self.settings.validate()?;
        if self.tiers.is_empty() {
            return Err(Error::Config(
                "a checkpointer needs at least one tier".into(),
            ));
        }
        for (tier, policy) in &self.tiers {
            policy.validate(&tier.location())?;
        }
        let cuda = self.cuda_staging()?;
        let settings = self.settings;
        let pool = match settings.staging_capacity {
            Some(c) => Some(new_pool(c, settings.block_size, cuda.as_ref())?),
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
        let schedule = self.schedule.unwrap_or_else(|| {
            SchedulerConfig::new(Policy::Availability, Duration::from_secs(24 * 3600))
        });
        let scheduler =
            Scheduler::new(schedule).map_err(|e| Error::Config(format!("schedule: {e}")))?;
        let tiers = self
            .tiers
            .into_iter()
            .map(|(tier, policy)| TierSlot {
                health: Health::new(tier.clone(), &settings.run, settings.probe),
                tier,
                policy,
                previous: Mutex::new(None),
                base: Default::default(),
            })
            .collect();
        Ok(Checkpointer {
            settings,
            tiers,
            pool: Mutex::new(pool),
            cuda,
            saves: Mutex::new(0),
            inflight: Mutex::new(Vec::new()),
            scheduler: Arc::new(Mutex::new(scheduler)),
            detected_logged: Arc::default(),
            last_step: Mutex::new(None),
            lineage: Mutex::default(),
            rollback: Mutex::new(None),
            uncommits: Mutex::new(Vec::new()),
            failed_saves: Arc::default(),
            started: Mutex::new(false),
            start_log: Mutex::new(None),
            collecting: Mutex::default(),
            custom_agreement: self.agreement,
            collectives: Mutex::new(0),
            runtime: Some(runtime),
        })
    }
}
