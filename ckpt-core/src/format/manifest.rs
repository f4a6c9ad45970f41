//! Manifests: the JSON that says what a checkpoint holds and how to check it.
//!
//! Each rank writes `rank-<r>.json` once its shard is durable; the
//! coordinator merges them into the step's `MANIFEST.json` (the commit
//! marker). Parsing treats both as untrusted input: sizes are capped,
//! arithmetic is checked, every piece is validated against its file's
//! length and the pieces of each tensor must tile it exactly once.
//!
//! Both carry a checksum of their own bytes (format 2): the document is
//! pretty-printed JSON whose last member is `"manifest_crc32c"`, the
//! crc32c of every byte before the `,` that introduces it. It is checked
//! before the JSON is parsed, so a flipped byte anywhere in a manifest is a
//! data fault ([`Error::InvalidManifest`]: restore falls back), never a
//! wrong tensor name or shape that looks like the caller's mistake. The
//! shard files' headers are covered by `header_crc32c` in the manifests.
//! Format 1 manifests (no checksums) are still read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::checksum::chunk_count;
use crate::format::layout;
use crate::model::dtype::DType;
use crate::model::spec::{MAX_DIMS, ShardSpec, checked_nbytes, checked_numel};
use crate::model::state::{LoopState, TensorRole};

/// Version of the manifest format this library writes.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest manifest format this library reads (1: no manifest or header
/// checksums).
pub const OLDEST_FORMAT: u32 = 1;
/// Name of the manifests' self-checksum member.
pub const SEAL_KEY: &str = "manifest_crc32c";
/// Largest manifest accepted (bytes).
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// Most tensors a checkpoint may hold.
pub const MAX_TENSORS: usize = 1 << 20;
/// Most ranks a checkpoint may have.
pub const MAX_WORLD_SIZE: u32 = 1 << 16;

/// Library name and version written into every manifest.
pub fn library_version() -> String {
    format!("ckpt {}", env!("CARGO_PKG_VERSION"))
}

/// One rank's contiguous piece of a tensor inside that rank's shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Rank that wrote it.
    pub rank: u32,
    /// Shard file, relative to the step directory.
    pub file: String,
    /// Byte offset of the piece's data in the file.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// Where the piece starts in the global tensor.
    pub global_offsets: Vec<u64>,
    /// Shape of the piece.
    pub shape: Vec<u64>,
    /// crc32c of each `chunk_size` chunk of the piece's bytes.
    pub crc32c: Vec<u32>,
    /// blake3 of the piece's bytes, when identity checks were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// In a merged manifest, for a replicated piece: every rank that held
    /// a copy whose checksums matched (the writer included). Empty for a
    /// piece one rank holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<u32>,
    /// Where each chunk is, when the chunks are not back to back at
    /// `offset` of `file`: one entry per chunk (an incremental save points
    /// unchanged chunks at the older step that holds them). Empty: the
    /// piece is contiguous.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkLoc>,
    /// blake3 of each chunk (hex), on tiers that save incrementally: a
    /// process that restores this step compares its first save against
    /// them. Empty elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_blake3: Vec<String>,
}

/// Where one chunk of a [`Piece`] is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    /// The older step whose directory holds the bytes; absent: this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// The file in that step's directory.
    pub file: String,
    /// Byte offset of the chunk in the file.
    pub offset: u64,
    /// Bytes stored when the chunk is a zstd frame (it decodes to the
    /// chunk's length, checked before its crc32c); absent: raw bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<u64>,
    /// Byte planes the chunk was grouped into before compression (the
    /// element size of 2- and 4-byte dtypes: byte `k` of every element
    /// together); 0 or 1: none.
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub planes: u8,
}

fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

/// A run of consecutive chunks of a piece stored back to back in one
/// file: what one read fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Path of the file, relative to the tier root.
    pub path: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Index (in the piece) of the span's first chunk.
    pub first_chunk: usize,
    /// Byte offset of the span within the piece.
    pub piece_offset: u64,
    /// A compressed chunk (a span of one chunk): its stored length and
    /// byte planes.
    pub zstd: Option<(u64, u8)>,
}

impl Piece {
    /// The piece as a shard of a tensor of `global_shape`.
    pub fn shard(&self, global_shape: &[u64]) -> ShardSpec {
        ShardSpec {
            global_shape: global_shape.to_vec(),
            offsets: self.global_offsets.clone(),
            shape: self.shape.clone(),
        }
    }

