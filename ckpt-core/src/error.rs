//! The one error type of ckpt-core, with semantic kinds.
//!
//! Every variant names the thing that went wrong (path, tensor, rank, step,
//! chunk) so a log line is enough to act on it. Backends map their private
//! errors into [`Error::Backend`] and say whether retrying can help.

use std::path::PathBuf;

/// Result alias used across ckpt.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while saving, committing or restoring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An object or checkpoint that was expected is absent.
    #[error("not found: {path}")]
    NotFound {
        /// Path (relative to the tier root) or description of the missing thing.
        path: String,
    },

    /// An object that must be created exactly once already exists
    /// (e.g. a second commit of the same step).
    #[error("already exists: {path}")]
    AlreadyExists {
        /// Path of the existing object.
        path: String,
    },

    /// Stored bytes do not match their checksum.
    #[error(
        "corrupt data in {path}, chunk {chunk}: expected crc32c {expected:#010x}, found {found:#010x}"
    )]
    Corrupt {
        /// Object that holds the bad chunk.
        path: String,
        /// Index of the chunk inside its tensor piece.
        chunk: usize,
        /// Checksum recorded at save time.
        expected: u32,
        /// Checksum of the bytes read back.
        found: u32,
    },

    /// A checkpoint is present but not whole: a file is shorter than the
    /// manifest says, a rank's piece is missing, or it was never committed.
    #[error("incomplete checkpoint: {path}: {reason}")]
    Incomplete {
        /// Object or step directory concerned.
        path: String,
        /// What is missing.
        reason: String,
    },

    /// A manifest or shard header that cannot be trusted: garbage JSON,
    /// impossible sizes, offsets past the end of the file.
    #[error("invalid manifest {path}: {reason}")]
    InvalidManifest {
        /// The manifest's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The caller's buffers do not match the checkpoint (wrong shape, dtype,
    /// missing tensor). Not a storage fault: restore does not fall back.
    #[error("tensor `{tensor}`: {reason}")]
    TensorMismatch {
        /// Tensor name.
        tensor: String,
        /// What does not match.
        reason: String,
    },

    /// A local file-system operation failed.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A storage backend (object store, peer) failed.
    #[error("tier {tier}: {message}{}", if *retryable { " (retryable)" } else { "" })]
    Backend {
        /// Which tier, e.g. `s3://bucket/prefix` or `peer://127.0.0.1:7000`.
        tier: String,
        /// Whether retrying the same call may succeed.
        retryable: bool,
        /// Human-readable description, naming the object where known.
        message: String,
    },

    /// The checkpointer is in a state where the call cannot run
    /// (closed, a flush failed, a save skipped...).
    #[error("invalid state: {0}")]
    InvalidState(String),

    /// Bad configuration or bad input state given by the caller.
    #[error("configuration: {0}")]
    Config(String),

    /// The CUDA driver is absent or one of its calls failed (feature
    /// `cuda`): no driver library, no such device, a copy or a
    /// registration refused. The message names the device and the call.
    #[error("CUDA: {0}")]
    Cuda(String),
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::InvalidManifest`].
    pub fn manifest(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidManifest {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::TensorMismatch`].
    pub fn tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::TensorMismatch {
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    /// Whether retrying the operation may succeed (transient network or
    /// server errors). Corruption and bad input are never retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend { retryable, .. } => *retryable,
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    /// Whether this error means the stored checkpoint is unusable (corrupt,
    /// truncated, missing pieces, garbage manifest), so restore should fall
    /// back to another tier or an older step rather than fail.
    pub fn is_data_fault(&self) -> bool {
        matches!(
            self,
            Error::NotFound { .. }
                | Error::Corrupt { .. }
                | Error::Incomplete { .. }
                | Error::InvalidManifest { .. }
                | Error::Backend { .. }
                | Error::Io { .. }
        )
    }
}
