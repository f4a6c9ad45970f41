//! The read pool of a restore: every target of one checkpoint on one tier
//! is checked against the verified manifest, cut into read units (whole
//! saved pieces straight into the caller's buffer, in 8 MiB units in file
//! order; resharded targets through the planner), and read by reader
//! threads while verifier threads check every chunk.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::format::checksum::verify_chunks;
use crate::format::manifest::{Manifest, Piece, Span};
use crate::model::{ShardSpec, TensorViewMut, checked_nbytes};
use crate::restore::block_on;
use crate::restore::reshard::plan_runs;
use crate::store;
use crate::sync::lock;
use crate::tier::Tier;

/// Bytes per parallel read of a large tensor (rounded up to a multiple of
/// the chunk size). Small enough that the reads in flight at any moment are
/// neighbours in the file: together they form one forward sequential stream,
/// which storage (and a virtual disk's host-side readahead) serves far better
/// than several streams far apart.
const READ_UNIT: u64 = 8 << 20;

enum Unit<'a> {
    Direct {
        /// Where the bytes are: one span for a contiguous piece.
        spans: Vec<Span>,
        buf: &'a mut [u8],
        crcs: &'a [u32],
    },
    Scatter {
        name: String,
        buf: &'a mut [u8],
        region: ShardSpec,
        global_shape: Vec<u64>,
        pieces: Vec<&'a Piece>,
        elem: u64,
    },
}

/// Reads every target from the checkpoint `m` on `tier`, verifying every
/// chunk it reads. Returns the bytes read.
pub(crate) fn read_targets(
    handle: &tokio::runtime::Handle,
    tier: &dyn Tier,
    m: &Manifest,
    targets: &mut [&mut dyn TensorViewMut],
    threads: usize,
) -> Result<u64> {
    // Every target is checked before storage or the caller's memory is
    // touched.
    let regions = regions(m, targets)?;
    // Only the files holding pieces these targets need: a rank restores its
    // shard even when another rank's file is gone from this tier.
    let mut needed = std::collections::BTreeSet::new();
    for (t, region) in targets.iter().zip(&regions) {
        for p in &m.tensors[t.name()].pieces {
            if p.shard(&region.global_shape).intersect(region).is_some() {
                needed.insert(p.rank);
            }
        }
    }
    block_on(
        handle,
        store::check_rank_files(tier, m, |r| needed.contains(&r)),
    )?;
    let units = units(m, targets, regions)?;
    read_pool(handle, tier, m, units, threads)
}

/// The part of its global tensor each target asks for, after checking it
/// against the (verified) manifest: a mismatch is the caller's error.
fn regions(m: &Manifest, targets: &[&mut dyn TensorViewMut]) -> Result<Vec<ShardSpec>> {
    targets
        .iter()
        .map(|t| {
            let name = t.name();
            let entry = m.tensors.get(name).ok_or_else(|| {
                Error::tensor(
                    name,
                    format!("not in checkpoint step {} of run {}", m.step, m.run),
                )
            })?;
            if entry.dtype != t.dtype() {
                return Err(Error::tensor(
                    name,
                    format!(
                        "checkpoint holds {}, the buffer is {}",
                        entry.dtype,
                        t.dtype()
                    ),
                ));
            }
            let Some(s) = t.shard() else {
                if t.shape() != entry.shape.as_slice() {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "checkpoint shape {:?}, buffer shape {:?}",
                            entry.shape,
                            t.shape()
                        ),
                    ));
                }
                return Ok(ShardSpec::full(entry.shape.clone()));
            };
            s.validate()
                .map_err(|e| Error::tensor(name, e.to_string()))?;
            if s.global_shape != entry.shape {
                return Err(Error::tensor(
                    name,
                    format!(
                        "shard of global shape {:?}, checkpoint has {:?}",
                        s.global_shape, entry.shape
                    ),
                ));
            }
            if s.shape != t.shape() {
                return Err(Error::tensor(
                    name,
                    format!("shard shape {:?} but buffer shape {:?}", s.shape, t.shape()),
                ));
            }
            Ok(s.clone())
        })
        .collect()
}

