//! `FaultTier`: a tier that forwards every call to another tier and injects
//! faults on demand, to test what the save, commit and restore paths do
//! when storage misbehaves.
//!
//! Faults are armed with [`FaultTier::inject`] (or
//! [`FaultTier::inject_times`]) and can be changed while a checkpointer is
//! using the tier: clones of a `FaultTier` share their faults and journal.
//! Every call is recorded in a journal ([`FaultTier::journal`]), so tests
//! can also assert the order of operations (e.g. that retention deletes a
//! step's `MANIFEST.json` before its data).
//!
//! ```
//! use std::sync::Arc;
//! use ckpt_core::{MemoryTier, PutMode, Tier};
//! use ckpt_io::{Fault, FaultTier};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let tier = FaultTier::new(Arc::new(MemoryTier::new()));
//! tier.inject(Fault::fail_put("MANIFEST.json"));
//! let err = tier.put("r/step-1/MANIFEST.json", "{}".into(), PutMode::Create).await;
//! assert!(err.is_err());
//! tier.clear();
//! tier.put("r/step-1/MANIFEST.json", "{}".into(), PutMode::Create).await.unwrap();
//! # });
//! ```

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{Capabilities, Error, ObjectMeta, PutMode, Result, Tier, TierWriter};
use futures::future::BoxFuture;

/// A fault to inject. Each names the objects it applies to by a path
/// suffix (`""` matches every path, `"MANIFEST.json"` only commit markers,
/// `".safetensors"` only shard files).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The `n`-th call (1-based) of [`TierWriter::write`] on each streamed
    /// object whose path ends with `suffix` fails with an I/O error; that
    /// call's bytes never reach the inner tier.
    NthWrite {
        /// Path suffix of the objects concerned.
        suffix: String,
        /// Which write fails, counting from 1 for each object.
        n: u64,
    },
    /// A disk with `bytes` free: streamed writes and puts to matching paths
    /// use up the budget. The streamed write that would exceed it stores
    /// what still fits and fails with [`io::ErrorKind::StorageFull`]; a put
    /// that does not fit stores nothing and fails the same way. Deleting
    /// does not give space back.
    StorageFullAfter {
        /// Path suffix of the objects concerned.
        suffix: String,
        /// Bytes that can still be written.
        bytes: u64,
    },
    /// [`Tier::put`] to a matching path fails; nothing is stored.
    FailPut {
        /// Path suffix of the objects concerned.
        suffix: String,
    },
    /// [`TierWriter::finish`] of a matching streamed object fails (as a
    /// failed fsync or multipart completion would); the inner writer is
    /// aborted, so the object does not appear.
    FailFinish {
        /// Path suffix of the objects concerned.
        suffix: String,
    },
    /// [`Tier::delete`] of a matching path fails; nothing is deleted.
    FailDelete {
        /// Path suffix of the objects concerned.
        suffix: String,
    },
    /// The process SIGKILLs itself when a [`Tier::put`] to a matching path
    /// starts: a crash at exactly that point of the commit protocol (no
    /// cleanup, no unwinding), for process-level crash tests.
    KillProcessOnPut {
        /// Path suffix of the objects concerned.
        suffix: String,
    },
    /// [`Tier::put`] to a matching path is stored, but its reply is lost:
    /// the caller gets the error a retried request would get (for a
    /// create, `AlreadyExists`: the object it just created is there; for
    /// an overwrite, a retryable backend error).
    LoseReply {
        /// Path suffix of the objects concerned.
        suffix: String,
    },
    /// Every call on a matching path (and every write and finish of a
    /// matching streamed object) first waits `delay`.
    Latency {
        /// Path suffix of the objects concerned.
        suffix: String,
        /// Added delay.
        delay: Duration,
    },
    /// [`Tier::get`], [`Tier::get_range`], [`Tier::read_into`] and
    /// [`Tier::size`] of a matching path fail with an I/O error (an
    /// unreadable file, a server's 503 after its retries): the bytes may
    /// well be intact, only this read failed.
    FailGet {
        /// Path suffix of the objects concerned.
        suffix: String,
        /// Matching reads that pass before the first that fails (a file
        /// that turns unreadable between a listing and a later read).
        skip: u64,
    },
    /// Every call on a matching path (and every write and finish of a
    /// matching streamed object) waits until `gate` is opened: a tier that
    /// is slow for exactly as long as a test needs, however loaded the
    /// machine is.
    Hold {
        /// Path suffix of the objects concerned.
        suffix: String,
        /// Opened by the test ([`FaultGate::open`]).
        gate: FaultGate,
    },
}