    /// The reads that fetch bytes `start..end` of the piece (both multiples
    /// of `chunk_size`, or `end` the piece's length) of step `step` of
    /// `run`: one span when the piece is contiguous, else one per run of
    /// chunks that lie back to back in one file.
    pub fn spans(&self, run: &str, step: u64, chunk_size: u64, start: u64, end: u64) -> Vec<Span> {
        let end = end.min(self.length);
        if start >= end {
            return Vec::new();
        }
        let here = layout::step_dir(run, step);
        if self.chunks.is_empty() {
            return vec![Span {
                path: format!("{here}/{}", self.file),
                offset: self.offset + start,
                len: end - start,
                first_chunk: (start / chunk_size) as usize,
                piece_offset: start,
                zstd: None,
            }];
        }
        let mut out: Vec<Span> = Vec::new();
        let first = (start / chunk_size) as usize;
        let last = end.div_ceil(chunk_size) as usize;
        for (i, loc) in self.chunks.iter().enumerate().take(last).skip(first) {
            let at = i as u64 * chunk_size;
            let len = chunk_size.min(end - at);
            let path = match loc.step {
                Some(s) => format!("{}/{}", layout::step_dir(run, s), loc.file),
                None => format!("{here}/{}", loc.file),
            };
            let zstd = loc.zstd.map(|z| (z, loc.planes));
            match out.last_mut() {
                Some(prev)
                    if zstd.is_none()
                        && prev.zstd.is_none()
                        && prev.path == path
                        && prev.offset + prev.len == loc.offset =>
                {
                    prev.len += len;
                }
                _ => out.push(Span {
                    path,
                    offset: loc.offset,
                    len,
                    first_chunk: i,
                    piece_offset: at,
                    zstd,
                }),
            }
        }
        out
    }

    /// The older steps this piece's chunks point into.
    pub fn referenced_steps(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().filter_map(|c| c.step)
    }
}

/// How a rank holds a replicated piece: the ranks with bit-identical
/// copies, and the one of them that writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// Every rank holding a copy, sorted (this one included).
    pub group: Vec<u32>,
    /// The rank that writes it into its shard file.
    pub writer: u32,
    /// Where the piece's checksums start among those of the rank's whole
    /// tensor, when a large tensor is split into blocks written by
    /// different replicas (0 for a whole tensor).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_chunk: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A tensor of a rank manifest: the rank's single piece of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of the whole tensor.
    pub global_shape: Vec<u64>,
    /// Model, optimizer or other.
    pub role: TensorRole,
    /// This rank's piece. For a replicated piece another rank writes,
    /// `rank` and `file` name the writer and `offset` is 0; the checksums
    /// are this rank's own copy's, for the commit to compare.
    pub piece: Piece,
    /// Set when the piece is replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
}

/// What one rank wrote for one step (`rank-<r>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankManifest {
    /// Format version.
    pub format: u32,
    /// Writer library.
    pub library: String,
    /// Run name.
    pub run: String,
    /// Step.
    pub step: u64,
    /// Ranks in the job.
    pub world_size: u32,
    /// This rank.
    pub rank: u32,
    /// Which incarnation of the job wrote it; the coordinator only merges
    /// rank manifests of one incarnation.
    pub incarnation: String,
    /// Chunk size of the checksums.
    pub chunk_size: u64,
    /// Wall time the save started, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The step this rank's process restored or saved before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
    /// The shard file.
    pub file: String,
    /// Its length in bytes.
    pub file_len: u64,
    /// The shard file's header (length prefix, JSON, padding): its length
    /// and crc32c (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderSum>,
    /// This rank's loop state.
    pub loop_state: LoopState,
    /// This rank's tensors.
    pub tensors: Vec<RankTensor>,
}

/// Length and crc32c of a shard file's header, so that every byte of a
/// committed checkpoint is covered by a checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderSum {
    /// Bytes from the start of the file to the start of the data section.
    pub len: u64,
    /// Their crc32c.
    pub crc32c: u32,
}

/// A tensor of the global manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: DType,
    /// Shape of the whole tensor.
    pub shape: Vec<u64>,
    /// Model, optimizer or other.
    pub role: TensorRole,
    /// Pieces that tile the tensor.
    pub pieces: Vec<Piece>,
}

/// One rank's file and loop state in the global manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankEntry {
    /// The rank.
    pub rank: u32,
    /// Its shard file, relative to the step directory.
    pub file: String,
    /// The file's length.
    pub file_len: u64,
    /// The file's header length and crc32c (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderSum>,
    /// The rank's loop state (RNG, data loader... may differ per rank).
    pub loop_state: LoopState,
}