/// Cuts the targets into read units: a target equal to a saved piece is
/// read straight into its buffer in `READ_UNIT`s, others go through the
/// resharding planner. Sorted for the pool: direct reads in file order (so
/// the reads in flight move forward through the file together), scattered
/// ones after them, reversed because workers pop from the end.
fn units<'a>(
    m: &'a Manifest,
    targets: &'a mut [&mut dyn TensorViewMut],
    regions: Vec<ShardSpec>,
) -> Result<Vec<Unit<'a>>> {
    let mut units: Vec<Unit<'a>> = Vec::new();
    for (t, region) in targets.iter_mut().zip(regions) {
        let name = t.name().to_string();
        let entry = &m.tensors[&name];
        let want = checked_nbytes(&region.shape, entry.dtype)
            .ok_or_else(|| Error::tensor(&name, "size overflows"))?;
        let buf = t.bytes_mut();
        if buf.len() as u64 != want {
            return Err(Error::tensor(
                &name,
                format!("buffer holds {} bytes, {want} needed", buf.len()),
            ));
        }
        let exact = entry
            .pieces
            .iter()
            .find(|p| p.global_offsets == region.offsets && p.shape == region.shape);
        if let Some(p) = exact {
            let unit = READ_UNIT.max(m.chunk_size) / m.chunk_size * m.chunk_size;
            for (i, part) in buf.chunks_mut(unit as usize).enumerate() {
                let rel = i as u64 * unit;
                let spans = p.spans(&m.run, m.step, m.chunk_size, rel, rel + part.len() as u64);
                units.push(Unit::Direct {
                    spans,
                    buf: part,
                    crcs: &p.crc32c,
                });
            }
            continue;
        }
        let pieces: Vec<&Piece> = entry
            .pieces
            .iter()
            .filter(|p| p.shard(&entry.shape).intersect(&region).is_some())
            .collect();
        units.push(Unit::Scatter {
            name,
            buf,
            region,
            global_shape: entry.shape.clone(),
            pieces,
            elem: entry.dtype.size() as u64,
        });
    }
    units.sort_by(|a, b| match (a, b) {
        (Unit::Direct { spans: sa, .. }, Unit::Direct { spans: sb, .. }) => {
            let key = |s: &[Span]| s.first().map(|s| (s.path.clone(), s.offset));
            key(sa).cmp(&key(sb))
        }
        (Unit::Direct { .. }, Unit::Scatter { .. }) => std::cmp::Ordering::Less,
        (Unit::Scatter { .. }, Unit::Direct { .. }) => std::cmp::Ordering::Greater,
        (Unit::Scatter { buf: x, .. }, Unit::Scatter { buf: y, .. }) => y.len().cmp(&x.len()),
    });
    units.reverse();
    Ok(units)
}

