//! Shard files are valid safetensors files: an 8-byte little-endian header
//! length, a JSON header, then the tensors' bytes packed back to back. The
//! header is padded with spaces (allowed by the format) so the data section
//! starts on a 4096-byte boundary, which keeps O_DIRECT and page-aligned
//! reads possible. Any safetensors reader can open a shard.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::spec::checked_nbytes;

/// Alignment of the data section.
pub const DATA_ALIGN: u64 = 4096;
/// Largest header accepted when parsing.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Where each tensor lands in a shard file.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    /// Header bytes, including the 8-byte length prefix and padding.
    pub header: Vec<u8>,
    /// Absolute file offset of each tensor's data, in input order.
    pub offsets: Vec<u64>,
    /// Total file length.
    pub file_len: u64,
}

/// Lays out a shard file holding `tensors` (name, dtype, shape) in order,
/// with `metadata` stored in the header's `__metadata__`.
pub fn layout(
    tensors: &[(&str, DType, &[u64])],
    metadata: &BTreeMap<String, String>,
) -> Result<ShardLayout> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut rel = Vec::with_capacity(tensors.len());
    let mut cursor: u64 = 0;
    for (name, dtype, shape) in tensors {
        let n =
            checked_nbytes(shape, *dtype).ok_or_else(|| Error::tensor(*name, "size overflows"))?;
        let end = cursor
            .checked_add(n)
            .ok_or_else(|| Error::tensor(*name, "file size overflows"))?;
        header.insert(
            (*name).to_string(),
            json!({ "dtype": dtype.name(), "shape": shape, "data_offsets": [cursor, end] }),
        );
        rel.push(cursor);
        cursor = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::Internal(format!("cannot serialize a shard header: {e}")))?;
    let unpadded = 8 + text.len() as u64;
    let padded = unpadded.div_ceil(DATA_ALIGN) * DATA_ALIGN;
    text.resize((padded - 8) as usize, b' ');
    let mut out = Vec::with_capacity(padded as usize);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    let offsets = rel.into_iter().map(|r| padded + r).collect();
    Ok(ShardLayout {
        header: out,
        offsets,
        file_len: padded + cursor,
    })
}

/// One tensor described by a shard header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<u64>,
}

/// Length of the whole header (prefix + JSON) given the first 8 bytes.
pub fn header_len(prefix: &[u8; 8]) -> Result<u64> {
    let n = u64::from_le_bytes(*prefix);
    if n > MAX_HEADER_BYTES {
        return Err(Error::manifest(
            "shard header",
            format!("header of {n} bytes exceeds {MAX_HEADER_BYTES}"),
        ));
    }
    Ok(8 + n)
}

/// Parses a shard header (`bytes` starts at the beginning of the file and
/// holds at least the whole header) against a file of `file_len` bytes.
/// Untrusted input: every range is checked.
pub fn parse_header(
    path: &str,
    bytes: &[u8],
    file_len: u64,
) -> Result<(Vec<HeaderTensor>, BTreeMap<String, String>)> {
    let bad = |r: String| Error::manifest(path, r);
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("file shorter than 8 bytes".into()))?;
    let total = header_len(&prefix)?;
    let json_bytes = bytes
        .get(8..total as usize)
        .ok_or_else(|| bad(format!("header of {total} bytes is truncated")))?;
    let map: Map<String, Value> =
        serde_json::from_slice(json_bytes).map_err(|e| bad(format!("header JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut out = Vec::new();
    for (name, v) in map {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v).map_err(|e| bad(format!("__metadata__: {e}")))?;
            continue;
        }
        let dtype: DType = serde_json::from_value(v.get("dtype").cloned().unwrap_or(Value::Null))
            .map_err(|e| bad(format!("tensor `{name}` dtype: {e}")))?;
        let shape: Vec<u64> =
            serde_json::from_value(v.get("shape").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("tensor `{name}` shape: {e}")))?;
        let offs: [u64; 2] =
            serde_json::from_value(v.get("data_offsets").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("tensor `{name}` data_offsets: {e}")))?;
        let n = checked_nbytes(&shape, dtype)
            .ok_or_else(|| bad(format!("tensor `{name}` size overflows")))?;
        if offs[1] < offs[0] || offs[1] - offs[0] != n {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets {offs:?} do not hold {n} bytes"
            )));
        }
        let start = total
            .checked_add(offs[0])
            .ok_or_else(|| bad("offset overflows".into()))?;
        let end = total
            .checked_add(offs[1])
            .ok_or_else(|| bad("offset overflows".into()))?;
        if end > file_len {
            return Err(bad(format!(
                "tensor `{name}` ends at {end}, past the file's {file_len} bytes"
            )));
        }
        out.push(HeaderTensor {
            name,
            dtype,
            shape,
            range: start..end,
        });
    }
    out.sort_by_key(|t| t.range.start);
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_data_and_parses_back() {
        let meta = BTreeMap::from([("run".to_string(), "r".to_string())]);
        let l =
            layout(&[("a", DType::F32, &[2, 3]), ("b", DType::U8, &[5])], &meta).expect("layout");
        assert_eq!(l.header.len() as u64 % DATA_ALIGN, 0);
        assert_eq!(l.offsets, vec![4096, 4096 + 24]);
        assert_eq!(l.file_len, 4096 + 29);
        let (ts, m) = parse_header("f", &l.header, l.file_len).expect("parse");
        assert_eq!(m, meta);
        assert_eq!(ts[1].name, "b");
        assert_eq!(ts[1].range, 4120..4125);
        assert!(
            parse_header("f", &l.header, l.file_len - 1).is_err(),
            "range past EOF must be rejected"
        );
    }
}
