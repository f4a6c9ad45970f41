//! The math-stop: copying the caller's tensors into staging blocks, in
//! parallel, computing crc32c per chunk while the bytes are still in cache.
//!
//! The staged stream is the concatenation of every copied tensor, cut into
//! pool blocks. Blocks are taken from the pool strictly in stream order (so a
//! pool smaller than the state streams through without deadlock: the
//! earliest unfilled block always gets memory first) and handed to `sink` as
//! soon as they are full, while later blocks are still being copied.
//!
//! A source may be in GPU memory ([`Source::Device`], feature `cuda`): its
//! pieces of a block are copied by the device's DMA engine while the worker
//! copies the block's host pieces, and the block goes to `sink` only after
//! those copies completed. Staging returns, ending the math-stop, once every
//! block is full, so once every device copy has completed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::model::DeviceSource;
use crate::save::pool::StagingPool;

/// Where one staged tensor's bytes come from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// Host memory, copied by the staging threads.
    Host(&'a [u8]),
    /// GPU memory, copied by a [`DeviceCopy`].
    Device {
        /// The device range.
        src: DeviceSource<'a>,
        /// The tensor's name, for errors.
        tensor: &'a str,
    },
}

impl Source<'_> {
    /// Bytes to stage.
    pub(crate) fn len(&self) -> usize {
        match self {
            Source::Host(h) => h.len(),
            Source::Device { src, .. } => src.len(),
        }
    }

    fn is_device(&self) -> bool {
        matches!(self, Source::Device { .. })
    }
}

