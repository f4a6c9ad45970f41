//! The checkpoints on a tier, read side: listing ([`committed_steps`],
//! [`runs`]), manifests ([`load_manifest`]), file checks, verification
//! ([`verify_step`]), garbage collection ([`gc`]) as async functions on a
//! [`Tier`](crate::Tier), and [`CheckpointStore`], the synchronous front
//! for tools (the `ckpt` CLI, exporters, tests) that also restores into
//! caller buffers.

mod compact;
pub(crate) mod events;
mod gc;
pub(crate) use gc::abandon_steps_up_to;
pub mod history;
pub mod lineage;
mod listing;
mod reader;
pub mod report;
pub(crate) mod retention;

pub use crate::restore::verify::{VerifyReport, verify_step, verify_step_with};
pub use compact::{CompactReport, compact};
pub(crate) use gc::gc_running;
pub use gc::{GcReport, abandon_steps, delete_step, gc, gc_with_progress, select_with_references};
pub(crate) use listing::committed_in;
pub use listing::{
    StepEvent, StepNote, check_files, check_header, check_rank_files, committed_steps,
    load_manifest, runs, shard_file, step_notes,
};
pub use reader::CheckpointStore;