/// A latch for [`Fault::Hold`]: closed when made, opened once, for good.
/// Clones share it.
#[derive(Clone)]
pub struct FaultGate(Arc<GateInner>);

struct GateInner {
    open: tokio::sync::watch::Sender<bool>,
    /// Calls waiting at the gate now.
    waiting: std::sync::atomic::AtomicUsize,
}

impl FaultGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self(Arc::new(GateInner {
            open: tokio::sync::watch::Sender::new(false),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// Opens the gate: every held call goes on, and none is held again.
    pub fn open(&self) {
        self.0.open.send_replace(true);
    }

    /// Whether [`FaultGate::open`] was called.
    pub fn is_open(&self) -> bool {
        *self.0.open.borrow()
    }

    /// How many calls wait at the gate now.
    pub fn waiting(&self) -> usize {
        self.0.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn passed(&self) {
        use std::sync::atomic::Ordering;
        let mut rx = self.0.open.subscribe();
        self.0.waiting.fetch_add(1, Ordering::AcqRel);
        // The sender lives in `self`: `wait_for` ends only when opened.
        let _ = rx.wait_for(|open| *open).await;
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for FaultGate {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FaultGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FaultGate({})",
            if self.is_open() { "open" } else { "closed" }
        )
    }
}

impl PartialEq for FaultGate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for FaultGate {}

impl Fault {
    /// [`Fault::NthWrite`].
    pub fn nth_write(suffix: impl Into<String>, n: u64) -> Self {
        Fault::NthWrite {
            suffix: suffix.into(),
            n,
        }
    }

    /// [`Fault::StorageFullAfter`].
    pub fn storage_full_after(suffix: impl Into<String>, bytes: u64) -> Self {
        Fault::StorageFullAfter {
            suffix: suffix.into(),
            bytes,
        }
    }

    /// [`Fault::FailPut`].
    pub fn fail_put(suffix: impl Into<String>) -> Self {
        Fault::FailPut {
            suffix: suffix.into(),
        }
    }

    /// [`Fault::FailFinish`].
    pub fn fail_finish(suffix: impl Into<String>) -> Self {
        Fault::FailFinish {
            suffix: suffix.into(),
        }
    }

    /// [`Fault::FailDelete`].
    pub fn fail_delete(suffix: impl Into<String>) -> Self {
        Fault::FailDelete {
            suffix: suffix.into(),
        }
    }

    /// [`Fault::KillProcessOnPut`].
    pub fn kill_process_on_put(suffix: impl Into<String>) -> Self {
        Fault::KillProcessOnPut {
            suffix: suffix.into(),
        }
    }

    /// [`Fault::LoseReply`].
    pub fn lose_reply(suffix: impl Into<String>) -> Self {
        Fault::LoseReply {
            suffix: suffix.into(),
        }
    }

    /// [`Fault::Latency`] on every path.
    pub fn latency(delay: Duration) -> Self {
        Fault::Latency {
            suffix: String::new(),
            delay,
        }
    }

    /// [`Fault::FailGet`].
    pub fn fail_get(suffix: impl Into<String>) -> Self {
        Self::fail_get_after(suffix, 0)
    }

    /// [`Fault::FailGet`] after `skip` reads that pass.
    pub fn fail_get_after(suffix: impl Into<String>, skip: u64) -> Self {
        Fault::FailGet {
            suffix: suffix.into(),
            skip,
        }
    }

    /// [`Fault::Hold`].
    pub fn hold(suffix: impl Into<String>, gate: &FaultGate) -> Self {
        Fault::Hold {
            suffix: suffix.into(),
            gate: gate.clone(),
        }
    }

    fn suffix(&self) -> &str {
        match self {
            Fault::NthWrite { suffix, .. }
            | Fault::StorageFullAfter { suffix, .. }
            | Fault::FailPut { suffix }
            | Fault::FailFinish { suffix }
            | Fault::FailDelete { suffix }
            | Fault::FailGet { suffix, .. }
            | Fault::KillProcessOnPut { suffix }
            | Fault::LoseReply { suffix }
            | Fault::Latency { suffix, .. }
            | Fault::Hold { suffix, .. } => suffix,
        }
    }
}

/// Kind of a recorded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`Tier::create`].
    Create,
    /// [`TierWriter::write`].
    Write,
    /// [`TierWriter::finish`].
    Finish,
    /// [`TierWriter::abort`], or a writer dropped without finishing.
    Abort,
    /// [`Tier::put`].
    Put(PutMode),
    /// [`Tier::get`].
    Get,
    /// [`Tier::get_range`].
    GetRange,
    /// [`Tier::read_into`].
    ReadInto,
    /// [`Tier::size`].
    Size,
    /// [`Tier::list`] (the path is the prefix).
    List,
    /// [`Tier::delete`].
    Delete,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// What was called.
    pub kind: OpKind,
    /// On which path (the prefix, for a listing).
    pub path: String,
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    /// Times it may still fire; `None` is unlimited.
    remaining: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    faults: Vec<Armed>,
    /// After this many more calls, every call waits on the gate
    /// ([`FaultTier::hold_after`]).
    hold_after: Option<(u64, FaultGate)>,
    journal: Vec<Op>,
    fired: Vec<String>,
}

/// What an intercepted call must do.
enum Verdict {
    Pass,
    Fail(String),
    /// Out of space: forward the first `fit` bytes of a write, then fail.
    Full {
        fit: usize,
    },
    /// SIGKILL this process.
    Kill,
    /// Apply, then report the error a retry would get.
    LoseReply,
}

impl State {
    fn record(&mut self, kind: OpKind, path: &str) {
        self.journal.push(Op {
            kind,
            path: path.to_string(),
        });
    }

    fn delay(&mut self, path: &str) -> Wait {
        let mut w = Wait::default();
        if let Some((left, gate)) = self.hold_after.as_mut() {
            if *left == 0 {
                w.gates.push(gate.clone());
            } else {
                *left -= 1;
            }
        }
        for a in &self.faults {
            match &a.fault {
                Fault::Latency { suffix, delay } if path.ends_with(suffix.as_str()) => {
                    w.delay += *delay;
                }
                Fault::Hold { suffix, gate } if path.ends_with(suffix.as_str()) => {
                    w.gates.push(gate.clone());
                }
                _ => {}
            }
        }
        w
    }

    /// Finds the first armed fault on `path` that `hit` accepts, counts it
    /// as fired and returns what `hit` decided.
    fn fire(&mut self, path: &str, mut hit: impl FnMut(&mut Fault) -> Option<Verdict>) -> Verdict {
        for i in 0..self.faults.len() {
            let armed = &mut self.faults[i];
            if armed.remaining == Some(0) || !path.ends_with(armed.fault.suffix()) {
                continue;
            }
            if let Some(v) = hit(&mut armed.fault) {
                if let Some(r) = armed.remaining.as_mut() {
                    *r -= 1;
                }
                let what = format!("{:?} on {path}", armed.fault);
                self.fired.push(what);
                return v;
            }
        }
        Verdict::Pass
    }
}

/// A fault-injecting wrapper around another tier. See the module docs.
#[derive(Debug, Clone)]
pub struct FaultTier {
    inner: Arc<dyn Tier>,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a call waits for before it goes on: added latency, held gates.
#[derive(Default)]
struct Wait {
    delay: Duration,
    gates: Vec<FaultGate>,
}

/// Waits out `w`: the delay on the runtime's timer when there is one, then
/// every gate.
async fn pause(w: Wait) {
    if !w.delay.is_zero() {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::time::sleep(w.delay).await;
        } else {
            std::thread::sleep(w.delay);
        }
    }
    for g in &w.gates {
        g.passed().await;
    }
}

fn full_path(location: &str, path: &str) -> PathBuf {
    PathBuf::from(format!("{}/{path}", location.trim_end_matches('/')))
}

fn injected(location: &str, path: &str, what: &str) -> Error {
    Error::io(
        full_path(location, path),
        io::Error::other(format!("injected fault: {what}")),
    )
}

fn storage_full(location: &str, path: &str) -> Error {
    Error::io(
        full_path(location, path),
        io::Error::new(
            io::ErrorKind::StorageFull,
            "no space left on device (injected fault)",
        ),
    )
}

impl FaultTier {
    /// Wraps `inner`, with no fault armed.
    pub fn new(inner: Arc<dyn Tier>) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// The wrapped tier.
    pub fn inner(&self) -> &Arc<dyn Tier> {
        &self.inner
    }

    /// Arms `fault` until [`FaultTier::clear`].
    pub fn inject(&self, fault: Fault) -> &Self {
        lock(&self.state).faults.push(Armed {
            fault,
            remaining: None,
        });
        self
    }

    /// Arms `fault` for its first `times` firings.
    pub fn inject_times(&self, fault: Fault, times: u64) -> &Self {
        lock(&self.state).faults.push(Armed {
            fault,
            remaining: Some(times),
        });
        self
    }

    /// After `calls` more calls through this tier (every create, write,
    /// finish, put, get, list, delete counts), every call waits until
    /// `gate` opens: a process that stops at exactly that request, as a
    /// crash would (never opened), or that resumes much later, as a zombie
    /// writer of an older incarnation would (opened). [`FaultTier::clear`]
    /// disarms it for later calls.
    pub fn hold_after(&self, calls: u64, gate: &FaultGate) -> &Self {
        lock(&self.state).hold_after = Some((calls, gate.clone()));
        self
    }

    /// Disarms every fault (the journal is kept).
    pub fn clear(&self) {
        let mut s = lock(&self.state);
        s.faults.clear();
        s.hold_after = None;
    }

    /// Every fault that fired so far, described with the path it hit.
    pub fn fired(&self) -> Vec<String> {
        lock(&self.state).fired.clone()
    }

    /// Every call so far, in the order they were made.
    pub fn journal(&self) -> Vec<Op> {
        lock(&self.state).journal.clone()
    }

    /// Empties the journal and the list of fired faults.
    pub fn clear_journal(&self) {
        let mut s = lock(&self.state);
        s.journal.clear();
        s.fired.clear();
    }

    /// Fails a read of `path` if a [`Fault::FailGet`] fires on it.
    fn read_fault(&self, path: &str) -> Result<()> {
        let verdict = lock(&self.state).fire(path, |f| match f {
            Fault::FailGet { skip, .. } if *skip > 0 => {
                *skip -= 1;
                None
            }
            Fault::FailGet { .. } => Some(Verdict::Fail("read".into())),
            _ => None,
        });
        match verdict {
            Verdict::Fail(what) => Err(injected(&self.inner.location(), path, &what)),
            _ => Ok(()),
        }
    }

    /// Records a call and returns what it waits for first.
    fn enter(&self, kind: OpKind, path: &str) -> Wait {
        let mut s = lock(&self.state);
        s.record(kind, path);
        s.delay(path)
    }
}

struct FaultWriter {
    inner: Option<Box<dyn TierWriter>>,
    state: Arc<Mutex<State>>,
    location: String,
    path: String,
    writes: u64,
}

impl FaultWriter {
    fn inner(&mut self) -> Result<&mut Box<dyn TierWriter>> {
        self.inner.as_mut().ok_or_else(|| {
            Error::InvalidState(format!("{} was already finished or aborted", self.path))
        })
    }
}

impl Drop for FaultWriter {
    fn drop(&mut self) {
        if self.inner.is_some() {
            lock(&self.state).record(OpKind::Abort, &self.path);
        }
    }
}

#[deny(clippy::missing_trait_methods)]
impl TierWriter for FaultWriter {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.writes += 1;
            let n = self.writes;
            let len = data.len();
            let (delay, verdict) = {
                let mut s = lock(&self.state);
                s.record(OpKind::Write, &self.path);
                let delay = s.delay(&self.path);
                let verdict = s.fire(&self.path, |f| match f {
                    Fault::NthWrite { n: want, .. } if *want == n => {
                        Some(Verdict::Fail(format!("write #{n}")))
                    }
                    Fault::StorageFullAfter { bytes, .. } if len > 0 => {
                        if len as u64 <= *bytes {
                            *bytes -= len as u64;
                            None
                        } else {
                            let fit = *bytes as usize;
                            *bytes = 0;
                            Some(Verdict::Full { fit })
                        }
                    }
                    _ => None,
                });
                (delay, verdict)
            };
            pause(delay).await;
            match verdict {
                Verdict::Pass | Verdict::Kill | Verdict::LoseReply => {
                    self.inner()?.write(data).await
                }
                Verdict::Fail(what) => Err(injected(&self.location, &self.path, &what)),
                Verdict::Full { fit } => {
                    if fit > 0 {
                        self.inner()?.write(data.slice(..fit)).await?;
                    }
                    Err(storage_full(&self.location, &self.path))
                }
            }
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let (delay, verdict) = {
                let mut s = lock(&self.state);
                s.record(OpKind::Finish, &self.path);
                let delay = s.delay(&self.path);
                let verdict = s.fire(&self.path, |f| match f {
                    Fault::FailFinish { .. } => Some(Verdict::Fail("finish".into())),
                    _ => None,
                });
                (delay, verdict)
            };
            pause(delay).await;
            let inner = self.inner.take().ok_or_else(|| {
                Error::InvalidState(format!("{} was already finished or aborted", self.path))
            })?;
            match verdict {
                Verdict::Fail(what) => {
                    let _ = inner.abort().await;
                    Err(injected(&self.location, &self.path, &what))
                }
                Verdict::Pass | Verdict::Full { .. } | Verdict::Kill | Verdict::LoseReply => {
                    inner.finish().await
                }
            }
        })
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            lock(&self.state).record(OpKind::Abort, &self.path);
            match self.inner.take() {
                Some(inner) => inner.abort().await,
                None => Ok(()),
            }
        })
    }
}