/// The commit marker of a checkpoint (`MANIFEST.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Writer library.
    pub library: String,
    /// Run name.
    pub run: String,
    /// Step.
    pub step: u64,
    /// Ranks in the job.
    pub world_size: u32,
    /// Incarnation of the job that wrote it.
    pub incarnation: String,
    /// Chunk size of the checksums.
    pub chunk_size: u64,
    /// Wall time the save started, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Every rank, in rank order.
    pub ranks: Vec<RankEntry>,
    /// How many rollbacks the run's lineage record (`LINEAGE.json`) held
    /// when this step was committed: rollback `k` abandons the steps above
    /// its `to_step` whose `lineage` is at most `k` (see [`Lineage`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lineage: u64,
    /// The step this one continues from (the step restored, or saved
    /// before it, by the coordinator's process), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
    /// The commit's own nonce (the coordinator's save attempt): on a store
    /// whose conditional create is not atomic, the coordinator reads the
    /// MANIFEST back and knows it is its own by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

fn check_header(path: &str, format: u32, chunk_size: u64, world_size: u32) -> Result<()> {
    if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&format) {
        return Err(Error::manifest(
            path,
            format!(
                "format {format} is not supported (this library reads {OLDEST_FORMAT}..={FORMAT_VERSION})"
            ),
        ));
    }
    if !(4096..=(1 << 30)).contains(&chunk_size) {
        return Err(Error::manifest(
            path,
            format!("chunk size {chunk_size} out of range"),
        ));
    }
    if world_size == 0 || world_size > MAX_WORLD_SIZE {
        return Err(Error::manifest(
            path,
            format!("world size {world_size} out of range"),
        ));
    }
    Ok(())
}

/// A format-2 file must record its header's checksum, inside the file.
/// A shard file name must be one plain name inside the step directory: a
/// manifest naming `../x` or `a/b` is corrupt (a data fault, so restore
/// falls back), never a path the tier is asked to open.
fn check_file_name(path: &str, file: &str) -> Result<()> {
    let bad = file.is_empty()
        || file.len() > 255
        || file == "."
        || file == ".."
        || file.contains(['/', '\\', '\0']);
    if bad {
        return Err(Error::manifest(
            path,
            format!("shard file name {file:?} is not a plain file name"),
        ));
    }
    Ok(())
}

fn check_header_sum(
    path: &str,
    format: u32,
    file: &str,
    header: Option<HeaderSum>,
    file_len: u64,
) -> Result<()> {
    check_file_name(path, file)?;
    match header {
        None if format >= 2 => Err(Error::manifest(
            path,
            format!("no header checksum for {file}"),
        )),
        Some(h) if h.len < 8 || h.len > file_len => Err(Error::manifest(
            path,
            format!(
                "header of {} bytes does not fit {file} ({file_len} bytes)",
                h.len
            ),
        )),
        _ => Ok(()),
    }
}

/// A piece's chunk map: one entry per chunk, plain file names, chunks of
/// this step inside its file (chunks of older steps are checked when they
/// are read: their files' lengths are in those steps' manifests).
fn check_chunk_map(
    path: &str,
    name: &str,
    piece: &Piece,
    chunk_size: u64,
    file_len: u64,
) -> Result<()> {
    let bad = |reason: String| Error::manifest(path, format!("tensor `{name}`: {reason}"));
    let want = chunk_count(piece.length, chunk_size);
    if piece.chunks.len() as u64 != want {
        return Err(bad(format!(
            "chunk map of {} entries for {want} chunks",
            piece.chunks.len()
        )));
    }
    for (i, c) in piece.chunks.iter().enumerate() {
        check_file_name(path, &c.file)?;
        let len = chunk_size.min(piece.length - i as u64 * chunk_size);
        let stored = match c.zstd {
            // A frame is at most a little larger than its input.
            Some(z) if z == 0 || z > zstd_bound(len) => {
                return Err(bad(format!(
                    "chunk {i}: a zstd frame of {z} bytes for {len} bytes of data"
                )));
            }
            Some(z) => z,
            None => len,
        };
        if !matches!(c.planes, 0 | 1 | 2 | 4 | 8) {
            return Err(bad(format!("chunk {i}: {} byte planes", c.planes)));
        }
        let end = c
            .offset
            .checked_add(stored)
            .ok_or_else(|| bad(format!("chunk {i}: offset + length overflows")))?;
        // A compaction file's length is checked when it is read.
        if c.step.is_none()
            && !layout::is_compact_file(&c.file)
            && (c.file != piece.file || end > file_len)
        {
            return Err(bad(format!(
                "chunk {i} ({} at {}..{end}) is not inside this step's file {} ({file_len} bytes)",
                c.file, c.offset, piece.file
            )));
        }
    }
    Ok(())
}

