//! The staging pool: host memory that saves copy tensors into, so training
//! can go on mutating its own buffers while the flush runs.
//!
//! Allocated once (anonymous mmap), pre-faulted (every page touched, so no
//! page fault lands inside a math-stop), page-locked with `mlock` when the
//! memlock limit allows it (otherwise a single warning, and the pool works
//! unlocked), and reused by every save. Its capacity bounds the host memory
//! ckpt uses: a save larger than the pool streams through it, waiting for
//! the flush to hand blocks back.
//!
//! The pool is cut into fixed-size blocks. A [`Block`] is exclusively owned
//! while it is filled; [`Block::freeze`] turns it into immutable [`Bytes`]
//! that every tier can hold without copying, and the block returns to the
//! pool when the last of those `Bytes` is dropped. All raw-memory code of
//! ckpt lives in this module.
//!
//! With the `cuda` feature the pool can also be registered with the CUDA
//! driver (`StagingPool::register_cuda`), so copies from the GPU are DMA
//! into it. Registration goes in bounded chunks (recent drivers refuse a
//! single registration of many GiB), each a whole number of blocks, so no
//! block straddles two registrations; the pool is unregistered before it is
//! unmapped.

use crate::sync::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::MmapMut;

#[cfg(feature = "cuda")]
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "cuda")]
static CUDA_REGISTER_WARNED: AtomicBool = AtomicBool::new(false);

/// Occupancy changes the pool remembers (two per block a save uses: 2 GiB
/// of 8 MiB blocks is 512).
const TIMELINE_LEN: usize = 1 << 16;

/// The staging pool's occupancy at one moment of a save
/// ([`SaveReport::staging`](crate::SaveReport::staging)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StagingSample {
    /// Time since the save started.
    pub at: Duration,
    /// Bytes of the pool holding staged data a tier still needs, from `at`
    /// until the next sample.
    pub in_use_bytes: u64,
}

/// Default block size: 8 MiB.
pub const DEFAULT_BLOCK_SIZE: usize = 8 << 20;

/// Default size of one CUDA host registration of the staging pool: 256 MiB
/// (rounded up to a whole number of blocks).
#[cfg(feature = "cuda")]
pub const DEFAULT_CUDA_REGISTER_CHUNK: usize = 256 << 20;

struct PoolInner {
    /// Owns the mapping; never accessed through this field after
    /// construction except to keep it alive (blocks use `base`).
    _map: MmapMut,
    base: *mut u8,
    block_size: usize,
    blocks: usize,
    locked: bool,
    free: Mutex<Vec<usize>>,
    returned: Condvar,
    /// Blocks in use after each change, newest last (taken while `free` is
    /// held, so in the order the changes happened).
    timeline: Mutex<std::collections::VecDeque<(Instant, u32)>>,
    /// The mapping's registration with the CUDA driver, if any; dropped
    /// (unregistered) before the mapping (`Drop for PoolInner`).
    #[cfg(feature = "cuda")]
    cuda: Mutex<Option<CudaRegistration>>,
}

// SAFETY: `base` points into `_map`, which lives as long as `PoolInner`.
// Distinct blocks are disjoint regions; a block index is handed to at most
// one `Block`/`FrozenBlock` at a time (the free list is the only source of
// indices and is guarded by a mutex), so no two threads ever alias the same
// bytes mutably.
unsafe impl Send for PoolInner {}
// SAFETY: see `Send`; shared access only touches the mutex-guarded free list.
unsafe impl Sync for PoolInner {}

impl PoolInner {
    fn release(&self, index: usize) {
        let mut free = lock(&self.free);
        free.push(index);
        self.record(free.len());
        drop(free);
        self.returned.notify_all();
    }

    /// Records the occupancy after a change, `free` blocks being free
    /// (called with the free list locked).
    fn record(&self, free: usize) {
        let mut t = lock(&self.timeline);
        if t.len() >= TIMELINE_LEN {
            t.pop_front();
        }
        t.push_back((Instant::now(), (self.blocks - free) as u32));
    }
}

#[cfg(feature = "cuda")]
impl Drop for PoolInner {
    fn drop(&mut self) {
        // Unregister while the mapping still exists.
        let reg = self.cuda.get_mut().unwrap_or_else(|e| e.into_inner());
        drop(reg.take());
    }
}

