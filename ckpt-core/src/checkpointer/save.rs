//! [`Checkpointer::save`], phase by phase: plan, pool, the tiers this save
//! goes to, the dispatcher, the copy (the math-stop), and the background
//! task that collects every tier's outcome.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpointer::{Checkpointer, TierSlot, new_pool, unix_ms};
use crate::error::{Error, Result};
use crate::format::layout;
use crate::model::TrainingState;
use crate::save::commit::{self, TierJob};
use crate::save::copy;
use crate::save::handle::{SaveHandle, SaveReport, TierReport};
use crate::save::health::Health;
use crate::save::plan::SavePlan;
use crate::save::policy::BusyPolicy;
use crate::save::pool::StagingPool;
use crate::save::stream::{self, SaveCtx, StageMsg};
use crate::schedule::{self, FailureEvent, Policy};
use crate::store::events;
use crate::sync::lock;

/// One tier's part of a save: a flush task, or a report made up front for
/// a tier that is down.
enum TierRun {
    Flush(tokio::task::JoinHandle<TierReport>, Arc<Health>),
    Unavailable(TierReport),
}

/// The tiers a save goes to.
struct Flushes {
    runs: Vec<TierRun>,
    /// The byte stream into each flushing tier.
    outs: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Where the rank manifest goes once the stream is complete.
    manifest: watch::Sender<stream::ManifestCell>,
}

impl Checkpointer {
    /// Saves `state`: copies it into the staging pool (the math-stop, the
    /// only time the caller waits) and returns while the flush to every
    /// tier runs in the background. [`SaveHandle::wait`] blocks until it is
    /// durable.
    ///
    /// A tier that is down is left out (its report says
    /// [`Error::Unavailable`]); when every tier the save goes to is down,
    /// nothing is copied at all.
    pub fn save(&self, state: &TrainingState<'_>) -> Result<SaveHandle> {
        self.save_impl(state, None)
    }

    /// Saves `state` while `during` runs: the copy into the staging pool
    /// runs on copy threads of its own (see
    /// [`overlap_copy_threads`](crate::CheckpointerBuilder::overlap_copy_threads)
    /// and [`overlap_copy_bandwidth`](crate::CheckpointerBuilder::overlap_copy_bandwidth))
    /// while `during` runs on the calling thread, and the call returns when
    /// both are done. Then the flush goes on in the background, as after
    /// [`save`](Self::save).
    ///
    /// This is the CheckFreq-style snapshot: save step `t`'s state while
    /// step `t + 1`'s forward and backward pass run, which only read the
    /// parameters and optimizer state. `state` borrows every tensor it
    /// holds for the whole call, so `during` can read them but the borrow
    /// checker refuses any `&mut` to them until the copy is finished: the
    /// optimizer update comes after this call returns.
    ///
    /// The report's `math_stop` is the time the caller waited beyond
    /// `during` (the planning before the copy, and the part of the copy not
    /// hidden), which is also what the scheduler learns; `copy` is the
    /// copy's own duration.
    ///
    /// Why a closure and not a guard returned at once: a guard can be
    /// leaked (`std::mem::forget`), and a copy that outlived it would read
    /// memory the caller is free to change; a closure cannot end before the
    /// copy does, a panic in it included (the copy is waited for first).
    ///
    /// GPU tensors (feature `cuda`) copy on ckpt's own stream, as with
    /// `save`: synchronize the stream that produced them before this call;
    /// the optimizer's stream may write them once it returns.
    ///
    /// ```
    /// use ckpt_core::{Checkpointer, MemoryTier, TensorRef, TierPolicy, TrainingState};
    /// let ckpt = Checkpointer::builder("overlap")
    ///     .tier(std::sync::Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
    ///     .build()?;
    /// let mut w = vec![0.5f32; 1 << 16];
    /// let t = TensorRef::from_slice("w", &[1 << 16], &w);
    /// let state = TrainingState::builder(1).model([&t]).without_optimizer().without_loop_state().build()?;
    /// // forward + backward: reads `w` while it is copied.
    /// let (h, grad) = ckpt.save_overlapped(&state, || w.iter().map(|x| x * 2.0).sum::<f32>());
    /// let h = h?;
    /// drop(state);
    /// w[0] -= 1e-3 * grad; // the update, after the copy
    /// let report = h.wait()?;
    /// println!("copy {:?}, of which the loop waited {:?}", report.copy, report.math_stop);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Changing a tensor while its copy runs does not compile:
    ///
    /// ```compile_fail,E0502
    /// use ckpt_core::{Checkpointer, MemoryTier, TensorRef, TierPolicy, TrainingState};
    /// # let ckpt = Checkpointer::builder("overlap")
    /// #     .tier(std::sync::Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
    /// #     .build().unwrap();
    /// let mut w = vec![0.5f32; 1024];
    /// let t = TensorRef::from_slice("w", &[1024], &w);
    /// let state = TrainingState::builder(1).model([&t]).without_optimizer().without_loop_state().build().unwrap();
    /// let (h, ()) = ckpt.save_overlapped(&state, || w[0] = 1.0); // error[E0502]: `w` is borrowed
    /// ```
    pub fn save_overlapped<R>(
        &self,
        state: &TrainingState<'_>,
        during: impl FnOnce() -> R,
    ) -> (Result<SaveHandle>, R) {
        let mut during = Some(during);
        let mut out = None;
        let h = self.save_impl(
            state,
            Some(&mut || {
                if let Some(f) = during.take() {
                    out = Some(f());
                }
            }),
        );
        // A save that failed (or was skipped) before its copy started did
        // not run `during`: it runs now.
        let out = match (out, during) {
            (Some(o), _) => o,
            (None, Some(f)) => f(),
            (None, None) => unreachable!("`during` runs exactly once"),
        };
        (h, out)
    }