/// The most bytes zstd can need for `len` bytes of input
/// (`ZSTD_COMPRESSBOUND`).
pub fn zstd_bound(len: u64) -> u64 {
    len + (len >> 8)
        + if len < (128 << 10) {
            ((128 << 10) - len) >> 11
        } else {
            0
        }
}

fn check_piece(
    path: &str,
    name: &str,
    dtype: DType,
    global: &[u64],
    piece: &Piece,
    chunk_size: u64,
    file_len: u64,
) -> Result<()> {
    let bad = |reason: String| Error::manifest(path, format!("tensor `{name}`: {reason}"));
    check_file_name(path, &piece.file)?;
    if global.len() > MAX_DIMS {
        return Err(bad(format!("{} dimensions", global.len())));
    }
    piece
        .shard(global)
        .validate()
        .map_err(|e| bad(e.to_string()))?;
    let want =
        checked_nbytes(&piece.shape, dtype).ok_or_else(|| bad("piece size overflows".into()))?;
    if want != piece.length {
        return Err(bad(format!(
            "piece length {} but {dtype} x {:?} is {want} bytes",
            piece.length, piece.shape
        )));
    }
    let end = piece
        .offset
        .checked_add(piece.length)
        .ok_or_else(|| bad("offset + length overflows".into()))?;
    if piece.chunks.is_empty() && end > file_len {
        return Err(bad(format!(
            "piece ends at byte {end}, past the end of {} ({file_len} bytes)",
            piece.file
        )));
    }
    if !piece.chunks.is_empty() {
        check_chunk_map(path, name, piece, chunk_size, file_len)?;
    }
    if piece.crc32c.len() as u64 != chunk_count(piece.length, chunk_size) {
        return Err(bad(format!(
            "{} checksums for {} bytes in chunks of {chunk_size}",
            piece.crc32c.len(),
            piece.length
        )));
    }
    Ok(())
}

/// Checks that `pieces` cover every element of a tensor of `global` exactly
/// once: their element counts add up to the tensor's and no two overlap.
fn check_tiling(path: &str, name: &str, global: &[u64], pieces: &[Piece]) -> Result<()> {
    let total = checked_numel(global)
        .ok_or_else(|| Error::manifest(path, format!("tensor `{name}`: shape overflows")))?;
    let mut sum: u64 = 0;
    for p in pieces {
        sum = sum
            .checked_add(checked_numel(&p.shape).unwrap_or(u64::MAX))
            .ok_or_else(|| {
                Error::manifest(path, format!("tensor `{name}`: piece sizes overflow"))
            })?;
    }
    // Pairwise overlap, sorted along the first dimension so only pieces that
    // can overlap there are compared.
    let mut shards: Vec<ShardSpec> = pieces
        .iter()
        .filter(|p| checked_numel(&p.shape) != Some(0))
        .map(|p| p.shard(global))
        .collect();
    shards.sort_by_key(|s| s.offsets.first().copied().unwrap_or(0));
    for i in 0..shards.len() {
        for j in i + 1..shards.len() {
            if let (Some(a), Some(b)) = (shards[i].offsets.first(), shards[j].offsets.first())
                && *b >= a + shards[i].shape[0]
            {
                break;
            }
            if shards[i].intersect(&shards[j]).is_some() {
                return Err(Error::Incomplete {
                    path: path.to_string(),
                    reason: format!(
                        "tensor `{name}`: pieces at {:?} and {:?} overlap",
                        shards[i].offsets, shards[j].offsets
                    ),
                });
            }
        }
    }
    if sum != total {
        return Err(Error::Incomplete {
            path: path.to_string(),
            reason: format!("tensor `{name}`: pieces cover {sum} of {total} elements"),
        });
    }
    Ok(())
}

/// Appends the self-checksum to a pretty-printed JSON object: the crc32c
/// of everything before the closing brace becomes its last member.
/// Anything that is not a JSON object is returned unchanged.
pub fn seal(json: &[u8]) -> Vec<u8> {
    let end = json
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let trimmed = &json[..end];
    let Some(body) = trimmed.strip_suffix(b"}") else {
        return json.to_vec();
    };
    let body = {
        let e = body
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        &body[..e]
    };
    let crc = crc32c::crc32c(body);
    let mut out = Vec::with_capacity(body.len() + 40);
    out.extend_from_slice(body);
    out.extend_from_slice(format!(",\n  \"{SEAL_KEY}\": \"{crc:08x}\"\n}}\n").as_bytes());
    out
}