/// The staging pool's size and state, for reports and benchmarks
/// ([`crate::Checkpointer::staging_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StagingStats {
    /// Bytes of staging memory.
    pub capacity: u64,
    /// Bytes per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub blocks: usize,
    /// Blocks free now (the others hold staged data a flush still needs).
    pub free_blocks: usize,
    /// Whether the pool is locked in RAM (`mlock`).
    pub locked: bool,
    /// Whether the pool is registered (pinned) with a CUDA driver.
    pub cuda_registered: bool,
    /// How many CUDA registrations cover it.
    pub cuda_registered_chunks: usize,
}

/// A pool of page-locked staging blocks. Cheap to clone (shared).
#[derive(Clone)]
pub struct StagingPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for StagingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingPool")
            .field("capacity", &self.capacity())
            .field("block_size", &self.inner.block_size)
            .field("locked", &self.inner.locked)
            .field("cuda_registered", &self.is_cuda_registered())
            .field("free_blocks", &self.free_blocks())
            .finish()
    }
}

impl StagingPool {
    /// Allocates `capacity` bytes (rounded up to whole blocks of
    /// `block_size`), pre-faults them and tries to lock them in RAM.
    pub fn new(capacity: u64, block_size: usize) -> Result<Self> {
        if block_size < 4096 || !block_size.is_power_of_two() {
            return Err(Error::Config(format!(
                "staging block size {block_size} must be a power of two >= 4096"
            )));
        }
        let blocks = usize::try_from(capacity.div_ceil(block_size as u64).max(1))
            .map_err(|_| Error::Config(format!("staging capacity {capacity} too large")))?;
        let len = blocks
            .checked_mul(block_size)
            .ok_or_else(|| Error::Config(format!("staging capacity {capacity} too large")))?;
        let mut map = MmapMut::map_anon(len).map_err(|e| Error::io("<staging pool>", e))?;
        #[cfg(target_os = "linux")]
        {
            // Transparent huge pages cut TLB misses during the copy; advisory only.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        // Pre-fault: touch every page now so the first save does not pay
        // for page faults inside its math-stop. The mapping is zero-filled
        // by the kernel, so every byte is initialized from the start.
        for page in map.chunks_mut(4096) {
            page[0] = 0;
        }
        let locked = match map.lock() {
            Ok(()) => true,
            Err(e) => {
                if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        bytes = len,
                        error = %e,
                        "cannot mlock the staging pool (raise `ulimit -l` to lock it); continuing with unlocked memory"
                    );
                }
                false
            }
        };
        let base = map.as_mut_ptr();
        Ok(Self {
            inner: Arc::new(PoolInner {
                _map: map,
                base,
                block_size,
                blocks,
                locked,
                free: Mutex::new((0..blocks).rev().collect()),
                returned: Condvar::new(),
                timeline: Mutex::new(std::collections::VecDeque::new()),
                #[cfg(feature = "cuda")]
                cuda: Mutex::new(None),
            }),
        })
    }

    /// Total bytes.
    pub fn capacity(&self) -> u64 {
        (self.inner.blocks * self.inner.block_size) as u64
    }

    /// Bytes per block.
    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.inner.blocks
    }

    /// Whether the pool is page-locked.
    pub fn is_locked(&self) -> bool {
        self.inner.locked
    }

    /// Whether the pool is registered with the CUDA driver (page-locked for
    /// DMA from the GPU). Always `false` without the `cuda` feature.
    pub fn is_cuda_registered(&self) -> bool {
        self.cuda_registered_chunks() > 0
    }

    /// How many separate CUDA host registrations cover the pool (0 when not
    /// registered).
    pub fn cuda_registered_chunks(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            let reg = lock(&self.inner.cuda);
            reg.as_ref().map_or(0, |r| r.chunks.len())
        }
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Registers the whole pool with the CUDA driver (`cuMemHostRegister`,
    /// portable to every context) in registrations of `chunk` bytes, a
    /// whole number of blocks, so copies from `device` are DMA into it. It
    /// stays registered until the pool is dropped. All or nothing: if one
    /// chunk is refused, those already registered are unregistered and the
    /// driver's error is returned. Registering again with the same device
    /// does nothing.
    #[cfg(feature = "cuda")]
    pub fn register_cuda(&self, device: &Arc<CudaDevice>, chunk: usize) -> Result<()> {
        let block = self.inner.block_size;
        if chunk == 0 || !chunk.is_multiple_of(block) {
            return Err(Error::Config(format!(
                "CUDA registration chunk of {chunk} bytes must be a positive multiple of the staging block size {block}"
            )));
        }
        let mut reg = lock(&self.inner.cuda);
        if let Some(r) = reg.as_ref() {
            if Arc::ptr_eq(&r.device, device) {
                return Ok(());
            }
            return Err(Error::Config(format!(
                "the staging pool is already registered with CUDA device {}",
                r.device.ordinal()
            )));
        }
        let len = self.inner.blocks * block;
        // SAFETY: `base .. base + len` is the pool's mapping, owned by
        // `self.inner`, which drops the registration before unmapping it
        // (`Drop for PoolInner`).
        *reg = Some(unsafe { CudaRegistration::new(device, self.inner.base, len, chunk) }?);
        Ok(())
    }

    /// [`StagingPool::register_cuda`], or one warning (per process) and
    /// pageable memory: device copies stay correct, only slower.
    #[cfg(feature = "cuda")]
    pub(crate) fn register_cuda_or_warn(&self, device: &Arc<CudaDevice>, chunk: usize) {
        if let Err(e) = self.register_cuda(device, chunk)
            && !CUDA_REGISTER_WARNED.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                bytes = self.capacity(),
                chunk,
                error = %e,
                "cannot register the staging pool with the CUDA driver; copies from the GPU go through pageable memory (correct, slower)"
            );
        }
    }

    /// Its size and state.
    pub fn stats(&self) -> StagingStats {
        StagingStats {
            capacity: self.capacity(),
            block_size: self.block_size(),
            blocks: self.blocks(),
            free_blocks: self.free_blocks(),
            locked: self.is_locked(),
            cuda_registered: self.is_cuda_registered(),
            cuda_registered_chunks: self.cuda_registered_chunks(),
        }
    }

    /// Blocks currently free.
    pub fn free_blocks(&self) -> usize {
        self.inner.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Takes a free block without waiting.
    #[cfg(test)]
    pub fn try_acquire(&self) -> Option<Block> {
        lock(&self.inner.free).pop().map(|index| Block {
            pool: self.inner.clone(),
            index,
        })
    }

    /// Waits (at most `timeout`) until `ready` holds for the free list,
    /// then runs `take` on it; says whether it had to wait. `None` on
    /// timeout.
    fn when_free<T>(
        &self,
        timeout: Duration,
        ready: impl Fn(&Vec<usize>) -> bool,
        take: impl FnOnce(&mut Vec<usize>) -> T,
    ) -> Option<(T, bool)> {
        let start = Instant::now();
        let mut free = lock(&self.inner.free);
        let mut waited = false;
        while !ready(&free) {
            waited = true;
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return None;
            }
            free = self
                .inner
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Some((take(&mut free), waited))
    }

    /// Takes a free block, waiting up to `timeout` for one to be returned.
    /// Returns the block and how long it waited.
    pub fn acquire(&self, timeout: Duration) -> Result<(Block, Duration)> {
        let start = Instant::now();
        let stuck = || {
            Error::InvalidState(format!(
                "no staging block came back within {timeout:?}: a flush is stuck"
            ))
        };
        let (index, waited) = self
            .when_free(
                timeout,
                |f| !f.is_empty(),
                |f| {
                    let index = f.pop();
                    self.inner.record(f.len());
                    index
                },
            )
            .ok_or_else(stuck)?;
        let block = Block {
            pool: self.inner.clone(),
            index: index.ok_or_else(stuck)?,
        };
        let waited = if waited {
            start.elapsed()
        } else {
            Duration::ZERO
        };
        Ok((block, waited))
    }

    /// The occupancy from `from` to `to`: the blocks in use at `from`, then
    /// every change, thinned to at most `points` samples by keeping the
    /// fullest of each time slice (so a pool that was full is never shown
    /// less full).
    pub(crate) fn occupancy(
        &self,
        from: Instant,
        to: Instant,
        points: usize,
    ) -> Vec<StagingSample> {
        let block = self.inner.block_size as u64;
        let t = lock(&self.inner.timeline);
        let before = t
            .iter()
            .rev()
            .find(|(at, _)| *at <= from)
            .map_or(0, |(_, n)| *n);
        let mut all = vec![(from, before)];
        all.extend(t.iter().filter(|(at, _)| *at > from && *at <= to).copied());
        drop(t);
        let span = to
            .saturating_duration_since(from)
            .max(Duration::from_nanos(1));
        let slices = points.max(3) as u128 - 2;
        let last = all.last().copied();
        let mut out: Vec<StagingSample> = Vec::new();
        let mut slice_of_last = None;
        let sample = |at: Instant, n: u32| StagingSample {
            at: at.saturating_duration_since(from),
            in_use_bytes: u64::from(n) * block,
        };
        for (at, n) in all {
            let s = sample(at, n);
            let slice = s.at.as_nanos() * slices / span.as_nanos();
            match out.last_mut() {
                // Same slice: keep its first time and its fullest point.
                Some(prev) if slice_of_last == Some(slice) => {
                    prev.in_use_bytes = prev.in_use_bytes.max(s.in_use_bytes);
                }
                _ => {
                    out.push(s);
                    slice_of_last = Some(slice);
                }
            }
        }
        // The state it ended in, as it was.
        if let Some((at, n)) = last {
            let end = sample(at, n);
            if out.last() != Some(&end) {
                out.push(end);
            }
        }
        out
    }

    /// Waits until every block is free (no flush holds staged data).
    #[cfg(test)]
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let blocks = self.inner.blocks;
        self.when_free(timeout, |f| f.len() >= blocks, |_| ())
            .is_some()
    }
}