    fn save_impl(
        &self,
        state: &TrainingState<'_>,
        mut during: Option<&mut dyn FnMut()>,
    ) -> Result<SaveHandle> {
        let step = state.step();
        self.log_start(step, None);
        let t0 = Instant::now();
        let rt = self.handle()?.clone();
        self.apply_rollback(&rt)?;
        let _span =
            tracing::info_span!("save", run = %self.settings.run, rank = self.settings.rank, step)
                .entered();
        // One save at a time: saves are numbered (tier selection) and their
        // blocks are taken from the pool in order.
        let mut saves = lock(&self.saves);
        let plan = SavePlan::new(
            &self.settings.run,
            self.settings.rank,
            state,
            self.gpu().is_some(),
            &self.settings.replicas,
            self.settings.chunk_size,
        )?;
        let pool = self.pool_for(plan.staged_bytes)?;
        self.check_streaming(step, &plan, &pool)?;
        let mut report = SaveReport::new(step, plan.bytes, plan.staged_bytes);
        // Every save() counts, skipped ones too: with the same calls on every
        // rank, tier selection (`TierPolicy::every`) stays the same on all.
        let index = *saves;
        *saves += 1;
        if self.settings.busy == BusyPolicy::Skip && !pool_can_take(&pool, plan.staged_bytes) {
            tracing::info!(
                step,
                "save skipped: staging pool still held by an earlier flush"
            );
            self.announce_skip(index, step, &rt);
            report.skipped = true;
            report.math_stop = t0.elapsed();
            return Ok(SaveHandle::finished(report, Vec::new(), t0.elapsed()));
        }
        let ctx = Arc::new(self.save_ctx(state, &plan, &pool, t0));
        let flushes = self.start_flushes(index, &ctx, &rt);
        if flushes.outs.is_empty() && !flushes.runs.is_empty() {
            tracing::debug!(
                step,
                "save not staged: every tier it goes to is unavailable"
            );
            report.math_stop = t0.elapsed();
            let reports: Vec<_> = flushes
                .runs
                .into_iter()
                .filter_map(|r| match r {
                    TierRun::Unavailable(r) => Some(r),
                    TierRun::Flush(..) => None,
                })
                .collect();
            let why = reports.iter().rev().find_map(|r| r.error.as_ref());
            self.failed_saves.note(step, false, why);
            return Ok(SaveHandle::finished(report, reports, t0.elapsed()));
        }
        let stage_tx = spawn_dispatcher(ctx, flushes.outs, flushes.manifest)?;

        // The math-stop: copy (host memcpy, device DMA) + checksum.
        crate::phase("stage", step);
        let sink = |k: usize, b: Bytes| {
            let _ = stage_tx.send(StageMsg::Block(k, b));
        };
        let overlapped = during.is_some();
        // An overlapped copy starts with `overlap_copy_threads` workers;
        // once the caller's work is done and it waits, every copy thread
        // may take the blocks left (the caller is idle then).
        let (threads, rate) = if overlapped {
            (
                self.settings
                    .copy_threads
                    .max(self.settings.overlap_copy_threads),
                self.settings.overlap_copy_rate,
            )
        } else {
            (self.settings.copy_threads, None)
        };
        let gate = overlapped.then(|| copy::Gate::new(self.settings.overlap_copy_threads));
        let gpu = self.gpu();
        let copy = || {
            let t = Instant::now();
            let r = copy::stage(
                &pool,
                &plan.sources,
                self.settings.chunk_size,
                self.settings.crc_while_staging,
                threads,
                self.settings.block_timeout,
                gpu,
                rate,
                gate.as_ref(),
                &sink,
            );
            (r, t.elapsed())
        };
        let (staged, copy_time, math_stop) = match during.as_mut() {
            None => {
                let (r, c) = copy();
                (r, c, t0.elapsed())
            }
            Some(f) => {
                // The copy on threads of its own, the caller's work here; the
                // scope ends only when both have (a panic in `f` included).
                let before = t0.elapsed();
                std::thread::scope(|s| {
                    let copier = s.spawn(copy);
                    f();
                    let waiting = Instant::now();
                    if let Some(g) = &gate {
                        g.raise(self.settings.copy_threads);
                    }
                    let (r, c) = copier.join().unwrap_or_else(|_| {
                        (
                            Err(Error::Internal("the staging copy panicked".into())),
                            Duration::ZERO,
                        )
                    });
                    (r, c, before + waiting.elapsed())
                })
            }
        };
        report.copy = copy_time;
        report.overlapped = overlapped;
        match staged {
            Ok(s) => {
                report.waited = s.waited;
                let _ = stage_tx.send(StageMsg::Done(s.crcs));
            }
            Err(e) => {
                let _ = stage_tx.send(StageMsg::Failed(e.clone()));
                return Err(e);
            }
        }
        drop(stage_tx);
        drop(saves);
        report.math_stop = math_stop;
        tracing::info!(step, bytes = report.bytes, staged = report.staged_bytes, math_stop = ?math_stop, waited = ?report.waited, "staged");
        let h = self.collect_in_background(report, flushes.runs, t0, &pool, &rt);
        let mut inflight = lock(&self.inflight);
        inflight.retain(|h| !h.is_done());
        inflight.push(h.clone());
        Ok(h)
    }