/// Checks the self-checksum of a manifest. `Ok(true)`: present and
/// correct; `Ok(false)`: absent (only acceptable in format 1); an error if
/// present and wrong.
fn check_seal(path: &str, bytes: &[u8]) -> Result<bool> {
    let key = format!(",\n  \"{SEAL_KEY}\": \"");
    // `<body>,\n  "manifest_crc32c": "xxxxxxxx"\n}\n`, the trailing newline
    // optional.
    let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let Some(text) = text.strip_suffix(b"\"\n}") else {
        return Ok(false);
    };
    let Some(hex_at) = text.len().checked_sub(8) else {
        return Ok(false);
    };
    let (before, hex) = text.split_at(hex_at);
    let Some(body) = before.strip_suffix(key.as_bytes()) else {
        return Ok(false);
    };
    let recorded = std::str::from_utf8(hex)
        .ok()
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| Error::manifest(path, format!("{SEAL_KEY} is not 8 hex digits")))?;
    let found = crc32c::crc32c(body);
    if found != recorded {
        return Err(Error::manifest(
            path,
            format!(
                "checksum mismatch: {SEAL_KEY} says {recorded:08x}, the manifest's bytes give {found:08x} (corrupt manifest)"
            ),
        ));
    }
    Ok(true)
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::manifest(
            path,
            format!(
                "{} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            ),
        ));
    }
    let sealed = check_seal(path, bytes)?;
    if !sealed {
        // Only format 1 predates the checksum; a newer manifest without one
        // lost it to corruption.
        let format = serde_json::from_slice::<FormatOnly>(bytes)
            .map(|f| f.format)
            .map_err(|e| Error::manifest(path, format!("{e} (and no {SEAL_KEY})")))?;
        if format >= 2 {
            return Err(Error::manifest(
                path,
                format!("format {format} manifest without its {SEAL_KEY} (corrupt manifest)"),
            ));
        }
    }
    serde_json::from_slice(bytes).map_err(|e| Error::manifest(path, e.to_string()))
}

/// Pretty JSON with its self-checksum.
fn to_sealed_json<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(v)
        .map_err(|e| Error::Internal(format!("cannot serialize the {what}: {e}")))?;
    Ok(seal(&json))
}

impl RankManifest {
    /// Parses and validates a rank manifest read from `path`.
    pub fn parse(path: &str, bytes: &[u8]) -> Result<Self> {
        let m: RankManifest = parse_json(path, bytes)?;
        m.validate(path)?;
        Ok(m)
    }

    /// Checks internal consistency.
    pub fn validate(&self, path: &str) -> Result<()> {
        check_header(path, self.format, self.chunk_size, self.world_size)?;
        if self.rank >= self.world_size {
            return Err(Error::manifest(
                path,
                format!("rank {} out of world size {}", self.rank, self.world_size),
            ));
        }
        if self.tensors.len() > MAX_TENSORS {
            return Err(Error::manifest(path, "too many tensors"));
        }
        check_header_sum(path, self.format, &self.file, self.header, self.file_len)?;
        for t in &self.tensors {
            if let Some(rep) = &t.replication {
                if !rep.group.contains(&self.rank) || !rep.group.contains(&rep.writer) {
                    return Err(Error::manifest(
                        path,
                        format!(
                            "tensor `{}`: replica group {:?} must hold rank {} and writer {}",
                            t.name, rep.group, self.rank, rep.writer
                        ),
                    ));
                }
                if rep.writer != self.rank {
                    // Held, not written here: its place is in the writer's
                    // file.
                    let mut held = t.piece.clone();
                    held.offset = 0;
                    check_piece(
                        path,
                        &t.name,
                        t.dtype,
                        &t.global_shape,
                        &held,
                        self.chunk_size,
                        held.length,
                    )?;
                    continue;
                }
            }
            if t.piece.rank != self.rank || t.piece.file != self.file {
                return Err(Error::manifest(
                    path,
                    format!("tensor `{}` points at another rank's file", t.name),
                ));
            }
            check_piece(
                path,
                &t.name,
                t.dtype,
                &t.global_shape,
                &t.piece,
                self.chunk_size,
                self.file_len,
            )?;
        }
        Ok(())
    }

    /// Serializes to pretty JSON, sealed with its own checksum.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        to_sealed_json("rank manifest", self)
    }
}

