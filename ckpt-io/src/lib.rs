//! Storage tiers for ckpt.
