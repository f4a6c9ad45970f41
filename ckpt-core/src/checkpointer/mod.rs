//! The checkpointer: owns the staging pool, the background runtime and the
//! tiers; `save` is the math-stop, everything else runs in the background.
//!
//! - [`builder`]: configuration, validated at `build`;
//! - [`save`]: [`Checkpointer::save`], phase by phase;
//! - this file: restore, the schedule, the failure log, close.

mod builder;
mod save;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

pub use builder::CheckpointerBuilder;
pub(crate) use builder::Settings;

use crate::error::{Error, Result};
use crate::model::{TensorViewMut, TrainingState};
use crate::restore::agree::StorageAgreement;
use crate::restore::{self, Agreement, RestoreOptions, Restored};
use crate::save::copy::DeviceCopy;
use crate::save::handle::{SaveHandle, SaveReport};
use crate::save::health::{Health, TierStatus};
use crate::save::policy::TierPolicy;
use crate::save::pool::{StagingPool, StagingStats};
use crate::schedule::{self, FailureEvent, Scheduler};
use crate::store::events as failure_events;
use crate::sync::lock;
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One tier as the checkpointer holds it.
struct TierSlot {
    tier: Arc<dyn Tier>,
    policy: TierPolicy,
    /// Completion of the previous save to this tier.
    previous: Mutex<Option<oneshot::Receiver<()>>>,
    health: Arc<Health>,
    /// The previous save committed here, for incremental saves.
    base: crate::save::incremental::BaseCell,
}

/// Saves and restores one rank's training state through a list of tiers.
/// See the crate docs for a complete example.
pub struct Checkpointer {
    settings: Settings,
    tiers: Vec<TierSlot>,
    pool: Mutex<Option<StagingPool>>,
    cuda: Option<CudaStaging>,
    /// Saves started (numbers the saves for `TierPolicy::every`).
    saves: Mutex<u64>,
    inflight: Mutex<Vec<SaveHandle>>,
    scheduler: Arc<Mutex<Scheduler>>,
    /// Whether the start of this process was logged (rank 0).
    started: Mutex<bool>,
    /// The background write of the start event, awaited by `close`.
    start_log: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The background collections of saves (each writes its save record
    /// after its handle completes): `close` lets them finish.
    collecting: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The builder's agreement, if it was given one.
    custom_agreement: Option<Arc<dyn Agreement>>,
    /// Collective calls made (restores, replica checks): names their
    /// agreement rounds, the same on every rank.
    collectives: Mutex<u64>,
    /// Whether a detected error was logged: once per incarnation, since a
    /// corrupted replica makes every later save differ until the job rolls
    /// back (one failure, not one per save).
    detected_logged: Arc<std::sync::atomic::AtomicBool>,
    /// The step restored or last saved: the parent of the next save.
    last_step: Mutex<Option<u64>>,
    /// The run's rollbacks, as known at the last restore.
    lineage: Mutex<Arc<crate::format::manifest::Lineage>>,
    /// A rollback to record before the next save.
    rollback: Mutex<Option<crate::format::manifest::Rollback>>,
    /// Rollbacks the coordinator could not yet record or uncommit on a tier
    /// (by the tier's index): tried again before every save until done, so
    /// a tier that was down at the rollback does not refuse the reused step
    /// numbers, nor keep abandoned steps committed, for long.
    uncommits: Mutex<Vec<(usize, crate::format::manifest::Rollback)>>,
    /// Saves in a row that committed on no tier (see [`FailedSaves`]).
    failed_saves: Arc<FailedSaves>,
    runtime: Option<Runtime>,
}

/// Saves in a row that committed on no tier. A loop that never waits on its
/// handles would otherwise train on unprotected without a word: from the
/// [`FailedSaves::LOUD_AFTER`]-th such save on, each one is an error in the
/// log naming the step and why the last tier refused it.
#[derive(Debug, Default)]
pub(crate) struct FailedSaves(std::sync::atomic::AtomicU64);

impl FailedSaves {
    /// Failed saves in a row before the log says so at error level.
    pub(crate) const LOUD_AFTER: u64 = 3;

