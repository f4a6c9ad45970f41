//! The math-stop: copying the caller's tensors into staging blocks, in
//! parallel, computing crc32c per chunk while the bytes are still in cache.
//!
//! The staged stream is the concatenation of every copied tensor, cut into
//! pool blocks. Blocks are taken from the pool strictly in stream order (so a
//! pool smaller than the state streams through without deadlock: the
//! earliest unfilled block always gets memory first) and handed to `sink` as
//! soon as they are full, while later blocks are still being copied.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::staging::StagingPool;

/// Bytes copied before their checksum is taken: small enough to still be in
/// L2 when crc32c reads them back.
const HOT_SPAN: usize = 256 << 10;

#[derive(Debug, Clone, Copy)]
struct Op {
    tensor: usize,
    chunk: usize,
    src: usize,
    dst: usize,
    len: usize,
}

/// What staging produced besides the blocks it handed to the sink.
#[derive(Debug)]
pub(crate) struct Staged {
    /// Per input tensor, crc32c of each chunk.
    pub crcs: Vec<Vec<u32>>,
    /// Time spent waiting for blocks to come back from a running flush.
    pub waited: Duration,
    /// Blocks used.
    #[cfg_attr(not(test), allow(dead_code))]
    pub blocks: usize,
}

fn plan(sources: &[&[u8]], block_size: usize, chunk_size: usize) -> Vec<Vec<Op>> {
    let mut blocks: Vec<Vec<Op>> = Vec::new();
    let mut pos = 0usize;
    for (tensor, src) in sources.iter().enumerate() {
        let mut off = 0usize;
        while off < src.len() {
            let dst = pos % block_size;
            if dst == 0 {
                blocks.push(Vec::new());
            }
            let chunk = off / chunk_size;
            let len = (src.len() - off)
                .min(block_size - dst)
                .min((chunk + 1) * chunk_size - off);
            if let Some(b) = blocks.last_mut() {
                b.push(Op {
                    tensor,
                    chunk,
                    src: off,
                    dst,
                    len,
                });
            }
            off += len;
            pos += len;
        }
    }
    blocks
}

fn fill(block: &mut [u8], ops: &[Op], sources: &[&[u8]]) -> Vec<u32> {
    ops.iter()
        .map(|op| {
            let src = &sources[op.tensor][op.src..op.src + op.len];
            let dst = &mut block[op.dst..op.dst + op.len];
            let mut crc = 0u32;
            for (s, d) in src.chunks(HOT_SPAN).zip(dst.chunks_mut(HOT_SPAN)) {
                d.copy_from_slice(s);
                crc = crc32c::crc32c_append(crc, d);
            }
            crc
        })
        .collect()
}

/// What one copy worker produced: (block index, chunk checksums) per
/// block it filled, and the time it waited for memory.
type WorkerOutput = (Vec<(usize, Vec<u32>)>, Duration);

/// Copies `sources` into pool blocks with `threads` workers, calling
/// `sink(block_index, bytes)` for every filled block (from worker threads,
/// in any order), and returns the per-chunk checksums.
pub(crate) fn stage(
    pool: &StagingPool,
    sources: &[&[u8]],
    chunk_size: u64,
    threads: usize,
    block_timeout: Duration,
    sink: &(dyn Fn(usize, Bytes) + Sync),
) -> Result<Staged> {
    let block_size = pool.block_size();
    let chunk =
        usize::try_from(chunk_size).map_err(|_| Error::Config("chunk size too large".into()))?;
    let plan = plan(sources, block_size, chunk);
    let next = Mutex::new(0usize);
    let failed = AtomicBool::new(false);
    let threads = threads.clamp(1, plan.len().max(1));

    let work = || -> Result<WorkerOutput> {
        let mut done = Vec::new();
        let mut waited = Duration::ZERO;
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok((done, waited));
            }
            // Take the next block index and its memory together, so blocks
            // are acquired in stream order.
            let (k, mut block) = {
                let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                if *n >= plan.len() {
                    return Ok((done, waited));
                }
                let (block, w) = pool.acquire(block_timeout)?;
                waited += w;
                let k = *n;
                *n += 1;
                (k, block)
            };
            let ops = &plan[k];
            let crcs = fill(block.as_mut_slice(), ops, sources);
            let used = ops.last().map(|o| o.dst + o.len).unwrap_or(0);
            sink(k, block.freeze(used));
            done.push((k, crcs));
        }
    };

    let results: Vec<Result<WorkerOutput>> = if threads == 1 {
        vec![work()]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let r = work();
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidState("a staging thread panicked".into()))
                    })
                })
                .collect()
        })
    };

    let mut per_block: Vec<Option<Vec<u32>>> = vec![None; plan.len()];
    let mut waited = Duration::ZERO;
    for r in results {
        let (done, w) = r?;
        waited = waited.max(w);
        for (k, crcs) in done {
            per_block[k] = Some(crcs);
        }
    }

    // Combine the partial checksums of chunks split across blocks, in
    // stream order.
    let mut crcs: Vec<Vec<u32>> = sources
        .iter()
        .map(|s| Vec::with_capacity(s.len().div_ceil(chunk)))
        .collect();
    for (ops, partial) in plan.iter().zip(per_block) {
        let partial =
            partial.ok_or_else(|| Error::InvalidState("a staging block was not filled".into()))?;
        for (op, crc) in ops.iter().zip(partial) {
            let table = &mut crcs[op.tensor];
            if table.len() == op.chunk + 1 {
                if let Some(last) = table.last_mut() {
                    *last = crc32c::crc32c_combine(*last, crc, op.len);
                }
            } else {
                table.push(crc);
            }
        }
    }
    Ok(Staged {
        crcs,
        waited,
        blocks: plan.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::chunk_crcs;

    #[test]
    fn staged_stream_and_crcs_match_sources() {
        let a: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let b: Vec<u8> = (0..3u8).collect();
        let c: Vec<u8> = (0..9_999u32).map(|i| (i % 13) as u8).collect();
        let sources: Vec<&[u8]> = vec![&a, &b, &[], &c];
        let pool = StagingPool::new(64 << 10, 4096).expect("pool");
        let got = Mutex::new(Vec::new());
        let staged = stage(
            &pool,
            &sources,
            4096 + 512,
            2,
            Duration::from_secs(5),
            &|k, bytes| {
                got.lock().expect("lock").push((k, bytes));
            },
        )
        .expect("stage");
        let mut got = got.into_inner().expect("lock");
        got.sort_by_key(|(k, _)| *k);
        let stream: Vec<u8> = got.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let want: Vec<u8> = sources.concat();
        assert_eq!(stream, want);
        for (s, crcs) in sources.iter().zip(&staged.crcs) {
            assert_eq!(*crcs, chunk_crcs(s, 4096 + 512));
        }
    }

    #[test]
    fn pool_smaller_than_state_streams_through() {
        let data = vec![5u8; 40_000];
        let pool = StagingPool::new(8192, 4096).expect("pool");
        let total = Mutex::new(0usize);
        let staged = stage(
            &pool,
            &[&data],
            4096,
            2,
            Duration::from_secs(5),
            &|_, bytes| {
                // Dropping immediately returns the block, as a finished flush would.
                *total.lock().expect("lock") += bytes.len();
            },
        )
        .expect("stage");
        assert_eq!(*total.lock().expect("lock"), 40_000);
        assert_eq!(staged.blocks, 10);
    }
}