/// The commit's check of a replicated tensor: every replica declared the
/// same pieces, each piece's writer wrote it, and every replica's chunk
/// checksums match the others'. Returns one piece per replicated region
/// (the writer's), listing the replicas that matched.
fn merge_replicas(
    step: u64,
    name: &str,
    copies: Vec<(u32, Replication, Piece)>,
) -> Result<Vec<Piece>> {
    // One region per (offsets, shape); every rank of its group must hold it.
    type Region = (Vec<u64>, Vec<u64>);
    let mut regions: BTreeMap<Region, Vec<(u32, Replication, Piece)>> = BTreeMap::new();
    for c in copies {
        regions
            .entry((c.2.global_offsets.clone(), c.2.shape.clone()))
            .or_default()
            .push(c);
    }
    let mut out = Vec::with_capacity(regions.len());
    for ((offsets, shape), held) in regions {
        let group = held[0].1.group.clone();
        let holders: Vec<u32> = held.iter().map(|(r, _, _)| *r).collect();
        if held.iter().any(|(_, rep, _)| rep.group != group) || holders != group {
            return Err(Error::tensor(
                name,
                format!(
                    "replicas disagree on the piece at {offsets:?} of shape {shape:?}: held by ranks {holders:?}, declared groups {:?}",
                    held.iter()
                        .map(|(_, rep, _)| rep.group.clone())
                        .collect::<Vec<_>>()
                ),
            ));
        }
        let writer = held[0].1.writer;
        let Some(written) = held
            .iter()
            .find(|(r, rep, p)| *r == writer && rep.writer == writer && p.rank == writer)
            .map(|(_, _, p)| p.clone())
        else {
            return Err(Error::tensor(
                name,
                format!("no replica in {group:?} wrote the piece at {offsets:?} (writer {writer})"),
            ));
        };
        let chunks = held
            .iter()
            .map(|(_, _, p)| p.crc32c.len())
            .max()
            .unwrap_or(0);
        for chunk in 0..chunks {
            let crcs: Vec<Option<u32>> = held
                .iter()
                .map(|(_, _, p)| p.crc32c.get(chunk).copied())
                .collect();
            if crcs.iter().all(|c| *c == crcs[0]) {
                continue;
            }
            // The odd ones out against a strict majority, else all of them.
            let majority = crcs
                .iter()
                .find(|c| crcs.iter().filter(|d| d == c).count() * 2 > crcs.len());
            let ranks = match majority {
                Some(m) => holders
                    .iter()
                    .zip(&crcs)
                    .filter(|(_, c)| *c != m)
                    .map(|(r, _)| *r)
                    .collect(),
                None => holders.clone(),
            };
            return Err(Error::ReplicaMismatch {
                step,
                tensor: name.to_string(),
                chunk: held[0].1.first_chunk as usize + chunk,
                ranks,
            });
        }
        let mut piece = written;
        piece.replicas = holders;
        out.push(piece);
    }
    Ok(out)
}

/// Why the coordinator gave up on committing a step (`ABORTED.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAborted {
    /// Format version.
    pub format: u32,
    /// The incarnation whose save was refused (a later incarnation's save of
    /// the same step number is not concerned).
    pub incarnation: String,
    /// The error's kind ([`Error::kind`]).
    pub kind: String,
    /// For a replica mismatch: the tensor, the chunk and the odd ranks out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    /// See `tensor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<usize>,
    /// See `tensor`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<u32>,
    /// The error, as the coordinator reported it.
    pub message: String,
}

impl StepAborted {
    /// The marker for `e`.
    pub fn of(incarnation: &str, e: &Error) -> Self {
        let (tensor, chunk, ranks) = match e {
            Error::ReplicaMismatch {
                tensor,
                chunk,
                ranks,
                ..
            } => (Some(tensor.clone()), Some(*chunk), ranks.clone()),
            _ => (None, None, Vec::new()),
        };
        Self {
            format: FORMAT_VERSION,
            incarnation: incarnation.to_string(),
            kind: e.kind().to_string(),
            tensor,
            chunk,
            ranks,
            message: e.to_string(),
        }
    }

    /// Parses a marker read from `path` (sealed like the manifests).
    pub fn parse(path: &str, bytes: &[u8]) -> Result<Self> {
        parse_json(path, bytes)
    }

    /// Serializes to sealed JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        to_sealed_json("aborted-step marker", self)
    }

    /// The error the coordinator met, for the other ranks of step `step`.
    pub fn into_error(self, step: u64) -> Error {
        match (self.kind.as_str(), self.tensor, self.chunk) {
            ("ReplicaMismatch", Some(tensor), Some(chunk)) => Error::ReplicaMismatch {
                step,
                tensor,
                chunk,
                ranks: self.ranks,
            },
            _ => Error::Incomplete {
                path: format!("step {step}"),
                reason: format!("the coordinator gave up: {}", self.message),
            },
        }
    }
}