#[deny(clippy::missing_trait_methods)]
impl Tier for FaultTier {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn create_guarantee(&self) -> BoxFuture<'_, ckpt_core::CreateGuarantee> {
        self.inner.create_guarantee()
    }

    fn create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        Box::pin(async move {
            pause(self.enter(OpKind::Create, path)).await;
            let inner = self.inner.create(path).await?;
            Ok(Box::new(FaultWriter {
                inner: Some(inner),
                state: self.state.clone(),
                location: self.inner.location(),
                path: path.to_string(),
                writes: 0,
            }) as Box<dyn TierWriter>)
        })
    }

    fn put<'a>(&'a self, path: &'a str, data: Bytes, mode: PutMode) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let len = data.len() as u64;
            let (delay, verdict) = {
                let mut s = lock(&self.state);
                s.record(OpKind::Put(mode), path);
                let delay = s.delay(path);
                let verdict = s.fire(path, |f| match f {
                    Fault::FailPut { .. } => Some(Verdict::Fail("put".into())),
                    Fault::KillProcessOnPut { .. } => Some(Verdict::Kill),
                    Fault::LoseReply { .. } => Some(Verdict::LoseReply),
                    Fault::StorageFullAfter { bytes, .. } if len > 0 => {
                        if len <= *bytes {
                            *bytes -= len;
                            None
                        } else {
                            Some(Verdict::Full { fit: 0 })
                        }
                    }
                    _ => None,
                });
                (delay, verdict)
            };
            pause(delay).await;
            let location = self.inner.location();
            match verdict {
                Verdict::Pass => self.inner.put(path, data, mode).await,
                Verdict::Fail(what) => Err(injected(&location, path, &what)),
                Verdict::Full { .. } => Err(storage_full(&location, path)),
                Verdict::LoseReply => {
                    self.inner.put(path, data, mode).await?;
                    Err(match mode {
                        PutMode::Create => Error::AlreadyExists {
                            path: path.to_string(),
                        },
                        PutMode::Overwrite => injected(&location, path, "lost reply of a put"),
                    })
                }
                Verdict::Kill => {
                    eprintln!("FaultTier: killing this process before putting {path}");
                    // SAFETY: raise(2) with a valid signal number has no
                    // memory-safety preconditions; SIGKILL ends the process
                    // here, without running any more of this program.
                    unsafe {
                        libc::raise(libc::SIGKILL);
                    }
                    Err(injected(&location, path, "kill"))
                }
            }
        })
    }

    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            pause(self.enter(OpKind::Get, path)).await;
            self.read_fault(path)?;
            self.inner.get(path).await
        })
    }

    fn get_range<'a>(&'a self, path: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            pause(self.enter(OpKind::GetRange, path)).await;
            self.read_fault(path)?;
            self.inner.get_range(path, range).await
        })
    }

    fn read_into<'a>(
        &'a self,
        path: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            pause(self.enter(OpKind::ReadInto, path)).await;
            self.read_fault(path)?;
            self.inner.read_into(path, offset, buf).await
        })
    }

    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            pause(self.enter(OpKind::Size, path)).await;
            self.read_fault(path)?;
            self.inner.size(path).await
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(async move {
            pause(self.enter(OpKind::List, prefix)).await;
            self.inner.list(prefix).await
        })
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (delay, verdict) = {
                let mut s = lock(&self.state);
                s.record(OpKind::Delete, path);
                let delay = s.delay(path);
                let verdict = s.fire(path, |f| match f {
                    Fault::FailDelete { .. } => Some(Verdict::Fail("delete".into())),
                    _ => None,
                });
                (delay, verdict)
            };
            pause(delay).await;
            match verdict {
                Verdict::Fail(what) => Err(injected(&self.inner.location(), path, &what)),
                Verdict::Pass | Verdict::Full { .. } | Verdict::Kill | Verdict::LoseReply => {
                    self.inner.delete(path).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_core::{
        Checkpointer, MemoryTier, RestoreOptions, Restored, SaveReport, TensorMut, TensorRef,
        TierPolicy, TrainingState, format::layout, store,
    };

    const N: usize = 10_000;

    fn data(seed: u32) -> Vec<f32> {
        (0..N as u32).map(|i| (i ^ seed) as f32 * 0.5).collect()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn checkpointer(tiers: &[Arc<dyn Tier>], keep: usize) -> Checkpointer {
        let mut b = Checkpointer::builder("r")
            .chunk_size(4096)
            .block_size(8192)
            .staging_capacity(4 * 8192);
        for t in tiers {
            b = b.tier(t.clone(), TierPolicy::keep_last(keep));
        }
        b.build().expect("checkpointer")
    }

    fn save(ckpt: &Checkpointer, step: u64) -> Result<SaveReport> {
        let w = data(step as u32);
        let tw = TensorRef::from_slice("w", &[N as u64], &w);
        let state = TrainingState::builder(step)
            .model([&tw])
            .without_optimizer()
            .rng(&[step])
            .data_loader(&step)
            .without_lr_schedule()
            .build()?;
        ckpt.save(&state)?.wait()
    }

    /// Restores the newest checkpoint and checks it is bit-identical to what
    /// was saved at its step.
    fn restore(ckpt: &Checkpointer) -> Restored {
        let mut w = vec![0f32; N];
        let r = ckpt
            .restore_with(
                &mut [&mut TensorMut::from_slice("w", &[N as u64], &mut w)],
                &RestoreOptions::default(),
            )
            .expect("restore")
            .expect("a checkpoint");
        assert_eq!(
            w,
            data(r.step as u32),
            "step {} restored other data",
            r.step
        );
        r
    }

    fn steps(tier: &dyn Tier) -> Vec<u64> {
        rt().block_on(store::committed_steps(tier, "r"))
            .expect("list")
    }

    fn listing(tier: &dyn Tier, step: u64) -> Vec<String> {
        let dir = format!("{}/", layout::step_dir("r", step));
        let mut v: Vec<String> = rt()
            .block_on(tier.list(&dir))
            .expect("list")
            .into_iter()
            .map(|o| o.path)
            .collect();
        v.sort();
        v
    }

    /// Whether `path` is rank 0's shard file of `step` (any attempt).
    fn is_data_path(step: u64, path: &str) -> bool {
        path.strip_prefix(&format!("{}/", layout::step_dir("r", step)))
            .is_some_and(|name| layout::is_rank_data_file(name, 0))
    }

    fn setup(keep: usize) -> (MemoryTier, FaultTier, Checkpointer) {
        let mem = MemoryTier::new();
        let faults = FaultTier::new(Arc::new(mem.clone()));
        let ckpt = checkpointer(&[Arc::new(faults.clone())], keep);
        (mem, faults, ckpt)
    }

    #[test]
    fn failed_data_write_fails_the_save_and_keeps_the_previous_checkpoint() {
        let (mem, faults, ckpt) = setup(5);
        save(&ckpt, 1).expect("step 1");
        faults.inject(Fault::nth_write(".safetensors", 3));
        let err = save(&ckpt, 2).expect_err("a failed data write must fail the save");
        let msg = err.to_string();
        for want in [
            "step 2",
            "rank-00000.",
            ".safetensors",
            "injected fault: write #3",
        ] {
            assert!(msg.contains(want), "`{want}` missing from: {msg}");
        }
        assert_eq!(faults.fired().len(), 1, "{:?}", faults.fired());
        assert!(
            faults
                .journal()
                .iter()
                .any(|o| o.kind == OpKind::Abort && is_data_path(2, &o.path)),
            "the flush must abort the torn shard"
        );
        assert!(
            listing(&mem, 2).is_empty(),
            "no MANIFEST, rank manifest or shard of the failed step: {:?}",
            listing(&mem, 2)
        );
        assert_eq!(steps(&mem), [1]);
        let r = restore(&ckpt);
        assert_eq!((r.step, r.fell_back()), (1, false));

        faults.clear();
        save(&ckpt, 3).expect("the next save succeeds");
        assert_eq!(steps(&mem), [1, 3]);
        assert_eq!(restore(&ckpt).step, 3);
    }

    #[test]
    fn failed_manifest_put_leaves_the_step_uncommitted() {
        let (mem, faults, ckpt) = setup(5);
        save(&ckpt, 1).expect("step 1");
        faults.inject(Fault::fail_put(layout::MANIFEST));
        let err = save(&ckpt, 2).expect_err("a failed commit must fail the save");
        assert!(err.to_string().contains("MANIFEST.json"), "{err}");
        // The data and the rank's manifest are durable, the marker is not.
        let left = listing(&mem, 2);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(is_data_path(2, &left[0]), "{left:?}");
        assert_eq!(
            left[1],
            format!("{}/rank-00000.json", layout::step_dir("r", 2))
        );
        assert_eq!(steps(&mem), [1], "step 2 must not be committed");
        let r = restore(&ckpt);
        assert_eq!((r.step, r.fell_back()), (1, false));

        faults.clear();
        save(&ckpt, 3).expect("the next save succeeds");
        assert_eq!(steps(&mem), [1, 3]);
        assert!(
            listing(&mem, 2).is_empty(),
            "retention removes the uncommitted leftover"
        );
        assert_eq!(restore(&ckpt).step, 3);
    }

    #[test]
    fn full_storage_fails_the_save_and_the_next_one_succeeds() {
        let (mem, faults, ckpt) = setup(5);
        save(&ckpt, 1).expect("step 1");
        faults.inject(Fault::storage_full_after("", 10_000));
        let err = save(&ckpt, 2).expect_err("a full disk must fail the save");
        let msg = err.to_string();
        assert!(
            msg.contains("no space left")
                && msg.contains("rank-00000.")
                && msg.contains(".safetensors"),
            "{msg}"
        );
        assert!(listing(&mem, 2).is_empty(), "{:?}", listing(&mem, 2));
        assert_eq!(steps(&mem), [1]);
        assert_eq!(restore(&ckpt).step, 1);

        // Typed: an Io error of kind StorageFull naming the object.
        let err = rt()
            .block_on(faults.put("r/big", Bytes::from(vec![0u8; 20_000]), PutMode::Create))
            .expect_err("over budget");
        match err {
            Error::Io { path, source } => {
                assert_eq!(source.kind(), io::ErrorKind::StorageFull);
                assert!(path.ends_with("r/big"), "{}", path.display());
            }
            e => panic!("expected Io, got {e}"),
        }

        faults.clear();
        save(&ckpt, 3).expect("the next save succeeds");
        assert_eq!(restore(&ckpt).step, 3);
    }

    #[test]
    fn failed_finish_leaves_no_shard() {
        let (mem, faults, ckpt) = setup(5);
        save(&ckpt, 1).expect("step 1");
        faults.inject(Fault::fail_finish(".safetensors"));
        let err = save(&ckpt, 2).expect_err("a failed finish must fail the save");
        assert!(err.to_string().contains("injected fault: finish"), "{err}");
        let left = listing(&mem, 2);
        assert!(!left.iter().any(|p| is_data_path(2, p)), "{left:?}");
        assert_eq!(steps(&mem), [1]);
        assert_eq!(restore(&ckpt).step, 1);
    }

    #[test]
    fn latency_slows_a_save_down_but_it_commits() {
        let (mem, faults, ckpt) = setup(5);
        faults.inject(Fault::latency(Duration::from_millis(20)));
        let report = save(&ckpt, 1).expect("step 1");
        assert!(
            report.total >= Duration::from_millis(100),
            "a dozen calls at 20 ms each took {:?}",
            report.total
        );
        assert_eq!(steps(&mem), [1]);
        assert_eq!(restore(&ckpt).step, 1);
    }

    #[test]
    fn a_failing_tier_does_not_stop_the_other_and_restore_uses_it() {
        let good = MemoryTier::named("good");
        let faults = FaultTier::new(Arc::new(MemoryTier::named("flaky")));
        let ckpt = checkpointer(&[Arc::new(faults.clone()), Arc::new(good.clone())], 5);
        save(&ckpt, 1).expect("step 1");
        faults.inject(Fault::nth_write(".safetensors", 2));
        let report = save(&ckpt, 2).expect("durable on the good tier");
        assert!(!report.tiers[0].committed && report.tiers[1].committed);
        match &report.tiers[0].error {
            Some(Error::Io { path, .. }) => {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                assert!(layout::is_rank_data_file(&name, 0), "{path:?}")
            }
            other => panic!("want an Io error naming the shard file, got {other:?}"),
        }
        assert_eq!(steps(faults.inner().as_ref()), [1]);
        let r = restore(&ckpt);
        assert_eq!((r.step, r.tier_index), (2, 1));
    }

    #[test]
    fn failed_delete_during_retention_uncommits_first() {
        let (mem, faults, ckpt) = setup(1);
        save(&ckpt, 1).expect("step 1");
        faults.inject(Fault::fail_delete(".safetensors"));
        // Retention after step 2 deletes step 1: its MANIFEST goes first,
        // then the shard's delete fails. The save itself is durable.
        save(&ckpt, 2).expect("step 2");
        assert_eq!(
            steps(&mem),
            [2],
            "step 1 is uncommitted even though its data remains"
        );
        // The failed delete stops that step's cleanup: its shard (and what
        // came after it) stays until the next gc; its MANIFEST is gone.
        let left = listing(&mem, 1);
        assert!(left.iter().any(|p| is_data_path(1, p)), "{left:?}");
        assert!(
            !left.iter().any(|p| p.ends_with(layout::MANIFEST)),
            "{left:?}"
        );
        assert_eq!(restore(&ckpt).step, 2);
        faults.clear();
        save(&ckpt, 3).expect("step 3");
        assert!(listing(&mem, 1).is_empty() && listing(&mem, 2).is_empty());
        assert_eq!(steps(&mem), [3]);
    }

    #[test]
    fn nth_write_counts_per_object_and_times_limit_firings() {
        let rt = rt();
        let faults = FaultTier::new(Arc::new(MemoryTier::new()));
        faults.inject(Fault::nth_write(".bin", 2));
        faults.inject_times(Fault::fail_put(".json"), 1);
        rt.block_on(async {
            for path in ["a.bin", "b.bin"] {
                let mut w = faults.create(path).await.expect("create");
                w.write(Bytes::from_static(b"1"))
                    .await
                    .expect("first write");
                let e = w.write(Bytes::from_static(b"2")).await.expect_err("second");
                assert!(e.to_string().contains(path), "{e}");
                w.abort().await.expect("abort");
            }
            let mut w = faults.create("c.txt").await.expect("create");
            for _ in 0..3 {
                w.write(Bytes::from_static(b"x"))
                    .await
                    .expect("unmatched path");
            }
            w.finish().await.expect("finish");
            assert!(
                faults
                    .put("m.json", Bytes::new(), PutMode::Create)
                    .await
                    .is_err()
            );
            faults
                .put("m.json", Bytes::new(), PutMode::Create)
                .await
                .expect("fired once only");
            assert_eq!(faults.get("c.txt").await.expect("get").as_ref(), b"xxx");
            let w = faults.create("d.bin").await.expect("create");
            drop(w);
        });
        assert_eq!(faults.fired().len(), 3, "{:?}", faults.fired());
        let kinds: Vec<OpKind> = faults.journal().iter().map(|o| o.kind).collect();
        assert_eq!(kinds.first(), Some(&OpKind::Create));
        assert_eq!(
            kinds.last(),
            Some(&OpKind::Abort),
            "a dropped writer is an abort"
        );
    }
}