/// Reads `units` with `threads` readers, which only read, so that many
/// reads stay in flight at all times; verification runs on verifier
/// threads, overlapping the next reads instead of stalling them (a reader
/// that verified its own buffer would leave the device idle for the length
/// of every crc pass). Stops at the first error. Returns the bytes read.
fn read_pool<'a>(
    handle: &tokio::runtime::Handle,
    tier: &dyn Tier,
    m: &Manifest,
    units: Vec<Unit<'a>>,
    threads: usize,
) -> Result<u64> {
    let queue = Mutex::new(units);
    let total = Mutex::new(0u64);
    let threads = threads.clamp(1, 64);
    let chunk_size = m.chunk_size;
    let verifiers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16);
    let (verify_tx, verify_rx) = std::sync::mpsc::channel::<Verify<'a>>();
    let verify_rx = Mutex::new(verify_rx);
    let failed = AtomicBool::new(false);
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        Err(e)
    };
    // Aligned buffers for tiers whose reads are zero-copy only into
    // aligned memory: one per reader and verifier, so readers block (and
    // stop reading ahead) when the verifiers fall behind.
    let align = tier.capabilities().read_alignment;
    let bounces = (align.is_power_of_two() && align > 1).then(|| {
        let unit = READ_UNIT.max(chunk_size) / chunk_size * chunk_size;
        BouncePool::new(threads + verifiers, unit as usize, align)
    });
    let verifier = || -> Result<()> {
        loop {
            let Ok(v) = lock(&verify_rx).recv() else {
                return Ok(());
            };
            let r = match v {
                Verify::InPlace { spans, buf, crcs } => verify_spans(&spans, buf, chunk_size, crcs),
                Verify::Bounced(mut job) => {
                    let r = job.copy_out(chunk_size);
                    if let Some(pool) = &bounces {
                        pool.put(job.bounce);
                    }
                    r
                }
            };
            if let Err(e) = r {
                return fail(e);
            }
        }
    };
    let reader = |verify_tx: std::sync::mpsc::Sender<Verify<'a>>| -> Result<()> {
        while !failed.load(Ordering::Relaxed) {
            let Some(unit) = lock(&queue).pop() else {
                return Ok(());
            };
            let (n, verify) = match handle.block_on(run_unit(
                tier,
                &m.run,
                m.step,
                unit,
                chunk_size,
                bounces.as_ref(),
                &failed,
            )) {
                Ok(x) => x,
                Err(e) => return fail(e),
            };
            *lock(&total) += n;
            // The verifiers outlive every reader, so the send only fails if
            // one of them failed already.
            if let Some(v) = verify
                && verify_tx.send(v).is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let mut workers: Vec<_> = (0..verifiers).map(|_| s.spawn(verifier)).collect();
        for _ in 0..threads {
            let tx = verify_tx.clone();
            workers.push(s.spawn(|| reader(tx)));
        }
        drop(verify_tx);
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a restore thread panicked".into())))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(*lock(&total))
}

/// How to read `span` into `buf` through one of `pool`'s aligned buffers:
/// (aligned file offset to read from, bytes before the span's first byte,
/// bytes at the end read straight into `buf`). `None` when the read is
/// zero-copy as it is (an aligned caller buffer) or too small to gain.
fn bounce_plan(span: &Span, buf: &[u8], pool: &BouncePool) -> Option<(u64, usize, usize)> {
    let a = pool.align as u64;
    let len = buf.len() as u64;
    let zero_copy = (buf.as_ptr() as u64).is_multiple_of(a)
        && span.offset.is_multiple_of(a)
        && len.is_multiple_of(a);
    let start = span.offset / a * a;
    let end = (span.offset + len) / a * a;
    if zero_copy || end <= span.offset || (end - start) as usize > pool.len {
        return None;
    }
    Some((
        start,
        (span.offset - start) as usize,
        (span.offset + len - end) as usize,
    ))
}

/// A buffer read but not yet verified.
enum Verify<'a> {
    /// Read in place: check it.
    InPlace {
        spans: Vec<Span>,
        buf: &'a mut [u8],
        crcs: &'a [u32],
    },
    /// Read into an aligned buffer: check and copy out.
    Bounced(Bounced<'a>),
}

/// Bytes to copy within [`copy_out`](Bounced::copy_out): checked against
/// their crc while in cache, then streamed to the caller's buffer.
const COPY_SPAN: usize = 256 << 10;

/// One span read into an aligned buffer: `bounce[skip..]` holds the first
/// `buf.len() - tail` bytes of the span; the last `tail` bytes were read
/// straight into `buf` (less than one alignment unit).
struct Bounced<'a> {
    span: Span,
    bounce: Bounce,
    skip: usize,
    tail: usize,
    buf: &'a mut [u8],
    crcs: &'a [u32],
}

