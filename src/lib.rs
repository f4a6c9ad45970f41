//! ckpt facade.
pub use ckpt_core as core;