/// An exclusively owned staging block.
pub struct Block {
    pool: Arc<PoolInner>,
    index: usize,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("index", &self.index).finish()
    }
}

impl Block {
    /// The block's bytes, writable. They hold whatever the previous save
    /// left (always initialized: the pool starts zero-filled).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `index < blocks`, so the region lies inside the mapping,
        // which outlives `self` via the `Arc`. This `Block` is the only owner
        // of `index` (taken from the free list under its mutex), so the
        // mutable borrow is unique; it is tied to `&mut self`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.base.add(self.index * self.pool.block_size),
                self.pool.block_size,
            )
        }
    }

    /// Makes the first `len` bytes immutable and shareable. The block goes
    /// back to the pool when the last clone of the returned `Bytes` drops.
    pub fn freeze(self, len: usize) -> Bytes {
        let len = len.min(self.pool.block_size);
        let frozen = FrozenBlock {
            pool: self.pool.clone(),
            index: self.index,
            len,
        };
        std::mem::forget(self);
        Bytes::from_owner(frozen)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

struct FrozenBlock {
    pool: Arc<PoolInner>,
    index: usize,
    len: usize,
}

impl AsRef<[u8]> for FrozenBlock {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in `Block::as_mut_slice`: the region is inside the live
        // mapping and owned by this value alone; once frozen it is never
        // written again until `drop` returns the index to the pool, so
        // shared reads are sound. `len <= block_size`.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.base.add(self.index * self.pool.block_size),
                self.len,
            )
        }
    }
}