impl Bounced<'_> {
    /// Verifies every chunk of the span (crc32c of the bytes read, taken
    /// from the aligned buffer while each piece is in cache) and copies
    /// them into the caller's buffer.
    fn copy_out(&mut self, chunk_size: u64) -> Result<()> {
        let len = self.buf.len();
        let head = len - self.tail;
        let src = &self.bounce.as_slice()[self.skip..self.skip + head];
        let chunk = chunk_size.max(1) as usize;
        let mut index = self.span.first_chunk;
        let mut at = 0usize;
        while at < len {
            let end = (at + chunk).min(len);
            let mut crc = 0u32;
            let mut pos = at;
            while pos < end {
                if pos < head {
                    let stop = (pos + COPY_SPAN).min(end).min(head);
                    let piece = &src[pos..stop];
                    crc = crc32c::crc32c_append(crc, piece);
                    crate::save::ntcopy::stream_copy(&mut self.buf[pos..stop], piece);
                    pos = stop;
                } else {
                    crc = crc32c::crc32c_append(crc, &self.buf[pos..end]);
                    pos = end;
                }
            }
            let want = self.crcs.get(index).copied();
            if want != Some(crc) {
                return Err(Error::Corrupt {
                    path: self.span.path.clone(),
                    chunk: index,
                    expected: want.unwrap_or(0),
                    found: crc,
                });
            }
            at = end;
            index += 1;
        }
        Ok(())
    }
}

/// Size of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// An aligned read buffer on transparent huge pages where the kernel allows
/// (a direct read's DMA list has a segment per physically contiguous run,
/// and virtual disks cap the segments per request).
struct Bounce {
    map: memmap2::MmapMut,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize) -> Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(len + HUGE_PAGE)
            .map_err(|e| Error::io("<restore read buffer>", e))?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let start = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        // Fault it in now, not inside the first read.
        map.iter_mut().step_by(4096).for_each(|b| *b = 0);
        Ok(Self { map, start, len })
    }

    fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }
}

/// The aligned buffers of one restore, made when first needed (a restore
/// of small or aligned buffers makes none).
struct BouncePool {
    /// Free buffers, and how many exist.
    free: Mutex<(Vec<Bounce>, usize)>,
    returned: std::sync::Condvar,
    /// Most buffers.
    max: usize,
    /// Bytes each buffer holds: a read unit plus one alignment unit (a span
    /// rarely starts on an aligned offset).
    len: usize,
    align: usize,
}

impl BouncePool {
    fn new(max: usize, unit: usize, align: usize) -> Self {
        Self {
            free: Mutex::new((Vec::new(), 0)),
            returned: std::sync::Condvar::new(),
            max: max.max(1),
            len: unit + align,
            align,
        }
    }

