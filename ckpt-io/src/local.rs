//! `LocalTier`: checkpoints as files in a local directory (node-local NVMe,
//! or a shared file system).
//!
//! Durability and atomicity:
//! - a streamed object is written to a hidden temporary file beside its
//!   final name, `fdatasync`ed, renamed into place, and the directory is
//!   fsynced, so a crash never leaves a torn file under the final name;
//! - `put(.., PutMode::Create)` (the commit of `MANIFEST.json`) writes and
//!   syncs a temporary file, then `link`s it to the final name, which fails
//!   if the name exists: two writers can never both commit a step;
//! - deletes remove the file and then empty parent directories.
//!
//! Blocking file I/O runs on tokio's blocking pool, never on the async
//! workers; `read_into` (restore) runs on restore's own threads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use ckpt_core::{Capabilities, Error, ObjectMeta, PutMode, Result, Tier, TierWriter};
use futures::future::BoxFuture;

use crate::direct_write::{self, DirectWriter};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A tier in a local directory. See the module docs for its guarantees.
#[derive(Debug, Clone)]
pub struct LocalTier {
    root: PathBuf,
    direct_reads: bool,
    direct_writes: bool,
    writes_in_flight: usize,
}

/// Default of [`LocalTier::with_writes_in_flight`].
pub const DEFAULT_WRITES_IN_FLIGHT: usize = 1;

/// Runs blocking file I/O off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::Internal(format!("file I/O task failed: {e}")))?,
        Err(_) => f(),
    }
}

