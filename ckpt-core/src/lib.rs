//! Core of ckpt (guide written with the pipeline).
pub mod schedule;
