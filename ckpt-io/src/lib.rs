//! # ckpt-io
//!
//! Storage tiers for ckpt, each implementing [`ckpt_core::Tier`]:
//! - [`LocalTier`]: files in a local directory (NVMe), fsynced, committed
//!   with an atomic no-replace link;
//! - `ObjectTier` (feature `s3`): S3-compatible object stores through
//!   `object_store`;
//! - [`MemoryTier`]: in-process memory, for tests.
//! - `PeerTier` (feature `peer`): replicas in peer processes' RAM, served
//!   by `PeerServer`s over TCP.
//!
//! [`FaultTier`] wraps any tier and injects faults (failed writes, a full
//! disk, a failed commit, latency) for tests; `conformance` (feature
//! `conformance`) is the suite of checks every tier must pass.
//!
//! ```
//! use ckpt_io::LocalTier;
//! use ckpt_core::Tier;
//! let dir = tempfile::tempdir().unwrap();
//! let tier = LocalTier::new(dir.path()).unwrap();
//! assert!(tier.capabilities().survives_process);
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod direct_read;
mod direct_write;
mod fault;
mod local;

pub use ckpt_core::MemoryTier;
pub use direct_write::supports_direct_writes;
pub use fault::{Fault, FaultGate, FaultTier, Op, OpKind};
pub use local::{DEFAULT_WRITES_IN_FLIGHT, LocalTier};

#[cfg(feature = "s3")]
pub mod object;
#[cfg(feature = "s3")]
pub use object::{ObjectTier, ObjectTierConfig, PayloadChecksum};

#[cfg(feature = "peer")]
pub mod peer;
#[cfg(feature = "peer")]
pub use peer::{PeerConfig, PeerServer, PeerServerConfig, PeerServerHandle, PeerTier};