fn map_err(path: &Path, rel: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::NotFound {
            path: rel.to_string(),
        }
    } else {
        Error::io(path, e)
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Makes the written temporary file `temp` the object at `path`: its data
/// synced, then renamed over `path` (`Overwrite`) or linked to it, which
/// never replaces an existing name (`Create`: the atomic "create if absent"
/// of a commit), and the directory synced. On failure `temp` is removed.
fn publish(file: File, temp: &Path, path: &Path, mode: PutMode) -> Result<()> {
    let r = (|| {
        file.sync_data().map_err(|e| Error::io(temp, e))?;
        drop(file);
        match mode {
            PutMode::Overwrite => fs::rename(temp, path).map_err(|e| Error::io(path, e))?,
            PutMode::Create => {
                match fs::hard_link(temp, path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(Error::AlreadyExists {
                            path: path.display().to_string(),
                        });
                    }
                    Err(e) => return Err(Error::io(path, e)),
                }
                let _ = fs::remove_file(temp);
            }
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = fs::remove_file(temp);
    }
    r
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    Ok(())
}

impl LocalTier {
    /// A tier rooted at `root`, created if absent. Fails with an error naming
    /// the directory if it cannot be created or written.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Self::open(root, true)
    }

    /// A tier on the existing directory `root`, for reading and maintenance
    /// (`ckpt ls`, `verify`, `gc`...): creates nothing, and fails with
    /// [`Error::Location`] if `root` is absent or not a directory, so a
    /// mistyped path never looks like an empty store.
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Self::open(root, false),
            Ok(_) => Err(Error::location(
                root.display().to_string(),
                "not a directory",
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::location(
                root.display().to_string(),
                "no such directory",
            )),
            Err(e) => Err(Error::io(&root, e)),
        }
    }

    fn open(root: PathBuf, writable: bool) -> Result<Self> {
        let meta = fs::metadata(&root).map_err(|e| Error::io(&root, e))?;
        if !meta.is_dir() {
            return Err(Error::location(
                root.display().to_string(),
                "not a directory",
            ));
        }
        if writable && meta.permissions().readonly() {
            return Err(Error::io(
                &root,
                io::Error::from(io::ErrorKind::PermissionDenied),
            ));
        }
        let root = root.canonicalize().map_err(|e| Error::io(&root, e))?;
        Ok(Self {
            root,
            direct_reads: true,
            direct_writes: true,
            writes_in_flight: DEFAULT_WRITES_IN_FLIGHT,
        })
    }

    /// Whether restore reads bypass the page cache with `O_DIRECT` (default
    /// on; file systems that refuse it are read through the page cache
    /// anyway). Direct reads cost the kernel a fraction of the CPU of
    /// buffered ones, which leaves the cores to crc32c verification; turn
    /// them off to keep restored files in the page cache for other readers.
    pub fn with_direct_reads(mut self, on: bool) -> Self {
        self.direct_reads = on;
        self
    }

    /// Whether streamed files (shard files) are written with `O_DIRECT`
    /// (default on): aligned staging blocks go to the device without a copy
    /// and without filling the page cache, so a save does not evict the
    /// training job's cached files; the last partial page is written
    /// buffered. File systems that refuse `O_DIRECT` get buffered writes
    /// (said once in the log). Small objects (manifests) are always
    /// buffered.
    pub fn with_direct_writes(mut self, on: bool) -> Self {
        self.direct_writes = on;
        self
    }

    /// How many `O_DIRECT` writes of one shard file may be in flight at
    /// once (default [`DEFAULT_WRITES_IN_FLIGHT`]; at least 1). Above 1,
    /// helper threads write the staging blocks at their offsets, so the
    /// device has the next write queued while one completes.
    pub fn with_writes_in_flight(mut self, n: usize) -> Self {
        self.writes_in_flight = n.max(1);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves an object path, refusing anything that could escape the root.
    fn resolve(&self, rel: &str) -> Result<PathBuf> {
        let ok = !rel.is_empty()
            && !rel.starts_with('/')
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !ok {
            return Err(Error::InvalidPath {
                path: rel.to_string(),
                reason: format!(
                    "not a relative path inside {} (empty, `.` or `..` components)",
                    self.root.display()
                ),
            });
        }
        Ok(self.root.join(rel))
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
            if ft.is_dir() {
                // A subdirectory that cannot be read (no permission, I/O
                // error) is left out rather than failing the whole listing:
                // one unreadable step must not hide every other checkpoint
                // of the run. Reading it directly still reports the error.
                if let Err(e) = self.walk(&path, prefix, out) {
                    tracing::warn!(dir = %path.display(), error = %e, "listing skips an unreadable directory");
                }
            } else if ft.is_file() {
                let rel = path
                    .strip_prefix(&self.root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if rel.starts_with(prefix) {
                    let size = entry.metadata().map_err(|e| Error::io(&path, e))?.len();
                    out.push(ObjectMeta { path: rel, size });
                }
            }
        }
        Ok(())
    }

    fn read_into_blocking(&self, rel: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let path = self.resolve(rel)?;
        let direct = if self.direct_reads {
            crate::direct_read::open(&path).map_err(|e| map_err(&path, rel, e))?
        } else {
            None
        };
        let file = match direct {
            Some(f) => f,
            None => File::open(&path).map_err(|e| map_err(&path, rel, e))?,
        };
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let end = offset.saturating_add(buf.len() as u64);
        if end > len {
            return Err(Error::Incomplete {
                path: rel.to_string(),
                reason: format!(
                    "read of bytes {offset}..{end} past the end of the file ({len} bytes)"
                ),
            });
        }
        if self.direct_reads {
            match crate::direct_read::read_exact_at(&file, buf, offset) {
                Ok(true) => return Ok(()),
                // Refused by the file system: read through the page cache.
                Ok(false) => {
                    let file = File::open(&path).map_err(|e| map_err(&path, rel, e))?;
                    return file
                        .read_exact_at(buf, offset)
                        .map_err(|e| Error::io(&path, e));
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        file.read_exact_at(buf, offset)
            .map_err(|e| Error::io(&path, e))
    }
}

/// A shard file being written. Its blocks go to a thread of its own, which
/// writes them back to back: the next write starts the moment the last one
/// returns, without waiting for an async task to be scheduled, so a busy
/// runtime (another tier's upload, hashing) cannot leave the disk idle
/// between writes. The queue is unbounded: it holds blocks that are already
/// in memory (staged, or the caller's zero-copy tensors) by reference, so
/// queueing them costs nothing, and `write` never waits for the runtime to
/// schedule it again before the thread has its next block. (A queue of two
/// left the disk idle whenever another tier's parts kept the runtime's
/// workers busy hashing.) Each block is written without waiting for later
/// ones, so a save streaming through a small pool always gets its blocks
/// back. `abort`, or a drop without `finish` (a cancelled save), stops the
/// thread before its next block, so it never writes out a queue nobody
/// will read; the blocks still queued are released. An aborted file is
/// removed; a dropped one is left for retention, as a crash would leave it.
struct LocalWriter {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Bytes>>,
    /// Set to make the thread stop before its next block.
    stop: Arc<AtomicBool>,
    /// The file once every queued block is written, or the first error.
    thread: Option<std::thread::JoinHandle<Result<DirectWriter<File>>>>,
    temp: PathBuf,
    path: PathBuf,
}

impl LocalWriter {
    fn start(mut file: DirectWriter<File>, temp: PathBuf, path: PathBuf) -> Result<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Named by its final path: that is the file the user knows.
        let name = path.clone();
        let thread = std::thread::Builder::new()
            .name("ckpt-local-write".into())
            .spawn(move || {
                while let Some(data) = rx.blocking_recv() {
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    file.write(&name, data).map_err(|e| Error::io(&name, e))?;
                }
                Ok(file)
            })
            .map_err(|e| Error::io(&temp, e))?;
        Ok(Self {
            tx: Some(tx),
            stop,
            thread: Some(thread),
            temp,
            path,
        })
    }

    /// Waits for the writer thread: the file, or the error it stopped on.
    async fn join(&mut self) -> Result<DirectWriter<File>> {
        self.tx = None;
        let thread = self.thread.take().ok_or_else(|| {
            Error::InvalidState(format!("write after failure on {}", self.temp.display()))
        })?;
        blocking(move || {
            thread
                .join()
                .map_err(|_| Error::Internal("a local writer thread panicked".into()))?
        })
        .await
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Neither finished nor aborted: nobody will read what is queued.
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

impl TierWriter for LocalWriter {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let sent = match &self.tx {
                Some(tx) => tx.send(data).is_ok(),
                None => false,
            };
            if sent {
                return Ok(());
            }
            // The thread stopped: its error is this write's.
            match self.join().await {
                Err(e) => Err(e),
                Ok(_) => Err(Error::Internal(format!(
                    "the writer of {} stopped early",
                    self.path.display()
                ))),
            }
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let written = self.join().await;
            let (temp, path) = (
                std::mem::take(&mut self.temp),
                std::mem::take(&mut self.path),
            );
            let file = match written {
                Ok(f) => f,
                Err(e) => {
                    let _ = fs::remove_file(&temp);
                    return Err(e);
                }
            };
            blocking(move || {
                let file = match file.finish(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = fs::remove_file(&temp);
                        return Err(Error::io(&path, e));
                    }
                };
                publish(file, &temp, &path, PutMode::Overwrite)
            })
            .await
        })
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.join().await;
            let temp = self.temp.clone();
            blocking(move || match fs::remove_file(&temp) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(&temp, e)),
            })
            .await
        })
    }
}

