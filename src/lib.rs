//! # ckpt
//!
//! Fast, verified, asynchronous checkpoints for sharded training state.
//!
//! A save copies the state into pinned staging memory (the *math-stop*,
//! the only time the training loop waits) and returns; a background flush
//! writes it to every tier (local NVMe, an S3-compatible object store, a
//! peer's memory), makes it durable, and commits it atomically. Restore
//! loads the newest checkpoint that verifies, from the fastest tier that
//! has it, and says what it skipped.
//!
//! ```
//! use ckpt::{Checkpointer, TensorMut, TensorRef, TierPolicy, TrainingState};
//!
//! let dir = tempfile::tempdir()?;
//! let ckpt = Checkpointer::builder("quick")
//!     .tier(ckpt::open_location(dir.path().to_str().unwrap())?, TierPolicy::keep_last(2))
//!     .build()?;
//! let w = vec![0.25f32; 4096];
//! let (m, v) = (vec![0f32; 4096], vec![0f32; 4096]);
//! let (tw, tm, tv) = (
//!     TensorRef::from_slice("w", &[64, 64], &w),
//!     TensorRef::from_slice("adam.m.w", &[64, 64], &m),
//!     TensorRef::from_slice("adam.v.w", &[64, 64], &v),
//! );
//! let state = TrainingState::builder(1)
//!     .model([&tw as _])
//!     .optimizer([&tm as _, &tv as _])
//!     .rng(&0u64)?
//!     .data_loader(&0u64)?
//!     .lr_schedule(&1e-3)?
//!     .build()?;
//! ckpt.save(&state)?.wait()?;
//!
//! let mut back = vec![0f32; 4096];
//! let r = ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[64, 64], &mut back)])?;
//! assert_eq!(r.map(|r| r.step), Some(1));
//! assert_eq!(back, w);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

use std::sync::Arc;

pub use ckpt_core::*;
pub use ckpt_io::{LocalTier, MemoryTier};
#[cfg(feature = "s3")]
pub use ckpt_io::{ObjectTier, ObjectTierConfig};

/// Opens a storage location: a directory path (created if absent), or
/// `s3://bucket/prefix` (with the `s3` feature; configured from `AWS_*`
/// environment variables).
pub fn open_location(location: &str) -> Result<Arc<dyn Tier>> {
    if let Some(rest) = location.strip_prefix("s3://") {
        return open_s3(rest, location);
    }
    if location.contains("://") {
        return Err(Error::Config(format!(
            "unsupported location `{location}`: use a directory or s3://bucket/prefix"
        )));
    }
    Ok(Arc::new(LocalTier::new(location)?))
}

#[cfg(feature = "s3")]
fn open_s3(_rest: &str, location: &str) -> Result<Arc<dyn Tier>> {
    Err(Error::Config(format!(
        "`{location}`: the object-store tier is not built into this binary yet"
    )))
}

#[cfg(not(feature = "s3"))]
fn open_s3(_rest: &str, location: &str) -> Result<Arc<dyn Tier>> {
    Err(Error::Config(format!(
        "`{location}`: this build of ckpt has no S3 support (enable the `s3` feature)"
    )))
}
