//! Sequential writes that bypass the page cache (`O_DIRECT`), for the local
//! tier's streamed files.
//!
//! A checkpoint is written once and read back only after a failure: through
//! the page cache it costs the kernel a copy of every byte and evicts the
//! training job's own cached files (its data set) to make room. The staging
//! blocks a save streams are page-aligned and immutable, so they go to the
//! device as they are; whatever is not aligned (a shard header built in a
//! `Vec`, a zero-copy tensor, the end of a block) is gathered in an aligned
//! bounce buffer and written from there. The tail that does not fill a
//! whole 4 KiB page is written last, buffered, with `O_DIRECT` turned off on
//! the descriptor, so the file has exactly its true length. The caller then
//! `fdatasync`s and renames it into place as for a buffered file.
//!
//! File systems that refuse `O_DIRECT` (tmpfs on older kernels, some
//! network file systems), at open or at the first write, and a short
//! write that leaves the offset unaligned, turn the rest of the file into
//! plain buffered writes: same bytes, same result.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of `O_DIRECT` offsets, lengths and buffers.
pub(crate) const ALIGN: usize = 4096;

/// Size of the bounce buffer for unaligned input.
const BOUNCE: usize = 4 << 20;

/// Whether the fallback to buffered writes was logged (once a process).
static SAID_FALLBACK: AtomicBool = AtomicBool::new(false);

fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

fn say_fallback(path: &Path, why: &str) {
    if !SAID_FALLBACK.swap(true, Ordering::Relaxed) {
        tracing::info!(file = %path.display(), "O_DIRECT writes unavailable ({why}): checkpoint files are written through the page cache");
    }
}

/// Positioned writes, and turning `O_DIRECT` off: what [`DirectWriter`]
/// needs of a file (a trait so tests can make a device that writes short).
pub(crate) trait Sink {
    /// Writes some of `buf` at `offset`; returns how much.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Turns `O_DIRECT` off: later writes go through the page cache.
    fn set_buffered(&mut self) -> io::Result<()>;
}

impl Sink for File {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }

    fn set_buffered(&mut self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.as_raw_fd();
        // SAFETY: `fd` is this open file's descriptor for the whole call;
        // F_GETFL/F_SETFL only read and set its status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; clearing O_DIRECT is a valid F_SETFL argument.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Creates `path` (which must not exist) for writing, with `O_DIRECT` when
/// the file system allows it. Returns the file and whether it is direct.
pub(crate) fn create(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    if direct {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => return Ok((f, true)),
            Err(e) if refused(&e) => say_fallback(path, "refused at open"),
            Err(e) => return Err(e),
        }
    }
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    Ok((f, false))
}

/// A page-aligned buffer of [`BOUNCE`] bytes.
struct Bounce {
    map: memmap2::MmapMut,
    fill: usize,
}

/// Writes a file front to back, aligned parts with `O_DIRECT`.
pub(crate) struct DirectWriter<S: Sink> {
    sink: S,
    direct: bool,
    /// Whether any direct write succeeded (a refusal after that is an
    /// error, not a file system without `O_DIRECT`).
    wrote_direct: bool,
    /// Bytes handed to the sink so far (a multiple of [`ALIGN`] while
    /// `direct`).
    offset: u64,
    bounce: Option<Bounce>,
}

impl<S: Sink> DirectWriter<S> {
    /// A writer at the start of `sink`; `direct`: whether `sink` is open
    /// with `O_DIRECT`.
    pub(crate) fn new(sink: S, direct: bool) -> Self {
        Self {
            sink,
            direct,
            wrote_direct: false,
            offset: 0,
            bounce: None,
        }
    }

    /// Appends `data`.
    pub(crate) fn write(&mut self, path: &Path, mut data: &[u8]) -> io::Result<()> {
        if !self.direct {
            // Bytes gathered before the switch go first.
            self.flush_pages(path, true)?;
            return self.write_all(path, data);
        }
        while !data.is_empty() {
            let aligned = (data.as_ptr() as usize).is_multiple_of(ALIGN);
            let fill = self.bounce.as_ref().map_or(0, |b| b.fill);
            // Aligned input at an aligned point of the file: straight from
            // the caller's memory (the staging block), no copy.
            if aligned && fill.is_multiple_of(ALIGN) && data.len() >= ALIGN {
                self.flush_bounce(path)?;
                let n = data.len() / ALIGN * ALIGN;
                self.write_all(path, &data[..n])?;
                data = &data[n..];
                if !self.direct {
                    return self.write_all(path, data);
                }
                continue;
            }
            let b = match &mut self.bounce {
                Some(b) => b,
                None => self.bounce.insert(Bounce {
                    map: memmap2::MmapMut::map_anon(BOUNCE)?,
                    fill: 0,
                }),
            };
            let take = (BOUNCE - b.fill).min(data.len());
            b.map[b.fill..b.fill + take].copy_from_slice(&data[..take]);
            b.fill += take;
            data = &data[take..];
            if b.fill == BOUNCE {
                self.flush_bounce(path)?;
                if !self.direct {
                    return self.write_all(path, data);
                }
            }
        }
        Ok(())
    }