impl Tier for LocalTier {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_atomic_create(true)
            .with_survives_process(true)
            .with_read_alignment(if self.direct_reads { 4096 } else { 0 })
    }

    fn create<'a>(&'a self, rel: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        Box::pin(async move {
            let path = self.resolve(rel)?;
            let direct = self.direct_writes;
            let in_flight = self.writes_in_flight;
            blocking(move || {
                create_parent(&path)?;
                let temp = temp_name(&path);
                let (file, direct) =
                    direct_write::create(&temp, direct).map_err(|e| Error::io(&temp, e))?;
                let writer = DirectWriter::new(file, direct).with_in_flight(in_flight);
                Ok(Box::new(LocalWriter::start(writer, temp, path)?) as Box<dyn TierWriter>)
            })
            .await
        })
    }

    fn put<'a>(&'a self, rel: &'a str, data: Bytes, mode: PutMode) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let path = self.resolve(rel)?;
            let rel = rel.to_string();
            blocking(move || {
                create_parent(&path)?;
                let temp = temp_name(&path);
                let written = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&temp)
                    .and_then(|mut f| f.write_all(&data).map(|()| f));
                match written {
                    Ok(f) => publish(f, &temp, &path, mode).map_err(|e| match e {
                        Error::AlreadyExists { .. } => Error::AlreadyExists { path: rel },
                        e => e,
                    }),
                    Err(e) => {
                        let _ = fs::remove_file(&temp);
                        Err(Error::io(&temp, e))
                    }
                }
            })
            .await
        })
    }

    fn get<'a>(&'a self, rel: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            let path = self.resolve(rel)?;
            let rel = rel.to_string();
            blocking(move || {
                fs::read(&path)
                    .map(Bytes::from)
                    .map_err(|e| map_err(&path, &rel, e))
            })
            .await
        })
    }

    fn get_range<'a>(&'a self, rel: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            let len = range
                .end
                .checked_sub(range.start)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Error::InvalidInput(format!("invalid range {range:?} for {rel}")))?;
            let this = self.clone();
            let rel = rel.to_string();
            blocking(move || {
                let mut buf = vec![0u8; len];
                this.read_into_blocking(&rel, range.start, &mut buf)?;
                Ok(Bytes::from(buf))
            })
            .await
        })
    }

    fn read_into<'a>(
        &'a self,
        rel: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        // Reads straight into the caller's buffer: no intermediate copy. The
        // buffer is borrowed, so this cannot move to the blocking pool; on a
        // multi-threaded runtime worker it uses `block_in_place`, elsewhere
        // (restore's own threads) it simply blocks its thread.
        Box::pin(async move {
            let on_worker = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if on_worker {
                tokio::task::block_in_place(|| self.read_into_blocking(rel, offset, buf))
            } else {
                self.read_into_blocking(rel, offset, buf)
            }
        })
    }

    fn size<'a>(&'a self, rel: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let path = self.resolve(rel)?;
            let rel = rel.to_string();
            blocking(move || match fs::metadata(&path) {
                Ok(m) if m.is_file() => Ok(m.len()),
                Ok(_) => Err(Error::NotFound { path: rel }),
                Err(e) => Err(map_err(&path, &rel, e)),
            })
            .await
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(async move {
            let this = self.clone();
            let prefix = prefix.to_string();
            blocking(move || {
                // Walk only the deepest directory the prefix names.
                let dir = match prefix.rfind('/') {
                    Some(i) => this.resolve(&prefix[..i])?,
                    None => this.root.clone(),
                };
                let mut out = Vec::new();
                this.walk(&dir, &prefix, &mut out)?;
                Ok(out)
            })
            .await
        })
    }

    fn delete<'a>(&'a self, rel: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let path = self.resolve(rel)?;
            let root = self.root.clone();
            blocking(move || {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(Error::io(&path, e)),
                }
                // Remove directories left empty, up to the root.
                let mut dir = path.parent();
                while let Some(d) = dir {
                    if d == root || fs::remove_dir(d).is_err() {
                        break;
                    }
                    dir = d.parent();
                }
                Ok(())
            })
            .await
        })
    }
}
