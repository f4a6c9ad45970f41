//! The one error type of ckpt-core, with semantic kinds.
//!
//! Every variant names the thing that went wrong (path, tensor, rank, step,
//! chunk, tier) so a log line is enough to act on it. Backends map their
//! private errors into [`Error::Backend`] (keeping the original as its
//! source) and say whether retrying can help. Errors are `Clone` (sources
//! behind `Arc`) so they cross threads and tasks as values, never as text.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Result alias used across ckpt.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The source of a backend error, shared.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// One tier's reason for not committing a save; see
/// [`Error::NotCommitted`].
#[derive(Debug, Clone)]
pub struct TierFailure {
    /// The tier's location.
    pub tier: String,
    /// Why it did not commit.
    pub error: Error,
}

impl std::fmt::Display for TierFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.tier, self.error)
    }
}

/// Everything that can go wrong while saving, committing or restoring.
#[derive(Debug, Clone, thiserror::Error)]
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

    /// Another coordinator's commit of the same step won: on a store that
    /// does not make conditional creates atomic, the MANIFEST read back
    /// after the create is not the one this commit wrote.
    #[error("lost the commit of {path}: {reason}")]
    CommitConflict {
        /// The MANIFEST's path.
        path: String,
        /// Whose commit is there instead.
        reason: String,
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

    /// A shard file's header (its safetensors JSON and padding) does not
    /// match the crc32c the manifest recorded for it.
    #[error(
        "corrupt safetensors header of {path}: expected crc32c {expected:#010x}, found {found:#010x}"
    )]
    CorruptHeader {
        /// The shard file.
        path: String,
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

    /// A manifest or shard header that cannot be trusted: a checksum that
    /// does not match its bytes, garbage JSON, impossible sizes, offsets
    /// past the end of the file.
    #[error("invalid manifest {path}: {reason}")]
    InvalidManifest {
        /// The manifest's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Replicas of a shard that must be bit-identical differ (silent data
    /// corruption in one of them): the step is not committed on any tier.
    /// With three or more replicas, `ranks` are the odd ones out against
    /// the majority; with two, both.
    #[error("step {step}: replicas of tensor `{tensor}` differ in chunk {chunk}: ranks {ranks:?}")]
    ReplicaMismatch {
        /// The step whose save was refused (or that was checked).
        step: u64,
        /// The tensor.
        tensor: String,
        /// The first chunk that differs.
        chunk: usize,
        /// The ranks whose copy differs.
        ranks: Vec<u32>,
    },

    /// A checkpoint restore must not use: it was created after the trust
    /// limit of a detected error
    /// ([`RestoreOptions::after_detected_error`](crate::RestoreOptions::after_detected_error)),
    /// so it may hold the error.
    #[error(
        "step {step} was created at {created_unix_ms} ms, after the trust limit {limit_unix_ms} ms of a detected error"
    )]
    AfterTrustLimit {
        /// The step.
        step: u64,
        /// When its save started (ms since the Unix epoch).
        created_unix_ms: u64,
        /// The limit.
        limit_unix_ms: u64,
    },

    /// The caller's buffers do not match a verified checkpoint (wrong
    /// shape, dtype, missing tensor). Not a storage fault: restore does not
    /// fall back.
    #[error("tensor `{tensor}`: {reason}")]
    TensorMismatch {
        /// Tensor name.
        tensor: String,
        /// What does not match.
        reason: String,
    },

    /// A local file-system operation failed. A full disk reads
    /// `disk full` and names the file ([`Error::is_storage_full`]).
    #[error("{}", io_message(path, source))]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
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
        /// The backend's own error, if any.
        #[source]
        source: Option<Source>,
    },

    /// A tier was left out of a save because it failed recently and has
    /// not answered a health probe since; it is probed in the background
    /// with bounded backoff and takes part again as soon as it answers.
    #[error("tier {tier} is unavailable (probing every {probe:?}): {cause}")]
    Unavailable {
        /// The tier's location.
        tier: String,
        /// Current interval between health probes.
        probe: Duration,
        /// The failure that took it out.
        cause: Box<Error>,
    },

    /// A save was committed on no tier. Each tier's reason is given.
    #[error("step {step} was not committed on any tier: {}", join(failures))]
    NotCommitted {
        /// The step.
        step: u64,
        /// Per tier, why not.
        failures: Vec<TierFailure>,
    },

    /// Restore found no checkpoint on the tiers it could list, but some
    /// tiers could not be listed: they may hold the run's checkpoints, so
    /// restore does not report a fresh start. Retry once they answer, or
    /// restore without them.
    #[error(
        "cannot tell whether run {run} has a checkpoint (not starting fresh): {} cannot be listed",
        join(failures)
    )]
    Unlisted {
        /// The run.
        run: String,
        /// The tiers that could not be listed, and why.
        failures: Vec<TierFailure>,
    },

    /// The ranks of a job found no step that every one of them can
    /// restore; each rank's reason is given. Never a silent fresh start:
    /// only a job in which no rank has any checkpoint starts fresh.
    #[error("no step of run {run} that every rank can restore: {}", ranks.iter().map(|(r, why)| format!("rank {r}: {why}")).collect::<Vec<_>>().join("; "))]
    NoCommonStep {
        /// The run.
        run: String,
        /// The ranks with nothing to restore, and why.
        ranks: Vec<(u32, String)>,
    },

    /// Some ranks never answered a round of the agreement in time.
    #[error("agreement round `{round}`: ranks {missing:?} did not answer within {after:?}")]
    AgreementTimeout {
        /// The round.
        round: String,
        /// The ranks that did not answer.
        missing: Vec<u32>,
        /// The bound.
        after: Duration,
    },

    /// A storage location (directory, `s3://` URL) cannot be opened.
    #[error("`{location}`: {reason}")]
    Location {
        /// The location as given.
        location: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A path that cannot be used: a run name that is not a safe path
    /// component, an object path that could escape its tier, a key the
    /// store refuses.
    #[error("invalid path `{path}`: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The caller's loop state does not decode into the type asked for
    /// (or cannot be encoded).
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was decoded (`rng state`, `data_loader state`...).
        what: String,
        /// The decoder's message.
        reason: String,
    },

    /// Bad input given at run time: an incomplete training state, a shard
    /// outside its tensor, buffers of the wrong size.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The checkpointer or a writer is in a state where the call cannot run
    /// (closed, already finished, a flush stuck...).
    #[error("invalid state: {0}")]
    InvalidState(String),

    /// Bad configuration of a checkpointer, tier or pool, reported by the
    /// builder that was given it.
    #[error("configuration: {0}")]
    Config(String),

    /// An internal invariant did not hold (a bug in ckpt: please report
    /// it). Never caused by storage contents or caller input.
    #[error("internal error: {0}")]
    Internal(String),

    /// The CUDA driver is absent or one of its calls failed (feature
    /// `cuda`): no driver library, no such device, a copy or a
    /// registration refused. The message names the device and the call.
    #[error("CUDA: {0}")]
    Cuda(String),
}

