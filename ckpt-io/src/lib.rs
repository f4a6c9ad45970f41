//! Storage tiers for ckpt.

#[cfg(feature = "s3")]
pub mod object;
#[cfg(feature = "s3")]
pub use object::{ObjectTier, ObjectTierConfig};
