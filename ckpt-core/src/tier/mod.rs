//! The storage abstraction every tier implements.
//!
//! A tier is a flat namespace of immutable objects addressed by `/`-separated
//! paths relative to the tier's root (a directory, a bucket prefix, a peer's
//! memory). The trait is deliberately small: what an implementation must
//! provide. The checkpoint layout, the commit protocol and retention live in
//! ckpt-core on top of it, identical for every tier.

pub(crate) mod memory;
mod probe;

pub use probe::{CreateGuarantee, PROBE_DIR, probe_create};

use std::fmt::Debug;
use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::error::Result;

/// How [`Tier::put`] treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace any existing object atomically.
    Overwrite,
    /// Fail with [`Error::AlreadyExists`](crate::Error::AlreadyExists) if
    /// the object exists. This is what makes a commit happen at most once.
    Create,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Path relative to the tier root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

/// What a tier can and cannot promise; the conformance suite and the
/// pipeline read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// `put(.., PutMode::Create)` is atomic against concurrent writers.
    pub atomic_create: bool,
    /// Data survives the loss of this process.
    pub survives_process: bool,
    /// Data survives the loss of this node.
    pub survives_node: bool,
    /// Most bytes a [`TierWriter`] may hold (unwritten, by reference) before
    /// it releases any: e.g. an object store's multipart part size times the
    /// parts in flight. A save that streams through a staging pool smaller
    /// than the state needs the pool to be larger than this.
    pub buffered_write: u64,
    /// Largest object a [`TierWriter`] can store (an object store's part
    /// size times its part limit), if there is one: a save whose shard file
    /// is larger fails on this tier at once, naming what is needed, instead
    /// of uploading it and failing at the end.
    pub max_object: Option<u64>,
    /// [`Tier::read_into`] goes straight into the caller's memory (no copy
    /// on the tier's side) when the buffer's address, the offset and the
    /// length are multiples of this (a local file read with `O_DIRECT`:
    /// 4096); 0 if alignment makes no difference. Restore then reads into
    /// aligned buffers of its own and copies out on its verifier threads,
    /// so the readers never stop to copy.
    pub read_alignment: usize,
}

impl Capabilities {
    /// Nothing promised: the starting point of the `with_*` setters.
    ///
    /// ```
    /// use ckpt_core::Capabilities;
    /// let c = Capabilities::NONE.with_atomic_create(true).with_survives_process(true);
    /// assert!(c.atomic_create && c.survives_process && !c.survives_node);
    /// ```
    pub const NONE: Self = Self {
        atomic_create: false,
        survives_process: false,
        survives_node: false,
        buffered_write: 0,
        max_object: None,
        read_alignment: 0,
    };

    /// Declares whether `put(.., PutMode::Create)` is atomic against
    /// concurrent writers.
    pub const fn with_atomic_create(mut self, on: bool) -> Self {
        self.atomic_create = on;
        self
    }

    /// Declares the largest object a writer can store.
    pub const fn with_max_object(mut self, bytes: Option<u64>) -> Self {
        self.max_object = bytes;
        self
    }

    /// Declares whether data survives the loss of this process.
    pub const fn with_survives_process(mut self, on: bool) -> Self {
        self.survives_process = on;
        self
    }

    /// Declares whether data survives the loss of this node.
    pub const fn with_survives_node(mut self, on: bool) -> Self {
        self.survives_node = on;
        self
    }

    /// Declares the alignment that makes [`Tier::read_into`] zero-copy
    /// (a power of two, or 0 for none).
    pub const fn with_read_alignment(mut self, align: usize) -> Self {
        self.read_alignment = align;
        self
    }

    /// Declares how many staged bytes a writer may hold before releasing.
    pub const fn with_buffered_write(mut self, bytes: u64) -> Self {
        self.buffered_write = bytes;
        self
    }
}

/// A storage tier: local files, an object store, a peer's memory.
///
/// Implementations must be cheap to share (`Arc<dyn Tier>`); all methods may
/// be called concurrently.
pub trait Tier: Send + Sync + Debug + 'static {
    /// Where this tier stores, for reports and errors
    /// (`/mnt/nvme/ckpt`, `s3://bucket/prefix`, `peer://10.0.0.2:7000`).
    fn location(&self) -> String;

    /// What this tier guarantees.
    fn capabilities(&self) -> Capabilities;

    /// What a `put(.., PutMode::Create)` guarantees here, as observed: the
    /// commit relies on it. The default trusts
    /// [`Capabilities::atomic_create`] (a tier that does not claim it is
    /// [`CreateGuarantee::Ignored`]); a tier whose backend may not honour
    /// what it is asked (an S3-compatible server) probes it with
    /// [`probe_create`] once and remembers the answer.
    fn create_guarantee(&self) -> BoxFuture<'_, CreateGuarantee> {
        let claimed = self.capabilities().atomic_create;
        Box::pin(async move {
            if claimed {
                CreateGuarantee::Atomic
            } else {
                CreateGuarantee::Ignored
            }
        })
    }

    /// Starts a new object at `path`, written front to back with
    /// [`TierWriter::write`]. It must not become readable under `path`
    /// in a torn state that could be mistaken for a whole object only if the
    /// tier's commit protocol relies on it; ckpt itself only trusts data that
    /// a committed manifest describes, with lengths and checksums.
    fn create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>>;

    /// Writes a small object in one call, atomically: readers see the old
    /// object or the new one, never a mix. Durable when it returns.
    fn put<'a>(&'a self, path: &'a str, data: Bytes, mode: PutMode) -> BoxFuture<'a, Result<()>>;

    /// Reads a whole object.
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes>>;

    /// Reads `range` of an object. Fails with
    /// [`Error::Incomplete`](crate::Error::Incomplete) if the object is
    /// shorter than `range.end`.
    fn get_range<'a>(&'a self, path: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<Bytes>>;

    /// Reads `buf.len()` bytes at `offset` straight into `buf`.
    ///
    /// The default goes through [`Tier::get_range`]; tiers that can read
    /// into caller memory without an intermediate buffer (local files)
    /// override it.
    fn read_into<'a>(
        &'a self,
        path: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let end = offset + buf.len() as u64;
            let bytes = self.get_range(path, offset..end).await?;
            if bytes.len() != buf.len() {
                return Err(crate::Error::Incomplete {
                    path: path.to_string(),
                    reason: format!(
                        "short read at offset {offset}: wanted {} bytes, got {}",
                        buf.len(),
                        bytes.len()
                    ),
                });
            }
            buf.copy_from_slice(&bytes);
            Ok(())
        })
    }

    /// Size of an object, or [`Error::NotFound`](crate::Error::NotFound).
    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64>>;

    /// Every object whose path starts with `prefix`, in any order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>>;

    /// Deletes an object. Deleting an absent object succeeds.
    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// A sequential writer for one object, from [`Tier::create`].
pub trait TierWriter: Send {
    /// Appends `data`. Implementations may keep `data` (it is immutable and
    /// reference counted) until it is written, instead of copying it.
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<()>>;

    /// Makes everything written durable (fsync, multipart complete) and the
    /// object readable. Only after this returns may a manifest refer to it.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>>;

    /// Gives up: removes whatever was written, best effort.
    fn abort(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
}
