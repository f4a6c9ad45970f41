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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::MmapMut;

use crate::error::{Error, Result};

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Default block size: 8 MiB.
pub const DEFAULT_BLOCK_SIZE: usize = 8 << 20;

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
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(index);
        drop(free);
        self.returned.notify_all();
    }
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

    /// Blocks currently free.
    pub fn free_blocks(&self) -> usize {
        self.inner.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Takes a free block without waiting.
    pub fn try_acquire(&self) -> Option<Block> {
        let mut free = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        free.pop().map(|index| Block {
            pool: self.inner.clone(),
            index,
        })
    }

    /// Takes a free block, waiting up to `timeout` for one to be returned.
    /// Returns the block and how long it waited.
    pub fn acquire(&self, timeout: Duration) -> Result<(Block, Duration)> {
        let start = Instant::now();
        let mut free = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut waited = false;
        loop {
            if let Some(index) = free.pop() {
                let block = Block {
                    pool: self.inner.clone(),
                    index,
                };
                return Ok((
                    block,
                    if waited {
                        start.elapsed()
                    } else {
                        Duration::ZERO
                    },
                ));
            }
            waited = true;
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::InvalidState(format!(
                    "no staging block came back within {timeout:?}: a flush is stuck"
                )));
            }
            free = self
                .inner
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every block is free (no flush holds staged data).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        let mut free = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        while free.len() < self.inner.blocks {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            free = self
                .inner
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
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
