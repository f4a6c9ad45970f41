//! The save path, in the order a save runs through it:
//!
//! 1. [`policy`]: which tiers take this save, what a busy pool does;
//! 2. [`pool`]: the staging pool the state is copied into;
//! 3. [`copy`]: the copy engine (the math-stop);
//! 4. [`stream`]: the dispatcher turning staged blocks into each shard
//!    file's byte stream, and this rank's manifest;
//! 5. [`commit`]: per tier, write, make durable, commit (the protocol);
//! 6. [`handle`]: what the caller holds: math-stop now, outcome later;
//! 7. [`health`]: tiers that fail transiently are left out and probed.

pub(crate) mod commit;
pub(crate) mod copy;
pub(crate) mod handle;
pub(crate) mod health;
pub(crate) mod policy;
pub mod pool;
pub(crate) mod stream;