    /// Writes the bounce buffer's whole pages (all of it when `all`, with
    /// `O_DIRECT` turned off first if it does not end on a page).
    fn flush_pages(&mut self, path: &Path, all: bool) -> io::Result<()> {
        let Some(mut b) = self.bounce.take() else {
            return Ok(());
        };
        let n = if all { b.fill } else { b.fill / ALIGN * ALIGN };
        if n > 0 {
            if !n.is_multiple_of(ALIGN) && self.direct {
                self.go_buffered(path)?;
            }
            let r = self.write_all(path, &b.map[..n]);
            if r.is_err() {
                self.bounce = Some(b);
                return r;
            }
            b.map.copy_within(n..b.fill, 0);
            b.fill -= n;
        }
        self.bounce = Some(b);
        Ok(())
    }

    fn flush_bounce(&mut self, path: &Path) -> io::Result<()> {
        self.flush_pages(path, false)
    }

    /// Writes what is left (the unaligned tail through the page cache) and
    /// returns the sink, ready to be synced.
    pub(crate) fn finish(mut self, path: &Path) -> io::Result<S> {
        self.flush_pages(path, true)?;
        Ok(self.sink)
    }

    fn go_buffered(&mut self, path: &Path) -> io::Result<()> {
        if self.direct {
            self.sink.set_buffered()?;
            self.direct = false;
            tracing::debug!(file = %path.display(), offset = self.offset, "rest of the file buffered");
        }
        Ok(())
    }