    /// The staging pool, allocated at the first save (sized to it) unless
    /// the builder gave a capacity.
    fn pool_for(&self, staged_bytes: u64) -> Result<StagingPool> {
        let mut guard = lock(&self.pool);
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let block = self.settings.block_size;
        let p = new_pool(staged_bytes.max(block as u64), block, self.cuda.as_ref())?;
        *guard = Some(p.clone());
        Ok(p)
    }

    /// A save larger than the pool streams through it: the flush must hand
    /// blocks back before staging can finish, so no tier may hold more than
    /// the pool minus a block (else the save would deadlock).
    fn check_streaming(&self, step: u64, plan: &SavePlan<'_>, pool: &StagingPool) -> Result<()> {
        if plan.staged_bytes <= pool.capacity() {
            return Ok(());
        }
        for slot in &self.tiers {
            let held = slot.tier.capabilities().buffered_write;
            let need = held.saturating_add(pool.block_size() as u64);
            if held > 0 && need > pool.capacity() {
                return Err(Error::Config(format!(
                    "step {step}: {} bytes must stream through a staging pool of {} bytes, but tier {} holds up to {held} bytes per upload; raise the staging capacity to at least {need} bytes (or to the state's size)",
                    plan.staged_bytes,
                    pool.capacity(),
                    slot.tier.location()
                )));
            }
        }
        Ok(())
    }

    fn save_ctx(
        &self,
        state: &TrainingState<'_>,
        plan: &SavePlan<'_>,
        pool: &StagingPool,
        started: Instant,
    ) -> SaveCtx {
        let s = &self.settings;
        SaveCtx {
            run: s.run.clone(),
            step: state.step(),
            rank: s.rank,
            world_size: s.world_size,
            incarnation: s.incarnation.clone(),
            attempt: crate::format::layout::new_attempt(&s.incarnation, state.step()),
            chunk_size: s.chunk_size,
            created_unix_ms: unix_ms(),
            started,
            parent: lock(&self.last_step).replace(state.step()),
            lineage: lock(&self.lineage).clone(),
            loop_state: state.loop_state().clone(),
            header: plan.header(),
            file_len: plan.layout.file_len,
            blake3: s.blake3,
            defer_flush: plan.staged_bytes <= pool.capacity() && !s.flush_while_staging,
            sum_after_staging: plan.staged_bytes <= pool.capacity() && s.flush_while_staging,
            crc_while_staging: s.crc_while_staging,
            commit_timeout: s.commit_timeout,
            tensors: plan.tensors.clone(),
        }
    }