impl Manifest {
    /// Parses and validates a manifest read from `path`.
    pub fn parse(path: &str, bytes: &[u8]) -> Result<Self> {
        let m: Manifest = parse_json(path, bytes)?;
        m.validate(path)?;
        Ok(m)
    }

    /// Checks internal consistency: header, ranks 0..world_size each once,
    /// every piece inside its file, checksums per chunk, exact tiling.
    pub fn validate(&self, path: &str) -> Result<()> {
        check_header(path, self.format, self.chunk_size, self.world_size)?;
        if self.ranks.len() != self.world_size as usize
            || self
                .ranks
                .iter()
                .enumerate()
                .any(|(i, r)| r.rank as usize != i)
        {
            return Err(Error::manifest(
                path,
                format!("ranks do not list 0..{} in order", self.world_size),
            ));
        }
        if self.tensors.len() > MAX_TENSORS {
            return Err(Error::manifest(path, "too many tensors"));
        }
        for r in &self.ranks {
            check_header_sum(path, self.format, &r.file, r.header, r.file_len)?;
        }
        for (name, t) in &self.tensors {
            for p in &t.pieces {
                let rank = self.ranks.get(p.rank as usize).ok_or_else(|| {
                    Error::manifest(
                        path,
                        format!(
                            "tensor `{name}`: piece of rank {} outside world size {}",
                            p.rank, self.world_size
                        ),
                    )
                })?;
                if rank.file != p.file {
                    return Err(Error::manifest(
                        path,
                        format!(
                            "tensor `{name}`: piece file {} is not rank {}'s file",
                            p.file, p.rank
                        ),
                    ));
                }
                check_piece(
                    path,
                    name,
                    t.dtype,
                    &t.shape,
                    p,
                    self.chunk_size,
                    rank.file_len,
                )?;
            }
            if let Some(s) = t
                .pieces
                .iter()
                .flat_map(Piece::referenced_steps)
                .find(|s| *s >= self.step)
            {
                return Err(Error::manifest(
                    path,
                    format!(
                        "tensor `{name}` refers to step {s}, not older than this step {}",
                        self.step
                    ),
                ));
            }
            check_tiling(path, name, &t.shape, &t.pieces)?;
        }
        Ok(())
    }

    /// Merges the rank manifests of one step into the global manifest,
    /// checking that they belong together (run, step, world size,
    /// incarnation) and that each tensor's pieces tile it exactly once.
    pub fn from_ranks(mut ranks: Vec<RankManifest>) -> Result<Self> {
        ranks.sort_by_key(|r| r.rank);
        let first = ranks
            .first()
            .ok_or_else(|| Error::Internal("no rank manifests to merge".into()))?;
        let dir = layout::step_dir(&first.run, first.step);
        let path = format!("{dir}/{}", layout::MANIFEST);
        let (run, step, world_size) = (first.run.clone(), first.step, first.world_size);
        let (incarnation, chunk_size) = (first.incarnation.clone(), first.chunk_size);
        if ranks.len() != world_size as usize {
            return Err(Error::Incomplete {
                path: dir,
                reason: format!("{} of {world_size} rank manifests present", ranks.len()),
            });
        }
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        let mut replicated: BTreeMap<String, Vec<(u32, Replication, Piece)>> = BTreeMap::new();
        let mut entries = Vec::with_capacity(ranks.len());
        let created_unix_ms = ranks.iter().map(|r| r.created_unix_ms).min().unwrap_or(0);
        let parent = first.parent;
        for (i, r) in ranks.into_iter().enumerate() {
            if r.rank as usize != i
                || r.run != run
                || r.step != step
                || r.world_size != world_size
                || r.incarnation != incarnation
                || r.chunk_size != chunk_size
            {
                return Err(Error::Incomplete {
                    path: dir,
                    reason: format!(
                        "rank manifest {} (run {}, step {}, world {}, incarnation {}) does not belong with rank 0's",
                        r.rank, r.run, r.step, r.world_size, r.incarnation
                    ),
                });
            }
            for t in r.tensors {
                let entry = tensors
                    .entry(t.name.clone())
                    .or_insert_with(|| TensorEntry {
                        dtype: t.dtype,
                        shape: t.global_shape.clone(),
                        role: t.role,
                        pieces: Vec::new(),
                    });
                if entry.dtype != t.dtype || entry.shape != t.global_shape {
                    return Err(Error::tensor(
                        &t.name,
                        format!(
                            "rank {} saved it as {} {:?}, another rank as {} {:?}",
                            r.rank, t.dtype, t.global_shape, entry.dtype, entry.shape
                        ),
                    ));
                }
                match t.replication {
                    Some(rep) => replicated
                        .entry(t.name.clone())
                        .or_default()
                        .push((r.rank, rep, t.piece)),
                    None => entry.pieces.push(t.piece),
                }
            }
            entries.push(RankEntry {
                rank: r.rank,
                file: r.file,
                file_len: r.file_len,
                header: r.header,
                loop_state: r.loop_state,
            });
        }
        for (name, copies) in replicated {
            let pieces = merge_replicas(step, &name, copies)?;
            if let Some(entry) = tensors.get_mut(&name) {
                entry.pieces.extend(pieces);
            }
        }
        let m = Manifest {
            format: FORMAT_VERSION,
            library: library_version(),
            run,
            step,
            world_size,
            incarnation,
            chunk_size,
            created_unix_ms,
            tensors,
            ranks: entries,
            lineage: 0,
            parent,
            commit: None,
        };
        m.validate(&path)?;
        Ok(m)
    }