    /// Counts one save's outcome; returns the failures in a row.
    pub(crate) fn note(&self, step: u64, committed: bool, why: Option<&Error>) -> u64 {
        use std::sync::atomic::Ordering;
        if committed {
            self.0.store(0, Ordering::Release);
            return 0;
        }
        let n = self.0.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= Self::LOUD_AFTER {
            let why = why.map(ToString::to_string).unwrap_or_default();
            tracing::error!(
                step,
                failed_in_a_row = n,
                last_error = %why,
                "no checkpoint committed on any tier for {n} saves in a row: the run is training without protection"
            );
        }
        n
    }

    /// Failures in a row so far.
    pub(crate) fn in_a_row(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("run", &self.settings.run)
            .field("rank", &self.settings.rank)
            .field("world_size", &self.settings.world_size)
            .field("tiers", &self.tier_locations())
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Starts building a checkpointer for `run` (a name safe as a path
    /// component: `[A-Za-z0-9._-]`).
    pub fn builder(run: impl Into<String>) -> CheckpointerBuilder {
        CheckpointerBuilder::new(run.into())
    }

    /// The run name.
    pub fn run(&self) -> &str {
        &self.settings.run
    }

    /// This rank.
    pub fn rank_id(&self) -> u32 {
        self.settings.rank
    }

    /// The world size.
    pub fn world_size(&self) -> u32 {
        self.settings.world_size
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

    /// Saves in a row, up to the last one finished, that committed on no
    /// tier (0 once one commits anywhere). From
    /// the third on, each is also logged as an error: a loop that never
    /// waits on its handles learns that it trains unprotected.
    pub fn saves_failed_in_a_row(&self) -> u64 {
        self.failed_saves.in_a_row()
    }

    /// The staging pool's size and state, once it is allocated (at `build`
    /// with a capacity, else at the first save).
    pub fn staging_stats(&self) -> Option<StagingStats> {
        lock(&self.pool).as_ref().map(StagingPool::stats)
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

    /// Restores the newest verified checkpoint into `targets`. `Ok(None)`
    /// means no tier holds a checkpoint of this run (a fresh start).
    ///
    /// The schedule's clock starts here: the state restore returns (or the
    /// fresh state) needs no save.
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
        // After a restore (perhaps of an older step, a rollback) nothing
        // saved before may be a base: the next save on each tier compares
        // against the restored step as that tier holds it (its chunk
        // hashes), or is whole.
        for slot in &self.tiers {
            *lock(&slot.base) = None;
        }
        let tiers = self.tiers();
        let mut opts = opts.clone();
        if opts.threads == 0 {
            opts.threads = self.settings.restore_threads;
        }
        // Every restore of a checkpointer is a collective: its rounds are
        // numbered by the call, the same on every rank.
        let call = {
            let mut n = lock(&self.collectives);
            *n += 1;
            *n
        };
        let agreement = self
            .agreement(&handle)
            .map(|a| Arc::new(restore::Numbered::new(a, format!("{call}-"))) as Arc<dyn Agreement>);
        let restored = restore::restore(
            &handle,
            &tiers,
            &self.settings.run,
            self.settings.rank,
            targets,
            &opts,
            agreement.as_deref(),
        )?;
        // The run's rollbacks as the longest record on any tier has them:
        // every commit carries their count, and repairs a tier that missed
        // one. A restore below a committed step is a rollback, recorded
        // before the next save (a restore that is not followed by a save,
        // to look at an older step, changes nothing).
        *lock(&self.lineage) = Arc::new(restore::block_on(
            &handle,
            crate::store::lineage::longest(&tiers, &self.settings.run),
        ));
        *lock(&self.rollback) =
            restored
                .as_ref()
                .filter(|r| r.rolls_back)
                .map(|r| crate::format::manifest::Rollback {
                    to_step: r.step,
                    abandoned: r.newer_committed.clone(),
                    incarnation: self.settings.incarnation.clone(),
                    unix_ms: unix_ms(),
                });
        if let Some(r) = &restored {
            for slot in self.tiers.iter().filter(|s| s.policy.incremental.is_some()) {
                *lock(&slot.base) = Some(Arc::new(crate::save::incremental::Base::pending(r.step)));
            }
        }
        let step = restored.as_ref().map(|r| r.step).unwrap_or(0);
        self.log_start(
            step,
            restored.as_ref().map(|r| r.saved_unix_ms as f64 / 1e3),
        );
        let mut s = lock(&self.scheduler);
        if let (Some(_), Some(age)) = (&restored, failure_events::process_age()) {
            s.record_restore(age);
        }
        s.mark_saved(step, Instant::now());
        *lock(&self.last_step) = restored.as_ref().map(|r| r.step);
        Ok(restored)
    }

    /// The tier that keeps the failure log and carries the restore
    /// agreement: the first that survives the loss of a node, else the last
    /// (the slowest, by the builder's convention, so the most durable).
    fn log_tier(&self) -> Arc<dyn Tier> {
        self.tiers
            .iter()
            .find(|t| t.tier.capabilities().survives_node)
            .or(self.tiers.last())
            .map(|t| t.tier.clone())
            .unwrap_or_else(|| Arc::new(crate::MemoryTier::new()))
    }

    /// How the ranks agree on the step to restore: the builder's
    /// [`Agreement`], else through the coordination tier; none for one rank.
    fn agreement(&self, handle: &tokio::runtime::Handle) -> Option<Arc<dyn Agreement>> {
        if self.settings.world_size < 2 {
            return None;
        }
        if let Some(a) = &self.custom_agreement {
            return Some(a.clone());
        }
        let s = &self.settings;
        Some(Arc::new(StorageAgreement::new(
            self.log_tier(),
            &s.run,
            &s.incarnation,
            s.rank,
            s.world_size,
            s.commit_timeout,
            handle.clone(),
        )))
    }

    /// The job continues from the step it restored, below a committed
    /// one: before this process's first save after the restore, the
    /// coordinator records the rollback in the run's lineage on every tier
    /// (from then on the newer steps are abandoned, wherever they are
    /// still committed) and uncommits those it sees (an auditable
    /// `MANIFEST.abandoned-<incarnation>.json` is kept); every rank waits
    /// for it (one agreement round), so no rank's save meets an abandoned
    /// step still committed under its number.
    pub(crate) fn apply_rollback(&self, handle: &tokio::runtime::Handle) -> Result<()> {
        let s = &self.settings;
        if s.rank == 0 {
            self.retry_uncommits(handle);
        }
        let Some(rollback) = lock(&self.rollback).take() else {
            return Ok(());
        };
        if s.rank == 0 {
            // The record on every tier first, then the uncommits: a
            // coordinator killed between the two leaves every tier knowing
            // which steps are abandoned.
            let mut recorded = Vec::new();
            for i in 0..self.tiers.len() {
                match self.record_on(i, &rollback, handle) {
                    Ok(()) => recorded.push(i),
                    Err(e) => self.uncommit_later(i, &rollback, &e),
                }
            }
            let mut abandoned = Vec::new();
            for i in recorded {
                match self.abandon_on(i, &rollback, handle) {
                    Ok(steps) => abandoned.extend(steps),
                    Err(e) => self.uncommit_later(i, &rollback, &e),
                }
            }
            abandoned.sort_unstable();
            abandoned.dedup();
            tracing::warn!(
                restored = rollback.to_step,
                ?abandoned,
                "the run continues from an older step: the newer ones are abandoned"
            );
        }
        if let Some(a) = self.agreement(handle) {
            let call = {
                let mut n = lock(&self.collectives);
                *n += 1;
                *n
            };
            let done = a.all_gather(
                &format!("{call}-rollback"),
                format!("{{\"rank\":{}}}", s.rank).into_bytes(),
            );
            if let Err(e) = done {
                *lock(&self.rollback) = Some(rollback);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Records `rollback` in the lineage record of tier `i`.
    fn record_on(
        &self,
        i: usize,
        rollback: &crate::format::manifest::Rollback,
        handle: &tokio::runtime::Handle,
    ) -> Result<()> {
        let (tier, run) = (self.tiers[i].tier.as_ref(), &self.settings.run);
        let known = lock(&self.lineage).clone();
        let l = restore::block_on(
            handle,
            crate::store::lineage::record_over(tier, run, rollback.clone(), &known),
        )?;
        let mut known = lock(&self.lineage);
        if l.rollbacks.len() > known.rollbacks.len() {
            *known = Arc::new(l);
        }
        Ok(())
    }

    /// Uncommits on tier `i` the steps `rollback` abandons; returns them.
    fn abandon_on(
        &self,
        i: usize,
        rollback: &crate::format::manifest::Rollback,
        handle: &tokio::runtime::Handle,
    ) -> Result<Vec<u64>> {
        let (tier, run) = (self.tiers[i].tier.as_ref(), &self.settings.run);
        // Which rollback of the run this is: steps committed under a later
        // count belong to the new lineage and stay.
        let index = {
            let known = lock(&self.lineage);
            known
                .rollbacks
                .iter()
                .rposition(|r| {
                    r.to_step == rollback.to_step && r.incarnation == rollback.incarnation
                })
                .unwrap_or(known.rollbacks.len()) as u64
        };
        restore::block_on(
            handle,
            crate::store::abandon_steps_up_to(
                tier,
                run,
                &rollback.abandoned,
                &self.settings.incarnation,
                index,
            ),
        )
    }

    fn uncommit_later(&self, i: usize, rollback: &crate::format::manifest::Rollback, e: &Error) {
        tracing::warn!(tier = %self.tiers[i].tier.location(), error = %e, "cannot record the rollback or uncommit the abandoned steps on this tier yet (the lineage record keeps them out); trying again before every save");
        lock(&self.uncommits).push((i, rollback.clone()));
    }

    /// Tries again the rollbacks a tier missed, on the tiers that take part
    /// in saves now (a tier that is down is left to its health probe: the
    /// save path never waits on it).
    fn retry_uncommits(&self, handle: &tokio::runtime::Handle) {
        let pending = std::mem::take(&mut *lock(&self.uncommits));
        let mut left = Vec::new();
        for (i, rollback) in pending {
            if self.tiers[i].health.unavailable().is_some() {
                left.push((i, rollback));
                continue;
            }
            let done = self
                .record_on(i, &rollback, handle)
                .and_then(|()| self.abandon_on(i, &rollback, handle));
            match done {
                Ok(steps) => {
                    tracing::info!(tier = %self.tiers[i].tier.location(), ?steps, "the rollback a tier missed is recorded there, its abandoned steps uncommitted")
                }
                Err(e) => {
                    tracing::debug!(tier = %self.tiers[i].tier.location(), error = %e, "the rollback a tier missed: still failing");
                    left.push((i, rollback));
                }
            }
        }
        lock(&self.uncommits).extend(left);
    }

    /// Rank 0 logs this process's start once (at the first restore or
    /// save) and feeds the failure statistics to the scheduler.
    fn log_start(&self, step: u64, saved_unix_s: Option<f64>) {
        let mut started = lock(&self.started);
        if *started || self.settings.rank != 0 {
            return;
        }
        *started = true;
        let Ok(handle) = self.handle() else { return };
        let tier = self.log_tier();
        let run = self.settings.run.clone();
        let scheduler = self.scheduler.clone();
        // In the background: the first save must not wait on the store (an
        // object store round trip) before its math-stop even starts.
        let event = FailureEvent {
            saved_unix_s,
            ..FailureEvent::start(failure_events::now_unix_s(), step)
        };
        let task = handle.spawn(async move {
            let logged = async {
                failure_events::append(tier.as_ref(), &run, &event).await?;
                failure_events::read(tier.as_ref(), &run).await
            };
            match logged.await {
                Ok(events) => {
                    let stats = schedule::failure_stats(&events, Some(failure_events::now_unix_s()));
                    tracing::debug!(failures = stats.failures, exposure_s = stats.exposure_s, "failure log read");
                    lock(&scheduler).observe_failures(stats);
                }
                Err(e) => tracing::warn!(error = %e, "cannot update the failure log; MTBF stays at its prior"),
            }
        });
        *lock(&self.start_log) = Some(task);
    }

    /// Whether the training loop should save at `step`: the interval policy
    /// of [`CheckpointerBuilder::schedule`], fed with this checkpointer's
    /// own measurements. Its clock starts at [`Checkpointer::restore`], or
    /// at the first call when the loop never restores.
    ///
    /// Never true while an earlier save is still flushing: a save is never
    /// requested faster than the tiers absorb them.
    pub fn should_save(&self, step: u64) -> bool {
        if lock(&self.inflight).iter().any(|h| !h.is_done()) {
            return false;
        }
        lock(&self.scheduler).should_save(step, Instant::now())
    }

    /// The current checkpoint period chosen by the schedule.
    pub fn checkpoint_interval(&self) -> Duration {
        lock(&self.scheduler).interval()
    }

    /// One line: the schedule's policy, its inputs (δ, M, R) and the
    /// interval it chose, and why.
    pub fn explain_schedule(&self) -> String {
        lock(&self.scheduler).explain()
    }

    /// Waits for every in-flight save and returns their reports.
    pub fn wait_all(&self) -> Vec<Result<SaveReport>> {
        let handles: Vec<SaveHandle> = lock(&self.inflight).drain(..).collect();
        handles.iter().map(SaveHandle::wait).collect()
    }

    /// Waits for in-flight saves, records the clean stop in the failure log
    /// and shuts the background runtime down.
    pub fn close(mut self) -> Vec<Result<SaveReport>> {
        let reports = self.wait_all();
        // The saves' records before the stop.
        self.finish_collecting();
        if self.settings.rank == 0 && *lock(&self.started) {
            let step = reports
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|r| r.step)
                .max()
                .unwrap_or(0);
            if let Err(e) = self.log_clean_stop(step) {
                tracing::warn!(error = %e, "cannot record the clean stop in the failure log");
            }
        }
        self.shutdown();
        reports
    }

    /// Records in the failure log that the job is about to die at `step`
    /// (call it from a fatal-error path: a panic hook, a handler of a
    /// fatal signal, a preemption notice that comes too late to save).
    /// With it `ckpt report` knows the step and time lost; a process killed
    /// outright records nothing, and the report estimates both from the
    /// last save it saw. Coordinator only (other ranks return at once);
    /// blocks until the event is written.
    pub fn record_crash(&self, step: u64) -> Result<()> {
        if self.settings.rank != 0 {
            return Ok(());
        }
        self.log_event(FailureEvent::crash(failure_events::now_unix_s(), step))
    }

    fn log_clean_stop(&self, step: u64) -> Result<()> {
        self.log_event(FailureEvent::clean_stop(failure_events::now_unix_s(), step))
    }

    /// Appends `event` to the failure log, after the start event.
    fn log_event(&self, event: FailureEvent) -> Result<()> {
        let handle = self.handle()?;
        let tier = self.log_tier();
        let run = &self.settings.run;
        let start_log = lock(&self.start_log).take();

        std::thread::scope(|s| {
            s.spawn(|| {
                handle.block_on(async {
                    // The start event first, so the log is complete.
                    if let Some(t) = start_log {
                        let _ = t.await;
                    }

                    failure_events::append(tier.as_ref(), run, &event).await
                })
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the failure-log thread panicked".into())))
        })
    }

    fn shutdown(&mut self) {
        self.finish_collecting();
        for t in &self.tiers {
            t.health.stop();
        }
        if let Some(Runtime::Owned(rt)) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Checkpointer {
    /// Lets the background collections of finished saves write their
    /// save records (at most 5 s each), so a checkpointer that is closed
    /// or dropped leaves its history complete.
    fn finish_collecting(&self) {
        let tasks = std::mem::take(&mut *lock(&self.collecting));
        if tasks.is_empty() {
            return;
        }
        let Ok(handle) = self.handle() else { return };
        let handle = handle.clone();
        std::thread::scope(|s| {
            s.spawn(|| {
                handle.block_on(async {
                    for t in tasks {
                        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
                    }
                })
            });
        });
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.wait_all();
        self.shutdown();
    }
}

/// What a replica check found (all replicas matched).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaCheck {
    /// Bytes fingerprinted on this rank.
    pub bytes: u64,
    /// Time spent fingerprinting them.
    pub fingerprint: Duration,
    /// Time spent exchanging fingerprints with the other ranks.
    pub exchange: Duration,
}

impl Checkpointer {
    /// Checks, without writing a checkpoint, that this rank's replicas hold
    /// the same tensors as it does: every rank of the job calls it with its
    /// state (a collective, like the restore agreement); each fingerprints
    /// its tensors (crc32c per chunk, from memory, in parallel, far cheaper
    /// than a copy), the fingerprints are exchanged, and replicas that
    /// differ are [`Error::ReplicaMismatch`] naming the tensor, the chunk
    /// and the odd ranks out. Tensors in GPU memory are not covered.
    pub fn verify_replicas(&self, state: &TrainingState<'_>) -> Result<ReplicaCheck> {
        let t0 = Instant::now();
        let prints = fingerprint(state, self.settings.chunk_size);
        let bytes = state.nbytes();
        let fingerprint = t0.elapsed();
        let handle = self.handle()?.clone();
        let Some(agreement) = self.agreement(&handle) else {
            return Ok(ReplicaCheck {
                bytes,
                fingerprint,
                exchange: Duration::ZERO,
            });
        };
        let round = {
            let mut n = lock(&self.collectives);
            *n += 1;
            format!("{n}-replicas")
        };
        let mine = serde_json::to_vec(&Prints {
            rank: self.settings.rank,
            tensors: prints,
        })
        .map_err(|e| Error::Internal(format!("cannot encode fingerprints: {e}")))?;
        let t1 = Instant::now();
        let all = agreement.all_gather(&round, mine)?;
        let exchange = t1.elapsed();
        let group = &self.settings.replicas;
        let mut theirs = Vec::with_capacity(group.len());
        for &r in group {
            let bytes = all.get(r as usize).ok_or_else(|| {
                Error::Internal(format!("no fingerprints from rank {r} in {round}"))
            })?;
            let p: Prints = serde_json::from_slice(bytes).map_err(|e| Error::Decode {
                what: format!("rank {r}'s fingerprints in {round}"),
                reason: e.to_string(),
            })?;
            theirs.push((r, p.tensors));
        }
        compare_fingerprints(state.step(), &theirs)?;
        Ok(ReplicaCheck {
            bytes,
            fingerprint,
            exchange,
        })
    }
}

/// Per tensor name, crc32c of each chunk.
pub type Fingerprints = Vec<(String, Vec<u32>)>;

/// One rank's fingerprints, as exchanged.
#[derive(serde::Serialize, serde::Deserialize)]
struct Prints {
    rank: u32,
    tensors: Fingerprints,
}

/// crc32c per `chunk` bytes of every host tensor of `state`, by name: what
/// replicas compare. Chunks are spread over the cores.
pub fn fingerprint(state: &TrainingState<'_>, chunk: u64) -> Fingerprints {
    let chunk = usize::try_from(chunk.max(1)).unwrap_or(usize::MAX);
    let jobs: Vec<(usize, &[u8])> = state
        .tensors()
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let bytes = match t.view.bytes() {
                crate::TensorBytes::Host(h) => h,
                _ => &[],
            };
            bytes.chunks(chunk).map(move |c| (i, c))
        })
        .collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16)
        .min(jobs.len().max(1));
    let per = jobs.len().div_ceil(threads).max(1);
    let crcs: Vec<u32> = std::thread::scope(|s| {
        let parts: Vec<_> = jobs
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(_, c)| crc32c::crc32c(c))
                        .collect::<Vec<u32>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut out: Fingerprints = state
        .tensors()
        .iter()
        .map(|t| (t.view.name().to_string(), Vec::new()))
        .collect();
    for ((i, _), crc) in jobs.iter().zip(crcs) {
        out[*i].1.push(crc);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Compares the replicas' fingerprints: the first tensor and chunk where
/// they differ is a [`Error::ReplicaMismatch`].
fn compare_fingerprints(step: u64, replicas: &[(u32, Fingerprints)]) -> Result<()> {
    let Some((_, first)) = replicas.first() else {
        return Ok(());
    };
    for (k, (name, _)) in first.iter().enumerate() {
        let tables: Vec<Option<&Vec<u32>>> = replicas
            .iter()
            .map(|(_, p)| p.get(k).filter(|(n, _)| n == name).map(|(_, c)| c))
            .collect();
        let chunks = tables.iter().flatten().map(|t| t.len()).max().unwrap_or(0);
        for chunk in 0..chunks.max(1) {
            let at: Vec<Option<u32>> = tables
                .iter()
                .map(|t| t.and_then(|t| t.get(chunk).copied()))
                .collect();
            if at.iter().all(|c| *c == at[0]) {
                continue;
            }
            let majority = at
                .iter()
                .find(|c| at.iter().filter(|d| d == c).count() * 2 > at.len());
            let ranks = replicas
                .iter()
                .zip(&at)
                .filter(|(_, c)| majority.is_none_or(|m| *c != m))
                .map(|((r, _), _)| *r)
                .collect();
            return Err(Error::ReplicaMismatch {
                step,
                tensor: name.clone(),
                chunk,
                ranks,
            });
        }
    }
    Ok(())
}
