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
//!     .model([&tw])
//!     .optimizer([&tm, &tv])
//!     .rng(&0u64)
//!     .data_loader(&0u64)
//!     .lr_schedule(&1e-3)
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

/// Checkpoints of burn modules and optimizers (feature `burn`): the
/// [`ckpt_burn`] crate.
#[cfg(feature = "burn")]
pub use ckpt_burn as burn;
pub use ckpt_core::*;
pub use ckpt_io::{LocalTier, MemoryTier};
#[cfg(feature = "s3")]
pub use ckpt_io::{ObjectTier, ObjectTierConfig};

/// Logs to stderr, filtered by `CKPT_LOG` (an `EnvFilter` directive such
/// as `info` or `warn,ckpt::phase=debug`; default `warn`), coloured only on a
/// terminal: what the `ckpt` CLI and the examples use (feature `cli`).
#[cfg(feature = "cli")]
pub fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Opens a storage location to save into: a directory path (created if
/// absent), or `s3://bucket/prefix` (with the `s3` feature).
///
/// An `s3://` location is configured the way `object_store` configures
/// S3 clients, from the environment: `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL` (MinIO, Garage, any S3-compatible server),
/// `AWS_ALLOW_HTTP`, `AWS_TIMEOUT`... (see [`ObjectTier`]). Opening sends one
/// list request: a missing bucket or refused credentials fail here, with an
/// [`Error::Location`] naming the location and the cause. A server that
/// cannot be reached right now is only a warning: saves go on without the
/// tier and it takes part again once it answers (a failing tier never stops
/// training).
pub fn open_location(location: &str) -> Result<Arc<dyn Tier>> {
    open(location, Access::Save)
}

/// Opens an existing storage location for reading and maintenance
/// (`ckpt ls`, `inspect`, `verify`, `gc`, `export`): creates nothing, and
/// fails with [`Error::Location`] naming the location if the directory
/// does not exist, the bucket does not exist, the credentials are refused
/// or the server cannot be reached.
pub fn open_existing_location(location: &str) -> Result<Arc<dyn Tier>> {
    open(location, Access::Read)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Save,
    Read,
}

fn open(location: &str, access: Access) -> Result<Arc<dyn Tier>> {
    if location.starts_with("s3://") || location.starts_with("s3a://") {
        return open_s3(location, access);
    }
    if let Some((scheme, _)) = location.split_once("://") {
        return Err(Error::location(
            location,
            format!("unsupported scheme `{scheme}://`: use a directory or s3://bucket/prefix"),
        ));
    }
    if location.is_empty() {
        return Err(Error::location(location, "empty location"));
    }
    let tier = match access {
        Access::Save => LocalTier::new(location),
        Access::Read => LocalTier::open_existing(location),
    };
    match tier {
        Ok(t) => Ok(Arc::new(t)),
        Err(e @ Error::Location { .. }) => Err(e),
        Err(e) => Err(Error::location(location, e.to_string())),
    }
}

#[cfg(feature = "s3")]
fn open_s3(location: &str, access: Access) -> Result<Arc<dyn Tier>> {
    use std::time::Duration;
    let wrap = |e: Error| Error::location(location, e.to_string());
    let tier = ObjectTier::from_url(location, ObjectTierConfig::default()).map_err(wrap)?;
    // One list request on a throwaway client of its own (no retries, short
    // timeouts), on a thread of its own, so this works from synchronous and
    // asynchronous callers alike and the returned client never depends on
    // a runtime that is gone.
    let mut probe_config =
        ObjectTierConfig::default().with_retry(ckpt_io::object::object_store::RetryConfig {
            max_retries: 0,
            ..ckpt_io::object::default_retry()
        });
    // The user's own timeouts win; else short ones.
    if std::env::var_os("AWS_CONNECT_TIMEOUT").is_none() {
        probe_config = probe_config.with_connect_timeout(Duration::from_secs(5));
    }
    if std::env::var_os("AWS_TIMEOUT").is_none() {
        probe_config = probe_config.with_request_timeout(Duration::from_secs(10));
    }
    let probe = ObjectTier::from_url(location, probe_config).map_err(wrap)?;
    let checked = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("<tokio runtime>", e))?
            .block_on(probe.check())
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Internal("the S3 probe thread panicked".into())));
    match checked {
        Ok(()) => Ok(Arc::new(tier)),
        Err(e) if access == Access::Save && e.is_retryable() => {
            tracing::warn!(location, error = %e, "S3 server not reachable now; saves go on without it until it answers");
            Ok(Arc::new(tier))
        }
        Err(e) => Err(wrap(e)),
    }
}

#[cfg(not(feature = "s3"))]
fn open_s3(location: &str, _access: Access) -> Result<Arc<dyn Tier>> {
    Err(Error::location(
        location,
        "this build of ckpt has no S3 support (enable the `s3` feature)",
    ))
}

// The Rust snippets of README.md and docs/ compile (and run where they can)
// as doctests: what the documentation shows is what builds.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
#[cfg(doctest)]
#[doc = include_str!("../docs/s3.md")]
mod docs_s3 {}
#[cfg(doctest)]
#[doc = include_str!("../docs/multi-rank.md")]
mod docs_multi_rank {}
#[cfg(doctest)]
#[doc = include_str!("../docs/peer.md")]
mod docs_peer {}
#[cfg(doctest)]
#[doc = include_str!("../docs/scheduler.md")]
mod docs_scheduler {}
