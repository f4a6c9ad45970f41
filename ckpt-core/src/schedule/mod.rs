//! Checkpoint interval scheduling.