/// Copies from device memory into staging blocks (a CUDA device, with the
/// `cuda` feature).
pub(crate) trait DeviceCopy: Sync {
    /// Starts every copy, runs `during` while they are in flight, and
    /// returns once all of them have completed (never earlier, also on
    /// error).
    fn copy_block(
        &self,
        copies: &mut [(DeviceSource<'_>, &mut [u8])],
        during: &mut dyn FnMut(),
    ) -> Result<()>;
}

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
    /// Time the copy stood still waiting for blocks to come back from a
    /// running flush.
    pub waited: Duration,
    /// Blocks used.
    #[cfg_attr(not(test), allow(dead_code))]
    pub blocks: usize,
}

/// What one staging worker did: (block index, partial checksums) per
/// block filled, and its time spent waiting for blocks.
type WorkerResult = Result<(Vec<(usize, Vec<u32>)>, Duration)>;

fn plan(sources: &[Source<'_>], block_size: usize, chunk_size: usize) -> Vec<Vec<Op>> {
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

/// Copies `src` into `dst` (same length), returning its crc32c if
/// `checksum` (else 0).
fn copy_host(src: &[u8], dst: &mut [u8], checksum: bool) -> u32 {
    if !checksum {
        // Nothing reads these bytes back soon: past the caches.
        crate::save::ntcopy::stream_copy(dst, src);
        return 0;
    }
    let mut crc = 0u32;
    for (s, d) in src.chunks(HOT_SPAN).zip(dst.chunks_mut(HOT_SPAN)) {
        d.copy_from_slice(s);
        crc = crc32c::crc32c_append(crc, d);
    }
    crc
}

/// Fills one block; returns the crc32c of each op if `checksum`.
fn fill(
    block: &mut [u8],
    ops: &[Op],
    sources: &[Source<'_>],
    checksum: bool,
    gpu: Option<&dyn DeviceCopy>,
) -> Result<Vec<u32>> {
    if !ops.iter().any(|op| sources[op.tensor].is_device()) {
        return Ok(ops
            .iter()
            .map(|op| {
                let dst = &mut block[op.dst..op.dst + op.len];
                match sources[op.tensor] {
                    Source::Host(h) => copy_host(&h[op.src..op.src + op.len], dst, checksum),
                    Source::Device { .. } => 0,
                }
            })
            .collect());
    }
    let gpu = gpu.ok_or_else(|| {
        Error::Internal("a tensor in GPU memory but no CUDA device to copy it".into())
    })?;
    let mut crcs = vec![0u32; ops.len()];
    let mut names: Vec<&str> = Vec::new();
    {
        // The block's disjoint pieces: device ones go to the DMA engine,
        // host ones are copied here while it runs.
        let mut device = Vec::new();
        let mut host = Vec::new();
        let mut rest: &mut [u8] = block;
        let mut at = 0usize;
        for (i, op) in ops.iter().enumerate() {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(op.dst - at);
            let (dst, tail) = tail.split_at_mut(op.len);
            rest = tail;
            at = op.dst + op.len;
            match sources[op.tensor] {
                Source::Host(h) => host.push((i, &h[op.src..op.src + op.len], dst)),
                Source::Device { src, tensor } => {
                    let piece = src.range(op.src, op.len).ok_or_else(|| {
                        Error::Internal(format!(
                            "tensor `{tensor}`: piece {}..{} outside its {} device bytes",
                            op.src,
                            op.src + op.len,
                            src.len()
                        ))
                    })?;
                    if names.last() != Some(&tensor) {
                        names.push(tensor);
                    }
                    device.push((piece, dst));
                }
            }
        }
        gpu.copy_block(&mut device, &mut || {
            for (i, src, dst) in host.iter_mut() {
                crcs[*i] = copy_host(src, dst, checksum);
            }
        })
        .map_err(|e| {
            let why = match e {
                Error::Cuda(m) => m,
                other => other.to_string(),
            };
            Error::Cuda(format!(
                "copying tensor `{}` from the GPU: {why}",
                names.join("`, `")
            ))
        })?;
    }
    if checksum {
        // Device bytes are checksummed from the staged copy, now complete.
        for (i, op) in ops.iter().enumerate() {
            if sources[op.tensor].is_device() {
                crcs[i] = crc32c::crc32c(&block[op.dst..op.dst + op.len]);
            }
        }
    }
    Ok(crcs)
}

/// How many of a copy's workers may take blocks: an overlapped save's copy
/// runs with a few while the caller works, then with all of them once the
/// caller waits for it.
pub(crate) struct Gate {
    allowed: Mutex<usize>,
    raised: std::sync::Condvar,
}

impl Gate {
    /// Workers `0..n` may work.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            allowed: Mutex::new(n.max(1)),
            raised: std::sync::Condvar::new(),
        }
    }

    /// Workers `0..n` may work from now on.
    pub(crate) fn raise(&self, n: usize) {
        let mut a = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        *a = (*a).max(n);
        self.raised.notify_all();
    }

    /// Waits until `worker` may work (`true`) or the copy is `finished`
    /// without it (`false`).
    fn admit(&self, worker: usize, finished: &dyn Fn() -> bool) -> bool {
        let mut a = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if worker < *a {
                return true;
            }
            if finished() {
                return false;
            }
            a = self
                .raised
                .wait_timeout(a, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Copies `sources` into pool blocks with `threads` workers, calling
/// `sink(block_index, bytes)` for every filled block (from worker threads,
/// in any order), and returns the per-chunk checksums if `checksum` (else
/// empty tables: the flush checksums the staged copy). Device sources are
/// copied by `gpu`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage(
    pool: &StagingPool,
    sources: &[Source<'_>],
    chunk_size: u64,
    checksum: bool,
    threads: usize,
    block_timeout: Duration,
    gpu: Option<&dyn DeviceCopy>,
    rate: Option<u64>,
    gate: Option<&Gate>,
    sink: &(dyn Fn(usize, Bytes) + Sync),
) -> Result<Staged> {
    let block_size = pool.block_size();
    let started = std::time::Instant::now();
    let copied = std::sync::atomic::AtomicU64::new(0);
    let chunk = usize::try_from(chunk_size)
        .map_err(|_| Error::Internal("chunk size too large for this platform".into()))?;
    let plan = plan(sources, block_size, chunk);
    let next = Mutex::new(0usize);
    let failed = AtomicBool::new(false);
    // A worker waiting for its block's device copies sleeps; a second one
    // keeps the copy engine fed with the next block meanwhile.
    let threads = if sources.iter().any(Source::is_device) {
        threads.max(2)
    } else {
        threads
    };
    let threads = threads.clamp(1, plan.len().max(1));

    let finished = || {
        failed.load(Ordering::Relaxed)
            || *next.lock().unwrap_or_else(|e| e.into_inner()) >= plan.len()
    };
    let work = |worker: usize| -> WorkerResult {
        let mut done = Vec::new();
        let mut waited = Duration::ZERO;
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok((done, waited));
            }
            if let Some(g) = gate
                && !g.admit(worker, &finished)
            {
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
            let crcs = fill(block.as_mut_slice(), ops, sources, checksum, gpu)?;
            let used = ops.last().map(|o| o.dst + o.len).unwrap_or(0);
            sink(k, block.freeze(used));
            done.push((k, crcs));
            // A bandwidth cap: no faster than `rate` bytes/s on average.
            if let Some(rate) = rate {
                let total = copied.fetch_add(used as u64, Ordering::Relaxed) + used as u64;
                let due = Duration::from_secs_f64(total as f64 / rate as f64);
                if let Some(rest) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
    };

    let results: Vec<WorkerResult> = if threads == 1 {
        vec![work(0)]
    } else {
        std::thread::scope(|s| {
            let work = &work;
            let failed = &failed;
            let handles: Vec<_> = (0..threads)
                .map(|worker| {
                    s.spawn(move || {
                        let r = work(worker);
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
                        Err(Error::Internal("a staging thread panicked".into()))
                    })
                })
                .collect()
        })
    };

    let mut per_block: Vec<Option<Vec<u32>>> = vec![None; plan.len()];
    let mut waited = Duration::ZERO;
    for r in results {
        let (done, w) = r?;
        // Blocks are taken one at a time (under `next`), so the workers'
        // waits never overlap: their sum is the time the copy stood still.
        waited += w;
        for (k, crcs) in done {
            per_block[k] = Some(crcs);
        }
    }

    if !checksum {
        return Ok(Staged {
            crcs: Vec::new(),
            waited,
            blocks: plan.len(),
        });
    }
    // Combine the partial checksums of chunks split across blocks, in
    // stream order.
    let mut crcs: Vec<Vec<u32>> = sources
        .iter()
        .map(|s| Vec::with_capacity(s.len().div_ceil(chunk)))
        .collect();
    for (ops, partial) in plan.iter().zip(per_block) {
        let partial =
            partial.ok_or_else(|| Error::Internal("a staging block was not filled".into()))?;
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
    use crate::format::checksum::chunk_crcs;

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
            &sources.iter().map(|s| Source::Host(s)).collect::<Vec<_>>(),
            4096 + 512,
            true,
            2,
            Duration::from_secs(5),
            None,
            None,
            None,
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
            &[Source::Host(&data)],
            4096,
            true,
            2,
            Duration::from_secs(5),
            None,
            None,
            None,
            &|_, bytes| {
                // Dropping immediately returns the block, as a finished flush would.
                *total.lock().expect("lock") += bytes.len();
            },
        )
        .expect("stage");
        assert_eq!(*total.lock().expect("lock"), 40_000);
        assert_eq!(staged.blocks, 10);
    }

    /// A "device" whose memory is host memory: drives the device path of
    /// staging (split blocks, copies in flight during host copies,
    /// checksums of the staged copy) without a GPU.
    struct HostAsDevice {
        fail: bool,
    }

    impl DeviceCopy for HostAsDevice {
        fn copy_block(
            &self,
            copies: &mut [(DeviceSource<'_>, &mut [u8])],
            during: &mut dyn FnMut(),
        ) -> Result<()> {
            during();
            if self.fail {
                return Err(Error::Cuda(
                    "device 0: cuMemcpyDtoHAsync failed: CUDA_ERROR_ILLEGAL_ADDRESS".into(),
                ));
            }
            for (src, dst) in copies.iter_mut() {
                // SAFETY: every source in these tests comes from
                // `fake_device` over a host slice that outlives `stage`.
                let s = unsafe { std::slice::from_raw_parts(src.ptr() as *const u8, src.len()) };
                dst.copy_from_slice(s);
            }
            Ok(())
        }
    }

    fn fake_device<'a>(data: &'a [u8], tensor: &'a str) -> Source<'a> {
        Source::Device {
            // SAFETY: read only by `HostAsDevice`, as host memory borrowed
            // for 'a.
            src: unsafe { DeviceSource::from_raw(data.as_ptr() as u64, data.len()) },
            tensor,
        }
    }

    #[test]
    fn device_and_host_sources_stage_into_one_stream() {
        let a: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let b: Vec<u8> = (0..5_555u32).map(|i| (i % 13) as u8).collect();
        let c: Vec<u8> = (0..9_999u32).map(|i| (i * 3 % 101) as u8).collect();
        let d: Vec<u8> = vec![9u8; 3];
        let sources = [
            fake_device(&a, "a"),
            Source::Host(&b),
            fake_device(&[], "empty"),
            fake_device(&c, "c"),
            Source::Host(&d),
        ];
        let want: Vec<u8> = [&a[..], &b, &c, &d].concat();
        for checksum in [false, true] {
            // A pool smaller than the state: blocks stream through.
            let pool = StagingPool::new(3 * 4096, 4096).expect("pool");
            let got = Mutex::new(Vec::new());
            let staged = stage(
                &pool,
                &sources,
                4096 + 512,
                checksum,
                1,
                Duration::from_secs(5),
                Some(&HostAsDevice { fail: false }),
                None,
                None,
                &|k, bytes| got.lock().expect("lock").push((k, bytes.to_vec())),
            )
            .expect("stage");
            let mut got = got.into_inner().expect("lock");
            got.sort_by_key(|(k, _)| *k);
            let stream: Vec<u8> = got.into_iter().flat_map(|(_, b)| b).collect();
            assert_eq!(stream, want, "checksum while staging: {checksum}");
            if checksum {
                for (s, crcs) in [&a[..], &b, &[], &c, &d].iter().zip(&staged.crcs) {
                    assert_eq!(*crcs, chunk_crcs(s, 4096 + 512));
                }
            } else {
                assert!(staged.crcs.is_empty());
            }
        }
    }

    #[test]
    fn device_copy_errors_name_the_tensor() {
        let a = vec![1u8; 10_000];
        let pool = StagingPool::new(4 * 4096, 4096).expect("pool");
        let err = stage(
            &pool,
            &[fake_device(&a, "layers.0.w")],
            4096,
            false,
            2,
            Duration::from_secs(5),
            Some(&HostAsDevice { fail: true }),
            None,
            None,
            &|_, _| {},
        )
        .expect_err("fails");
        let msg = err.to_string();
        assert!(msg.contains("`layers.0.w`"), "{msg}");
        assert!(msg.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{msg}");
        assert!(pool.wait_idle(Duration::from_secs(5)), "blocks come back");
    }

    #[test]
    fn device_sources_without_a_device_are_refused() {
        let a = vec![1u8; 100];
        let pool = StagingPool::new(4096, 4096).expect("pool");
        let r = stage(
            &pool,
            &[fake_device(&a, "w")],
            4096,
            false,
            1,
            Duration::from_secs(5),
            None,
            None,
            None,
            &|_, _| {},
        );
        assert!(r.is_err());
    }
}
