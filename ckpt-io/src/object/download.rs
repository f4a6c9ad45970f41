//! Reads: whole objects, ranged `GET`s straight into caller memory, `HEAD`.

use std::ops::Range;

use bytes::Bytes;
use futures::StreamExt;
use object_store::GetOptions;

use ckpt_core::{Error, Result};

use super::{Inner, Op};

/// `Tier::get`.
pub(super) async fn get(inner: &Inner, path: &str) -> Result<Bytes> {
    let key = inner.key(path)?;
    let result = inner
        .store
        .get_opts(&key, GetOptions::new())
        .await
        .map_err(|e| inner.error(Op::Get, path, e))?;
    result
        .bytes()
        .await
        .map_err(|e| inner.error(Op::Get, path, e))
}

/// `Tier::size`: a `HEAD`.
pub(super) async fn size(inner: &Inner, path: &str) -> Result<u64> {
    let key = inner.key(path)?;
    inner
        .store
        .get_opts(&key, GetOptions::new().with_head(true))
        .await
        .map(|r| r.meta.size)
        .map_err(|e| inner.error(Op::Head, path, e))
}

fn short(path: &str, range: &Range<u64>, got: u64) -> Error {
    Error::Incomplete {
        path: path.to_string(),
        reason: format!(
            "range {range:?} wanted {} bytes, the object returned {got}",
            range.end - range.start
        ),
    }
}

/// Maps the failure of a ranged `GET`: a range the object cannot serve
/// (HTTP 416, or the client's own range check) is [`Error::Incomplete`].
fn range_error(inner: &Inner, path: &str, range: &Range<u64>, e: object_store::Error) -> Error {
    let status = super::http_status(&e);
    let text = super::chain_text(&e);
    match inner.error(Op::Get, path, e) {
        Error::Backend {
            retryable: false, ..
        } if status.is_none() && text.to_ascii_lowercase().contains("range") => Error::Incomplete {
            path: path.to_string(),
            reason: format!("range {range:?} is past the end of the object: {text}"),
        },
        other => other,
    }
}

/// Checks an empty or inverted range without a ranged `GET` (S3 cannot
/// serve an empty range). `Ok(true)`: nothing to read.
async fn trivial_range(inner: &Inner, path: &str, range: &Range<u64>) -> Result<bool> {
    if range.start > range.end {
        return Err(Error::Incomplete {
            path: path.to_string(),
            reason: format!("invalid range {range:?}"),
        });
    }
    if range.start < range.end {
        return Ok(false);
    }
    let len = size(inner, path).await?;
    if range.end > len {
        return Err(Error::Incomplete {
            path: path.to_string(),
            reason: format!("range {range:?} past the end ({len} bytes)"),
        });
    }
    Ok(true)
}

/// One ranged `GET`; `None` for an empty range (nothing to read).
async fn ranged_get(
    inner: &Inner,
    path: &str,
    range: &Range<u64>,
) -> Result<Option<object_store::GetResult>> {
    if trivial_range(inner, path, range).await? {
        return Ok(None);
    }
    let key = inner.key(path)?;
    inner
        .store
        .get_opts(&key, GetOptions::new().with_range(Some(range.clone())))
        .await
        .map(Some)
        .map_err(|e| range_error(inner, path, range, e))
}

/// `Tier::get_range`: one ranged `GET`.
pub(super) async fn get_range(inner: &Inner, path: &str, range: Range<u64>) -> Result<Bytes> {
    let Some(result) = ranged_get(inner, path, &range).await? else {
        return Ok(Bytes::new());
    };
    let bytes = result
        .bytes()
        .await
        .map_err(|e| inner.error(Op::Get, path, e))?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(short(path, &range, bytes.len() as u64));
    }
    Ok(bytes)
}

/// `Tier::read_into`: a ranged `GET` whose body chunks are copied into
/// `buf` as they arrive (the one copy; no intermediate buffer).
pub(super) async fn read_into(
    inner: &Inner,
    path: &str,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let range = offset..offset + buf.len() as u64;
    let Some(result) = ranged_get(inner, path, &range).await? else {
        return Ok(());
    };
    let mut stream = result.into_stream();
    let mut filled = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| inner.error(Op::Get, path, e))?;
        let Some(dst) = buf.get_mut(filled..filled + chunk.len()) else {
            return Err(short(path, &range, (filled + chunk.len()) as u64));
        };
        dst.copy_from_slice(&chunk);
        filled += chunk.len();
    }
    if filled != buf.len() {
        return Err(short(path, &range, filled as u64));
    }
    Ok(())
}
