//! [`CheckpointStore`]: the read side of one tier as a synchronous API, for
//! tools and tests that work on checkpoints without a checkpointer.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::model::TensorViewMut;
use crate::restore::{self, RestoreOptions, Restored};
use crate::store::retention::Retention;
use crate::store::{GcReport, VerifyReport};
use crate::tier::Tier;

/// The checkpoints on one tier: list them, load and verify them, restore
/// them into buffers, garbage-collect. What the `ckpt` CLI is built on.
///
/// ```
/// use std::sync::Arc;
/// use ckpt_core::{Checkpointer, CheckpointStore, MemoryTier, RestoreOptions, TensorMut,
///     TensorRef, TierPolicy, TrainingState};
///
/// let tier = Arc::new(MemoryTier::new());
/// let ckpt = Checkpointer::builder("demo").tier(tier.clone(), TierPolicy::keep_last(2)).build()?;
/// let w = vec![3.0f32; 16];
/// let t = TensorRef::from_slice("w", &[16], &w);
/// let state = TrainingState::builder(5)
///     .model([&t]).without_optimizer().without_loop_state()
///     .build()?;
/// ckpt.save(&state)?.wait()?;
///
/// let store = CheckpointStore::new(tier)?;
/// assert_eq!(store.runs()?, ["demo"]);
/// assert_eq!(store.steps("demo")?, [5]);
/// let m = store.manifest("demo", 5)?;
/// assert!(store.verify(&m).is_ok());
/// let mut back = vec![0f32; 16];
/// let r = store
///     .restore("demo", &mut [&mut TensorMut::from_slice("w", &[16], &mut back)], &RestoreOptions::default())?
///     .expect("a checkpoint");
/// assert_eq!((r.step, back), (5, w));
/// # Ok::<(), ckpt_core::Error>(())
/// ```
pub struct CheckpointStore {
    tier: Arc<dyn Tier>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("tier", &self.tier.location())
            .finish()
    }
}

impl CheckpointStore {
    /// The store on `tier`, with a small runtime of its own for the tier's
    /// requests.
    pub fn new(tier: Arc<dyn Tier>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckpt-store")
            .enable_all()
            .build()
            .map_err(|e| Error::io("<tokio runtime>", e))?;
        Ok(Self { tier, rt: Some(rt) })
    }

    /// The tier.
    pub fn tier(&self) -> &Arc<dyn Tier> {
        &self.tier
    }

    fn rt(&self) -> Result<&tokio::runtime::Runtime> {
        self.rt
            .as_ref()
            .ok_or_else(|| Error::Internal("checkpoint store without a runtime".into()))
    }