    /// A latency-aware schedule needs enough snapshots that one taken at
    /// least L before a detected error is still retained.
    fn latency_floor(&self) -> usize {
        let s = lock(&self.scheduler);
        match s.policy() {
            Policy::LatencyAware { latency, .. } => {
                schedule::retention_floor(s.interval().as_secs_f64(), latency.as_secs_f64())
                    as usize
            }
            _ => 1,
        }
    }

    /// Starts one flush task per tier that takes save number `index`; a
    /// tier that is down gets its report right away.
    fn start_flushes(
        &self,
        index: u64,
        ctx: &Arc<SaveCtx>,
        rt: &tokio::runtime::Handle,
    ) -> Flushes {
        let floor = self.latency_floor();
        let (manifest, manifest_rx) = watch::channel(None);
        let mut flushes = Flushes {
            runs: Vec::new(),
            outs: Vec::new(),
            manifest,
        };
        for slot in self.tiers.iter().filter(|s| s.policy.takes(index)) {
            if let Some(e) = slot.health.unavailable() {
                tracing::debug!(step = ctx.step, tier = %slot.tier.location(), "tier left out of the save: unavailable");
                flushes.runs.push(TierRun::Unavailable(TierReport::not_run(
                    slot.tier.location(),
                    e,
                )));
                continue;
            }
            if let Some(max) = slot.tier.capabilities().max_object
                && ctx.file_len > max
            {
                flushes.runs.push(TierRun::Unavailable(TierReport::not_run(
                    slot.tier.location(),
                    Error::Config(format!(
                        "step {}: rank {}'s shard file is {} bytes, larger than the {max} bytes one object on {} can hold (part size x part limit); with S3's 10 000 parts it needs a part size of at least {} bytes",
                        ctx.step,
                        ctx.rank,
                        ctx.file_len,
                        slot.tier.location(),
                        ctx.file_len.div_ceil(10_000)
                    )),
                )));
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            flushes.outs.push(tx);
            let job = self.tier_job(slot, floor, rx, manifest_rx.clone());
            flushes.runs.push(TierRun::Flush(
                rt.spawn(commit::flush_tier(ctx.clone(), job)),
                slot.health.clone(),
            ));
        }
        flushes
    }

    /// With several ranks, a skipped save would leave the others waiting
    /// for this rank's shard until the commit timeout: tell them, in the
    /// background, on every tier the save would have gone to (the
    /// coordinator marks the step aborted, another rank leaves a note the
    /// coordinator reads).
    fn announce_skip(&self, index: u64, step: u64, rt: &tokio::runtime::Handle) {
        let s = &self.settings;
        if s.world_size < 2 {
            return;
        }
        let why = Error::Incomplete {
            path: layout::step_dir(&s.run, step),
            reason: format!(
                "rank {} skipped the save (its staging pool was still held by an earlier flush)",
                s.rank
            ),
        };
        for slot in self.tiers.iter().filter(|t| t.policy.takes(index)) {
            let tier = slot.tier.clone();
            let (run, inc, rank, why) = (s.run.clone(), s.incarnation.clone(), s.rank, why.clone());
            rt.spawn(async move {
                commit::announce_skip(tier.as_ref(), &run, step, rank, &inc, &why).await;
            });
        }
    }

    fn tier_job(
        &self,
        slot: &TierSlot,
        latency_floor: usize,
        data: mpsc::UnboundedReceiver<Bytes>,
        manifest: watch::Receiver<stream::ManifestCell>,
    ) -> TierJob {
        // Saves to one tier are flushed in order: this one waits for the
        // previous one's completion.
        let (done, done_rx) = oneshot::channel();
        let previous = lock(&slot.previous).replace(done_rx);
        let mut policy = slot.policy;
        policy.retention = policy
            .retention
            .with_floor(policy.retention.floor.max(latency_floor));
        TierJob {
            tier: slot.tier.clone(),
            policy,
            data,
            manifest,
            previous,
            done,
            base: slot.base.clone(),
        }
    }

    /// Waits for every tier of the save in the background, records the
    /// save with the scheduler and the tiers' health, and completes the
    /// handle.
    fn collect_in_background(
        &self,
        report: SaveReport,
        runs: Vec<TierRun>,
        t0: Instant,
        pool: &StagingPool,
        rt: &tokio::runtime::Handle,
    ) -> SaveHandle {
        let pool = pool.clone();
        let math_stop = report.math_stop;
        let (step, bytes) = (report.step, report.bytes);
        let handle = SaveHandle::pending(report);
        let finisher = handle.clone();
        let scheduler = self.scheduler.clone();
        // The coordinator logs a detected error (replicas that differ) in
        // the failure log, once per incarnation.
        let log = (self.settings.rank == 0).then(|| (self.log_tier(), self.settings.run.clone()));
        let logged = self.detected_logged.clone();
        let incarnation = self.settings.incarnation.clone();
        let saves = *lock(&self.saves);
        let failed_saves = self.failed_saves.clone();
        let task = rt.spawn(async move {
            let mut reports = Vec::with_capacity(runs.len());
            for run in runs {
                match run {
                    TierRun::Unavailable(r) => reports.push(r),
                    TierRun::Flush(task, health) => {
                        let r = task.await.unwrap_or_else(|e| {
                            TierReport::not_run(
                                "?".into(),
                                Error::Internal(format!("flush task failed: {e}")),
                            )
                        });
                        health.record(r.error.as_ref());
                        reports.push(r);
                    }
                }
            }
            let mismatch = reports
                .iter()
                .any(|r| matches!(r.error, Some(Error::ReplicaMismatch { .. })));
            if let (true, Some((tier, run))) = (mismatch, &log)
                && !logged.swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                let event = FailureEvent::detected_error(events::now_unix_s(), step);
                if let Err(e) = events::append(tier.as_ref(), run, &event).await {
                    tracing::warn!(error = %e, "cannot record the detected error in the failure log");
                }
            }
            let committed = reports.iter().any(|r| r.committed);
            let why = reports.iter().rev().find_map(|r| r.error.as_ref());
            failed_saves.note(step, committed, why);
            if committed {
                let absorbed = reports
                    .iter()
                    .map(|r| r.flush + r.commit)
                    .max()
                    .unwrap_or(Duration::ZERO);
                lock(&scheduler).record_save(math_stop, absorbed);
            }
            let total = t0.elapsed();
            let history = log.as_ref().map(|(tier, run)| {
                // The save history `ckpt report` reads: written after the
                // handle completes, so a slow or failed log tier never
                // delays the save's outcome (best effort: a process that
                // exits at once may lose its last record).
                let record = crate::store::history::SaveRecord {
                    step,
                    started_unix_s: events::now_unix_s() - total.as_secs_f64(),
                    math_stop_s: math_stop.as_secs_f64(),
                    bytes,
                    incarnation,
                    tiers: reports
                        .iter()
                        .map(|r| crate::store::history::TierRecord {
                            tier: r.tier.clone(),
                            committed: r.committed,
                            durable_s: r.durable_at.unwrap_or(math_stop + r.flush + r.commit).as_secs_f64(),
                            written: r.written,
                            referenced: r.referenced,
                        })
                        .collect(),
                };
                (tier.clone(), run.clone(), record)
            });
            let staging = pool.occupancy(t0, t0 + total, crate::save::handle::STAGING_SAMPLES);
            finisher.finish(reports, total, staging);
            if let Some((tier, run, record)) = history
                && let Err(e) = crate::store::history::append(tier.as_ref(), &run, &record, saves).await
            {
                tracing::debug!(error = %e, "cannot record the save in the save history");
            }
        });
        let mut collecting = lock(&self.collecting);
        collecting.retain(|t| !t.is_finished());
        collecting.push(task);
        handle
    }
}

/// Whether the pool can take a save of `staged_bytes` right now (policy
/// `Skip`): a save larger than the pool needs it whole.
fn pool_can_take(pool: &StagingPool, staged_bytes: u64) -> bool {
    let needed = staged_bytes.div_ceil(pool.block_size() as u64) as usize;
    pool.free_blocks() >= needed.min(pool.blocks())
}

/// Starts the dispatcher thread of one save; returns the channel staging
/// sends its blocks to.
fn spawn_dispatcher(
    ctx: Arc<SaveCtx>,
    outs: Vec<mpsc::UnboundedSender<Bytes>>,
    manifest: watch::Sender<stream::ManifestCell>,
) -> Result<std_mpsc::Sender<StageMsg>> {
    let (tx, rx) = std_mpsc::channel::<StageMsg>();
    std::thread::Builder::new()
        .name("ckpt-dispatch".into())
        .spawn(move || stream::dispatch(ctx, rx, outs, manifest))
        .map_err(|e| Error::io("<dispatch thread>", e))?;
    Ok(tx)
}
