//! Physical floors measured in the same run as the figures they bound:
//! memcpy bandwidth (staging cannot beat it), device-to-host copy bandwidth
//! (staging from a GPU cannot beat it) and raw sequential write/read
//! bandwidth of the same directory (flush and restore cannot beat them).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A copy destination as good as the staging pool's: anonymous memory,
/// advised for transparent huge pages (fewer TLB misses), every page touched
/// before timing. A plain `Vec` gets 4 KiB pages where THP is `madvise`-only
/// and would make the floor slower than what ckpt itself achieves.
type Scratch = memmap2::MmapMut;

fn scratch(len: usize) -> std::io::Result<Scratch> {
    let mut map = memmap2::MmapMut::map_anon(len.max(1))?;
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    map.iter_mut().step_by(4096).for_each(|b| *b = 1);
    Ok(map)
}

/// Time to copy every tensor into one reused, pre-touched buffer on one
/// thread (the plain `memcpy` floor).
pub fn memcpy(tensors: &[Vec<u8>]) -> std::io::Result<Duration> {
    let largest = tensors.iter().map(Vec::len).max().unwrap_or(0);
    let mut dst = scratch(largest)?;
    let t = Instant::now();
    for src in tensors {
        dst[..src.len()].copy_from_slice(src);
        std::hint::black_box(&mut dst);
    }
    Ok(t.elapsed())
}

/// The same with `threads` threads, each copying its share into its own
/// reused buffer: the floor for a parallel copy on this machine.
pub fn memcpy_parallel(tensors: &[Vec<u8>], threads: usize) -> std::io::Result<Duration> {
    let total: usize = tensors.iter().map(Vec::len).sum();
    let share = total.div_ceil(threads.max(1));
    let mut parts: Vec<Vec<&[u8]>> = vec![Vec::new(); threads.max(1)];
    let (mut i, mut filled) = (0usize, 0usize);
    for t in tensors {
        for piece in t.chunks(share.max(1)) {
            if filled >= share && i + 1 < parts.len() {
                i += 1;
                filled = 0;
            }
            parts[i].push(piece);
            filled += piece.len();
        }
    }
    let mut bufs: Vec<Scratch> = parts
        .iter()
        .map(|p| scratch(p.iter().map(|s| s.len()).max().unwrap_or(0)))
        .collect::<std::io::Result<_>>()?;
    let t = Instant::now();
    std::thread::scope(|s| {
        for (p, b) in parts.iter().zip(bufs.iter_mut()) {
            s.spawn(move || {
                for src in p {
                    b[..src.len()].copy_from_slice(src);
                    std::hint::black_box(&mut *b);
                }
            });
        }
    });
    Ok(t.elapsed())
}

/// Writes `tensors` back to back into a new file in `dir` with large
/// writes, then fsyncs: the raw write floor. Returns the time and leaves no
/// file behind.
pub fn raw_write(dir: &Path, tensors: &[Vec<u8>]) -> std::io::Result<Duration> {
    let path = dir.join(".raw-write-floor");
    let t = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    for src in tensors {
        for piece in src.chunks(8 << 20) {
            f.write_all(piece)?;
        }
    }
    f.sync_all()?;
    let d = t.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(d)
}