impl Drop for FrozenBlock {
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

/// Host memory registered with the CUDA driver, chunk by chunk, and
/// unregistered on drop.
#[cfg(feature = "cuda")]
struct CudaRegistration {
    device: Arc<CudaDevice>,
    /// Start of each registered chunk.
    chunks: Vec<*mut u8>,
}

// SAFETY: the addresses are never dereferenced, only handed back to the
// driver to unregister them, which any thread may do.
#[cfg(feature = "cuda")]
unsafe impl Send for CudaRegistration {}
// SAFETY: see `Send`; no method reads through `&self`.
#[cfg(feature = "cuda")]
unsafe impl Sync for CudaRegistration {}

#[cfg(feature = "cuda")]
impl CudaRegistration {
    /// Registers `base .. base + len` in registrations of at most `chunk`
    /// bytes (a multiple of the page size).
    ///
    /// # Safety
    /// `base .. base + len` must be a live mapping, page-aligned, that
    /// outlives the returned value.
    unsafe fn new(
        device: &Arc<CudaDevice>,
        base: *mut u8,
        len: usize,
        chunk: usize,
    ) -> Result<Self> {
        let _bound = device.bind()?;
        // On an error below, dropping `reg` unregisters what was registered.
        let mut reg = Self {
            device: device.clone(),
            chunks: Vec::with_capacity(len.div_ceil(chunk)),
        };
        let mut off = 0usize;
        while off < len {
            let n = chunk.min(len - off);
            // SAFETY: `off < len`, so the address is inside the mapping.
            let p = unsafe { base.add(off) };
            // SAFETY: `p .. p + n` lies inside the caller's live mapping
            // (`off + n <= len`). Registering pins the pages and maps them for
            // DMA without touching their contents; it is undone in `Drop`
            // before the mapping goes away.
            let r = unsafe {
                cudarc::driver::sys::cuMemHostRegister_v2(
                    p.cast(),
                    n,
                    cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            };
            device.check(
                &format!("cuMemHostRegister of {n} bytes at offset {off} of {len}"),
                r,
            )?;
            reg.chunks.push(p);
            off += n;
        }
        Ok(reg)
    }
}

#[cfg(feature = "cuda")]
impl Drop for CudaRegistration {
    fn drop(&mut self) {
        let bound = self.device.bind();
        for &p in &self.chunks {
            // SAFETY: `p` was registered by `new` and is unregistered once,
            // while its mapping is still alive (the owners drop the
            // registration first).
            let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(p.cast()) };
        }
        drop(bound);
    }
}

/// A host buffer registered with the CUDA driver (page-locked for DMA), the
/// destination of the pinned device-to-host bandwidth floor. Pre-faulted,
/// registered in chunks like the staging pool, unregistered on drop.
#[cfg(feature = "cuda")]
pub struct PinnedBuffer {
    reg: Option<CudaRegistration>,
    map: MmapMut,
    len: usize,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "cuda")]
