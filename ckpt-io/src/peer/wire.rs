//! I/O helpers shared by the peer client and server: reads and writes
//! bounded in time per step of progress, nonces and MACs.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::protocol::{CLIENT_AUTH_CONTEXT, MAC_LEN, NONCE_LEN, SERVER_AUTH_CONTEXT};

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

/// Reads `len` bytes into a new buffer. `len` must have been checked
/// against a limit already; the buffer grows as data arrives, at most
/// `initial` bytes are reserved up front.
pub(crate) async fn read_bytes_timed<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    initial: u64,
    timeout: Duration,
    what: &str,
) -> io::Result<Bytes> {
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "length overflows"))?;
    let mut buf = BytesMut::with_capacity(len.min(usize::try_from(initial).unwrap_or(usize::MAX)));
    while buf.len() < len {
        let want = (len - buf.len()).min(STEP);
        buf.reserve(want);
        let n = tokio::time::timeout(timeout, (&mut *r).take(want as u64).read_buf(&mut buf))
            .await
            .map_err(|_| timed_out(what, timeout))??;
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

/// Reads and discards `len` bytes with a fixed 64 KiB buffer.
pub(crate) async fn discard_timed<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    timeout: Duration,
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
        left -= n as u64;
    }
    Ok(())
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

/// 32 random bytes from the operating system.
pub(crate) fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    use std::io::Read;
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

fn mac(secret: &[u8], nonce: &[u8], context: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(nonce);
    m.update(context);
    m
}

/// The client's proof: `HMAC-SHA256(secret, server nonce || "ckpt-peer-v1")`.
pub(crate) fn client_proof(secret: &[u8], server_nonce: &[u8]) -> [u8; MAC_LEN] {
    mac(secret, server_nonce, CLIENT_AUTH_CONTEXT)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks the client's proof in constant time.
pub(crate) fn verify_client_proof(secret: &[u8], server_nonce: &[u8], proof: &[u8]) -> bool {
    mac(secret, server_nonce, CLIENT_AUTH_CONTEXT)
        .verify_slice(proof)
        .is_ok()
}

/// The server's proof: `HMAC-SHA256(secret, client nonce || "ckpt-peer-v1-server")`.
pub(crate) fn server_proof(secret: &[u8], client_nonce: &[u8]) -> [u8; MAC_LEN] {
    mac(secret, client_nonce, SERVER_AUTH_CONTEXT)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks the server's proof in constant time.
pub(crate) fn verify_server_proof(secret: &[u8], client_nonce: &[u8], proof: &[u8]) -> bool {
    mac(secret, client_nonce, SERVER_AUTH_CONTEXT)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_nonce() {
        let n1 = nonce().expect("nonce");
        let n2 = nonce().expect("nonce");
        assert_ne!(n1, n2);
        let p = client_proof(b"secret", &n1);
        assert!(verify_client_proof(b"secret", &n1, &p));
        assert!(!verify_client_proof(b"secreT", &n1, &p));
        assert!(!verify_client_proof(b"secret", &n2, &p));
        assert!(!verify_client_proof(b"secret", &n1, &p[..31]));
        // The two directions use different contexts.
        assert!(!verify_server_proof(b"secret", &n1, &p));
        let s = server_proof(b"secret", &n1);
        assert!(verify_server_proof(b"secret", &n1, &s));
    }
}