    /// Serializes to pretty JSON, sealed with its own checksum.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        to_sealed_json("manifest", self)
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors
            .values()
            .flat_map(|t| &t.pieces)
            .map(|p| p.length)
            .sum()
    }

    /// Bytes of tensor data this step's own files hold (the rest is in
    /// older steps' files: [`Manifest::referenced_bytes`]).
    pub fn written_bytes(&self) -> u64 {
        self.data_bytes() - self.referenced_bytes()
    }

    /// Bytes of tensor data an incremental save left in older steps'
    /// files.
    pub fn referenced_bytes(&self) -> u64 {
        let cs = self.chunk_size;
        self.tensors
            .values()
            .flat_map(|t| &t.pieces)
            .flat_map(|p| {
                p.chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.step.is_some())
                    .map(move |(i, _)| cs.min(p.length - i as u64 * cs))
            })
            .sum()
    }
}

/// A run's rollbacks (`<run>/LINEAGE.json`): each time a job resumed from a
/// step older than the newest committed one, the steps above it were
/// abandoned. The record is written on every tier before those steps are
/// uncommitted, so a step whose uncommit failed (a tier down, the
/// coordinator killed half-way) is still known to be abandoned: rollback
/// `k` abandons every step above its `to_step` committed with
/// [`Manifest::lineage`] at most `k`; steps committed after it carry a
/// larger `lineage` and are the current lineage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// Format version.
    pub format: u32,
    /// Rollbacks, oldest first.
    pub rollbacks: Vec<Rollback>,
}

/// One rollback of a [`Lineage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// The step the job resumed from.
    pub to_step: u64,
    /// The committed steps above it at the time (those the coordinator saw).
    pub abandoned: Vec<u64>,
    /// The incarnation that resumed.
    pub incarnation: String,
    /// When, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Lineage {
    /// Parses a lineage record read from `path`.
    pub fn parse(path: &str, bytes: &[u8]) -> Result<Self> {
        parse_json(path, bytes)
    }

    /// Serializes to pretty JSON, sealed with its own checksum.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        to_sealed_json("lineage", self)
    }

    /// Whether `step`, committed with lineage count `lineage`, was
    /// abandoned by a later rollback.
    pub fn abandons(&self, step: u64, lineage: u64) -> bool {
        self.rollbacks
            .iter()
            .enumerate()
            .any(|(k, r)| k as u64 >= lineage && step > r.to_step)
    }

    /// The rollbacks that manifests committed as `(step, rollback count)`
    /// show, for a record that was lost: rollback `k` resumed below the
    /// lowest step committed with a count above `k` (it abandons nothing
    /// when no such step exists). See
    /// [`read_or_infer`](crate::store::lineage::read_or_infer).
    pub fn inferred(counts: &[(u64, u64)]) -> Self {
        let rollbacks = counts.iter().map(|&(_, l)| l).max().unwrap_or(0);
        let rollbacks = (0..rollbacks)
            .map(|k| Rollback {
                to_step: counts
                    .iter()
                    .filter(|&&(_, l)| l > k)
                    .map(|&(s, _)| s.saturating_sub(1))
                    .min()
                    .unwrap_or(u64::MAX),
                abandoned: Vec::new(),
                incarnation: "inferred".into(),
                unix_ms: 0,
            })
            .collect();
        Self {
            format: 1,
            rollbacks,
        }
    }

    /// The lowest step any rollback resumed from: steps at or below it are
    /// never abandoned.
    pub fn floor(&self) -> Option<u64> {
        self.rollbacks.iter().map(|r| r.to_step).min()
    }
}
