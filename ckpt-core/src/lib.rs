//! # ckpt-core
//!
//! The core of ckpt: the state model, the staging pool, the
//! save → flush → commit pipeline, restore with verification and fallback,
//! resharding, retention, and the checkpoint-interval scheduler. Storage
//! backends implement [`Tier`]; the ones for local files, S3-compatible
//! object stores and peer memory live in `ckpt-io`.
//!
//! ```
//! use std::sync::Arc;
//! use ckpt_core::{Checkpointer, MemoryTier, TensorMut, TensorRef, TierPolicy, TrainingState};
//!
//! let tier = Arc::new(MemoryTier::new());
//! let ckpt = Checkpointer::builder("example")
//!     .tier(tier, TierPolicy::keep_last(2))
//!     .build()?;
//!
//! let w = vec![1.5f32; 1024];
//! let (m, v) = (vec![0.1f32; 1024], vec![0.2f32; 1024]);
//! let (tw, tm, tv) = (
//!     TensorRef::from_slice("w", &[32, 32], &w),
//!     TensorRef::from_slice("adam.m.w", &[32, 32], &m),
//!     TensorRef::from_slice("adam.v.w", &[32, 32], &v),
//! );
//! let state = TrainingState::builder(100)
//!     .model([&tw])
//!     .optimizer([&tm, &tv])
//!     .rng(&[42u64])
//!     .data_loader(&6400u64)
//!     .lr_schedule(&1e-3f64)
//!     .build()?;
//! let handle = ckpt.save(&state)?;        // returns after the copy: the math-stop
//! println!("math-stop {:?}", handle.math_stop());
//! handle.wait()?;                        // durable on every tier
//!
//! let mut w2 = vec![0f32; 1024];
//! let restored = ckpt
//!     .restore(&mut [&mut TensorMut::from_slice("w", &[32, 32], &mut w2)])?
//!     .expect("a checkpoint exists");
//! assert_eq!(restored.step, 100);
//! assert_eq!(w2, w);
//! assert_eq!(restored.loop_state.data_loader::<u64>()?, 6400);
//! # Ok::<(), ckpt_core::Error>(())
//! ```
//!
//! ## A guide to the types
//! - **What you save**: your tensors, through [`TensorView`] (a
//!   [`TensorSpec`] and the bytes: [`TensorBytes::Host`], zero-copy
//!   [`TensorBytes::Shared`], or GPU memory), or the plain [`TensorRef`] /
//!   [`SharedTensor`]; a [`ShardSpec`] for a piece of a larger tensor. A
//!   [`TrainingState`] bundles them with the loop state (step, RNG, data
//!   loader, LR schedule); its builder refuses a state that forgot any of
//!   them.
//! - **Saving**: [`Checkpointer`] ([`CheckpointerBuilder`] with one or more
//!   [`Tier`]s and a [`TierPolicy`] each). [`Checkpointer::save`] is the
//!   math-stop; its [`SaveHandle`] reports the durable outcome
//!   ([`SaveReport`], one [`TierReport`] per tier).
//!   [`Checkpointer::should_save`] asks the interval scheduler
//!   ([`schedule`]).
//! - **Restoring**: [`Checkpointer::restore`] into [`TensorViewMut`]s
//!   ([`TensorMut`]), with [`RestoreOptions`]; [`Restored`] says what was
//!   loaded and what was skipped. Tools use [`CheckpointStore`] (list,
//!   verify, gc, restore) without a checkpointer.
//! - **Storage**: the [`Tier`] trait (a flat namespace of immutable
//!   objects); [`MemoryTier`] is its reference implementation, `ckpt-io`
//!   has the real ones. The on-storage format is in [`format`](mod@format).
//! - **Errors**: one [`Error`] enum, `Clone`, every variant naming what
//!   went wrong; [`Error::is_data_fault`] is what restore falls back on.
//!
//! Inside, the code follows the path of a checkpoint: `model/` (what is
//! saved), `save/` (plan, pool, copy, stream, commit, handle, health),
//! `restore/`, `store/` (listing, gc, retention, failure events),
//! `checkpointer/` (the facade), `format/`, `tier/`, `schedule/`.
//!
//! ## Guarantees
//! - **Atomic commit**: a checkpoint exists on a tier iff its
//!   `MANIFEST.json` exists and verifies; it is written last, with a
//!   conditional create, after every rank's data is durable.
//! - **Every byte verified**: each chunk's crc32c is checked as it is read,
//!   each shard header and each manifest against its own crc32c; a corrupt
//!   or partial checkpoint is never loaded: restore falls back to the next
//!   tier, then the previous step, and says so in [`Restored`].
//! - **A failing tier never stops training**: it is left out of saves and
//!   probed until it answers ([`Checkpointer::tier_status`]).
//! - **Bounded memory**: the staging pool is allocated once; saves never
//!   allocate an unbounded copy.
//! - **Retention never loses the newest checkpoint**, and uncommits before
//!   deleting data.
//!
//! ## Features
//! - `cuda`: saves tensors that live in GPU memory (the `cuda` module):
//!   copied by DMA into the staging pool, registered with the driver. The
//!   driver is loaded at run time; the build needs no CUDA toolkit.

#![deny(unsafe_op_in_unsafe_fn)]

mod checkpointer;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod format;
mod model;
pub mod restore;
pub mod rng;
mod save;
pub mod schedule;
pub mod store;
mod sync;
mod tier;

/// Marks the start of a phase of a save or restore with a `tracing` event
/// of target `ckpt::phase` (level debug): `CKPT_LOG=ckpt::phase=debug`
/// shows where a process spends its time, and the crash test uses it to
/// kill processes in every phase.
pub(crate) fn phase(name: &'static str, step: u64) {
    tracing::debug!(target: "ckpt::phase", phase = name, step);
}

pub use checkpointer::{
    Checkpointer, CheckpointerBuilder, Fingerprints, ReplicaCheck, fingerprint,
};
pub use error::{Error, Result, Source as ErrorSource, TierFailure};
pub use format::manifest::{Manifest, RankManifest};
pub use model::*;
pub use restore::{Agreement, RestoreOptions, Restored, Skipped};
pub use save::handle::{STAGING_SAMPLES, SaveHandle, SaveReport, TierReport};
pub use save::health::{ProbeBackoff, TierStatus};
pub use save::ntcopy::stream_copy;
pub use save::policy::{BusyPolicy, Compression, TierPolicy};
pub use save::pool::{StagingSample, StagingStats};
pub use store::retention::Retention;
pub use store::{CheckpointStore, GcReport, VerifyReport};
pub use tier::memory::MemoryTier;
pub use tier::{
    Capabilities, CreateGuarantee, ObjectMeta, PROBE_DIR, PutMode, Tier, TierWriter, probe_create,
};