    /// Runs a future on the store's runtime from a thread of its own, so
    /// this works from synchronous and asynchronous callers alike.
    fn block_on<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> Result<T> {
        let rt = self.rt()?;
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(f))
                .join()
                .map_err(|_| Error::Internal("a store thread panicked".into()))
        })
    }

    /// Runs with at least one committed step, sorted.
    pub fn runs(&self) -> Result<Vec<String>> {
        self.block_on(crate::store::runs(self.tier.as_ref()))?
    }

    /// Committed steps of `run`, ascending.
    pub fn steps(&self, run: &str) -> Result<Vec<u64>> {
        self.block_on(crate::store::committed_steps(self.tier.as_ref(), run))?
    }

    /// Refused and uncommitted steps of `run` still stored
    /// ([`crate::store::step_notes`]).
    pub fn step_notes(&self, run: &str) -> Result<Vec<crate::store::StepNote>> {
        self.block_on(crate::store::step_notes(self.tier.as_ref(), run))?
    }

    /// The run's failure log (starts, crashes, clean stops, detected
    /// errors), oldest first; empty when nothing was logged.
    pub fn failure_log(&self, run: &str) -> Result<Vec<crate::schedule::FailureEvent>> {
        self.block_on(crate::store::events::read(self.tier.as_ref(), run))?
    }

    /// What the location's conditional create guarantees (an object store
    /// is probed once, with objects under [`crate::PROBE_DIR`] that are
    /// removed again; see [`Tier::create_guarantee`]).
    pub fn create_guarantee(&self) -> Result<crate::tier::CreateGuarantee> {
        self.block_on(self.tier.create_guarantee())
    }

    /// The verified manifest of `run`'s step `step`.
    pub fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        self.block_on(crate::store::load_manifest(self.tier.as_ref(), run, step))?
    }

    /// Reads back and checks every byte of the checkpoint `m` describes
    /// (file lengths, shard headers, every chunk).
    pub fn verify(&self, m: &Manifest) -> VerifyReport {
        self.verify_with_progress(m, &|_| {})
    }

    /// [`verify`](Self::verify), calling `progress` with the bytes of each
    /// span as it is checked (in all, [`Manifest::data_bytes`]).
    pub fn verify_with_progress(
        &self,
        m: &Manifest,
        progress: &(dyn Fn(u64) + Sync),
    ) -> VerifyReport {
        self.block_on(crate::restore::verify::verify_step_with(
            self.tier.as_ref(),
            m,
            progress,
        ))
        .unwrap_or_else(|e| VerifyReport::failed(m.step, e.to_string()))
    }

    /// Applies `retention` to `run` and removes crash leftovers.
    pub fn gc(&self, run: &str, retention: &Retention) -> Result<GcReport> {
        self.gc_with_progress(run, retention, &|_, _| {})
    }

    /// [`gc`](Self::gc), calling `progress(step, bytes)` after each step
    /// deleted, with the bytes its files held.
    pub fn gc_with_progress(
        &self,
        run: &str,
        retention: &Retention,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<GcReport> {
        retention.validate()?;
        self.block_on(crate::store::gc_with_progress(
            self.tier.as_ref(),
            run,
            retention,
            progress,
        ))?
    }

    /// The history of `run`: saves, restarts and their rollback, where its
    /// wall time went, and the interval the scheduler's formulas give (see
    /// [`report`](crate::store::report)).
    pub fn report(&self, run: &str) -> Result<crate::store::report::RunReport> {
        let tier = self.tier.as_ref();
        let (events, saves, times) = self.block_on(async {
            let events = crate::store::events::read(tier, run).await?;
            let saves = crate::store::history::read(tier, run).await?;
            // When each restored step was saved, from its manifest, for
            // restored steps the save history lacks.
            let mut times = std::collections::BTreeMap::new();
            for e in events
                .iter()
                .filter(|e| e.kind == crate::schedule::FailureEventKind::Start)
            {
                if !saves.iter().any(|s| s.step == e.step)
                    && let Ok(m) = crate::store::load_manifest(tier, run, e.step).await
                {
                    times.insert(e.step, m.created_unix_ms as f64 / 1e3);
                }
            }
            Ok::<_, crate::Error>((events, saves, times))
        })??;
        Ok(crate::store::report::build(run, &events, &saves, &times))
    }

    /// Copies the chunks the steps `retention` keeps point at in steps it
    /// deletes into the kept steps' own files (see
    /// [`compact`](crate::store::compact)); a [`CheckpointStore::gc`] with
    /// the same retention then deletes those steps.
    pub fn compact(&self, run: &str, retention: &Retention) -> Result<crate::store::CompactReport> {
        self.block_on(crate::store::compact(self.tier.as_ref(), run, retention))?
    }

    /// What [`CheckpointStore::gc`] would keep and delete, without
    /// deleting: `(kept, deleted, kept because kept steps point into them)`.
    pub fn gc_plan(
        &self,
        run: &str,
        retention: &Retention,
    ) -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
        retention.validate()?;
        let steps = self.steps(run)?;
        self.block_on(crate::store::select_with_references(
            self.tier.as_ref(),
            run,
            &steps,
            retention,
        ))?
    }

    /// Restores the newest verified checkpoint of `run` (or
    /// [`RestoreOptions::step`]) into `targets`, falling back to older
    /// steps as [`Checkpointer::restore`](crate::Checkpointer::restore)
    /// does. `Ok(None)`: the tier holds no checkpoint of `run`.
    pub fn restore(
        &self,
        run: &str,
        targets: &mut [&mut dyn TensorViewMut],
        opts: &RestoreOptions,
    ) -> Result<Option<Restored>> {
        let rt = self.rt()?;
        let mut opts = opts.clone();
        if opts.threads == 0 {
            opts.threads = 4;
        }
        restore::restore(
            rt.handle(),
            std::slice::from_ref(&self.tier),
            run,
            opts.rank,
            targets,
            &opts,
            None,
        )
    }

    /// Reads `targets` from the checkpoint `m` describes (no fallback),
    /// verifying every chunk it reads; returns the bytes read. What an
    /// exporter calls tensor by tensor.
    pub fn read(&self, m: &Manifest, targets: &mut [&mut dyn TensorViewMut]) -> Result<u64> {
        let rt = self.rt()?;
        restore::read_targets(rt.handle(), self.tier.as_ref(), m, targets, 4)
    }
}

impl Drop for CheckpointStore {
    fn drop(&mut self) {
        // Never blocks, also when dropped inside an async context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