/// Writes as many bytes as `tensors` hold into a new file in `dir` with
/// `O_DIRECT`, `in_flight` writes of 8 MiB at once, then fsyncs: what the
/// device takes with no CPU work in the way. The writes come from one
/// aligned copy of the tensors on huge pages (as the staging pool's),
/// made before the clock starts, so no copy is timed and every write
/// carries different bytes, as a checkpoint's do. `None` if the file
/// system refuses `O_DIRECT`; no file is left behind.
pub fn raw_write_direct(dir: &Path, tensors: &[Vec<u8>], in_flight: usize) -> Option<Duration> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    let path = dir.join(".raw-write-floor-direct");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .ok()?;
    let unit: u64 = 8 << 20;
    let total: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let total = total.div_ceil(4096) * 4096;
    let mut all = scratch(total as usize).ok()?;
    let mut at = 0;
    for t in tensors {
        all[at..at + t.len()].copy_from_slice(t);
        at += t.len();
    }
    let all = &all[..];
    let next = AtomicU64::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..in_flight.max(1) {
            let (f, next, failed) = (&f, &next, &failed);
            s.spawn(move || {
                loop {
                    let at = next.fetch_add(unit, Ordering::Relaxed);
                    if at >= total || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let n = unit.min(total - at) as usize;
                    let from = at as usize;
                    if f.write_all_at(&all[from..from + n], at).is_err() {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    let ok = !failed.load(Ordering::Relaxed) && f.sync_all().is_ok();
    let d = t.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    ok.then_some(d)
}

/// Drops `path` from the page cache so the next read is cold.
pub fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = File::open(path) {
        let _ = f.sync_all();
        // SAFETY: posix_fadvise only reads its integer arguments; the file
        // descriptor is open for the duration of the call.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Cold sequential read of a whole file in 8 MiB reads: the raw read floor.
pub fn raw_read(path: &Path) -> std::io::Result<(Duration, u64)> {
    evict(path);
    let mut buf = vec![0u8; 8 << 20];
    let t = Instant::now();
    let mut f = File::open(path)?;
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((t.elapsed(), total))
}

/// Cold read of a whole file by `threads` threads, each issuing `unit`-byte
/// positioned reads: the floor for a restore that reads the same way.
pub fn raw_read_parallel(path: &Path, threads: usize, unit: usize) -> std::io::Result<Duration> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    evict(path);
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| -> std::io::Result<()> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    let mut buf = vec![0u8; unit];
                    loop {
                        let off = next.fetch_add(unit as u64, Ordering::Relaxed);
                        if off >= len {
                            return Ok(());
                        }
                        let n = (len - off).min(unit as u64) as usize;
                        f.read_exact_at(&mut buf[..n], off)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| std::io::Error::other("reader panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed())
}

/// Time to copy every device buffer, back to back on the device's copy
/// stream, into consecutive ranges of `dst` (of their total size), up to
/// the completion of the last copy. Into a registered (pinned) `dst` this is
/// the floor of staging from the GPU; into pageable memory, the reference
/// without registration.
#[cfg(feature = "cuda")]
pub fn d2h(
    device: &ckpt_core::cuda::CudaDevice,
    bufs: &[ckpt_core::cuda::DeviceBuffer],
    dst: &mut [u8],
) -> ckpt_core::Result<Duration> {
    let mut copies = Vec::with_capacity(bufs.len());
    let mut rest = dst;
    for b in bufs {
        let n = b.len().min(rest.len());
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        copies.push((b.source(), head));
        rest = tail;
    }
    let t = Instant::now();
    device.copy_to_host(&mut copies)?;
    Ok(t.elapsed())
}

/// Cold read of a whole file with `O_DIRECT` (no page cache) by `threads`
/// threads, each issuing `unit`-byte positioned reads into its own aligned
/// buffer; `None` if the file system refuses `O_DIRECT`.
pub fn raw_read_direct(path: &Path, threads: usize, unit: usize) -> Option<Duration> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    evict(path);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let len = f.metadata().ok()?.len();
    let next = AtomicU64::new(0);
    // Buffers are allocated and faulted in before the clock starts.
    let bufs: Vec<Scratch> = (0..threads.max(1))
        .map(|_| scratch(unit))
        .collect::<std::io::Result<_>>()
        .ok()?;
    let t = Instant::now();
    let ok = std::thread::scope(|s| {
        let workers: Vec<_> = bufs
            .into_iter()
            .map(|mut buf| {
                let (f, next) = (&f, &next);
                s.spawn(move || -> std::io::Result<()> {
                    loop {
                        let off = next.fetch_add(unit as u64, Ordering::Relaxed);
                        if off >= len {
                            return Ok(());
                        }
                        // Whole aligned units; the last one reads short at
                        // the end of the file.
                        let mut at = 0;
                        while at < unit {
                            match f.read_at(&mut buf[at..], off + at as u64)? {
                                0 => break,
                                n => at += n,
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .all(|w| w.join().is_ok_and(|r| r.is_ok()))
    });
    ok.then(|| t.elapsed())
}

/// Median of a sample.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
