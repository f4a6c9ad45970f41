//! I/O helpers shared by the peer client and server: reads and writes
//! bounded in time per step of progress, hashing streamed payloads into
//! their frame tag as they go.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::protocol::TAG_LEN;
use super::session::Tagger;

/// Most bytes moved by one timed step; the timeout bounds each step, so a
/// large transfer can take as long as it needs while it makes progress.
const STEP: usize = 1 << 20;

fn timed_out(what: &str, t: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no progress for {t:?} while {what}"),
    )
}

/// Reads exactly `buf.len()` bytes, each step of at most 1 MiB within
/// `timeout`.
pub(crate) async fn read_exact_timed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    timeout: Duration,
    what: &str,
) -> io::Result<()> {
    for part in buf.chunks_mut(STEP) {
        tokio::time::timeout(timeout, r.read_exact(part))
            .await
            .map_err(|_| timed_out(what, timeout))??;
    }
    Ok(())
}

/// Like [`read_exact_timed`], feeding each step's bytes to `tag` as they
/// arrive (while they are in cache).
pub(crate) async fn read_exact_hashed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    timeout: Duration,
    what: &str,
    tag: &mut Tagger,
) -> io::Result<()> {
    for part in buf.chunks_mut(STEP) {
        tokio::time::timeout(timeout, r.read_exact(part))
            .await
            .map_err(|_| timed_out(what, timeout))??;
        tag.update(part);
    }
    Ok(())
}

/// Reads a frame's tag.
pub(crate) async fn read_tag<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> io::Result<[u8; TAG_LEN]> {
    let mut t = [0u8; TAG_LEN];
    read_exact_timed(r, &mut t, timeout, "reading a frame tag").await?;
    Ok(t)
}

/// Reads `len` bytes into a new buffer. `len` must have been checked
/// against a limit already; the buffer grows as data arrives, at most
/// `initial` bytes are reserved up front. Each step's bytes are fed to
/// `tag`.
pub(crate) async fn read_bytes_timed<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    initial: u64,
    timeout: Duration,
    what: &str,
    tag: &mut Tagger,
) -> io::Result<Bytes> {
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "length overflows"))?;
    let mut buf = BytesMut::with_capacity(len.min(usize::try_from(initial).unwrap_or(usize::MAX)));
    while buf.len() < len {
        let want = (len - buf.len()).min(STEP);
        buf.reserve(want);
        let at = buf.len();
        let n = tokio::time::timeout(timeout, (&mut *r).take(want as u64).read_buf(&mut buf))
            .await
            .map_err(|_| timed_out(what, timeout))??;
        tag.update(&buf[at..]);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {} of {len} bytes while {what}",
                    buf.len()
                ),
            ));
        }
    }
    Ok(buf.freeze())
}

/// Reads and discards `len` bytes with a fixed 64 KiB buffer, feeding
/// them to `tag` when given (a refused payload's tag is still checked).
pub(crate) async fn discard_timed<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    timeout: Duration,
    mut tag: Option<&mut Tagger>,
) -> io::Result<()> {
    let mut scratch = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let want = left.min(scratch.len() as u64) as usize;
        let n = tokio::time::timeout(timeout, r.read(&mut scratch[..want]))
            .await
            .map_err(|_| timed_out("discarding a refused payload", timeout))??;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(t) = tag.as_deref_mut() {
            t.update(&scratch[..n]);
        }
        left -= n as u64;
    }
    Ok(())
}

/// Reads and discards at most `limit` bytes, until the end of the stream
/// or `timeout` without progress, with a small buffer on the stack: the
/// close of a connection that has not authenticated allocates nothing.
pub(crate) async fn drain_small<R: AsyncRead + Unpin>(r: &mut R, limit: usize, timeout: Duration) {
    let mut scratch = [0u8; 512];
    let mut left = limit;
    while left > 0 {
        let want = left.min(scratch.len());
        match tokio::time::timeout(timeout, r.read(&mut scratch[..want])).await {
            Ok(Ok(n)) if n > 0 => left -= n,
            _ => return,
        }
    }
}

/// Writes all of `buf`, each step of at most 1 MiB within `timeout`.
pub(crate) async fn write_all_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    timeout: Duration,
    what: &str,
) -> io::Result<()> {
    for part in buf.chunks(STEP) {
        tokio::time::timeout(timeout, w.write_all(part))
            .await
            .map_err(|_| timed_out(what, timeout))??;
    }
    Ok(())
}

/// Like [`write_all_timed`], feeding each step's bytes to `tag` before it
/// is written.
pub(crate) async fn write_hashed<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    timeout: Duration,
    what: &str,
    tag: &mut Tagger,
) -> io::Result<()> {
    for part in buf.chunks(STEP) {
        tag.update(part);
        tokio::time::timeout(timeout, w.write_all(part))
            .await
            .map_err(|_| timed_out(what, timeout))??;
    }
    Ok(())
}

/// Flushes within `timeout`.
pub(crate) async fn flush_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    timeout: Duration,
    what: &str,
) -> io::Result<()> {
    tokio::time::timeout(timeout, w.flush())
        .await
        .map_err(|_| timed_out(what, timeout))?
}
