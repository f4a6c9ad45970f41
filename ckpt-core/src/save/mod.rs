//! The save path, in the order a save runs through it:
//!
//! 1. [`plan`]: the shard file's layout, what is copied and what is kept
//!    by reference (pure, no runtime);
//! 2. [`policy`]: which tiers take this save, what a busy pool does;
//! 3. [`pool`]: the staging pool the state is copied into;
//! 4. [`copy`]: the copy engine (the math-stop), with [`ntcopy`]'s
//!    cache-bypassing copy;
//! 5. [`stream`]: the dispatcher turning staged blocks into each shard
//!    file's byte stream, and this rank's manifest;
//! 6. [`commit`]: per tier, write, make durable, commit (the protocol),
//!    through [`incremental`] where the tier takes incremental saves;
//! 7. [`handle`]: what the caller holds: math-stop now, outcome later;
//! 8. [`health`]: tiers that fail transiently are left out and probed.

pub(crate) mod commit;
pub(crate) mod copy;
pub(crate) mod handle;
pub(crate) mod health;
pub(crate) mod incremental;
pub(crate) mod ntcopy;
pub(crate) mod plan;
pub(crate) mod policy;
pub(crate) mod pool;
pub(crate) mod stream;
