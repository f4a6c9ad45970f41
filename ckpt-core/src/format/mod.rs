//! The on-storage format, identical on every tier: where objects live
//! ([`layout`]), the shard files (valid safetensors, [`shard_file`]), the
//! manifests ([`manifest`]) and their checksums ([`checksum`]). Public for
//! tools that read checkpoints without a checkpointer (fuzzers, exporters);
//! a training loop never needs it.

pub mod checksum;
pub mod layout;
pub mod manifest;
pub mod shard_file;
