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
//! Aligned writes after the first can go out several at a time
//! ([`DirectWriter::with_in_flight`]): helper threads take whole pieces of
//! at most [`PIECE`] bytes at their offsets, so the device always has the
//! next write queued while the last one completes. Each helper holds its
//! piece (a reference to the staging block) until the write returns. The
//! bounce buffer and the tail are written by the caller's thread; the tail
//! only after every piece is written.
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
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};

use bytes::Bytes;

/// Alignment of `O_DIRECT` offsets, lengths and buffers.
pub(crate) const ALIGN: usize = 4096;

/// Size of the bounce buffer for unaligned input.
const BOUNCE: usize = 4 << 20;

/// Largest write a helper takes at once: a zero-copy tensor of a GiB still
/// goes out as several writes in flight.
pub(crate) const PIECE: usize = 8 << 20;

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
/// Shared by the helper threads, so it takes `&self`.
pub(crate) trait Sink: Send + Sync + 'static {
    /// Writes some of `buf` at `offset`; returns how much.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Turns `O_DIRECT` off: later writes go through the page cache
    /// (writes already in flight finish as they started).
    fn set_buffered(&self) -> io::Result<()>;
}

impl Sink for File {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }

    fn set_buffered(&self) -> io::Result<()> {
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

/// What the helper threads report.
#[derive(Default)]
struct FlightState {
    /// Pieces handed out and not yet written.
    pending: usize,
    /// The first error a helper met.
    error: Option<io::Error>,
    /// A helper turned `O_DIRECT` off (a short write left it unaligned).
    buffered: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<FlightState>,
    /// Signalled when `pending` drops to 0.
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Helper threads writing aligned pieces at their offsets.
struct Flight {
    /// A rendezvous channel: a piece is handed over only when a helper is
    /// free, so at most as many writes are in flight as there are helpers.
    tx: Option<mpsc::SyncSender<(Bytes, u64)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Flight {
    fn start<S: Sink>(sink: &Arc<S>, helpers: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<(Bytes, u64)>(0);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared::default());
        let mut flight = Self {
            tx: Some(tx),
            threads: Vec::with_capacity(helpers),
            shared: shared.clone(),
        };
        for _ in 0..helpers {
            let (rx, sink, shared) = (rx.clone(), sink.clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name("ckpt-local-write".into())
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok((data, offset)) = job else { return };
                        let r = write_piece(&*sink, &data, offset, &shared);
                        // The staging block goes back before the count drops.
                        drop(data);
                        let mut st = shared.lock();
                        if let Err(e) = r {
                            st.error.get_or_insert(e);
                        }
                        st.pending -= 1;
                        if st.pending == 0 {
                            shared.idle.notify_all();
                        }
                    }
                })?;
            flight.threads.push(t);
        }
        Ok(flight)
    }

    /// Hands `data` (aligned, at the aligned `offset`) to a free helper.
    fn send(&mut self, data: Bytes, offset: u64) -> io::Result<()> {
        self.shared.lock().pending += 1;
        let sent = self.tx.as_ref().map(|tx| tx.send((data, offset)));
        if !matches!(sent, Some(Ok(()))) {
            self.shared.lock().pending -= 1;
            return Err(io::Error::other("the write helpers stopped"));
        }
        Ok(())
    }

    /// Waits until every piece handed out is written; the first error.
    fn wait(&self) -> io::Result<()> {
        let mut st = self.shared.lock();
        while st.pending > 0 {
            st = self
                .shared
                .idle
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.error.take().map_or(Ok(()), Err)
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Helpers finish the write they are in (the file stays open until
        // then) and stop.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A helper's write of one aligned piece. A short write that leaves the
/// rest unaligned turns the descriptor buffered (for everyone) and writes
/// the rest through the page cache.
fn write_piece<S: Sink>(
    sink: &S,
    mut buf: &[u8],
    mut offset: u64,
    shared: &Shared,
) -> io::Result<()> {
    while !buf.is_empty() {
        match sink.write_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the device accepted no more bytes",
                ));
            }
            Ok(n) => {
                offset += n as u64;
                buf = &buf[n..];
                if !n.is_multiple_of(ALIGN) && !buf.is_empty() {
                    let mut st = shared.lock();
                    if !st.buffered {
                        sink.set_buffered()?;
                        st.buffered = true;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a file front to back, aligned parts with `O_DIRECT`.
pub(crate) struct DirectWriter<S: Sink> {
    /// Declared before `sink`: dropped (helpers joined) first.
    flight: Option<Flight>,
    sink: Arc<S>,
    /// Aligned writes in flight at once (1: the caller's thread writes
    /// everything itself).
    in_flight: usize,
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
            flight: None,
            sink: Arc::new(sink),
            in_flight: 1,
            direct,
            wrote_direct: false,
            offset: 0,
            bounce: None,
        }
    }

    /// Up to `n` aligned writes in flight at once (at least 1). The helper
    /// threads start at the second aligned write, so a small file costs
    /// none.
    pub(crate) fn with_in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self
    }

    /// Appends `data`.
    pub(crate) fn write(&mut self, path: &Path, mut data: Bytes) -> io::Result<()> {
        self.sync_flight();
        if !self.direct {
            // Bytes gathered before the switch go first.
            self.flush_pages(path, true)?;
            return self.write_all(path, &data);
        }
        while !data.is_empty() {
            let aligned = (data.as_ptr() as usize).is_multiple_of(ALIGN);
            let fill = self.bounce.as_ref().map_or(0, |b| b.fill);
            // Aligned input at an aligned point of the file: straight from
            // the caller's memory (the staging block), no copy.
            if aligned && fill.is_multiple_of(ALIGN) && data.len() >= ALIGN {
                self.flush_bounce(path)?;
                let n = data.len() / ALIGN * ALIGN;
                let whole = data.split_to(n);
                self.write_aligned(path, whole)?;
                if !self.direct {
                    return self.write_all(path, &data);
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
            let _ = data.split_to(take);
            if b.fill == BOUNCE {
                self.flush_bounce(path)?;
                if !self.direct {
                    return self.write_all(path, &data);
                }
            }
        }
        Ok(())
    }

    /// Writes `data` (aligned, a whole number of pages) at the current
    /// offset: by the helpers once a direct write has succeeded and more
    /// than one may be in flight, here otherwise.
    fn write_aligned(&mut self, path: &Path, mut data: Bytes) -> io::Result<()> {
        if self.in_flight < 2 || !self.wrote_direct {
            // The first direct write is made here: a refusal of it means a
            // file system without O_DIRECT, and falls back.
            let first = data.split_to(data.len().min(PIECE));
            self.write_all(path, &first)?;
            if data.is_empty() || !self.direct || self.in_flight < 2 {
                return self.write_all(path, &data);
            }
        }
        let flight = match &mut self.flight {
            Some(f) => f,
            None => self
                .flight
                .insert(Flight::start(&self.sink, self.in_flight)?),
        };
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(PIECE));
            let len = piece.len() as u64;
            if let Some(e) = flight.shared.lock().error.take() {
                return Err(e);
            }
            flight.send(piece, self.offset)?;
            self.offset += len;
        }
        Ok(())
    }

    /// Waits for every write in flight; the first error a helper met.
    fn drain(&mut self) -> io::Result<()> {
        let r = self.flight.as_ref().map_or(Ok(()), Flight::wait);
        self.sync_flight();
        r
    }

    /// Takes in whether a helper turned `O_DIRECT` off.
    fn sync_flight(&mut self) {
        if self
            .flight
            .as_ref()
            .is_some_and(|f| f.shared.lock().buffered)
        {
            self.direct = false;
        }
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
        self.drain()?;
        self.flush_pages(path, true)?;
        self.flight = None;
        Arc::try_unwrap(self.sink)
            .map_err(|_| io::Error::other("a write helper still holds the file"))
    }

    fn go_buffered(&mut self, path: &Path) -> io::Result<()> {
        // Writes in flight finish first: from here on the file is written
        // by this thread alone.
        self.drain()?;
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
    struct Dev(Mutex<DevState>);

    #[derive(Default, Clone)]
    struct DevState {
        data: Vec<u8>,
        direct: bool,
        writes: Vec<(u64, usize, bool)>,
        /// Largest write accepted (short writes beyond), at offsets from
        /// `short_from` on.
        max: Option<usize>,
        short_from: u64,
        /// Fail with ENOSPC past this many bytes.
        space: Option<u64>,
        /// Refuse direct writes with EINVAL (a file system without
        /// `O_DIRECT` that accepted the open).
        refuse: bool,
        /// Writes in progress now, and the most at once.
        busy: usize,
        most_busy: usize,
        /// How long each write takes.
        delay: Option<std::time::Duration>,
        /// After the first write, each write waits until this many were in
        /// flight at once: a count the test can assert on a loaded machine
        /// (bounded against a hang).
        rendezvous: Option<usize>,
    }

    impl Dev {
        fn new(st: DevState) -> Self {
            Self(Mutex::new(st))
        }
    }

    impl Sink for Dev {
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            let (delay, rendezvous) = {
                let mut st = self.0.lock().expect("test device");
                st.busy += 1;
                st.most_busy = st.most_busy.max(st.busy);
                (st.delay, st.rendezvous.filter(|_| !st.writes.is_empty()))
            };
            if let Some(n) = rendezvous {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while self.0.lock().expect("test device").most_busy < n
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            let mut st = self.0.lock().expect("test device");
            st.busy -= 1;
            st.write(buf, offset)
        }

        fn set_buffered(&self) -> io::Result<()> {
            self.0.lock().expect("test device").direct = false;
            Ok(())
        }
    }

    impl DevState {
        fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
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
            let mut n = match self.max {
                Some(m) if offset >= self.short_from => m.min(buf.len()),
                _ => buf.len(),
            };
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
    }

    fn aligned(len: usize, seed: u8) -> memmap2::MmapMut {
        let mut m = memmap2::MmapMut::map_anon(len.max(1)).expect("test setup");
        for (i, b) in m.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        m
    }

    /// Writes `parts` with 1 and with 4 writes in flight; both must agree
    /// (same bytes, same result); returns the device written with 4.
    fn run(dev: DevState, parts: &[Bytes]) -> io::Result<DevState> {
        let one = run_with(dev.clone(), parts, 1);
        let four = run_with(dev, parts, 4);
        match (&one, &four) {
            (Ok(a), Ok(b)) => assert_eq!(a.data, b.data, "1 and 4 in flight wrote alike"),
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
            _ => panic!("1 in flight: {:?}; 4: {:?}", one.is_ok(), four.is_ok()),
        }
        four
    }

    fn run_with(dev: DevState, parts: &[Bytes], in_flight: usize) -> io::Result<DevState> {
        let mut w = DirectWriter::new(Dev::new(dev), true).with_in_flight(in_flight);
        for p in parts {
            w.write(Path::new("f"), p.clone())?;
        }
        let dev = w.finish(Path::new("f"))?;
        Ok(dev.0.into_inner().expect("test device"))
    }

    /// `len` bytes of a page-aligned map as `Bytes`.
    fn aligned_bytes(len: usize, seed: u8) -> Bytes {
        Bytes::from_owner(aligned(len, seed)).slice(..len)
    }

    fn direct_dev() -> DevState {
        DevState {
            direct: true,
            ..DevState::default()
        }
    }

    #[test]
    fn aligned_blocks_go_direct_and_the_tail_buffered() {
        let header = Bytes::from((0..8192u32).map(|i| i as u8).collect::<Vec<u8>>());
        let block = aligned_bytes(1 << 20, 1);
        let tail = aligned_bytes(1 << 20, 2).slice(..100_003);
        let dev =
            run(direct_dev(), &[header.clone(), block.clone(), tail.clone()]).expect("test setup");
        let want: Vec<u8> = [&header[..], &block[..], &tail[..]].concat();
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
        let src = aligned_bytes(3 << 20, 7);
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
        let parts: Vec<Bytes> = cuts.windows(2).map(|w| src.slice(w[0]..w[1])).collect();
        let dev = run(direct_dev(), &parts).expect("test setup");
        assert_eq!(&dev.data[..], &src[..]);
        assert!(dev.writes.iter().any(|w| w.2), "some writes were direct");
    }

    #[test]
    fn several_writes_go_out_at_once_and_land_in_place() {
        // 12 blocks of 1 MiB and a zero-copy "tensor" of 3 pieces, on a
        // device that takes 50 ms a write.
        let mut parts: Vec<Bytes> = (0..12).map(|i| aligned_bytes(1 << 20, i)).collect();
        parts.push(aligned_bytes(3 * PIECE, 99));
        parts.push(aligned_bytes(5000, 100));
        let dev = DevState {
            delay: Some(std::time::Duration::from_millis(50)),
            ..direct_dev()
        };
        let four = run_with(
            DevState {
                rendezvous: Some(4),
                ..dev.clone()
            },
            &parts,
            4,
        )
        .expect("4 in flight");
        let one = run_with(dev, &parts, 1).expect("1 in flight");
        let want: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(four.data, want);
        assert_eq!(one.data, want);
        assert_eq!(one.most_busy, 1);
        assert_eq!(four.most_busy, 4, "4 writes were in flight at once");
        // The tensor went out in pieces of at most PIECE, all direct.
        assert!(four.writes.iter().all(|w| w.1 <= PIECE));
        let direct: usize = four.writes.iter().filter(|w| w.2).map(|w| w.1).sum();
        assert_eq!(direct, want.len() / ALIGN * ALIGN);
    }

    #[test]
    fn a_short_write_switches_to_buffered_and_loses_nothing() {
        let block = aligned_bytes(1 << 20, 3);
        let parts = vec![block.clone(); 6];
        let dev = run(
            DevState {
                max: Some(10_000), // not a multiple of 4096
                ..direct_dev()
            },
            &parts,
        )
        .expect("test setup");
        assert_eq!(dev.data, block.repeat(6));
        assert!(dev.writes[0].2 && !dev.writes.last().expect("test setup").2);
    }

    #[test]
    fn a_short_write_in_flight_switches_to_buffered_and_loses_nothing() {
        let block = aligned_bytes(1 << 20, 9);
        let parts = vec![block.clone(); 8];
        let dev = run(
            DevState {
                max: Some(10_000),
                short_from: 3 << 20, // a helper's write, not the first
                ..direct_dev()
            },
            &parts,
        )
        .expect("test setup");
        assert_eq!(dev.data, block.repeat(8));
        // A helper's direct write came back short and turned the rest
        // buffered.
        assert!(dev.writes[0].2);
        assert!(
            dev.writes
                .iter()
                .any(|w| w.0 >= 3 << 20 && w.1 == 10_000 && w.2)
        );
        assert!(!dev.writes.last().expect("test setup").2);
    }

    #[test]
    fn a_short_aligned_write_stays_direct() {
        let block = aligned_bytes(1 << 20, 8);
        let parts = vec![block.clone(); 6];
        let dev = run(
            DevState {
                max: Some(3 * ALIGN),
                ..direct_dev()
            },
            &parts,
        )
        .expect("test setup");
        assert_eq!(dev.data, block.repeat(6));
        assert!(dev.writes.iter().all(|w| w.2), "every write direct");
    }

    #[test]
    fn a_refused_first_write_falls_back_to_buffered() {
        let block = aligned_bytes(1 << 20, 6);
        let header = Bytes::from(vec![9u8; 4096]);
        let dev = run(
            DevState {
                refuse: true,
                ..direct_dev()
            },
            &[
                header.clone(),
                block.clone(),
                block.clone(),
                block.slice(..777),
            ],
        )
        .expect("buffered fallback");
        assert_eq!(
            dev.data,
            [&header[..], &block[..], &block[..], &block[..777]].concat()
        );
        assert!(dev.writes.iter().all(|w| !w.2), "every write buffered");
    }

    #[test]
    fn enospc_in_an_aligned_write_is_an_error() {
        let block = aligned_bytes(1 << 20, 4);
        // In the first write, and in a helper's write after several.
        for space in [1 << 19, (5 << 20) + (1 << 19)] {
            let e = run(
                DevState {
                    space: Some(space),
                    ..direct_dev()
                },
                &vec![block.clone(); 8],
            )
            .err()
            .expect("no space");
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "space {space}");
        }
    }

    #[test]
    fn a_state_not_a_multiple_of_4096_keeps_its_length() {
        for len in [1usize, 4095, 4097, 12_345, (1 << 20) + 1, 2 * PIECE + 5] {
            let src = aligned_bytes(len, 5);
            let dev = run(direct_dev(), std::slice::from_ref(&src)).expect("test setup");
            assert_eq!(dev.data.len(), len);
            assert_eq!(&dev.data[..], &src[..]);
        }
    }
}