    /// `write_at` until all of `buf` is written. A refusal of the first
    /// direct write, or a short write that leaves the offset unaligned,
    /// switches to buffered writes for the rest.
    fn write_all(&mut self, path: &Path, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.sink.write_at(buf, self.offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the device accepted no more bytes",
                    ));
                }
                Ok(n) => {
                    self.offset += n as u64;
                    buf = &buf[n..];
                    if self.direct {
                        self.wrote_direct = true;
                        if !self.offset.is_multiple_of(ALIGN as u64)
                            || !(buf.as_ptr() as usize).is_multiple_of(ALIGN)
                            || !buf.len().is_multiple_of(ALIGN)
                        {
                            self.go_buffered(path)?;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.direct && !self.wrote_direct && refused(&e) => {
                    say_fallback(path, "refused at the first write");
                    self.go_buffered(path)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Whether `dir`'s file system takes `O_DIRECT` writes (a probe file is
/// created and removed).
pub fn supports_direct_writes(dir: &Path) -> bool {
    let probe = dir.join(format!(".ckpt-direct-probe.{}", std::process::id()));
    let ok = match create(&probe, true) {
        Ok((f, true)) => {
            let map = memmap2::MmapMut::map_anon(ALIGN);
            let ok = map.is_ok_and(|m| FileExt::write_at(&f, &m, 0).is_ok());
            drop(f);
            ok
        }
        _ => false,
    };
    let _ = std::fs::remove_file(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device in memory that records each write and can write short or
    /// refuse.
    #[derive(Default)]
    struct Dev {
        data: Vec<u8>,
        direct: bool,
        writes: Vec<(u64, usize, bool)>,
        /// Largest write accepted (short writes beyond).
        max: Option<usize>,
        /// Fail with ENOSPC past this many bytes.
        space: Option<u64>,
        /// Refuse direct writes with EINVAL (a file system without
        /// `O_DIRECT` that accepted the open).
        refuse: bool,
    }

    impl Sink for Dev {
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
            if self.direct && self.refuse {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            if self.direct {
                assert!(
                    offset.is_multiple_of(ALIGN as u64),
                    "unaligned offset {offset}"
                );
                assert!(
                    buf.len().is_multiple_of(ALIGN),
                    "unaligned length {}",
                    buf.len()
                );
                assert!(
                    (buf.as_ptr() as usize).is_multiple_of(ALIGN),
                    "unaligned buffer"
                );
            }
            let mut n = self.max.map_or(buf.len(), |m| m.min(buf.len()));
            if let Some(space) = self.space {
                let room = space.saturating_sub(offset) as usize;
                if room == 0 {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                n = n.min(room);
            }
            let end = offset as usize + n;
            if self.data.len() < end {
                self.data.resize(end, 0);
            }
            self.data[offset as usize..end].copy_from_slice(&buf[..n]);
            self.writes.push((offset, n, self.direct));
            Ok(n)
        }

        fn set_buffered(&mut self) -> io::Result<()> {
            self.direct = false;
            Ok(())
        }
    }

    fn aligned(len: usize, seed: u8) -> memmap2::MmapMut {
        let mut m = memmap2::MmapMut::map_anon(len.max(1)).expect("test setup");
        for (i, b) in m.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        m
    }

    fn run(dev: Dev, parts: &[&[u8]]) -> io::Result<Dev> {
        let mut w = DirectWriter::new(dev, true);
        for p in parts {
            w.write(Path::new("f"), p)?;
        }
        w.finish(Path::new("f"))
    }

    #[test]
    fn aligned_blocks_go_direct_and_the_tail_buffered() {
        let header: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let block = aligned(1 << 20, 1);
        let last = aligned(1 << 20, 2);
        let tail = &last[..100_003];
        let dev = run(
            Dev {
                direct: true,
                ..Dev::default()
            },
            &[&header, &block, tail],
        )
        .expect("test setup");
        let want: Vec<u8> = [&header[..], &block[..], tail].concat();
        assert_eq!(dev.data, want);
        // The block went out from its own memory in one direct write.
        assert!(
            dev.writes.contains(&(8192, 1 << 20, true)),
            "{:?}",
            dev.writes
        );
        // Only the last partial page went through the page cache.
        let buffered: usize = dev.writes.iter().filter(|w| !w.2).map(|w| w.1).sum();
        assert_eq!(buffered, 100_003 % ALIGN);
    }

    #[test]
    fn unaligned_input_of_any_sizes_is_written_exactly() {
        let src = aligned(3 << 20, 7);
        // Parts at odd addresses and lengths.
        let cuts = [
            0usize,
            1,
            4095,
            4097,
            70_000,
            1 << 20,
            (1 << 20) + 13,
            3 << 20,
        ];
        let parts: Vec<&[u8]> = cuts.windows(2).map(|w| &src[w[0]..w[1]]).collect();
        let dev = run(
            Dev {
                direct: true,
                ..Dev::default()
            },
            &parts,
        )
        .expect("test setup");
        assert_eq!(&dev.data[..], &src[..]);
        assert!(dev.writes.iter().any(|w| w.2), "some writes were direct");
    }

    #[test]
    fn a_short_write_switches_to_buffered_and_loses_nothing() {
        let block = aligned(1 << 20, 3);
        let dev = run(
            Dev {
                direct: true,
                max: Some(10_000), // not a multiple of 4096
                ..Dev::default()
            },
            &[&block, &block],
        )
        .expect("test setup");
        assert_eq!(dev.data, [&block[..], &block[..]].concat());
        assert!(dev.writes[0].2 && !dev.writes.last().expect("test setup").2);
    }

    #[test]
    fn a_refused_first_write_falls_back_to_buffered() {
        let block = aligned(1 << 20, 6);
        let header = vec![9u8; 4096];
        let dev = run(
            Dev {
                direct: true,
                refuse: true,
                ..Dev::default()
            },
            &[&header, &block, &block[..777]],
        )
        .expect("buffered fallback");
        assert_eq!(dev.data, [&header[..], &block[..], &block[..777]].concat());
        assert!(dev.writes.iter().all(|w| !w.2), "every write buffered");
    }

    #[test]
    fn enospc_in_an_aligned_write_is_an_error() {
        let block = aligned(1 << 20, 4);
        let e = run(
            Dev {
                direct: true,
                space: Some(1 << 19),
                ..Dev::default()
            },
            &[&block],
        )
        .err()
        .expect("no space");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn a_state_not_a_multiple_of_4096_keeps_its_length() {
        for len in [1usize, 4095, 4097, 12_345, (1 << 20) + 1] {
            let src = aligned(len, 5);
            let dev = run(
                Dev {
                    direct: true,
                    ..Dev::default()
                },
                &[&src[..len]],
            )
            .expect("test setup");
            assert_eq!(dev.data.len(), len);
            assert_eq!(&dev.data[..], &src[..len]);
        }
    }
}