fn io_message(path: &std::path::Path, source: &std::io::Error) -> String {
    if source.kind() == std::io::ErrorKind::StorageFull {
        format!("disk full: no space left writing {}", path.display())
    } else {
        format!("i/o error on {}: {source}", path.display())
    }
}

fn join(failures: &[TierFailure]) -> String {
    if failures.is_empty() {
        return "no tier took this save".into();
    }
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
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

    /// Builds an [`Error::Backend`] without a source.
    pub fn backend(tier: impl Into<String>, retryable: bool, message: impl Into<String>) -> Self {
        Error::Backend {
            tier: tier.into(),
            retryable,
            message: message.into(),
            source: None,
        }
    }

    /// Builds an [`Error::Location`].
    pub fn location(location: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Location {
            location: location.into(),
            reason: reason.into(),
        }
    }

    /// The variant's name (`"Backend"`, `"Unavailable"`, `"Io"`...), for
    /// machine-readable reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "NotFound",
            Error::AlreadyExists { .. } => "AlreadyExists",
            Error::CommitConflict { .. } => "CommitConflict",
            Error::Corrupt { .. } => "Corrupt",
            Error::CorruptHeader { .. } => "CorruptHeader",
            Error::Incomplete { .. } => "Incomplete",
            Error::InvalidManifest { .. } => "InvalidManifest",
            Error::AfterTrustLimit { .. } => "AfterTrustLimit",
            Error::ReplicaMismatch { .. } => "ReplicaMismatch",
            Error::TensorMismatch { .. } => "TensorMismatch",
            Error::Io { .. } => "Io",
            Error::Backend { .. } => "Backend",
            Error::Unavailable { .. } => "Unavailable",
            Error::NotCommitted { .. } => "NotCommitted",
            Error::Unlisted { .. } => "Unlisted",
            Error::NoCommonStep { .. } => "NoCommonStep",
            Error::AgreementTimeout { .. } => "AgreementTimeout",
            Error::Location { .. } => "Location",
            Error::InvalidPath { .. } => "InvalidPath",
            Error::Decode { .. } => "Decode",
            Error::InvalidInput(_) => "InvalidInput",
            Error::InvalidState(_) => "InvalidState",
            Error::Config(_) => "Config",
            Error::Internal(_) => "Internal",
            Error::Cuda(_) => "Cuda",
        }
    }

    /// Whether retrying the operation may succeed (transient network or
    /// server errors). Corruption and bad input are never retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend { retryable, .. } => *retryable,
            Error::Unavailable { .. } => true,
            Error::Unlisted { failures, .. } => failures.iter().any(|f| f.error.is_retryable()),
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    /// Whether a local disk (or quota) is full.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }

    /// Whether this error means the stored checkpoint is unusable (corrupt,
    /// truncated, missing pieces, garbage manifest), so restore should fall
    /// back to another tier or an older step rather than fail.
    pub fn is_data_fault(&self) -> bool {
        self.is_proven_corrupt()
            || matches!(
                self,
                Error::NotFound { .. }
                    | Error::Incomplete { .. }
                    | Error::Backend { .. }
                    | Error::Unavailable { .. }
                    | Error::AfterTrustLimit { .. }
                    | Error::Io { .. }
            )
    }

    /// Whether the bytes were read and refused: a checksum that does not
    /// match, a header or manifest that does not parse or validate. Unlike
    /// [`Error::is_data_fault`], never an error of the way there (I/O, a
    /// timeout, a server down): reading again would give the same bytes.
    /// Only this may make retention treat a step as pointing into nothing.
    pub fn is_proven_corrupt(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::CorruptHeader { .. } | Error::InvalidManifest { .. }
        )
    }
}

/// Serializes an error as its message (reports are JSON).
pub(crate) fn serialize_error<S: serde::Serializer>(e: &Error, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&e.to_string())
}

/// Serializes an optional error as its message or `null`.
pub(crate) fn serialize_opt_error<S: serde::Serializer>(
    e: &Option<Error>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.serialize_str(&e.to_string()),
        None => s.serialize_none(),
    }
}