impl PinnedBuffer {
    /// Allocates `len` bytes and registers them with `device` in chunks of
    /// 256 MiB. Fails if the driver refuses.
    pub fn new(device: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        let mut map = MmapMut::map_anon(len.max(1)).map_err(|e| Error::io("<pinned buffer>", e))?;
        for page in map.chunks_mut(4096) {
            page[0] = 1;
        }
        let base = map.as_mut_ptr();
        // SAFETY: `base .. base + len` is `map`, page-aligned (a fresh
        // mapping), and `Drop for PinnedBuffer` drops the registration
        // before the mapping.
        let reg = unsafe { CudaRegistration::new(device, base, len, DEFAULT_CUDA_REGISTER_CHUNK) }?;
        Ok(Self {
            reg: Some(reg),
            map,
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map[..self.len]
    }

    /// The bytes, writable (DMA destination).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

#[cfg(feature = "cuda")]
impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // Unregister while the mapping still exists.
        drop(self.reg.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_when_bytes_drop() {
        let pool = StagingPool::new(3 * 4096, 4096).expect("pool");
        assert_eq!(pool.blocks(), 3);
        let mut b = pool.try_acquire().expect("block");
        b.as_mut_slice()[..5].copy_from_slice(b"hello");
        let bytes = b.freeze(5);
        assert_eq!(&bytes[..], b"hello");
        let clone = bytes.slice(1..3);
        assert_eq!(pool.free_blocks(), 2);
        drop(bytes);
        assert_eq!(pool.free_blocks(), 2, "a live slice keeps the block");
        assert_eq!(&clone[..], b"el");
        drop(clone);
        assert_eq!(pool.free_blocks(), 3);
    }

    #[test]
    fn acquire_waits_for_a_returned_block() {
        let pool = StagingPool::new(4096, 4096).expect("pool");
        let held = pool.try_acquire().expect("block").freeze(10);
        assert!(pool.try_acquire().is_none());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(held);
        });
        let (_b, waited) = pool
            .acquire(Duration::from_secs(5))
            .expect("block comes back");
        assert!(waited >= Duration::from_millis(20), "waited {waited:?}");
        t.join().expect("thread");
        assert!(pool.acquire(Duration::from_millis(1)).is_err());
    }
}