    /// A free buffer (a new one while fewer than `max` exist), or `None`
    /// once the restore has `failed`.
    fn take(&self, failed: &AtomicBool) -> Result<Option<Bounce>> {
        let mut free = lock(&self.free);
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if let Some(b) = free.0.pop() {
                return Ok(Some(b));
            }
            if free.1 < self.max {
                free.1 += 1;
                drop(free);
                return Bounce::new(self.len).map(Some).inspect_err(|_| {
                    lock(&self.free).1 -= 1;
                });
            }
            free = self
                .returned
                .wait_timeout(free, std::time::Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn put(&self, b: Bounce) {
        lock(&self.free).0.push(b);
        self.returned.notify_one();
    }
}

/// Reads `spans` (of one piece, in order, starting at the first span's
/// piece offset) into `buf`, back to back.
pub(crate) async fn read_spans(tier: &dyn Tier, spans: &[Span], buf: &mut [u8]) -> Result<()> {
    for s in spans {
        let dst = buf
            .get_mut(span_range(spans, s))
            .ok_or_else(|| outside(s))?;
        read_span_into(tier, s, dst).await?;
    }
    Ok(())
}

/// Where span `s` of `spans` lies in a buffer that starts at the first
/// span's piece offset.
fn span_range(spans: &[Span], s: &Span) -> std::ops::Range<usize> {
    let base = spans.first().map_or(0, |f| f.piece_offset);
    let at = (s.piece_offset - base) as usize;
    at..at + s.len as usize
}

fn outside(s: &Span) -> Error {
    Error::Internal(format!("span of {} outside its buffer", s.path))
}

/// Reads one span into `dst` (`s.len` bytes): straight from the file, or,
/// for a compressed chunk, its frame decoded into `dst` (never more than
/// `dst` holds: a frame claiming more is refused before it can grow) and
/// its byte planes put back.
pub(crate) async fn read_span_into(tier: &dyn Tier, s: &Span, dst: &mut [u8]) -> Result<()> {
    let Some((stored, planes)) = s.zstd else {
        return tier.read_into(&s.path, s.offset, dst).await;
    };
    let frame = tier.get_range(&s.path, s.offset..s.offset + stored).await?;
    let bad = |why: String| Error::Incomplete {
        path: s.path.clone(),
        reason: format!("chunk {}: {why}", s.first_chunk),
    };
    let mut plain = vec![0u8; dst.len()];
    let n = zstd::bulk::decompress_to_buffer(&frame, &mut plain).map_err(|e| {
        bad(format!(
            "zstd frame of {stored} bytes does not decode into {} bytes: {e}",
            dst.len()
        ))
    })?;
    if n != dst.len() {
        return Err(bad(format!(
            "zstd frame decodes to {n} bytes, the chunk has {}",
            dst.len()
        )));
    }
    match planes {
        2 | 4 | 8 => crate::save::incremental::from_planes(&plain, planes as usize, dst),
        _ => dst.copy_from_slice(&plain),
    }
    Ok(())
}

/// Verifies `buf` (read by [`read_spans`]) chunk by chunk, naming the file
/// each chunk came from.
pub(crate) fn verify_spans(
    spans: &[Span],
    buf: &[u8],
    chunk_size: u64,
    crcs: &[u32],
) -> Result<()> {
    for s in spans {
        let data = buf.get(span_range(spans, s)).ok_or_else(|| outside(s))?;
        verify_chunks(&s.path, data, chunk_size, s.first_chunk, crcs)?;
    }
    Ok(())
}

/// Reads one unit. A direct read is returned for verification by the
/// caller's verifier threads; a scattered one is verified here, before its
/// pieces are copied out of the scratch buffer.
#[allow(clippy::too_many_arguments)]
async fn run_unit<'a>(
    tier: &dyn Tier,
    run: &str,
    step: u64,
    unit: Unit<'a>,
    chunk_size: u64,
    bounces: Option<&BouncePool>,
    failed: &AtomicBool,
) -> Result<(u64, Option<Verify<'a>>)> {
    match unit {
        Unit::Direct { spans, buf, crcs } => {
            let n = buf.len() as u64;
            if let (Some(pool), [span]) = (bounces, spans.as_slice())
                && span.zstd.is_none()
                && let Some((start, skip, tail)) = bounce_plan(span, buf, pool)
            {
                // Straight into an aligned buffer of ours (zero-copy on the
                // tier's side); the verifier copies it out.
                let Some(mut bounce) = pool.take(failed)? else {
                    return Ok((0, None));
                };
                let head = buf.len() - tail;
                let read = async {
                    let aligned = &mut bounce.as_mut_slice()[..skip + head];
                    tier.read_into(&span.path, start, aligned).await?;
                    if tail > 0 {
                        let off = span.offset + head as u64;
                        tier.read_into(&span.path, off, &mut buf[head..]).await?;
                    }
                    Ok::<_, Error>(())
                };
                if let Err(e) = read.await {
                    pool.put(bounce);
                    return Err(e);
                }
                let job = Bounced {
                    span: span.clone(),
                    bounce,
                    skip,
                    tail,
                    buf,
                    crcs,
                };
                return Ok((n, Some(Verify::Bounced(job))));
            }
            read_spans(tier, &spans, buf).await?;
            Ok((n, Some(Verify::InPlace { spans, buf, crcs })))
        }
        Unit::Scatter {
            name,
            buf,
            region,
            global_shape,
            pieces,
            elem,
        } => {
            let mut read = 0u64;
            for p in pieces {
                let runs = plan_runs(&p.shard(&global_shape), &region);
                let (Some(lo), Some(hi)) = (
                    runs.iter().map(|r| r.src * elem).min(),
                    runs.iter().map(|r| (r.src + r.len) * elem).max(),
                ) else {
                    continue;
                };
                let c0 = lo / chunk_size;
                let start = c0 * chunk_size;
                let end = (hi.div_ceil(chunk_size) * chunk_size).min(p.length);
                let mut scratch = vec![0u8; (end - start) as usize];
                let spans = p.spans(run, step, chunk_size, start, end);
                read_spans(tier, &spans, &mut scratch).await?;
                verify_spans(&spans, &scratch, chunk_size, &p.crc32c)?;
                read += scratch.len() as u64;
                for r in runs {
                    let s = (r.src * elem - start) as usize;
                    let d = (r.dst * elem) as usize;
                    let n = (r.len * elem) as usize;
                    let (Some(src), Some(dst)) = (scratch.get(s..s + n), buf.get_mut(d..d + n))
                    else {
                        return Err(Error::tensor(&name, "resharding plan out of bounds"));
                    };
                    dst.copy_from_slice(src);
                }
            }
            Ok((read, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::PutMode;
    use crate::tier::memory::MemoryTier;
    use bytes::Bytes;

    fn span(stored: u64, len: u64) -> Span {
        Span {
            path: "r/f".into(),
            offset: 0,
            len,
            first_chunk: 3,
            piece_offset: 0,
            zstd: Some((stored, 1)),
        }
    }

    #[test]
    fn frames_that_claim_more_or_less_than_their_chunk_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let tier = MemoryTier::new();
        // 64 MiB of zeros in a frame of a few KiB: decoding is bounded by
        // the chunk's length, never by what the frame claims.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).expect("compress");
        let stored = bomb.len() as u64;
        rt.block_on(tier.put("r/f", Bytes::from(bomb), PutMode::Overwrite))
            .expect("put");
        let mut dst = vec![0u8; 4096];
        match rt.block_on(read_span_into(&tier, &span(stored, 4096), &mut dst)) {
            Err(Error::Incomplete { path, reason }) => {
                assert_eq!(path, "r/f");
                assert!(reason.contains("chunk 3"), "{reason}");
            }
            other => panic!("a bomb frame must be refused: {other:?}"),
        }
        // A frame shorter than its chunk.
        let short = zstd::bulk::compress(&[7u8; 1000], 1).expect("compress");
        let stored = short.len() as u64;
        rt.block_on(tier.put("r/f", Bytes::from(short), PutMode::Overwrite))
            .expect("put");
        let e = rt
            .block_on(read_span_into(&tier, &span(stored, 4096), &mut dst))
            .expect_err("short frame");
        assert!(e.to_string().contains("decodes to 1000 bytes"), "{e}");
        // A truncated frame.
        let whole = zstd::bulk::compress(&[9u8; 4096], 1).expect("compress");
        let cut = Bytes::copy_from_slice(&whole[..whole.len() - 3]);
        let stored = cut.len() as u64;
        rt.block_on(tier.put("r/f", cut, PutMode::Overwrite))
            .expect("put");
        let e = rt
            .block_on(read_span_into(&tier, &span(stored, 4096), &mut dst))
            .expect_err("truncated frame");
        assert!(e.is_data_fault(), "{e:?}");
    }
}
