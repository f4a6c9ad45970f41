//! Incremental saves, per tier: a chunk whose content equals the same chunk
//! of the previous save committed on this tier is not written again.
//!
//! The tier's byte stream (the shard file: header, then every tensor this
//! rank writes, back to back) is cut into the manifest's checksum chunks.
//! Each chunk's blake3 is compared with the same chunk (same tensor, same
//! piece of it, same index) of the tier's [`Base`]; an equal one is
//! skipped and recorded as a [`ChunkLoc`] pointing at the file that holds
//! its bytes (references always name that file directly, never a step
//! that itself refers on). The shard file then holds the header and the
//! chunks this save wrote, in order, and each piece that is not contiguous
//! carries a chunk map. Identity is blake3 over the chunk plus its length:
//! never crc32c alone.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::manifest::{ChunkLoc, Manifest, RankManifest};
use crate::save::policy::Compression;
use crate::save::stream::SaveCtx;

/// One chunk as saved: its content hash, length and where its bytes are.
type Saved = (blake3::Hash, u64, ChunkLoc);

/// What a tier holds of the previous save committed on it: per piece
/// (tensor, offsets in the global tensor), each chunk's hash and where
/// its bytes are.
#[derive(Debug, Default)]
pub(crate) struct Base {
    /// Incremental saves since the last whole one.
    pub chain: u32,
    /// The tier's write rate on that save (bytes written over the time to
    /// durable), for [`Compression::Auto`].
    pub write_bps: Option<f64>,
    /// Not read yet: the step this process restored, whose MANIFEST on
    /// the tier carries the chunk hashes (read by the first save).
    pub pending: Option<u64>,
    pieces: HashMap<(String, Vec<u64>), Vec<Saved>>,
}

impl Base {
    /// The base of a process that restored `step`: read from the tier's
    /// MANIFEST of that step when the first save needs it.
    pub fn pending(step: u64) -> Self {
        Self {
            pending: Some(step),
            ..Self::default()
        }
    }

    /// What `rank` wrote in the committed checkpoint `m`, from the chunk
    /// hashes its pieces carry (pieces without them are not a base: their
    /// chunks are written again). `None` when no piece has them.
    ///
    /// The chain counts the older steps these pieces refer into (a process
    /// does not know how many saves made them): a lower bound of the saves
    /// since the last whole one.
    pub fn from_manifest(m: &Manifest, rank: u32) -> Option<Self> {
        let cs = m.chunk_size;
        let mut pieces = HashMap::new();
        let mut older = std::collections::BTreeSet::new();
        for (name, t) in &m.tensors {
            for p in t.pieces.iter().filter(|p| p.rank == rank) {
                let n = p.length.div_ceil(cs) as usize;
                if p.chunk_blake3.len() != n || !(p.chunks.is_empty() || p.chunks.len() == n) {
                    continue;
                }
                let mut saved = Vec::with_capacity(n);
                for (k, hex) in p.chunk_blake3.iter().enumerate() {
                    let hash = blake3::Hash::from_hex(hex).ok()?;
                    let at = k as u64 * cs;
                    let len = cs.min(p.length - at);
                    let loc = match p.chunks.get(k) {
                        Some(loc) => ChunkLoc {
                            step: Some(loc.step.unwrap_or(m.step)),
                            ..loc.clone()
                        },
                        None => ChunkLoc {
                            step: Some(m.step),
                            file: p.file.clone(),
                            offset: p.offset + at,
                            zstd: None,
                            planes: 0,
                        },
                    };
                    if loc.step != Some(m.step) {
                        older.extend(loc.step);
                    }
                    saved.push((hash, len, loc));
                }
                pieces.insert((name.clone(), p.global_offsets.clone()), saved);
            }
        }
        (!pieces.is_empty()).then_some(Self {
            chain: older.len() as u32,
            write_bps: None,
            pending: None,
            pieces,
        })
    }
}

/// A tier's base, shared between its saves.
pub(crate) type BaseCell = Arc<std::sync::Mutex<Option<Arc<Base>>>>;

/// One run of the stream: bytes outside any chunk (the header) or one
/// whole chunk of a tensor.
enum Seg {
    Raw(Bytes),
    Chunk {
        tensor: usize,
        index: usize,
        parts: Vec<Bytes>,
    },
}

/// Cuts a tier's stream into [`Seg`]s and decides, chunk by chunk,
/// whether it is written.
pub(crate) struct Dedup {
    ctx: Arc<SaveCtx>,
    base: Option<Arc<Base>>,
    /// The tensors in the stream, in file order: (index in ctx.tensors,
    /// file offset, length).
    order: Vec<(usize, u64, u64)>,
    /// Position in the stream.
    pos: u64,
    /// The chunk being gathered: its tensor (position in `order`), index,
    /// start and end in the file, and its parts so far.
    current: Option<(usize, usize, u64, u64, Vec<Bytes>)>,
    /// Bytes written to the tier's file so far.
    pub written: u64,
    /// Bytes of chunks skipped (their bytes are in older files).
    pub referenced: u64,
    /// Per tensor of `order`: each chunk's hash, length and location.
    chunks: Vec<Vec<Saved>>,
    file: String,
    /// Whether unchanged chunks are skipped (else every chunk is written:
    /// a tier that only compresses).
    dedup: bool,
    /// Whether chunk hashes are computed (for the next save's base).
    hash: bool,
    compression: Compression,
    /// Per tensor of `order`, under `Auto`: whether its chunks are
    /// compressed, decided on its first chunk.
    auto: Vec<Option<bool>>,
    /// Bytes of chunks stored compressed, and their compressed size.
    pub compressed: (u64, u64),
}

impl Dedup {
    /// A stream to cut against `base` (`None`: a whole save, which still
    /// records the hashes for the next one).
    pub fn new(
        ctx: Arc<SaveCtx>,
        base: Option<Arc<Base>>,
        dedup: bool,
        hash: bool,
        compression: Compression,
    ) -> Self {
        let mut order: Vec<(usize, u64, u64)> = ctx
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.written_by(ctx.rank))
            .map(|(i, t)| (i, t.offset, t.len))
            .collect();
        order.sort_by_key(|o| o.1);
        let chunks = order.iter().map(|_| Vec::new()).collect();
        let auto = order.iter().map(|_| None).collect();
        let file = crate::format::layout::rank_data_file(ctx.rank, &ctx.attempt);
        Self {
            ctx,
            base,
            order,
            pos: 0,
            current: None,
            written: 0,
            referenced: 0,
            chunks,
            file,
            dedup,
            hash,
            compression,
            auto,
            compressed: (0, 0),
        }
    }

    /// The chunk (tensor position in `order`, index, start, end) that the
    /// stream position `pos` falls in, if any.
    fn chunk_at(&self, pos: u64) -> Option<(usize, usize, u64, u64)> {
        let cs = self.ctx.chunk_size;
        let k = self
            .order
            .partition_point(|(_, off, _)| *off <= pos)
            .checked_sub(1)?;
        let (_, off, len) = self.order[k];
        if pos >= off + len {
            return None;
        }
        let index = (pos - off) / cs;
        let start = off + index * cs;
        Some((k, index as usize, start, (start + cs).min(off + len)))
    }

    /// Feeds the next bytes of the stream; returns the segments completed.
    fn feed(&mut self, mut b: Bytes, out: &mut Vec<Seg>) {
        while !b.is_empty() {
            if self.current.is_none() {
                match self.chunk_at(self.pos) {
                    Some((k, index, start, end)) => {
                        self.current = Some((k, index, start, end, Vec::new()));
                    }
                    None => {
                        // Outside every tensor: up to the next tensor's start.
                        let next = self
                            .order
                            .iter()
                            .map(|o| o.1)
                            .find(|off| *off > self.pos)
                            .unwrap_or(u64::MAX);
                        let n = (next - self.pos).min(b.len() as u64) as usize;
                        self.pos += n as u64;
                        out.push(Seg::Raw(b.split_to(n)));
                        continue;
                    }
                }
            }
            let Some((k, index, _, end, parts)) = self.current.as_mut() else {
                continue;
            };
            let n = (*end - self.pos).min(b.len() as u64) as usize;
            parts.push(b.split_to(n));
            self.pos += n as u64;
            if self.pos == *end {
                let (tensor, index) = (*k, *index);
                let parts = std::mem::take(parts);
                self.current = None;
                out.push(Seg::Chunk {
                    tensor,
                    index,
                    parts,
                });
            }
        }
    }

    /// Feeds `b`; returns what is to be written, in order (chunks are
    /// held back until whole, then written or skipped).
    pub fn push(&mut self, b: Bytes) -> Vec<Bytes> {
        let mut segs = Vec::new();
        self.feed(b, &mut segs);
        let mut out = Vec::new();
        for seg in segs {
            match seg {
                Seg::Raw(b) => {
                    self.written += b.len() as u64;
                    out.push(b);
                }
                Seg::Chunk {
                    tensor,
                    index,
                    parts,
                } => {
                    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
                    // Hashes only where a later save compares against
                    // them (incremental tiers).
                    let hash = if self.hash {
                        let mut h = blake3::Hasher::new();
                        for p in &parts {
                            h.update(p);
                        }
                        h.finalize()
                    } else {
                        blake3::Hash::from_bytes([0; 32])
                    };
                    let t = &self.ctx.tensors[self.order[tensor].0];
                    let same = self
                        .base
                        .as_ref()
                        .filter(|_| self.dedup)
                        .and_then(|b| b.pieces.get(&(t.name.clone(), t.global_offsets.clone())))
                        .and_then(|chunks| chunks.get(index))
                        .filter(|(h, l, _)| *h == hash && *l == len)
                        .map(|(_, _, loc)| loc.clone());
                    let loc = match same {
                        Some(loc) => {
                            self.referenced += len;
                            loc
                        }
                        None => {
                            let mut loc = ChunkLoc {
                                step: Some(self.ctx.step),
                                file: self.file.clone(),
                                offset: self.written,
                                zstd: None,
                                planes: 0,
                            };
                            let planes = t.dtype.size() as u8;
                            match self.compress(tensor, &parts, len, planes) {
                                Some(frame) => {
                                    loc.zstd = Some(frame.len() as u64);
                                    loc.planes = planes;
                                    self.compressed.0 += len;
                                    self.compressed.1 += frame.len() as u64;
                                    self.written += frame.len() as u64;
                                    out.push(frame);
                                }
                                None => {
                                    for p in parts {
                                        self.written += p.len() as u64;
                                        out.push(p);
                                    }
                                }
                            }
                            loc
                        }
                    };
                    self.chunks[tensor].push((hash, len, loc));
                }
            }
        }
        out
    }

    /// The chunk as a zstd frame, if this tier compresses it and it
    /// shrinks to under 90%.
    fn compress(&mut self, tensor: usize, parts: &[Bytes], len: u64, planes: u8) -> Option<Bytes> {
        let decided = match self.compression {
            Compression::Off => return None,
            Compression::On => true,
            Compression::Auto => match self.auto[tensor] {
                Some(d) => d,
                None => {
                    // Decide on the first chunk: compressing pays when it
                    // saves more write time than it costs,
                    // c * (1 - ratio) > write rate.
                    let t0 = std::time::Instant::now();
                    let frame = encode(parts, len, planes);
                    let secs = t0.elapsed().as_secs_f64().max(1e-9);
                    let ratio = frame.as_ref().map_or(1.0, |f| f.len() as f64 / len as f64);
                    let speed = len as f64 / secs;
                    let worth = self
                        .base
                        .as_ref()
                        .and_then(|b| b.write_bps)
                        .is_some_and(|w| speed * (1.0 - ratio) > w);
                    self.auto[tensor] = Some(worth);
                    return frame.filter(|f| worth && f.len() as u64 * 10 < len * 9);
                }
            },
        };
        if !decided {
            return None;
        }
        encode(parts, len, planes).filter(|f| (f.len() as u64) * 10 < len * 9)
    }

    /// The stream has ended: the bytes it carried (header and every
    /// tensor, as the shard file's layout has them).
    pub fn received(&self) -> u64 {
        self.pos
    }

    /// The rank manifest as this tier stores it (pieces with chunk maps
    /// where chunks moved or were skipped, the file's real length), and the
    /// base the next save on this tier compares against.
    pub fn finish(self, full: &RankManifest) -> Result<(RankManifest, Base)> {
        if self.current.is_some() {
            return Err(Error::Internal("the stream ended inside a chunk".into()));
        }
        let mut m = full.clone();
        m.file_len = self.written;
        let mut base = Base {
            chain: match &self.base {
                Some(b) if self.referenced > 0 => b.chain + 1,
                _ => 0,
            },
            write_bps: None,
            pending: None,
            pieces: HashMap::new(),
        };
        for ((i, _, _), chunks) in self.order.iter().zip(self.chunks) {
            let t = &self.ctx.tensors[*i];
            let entry = m
                .tensors
                .iter_mut()
                .find(|e| e.name == t.name && e.piece.global_offsets == t.global_offsets)
                .ok_or_else(|| {
                    Error::Internal(format!("tensor `{}` not in its manifest", t.name))
                })?;
            let contiguous = chunks.iter().enumerate().all(|(k, (_, _, loc))| {
                loc.step == Some(self.ctx.step)
                    && loc.zstd.is_none()
                    && loc.offset == entry.piece.offset + k as u64 * self.ctx.chunk_size
            });
            if self.hash {
                entry.piece.chunk_blake3 = chunks
                    .iter()
                    .map(|(h, _, _)| h.to_hex().to_string())
                    .collect();
            }
            if !contiguous {
                entry.piece.chunks = chunks
                    .iter()
                    .map(|(_, _, loc)| ChunkLoc {
                        step: loc.step.filter(|s| *s != self.ctx.step),
                        ..loc.clone()
                    })
                    .collect();
            }
            base.pieces
                .insert((t.name.clone(), t.global_offsets.clone()), chunks);
        }
        Ok((m, base))
    }
}

/// Groups the bytes of `planes`-byte elements by significance (byte `k`
/// of every element together: exponents compress, mantissas do not) and
/// compresses the chunk into one zstd frame.
fn encode(parts: &[Bytes], len: u64, planes: u8) -> Option<Bytes> {
    let mut raw = Vec::with_capacity(len as usize);
    for p in parts {
        raw.extend_from_slice(p);
    }
    let grouped = match planes {
        2 | 4 | 8 => to_planes(&raw, planes as usize),
        _ => raw,
    };
    zstd::bulk::compress(&grouped, 1).ok().map(Bytes::from)
}

/// Byte `k` of every `n`-byte element, for each `k` in turn; a tail shorter
/// than an element stays as it is, at the end.
pub(crate) fn to_planes(data: &[u8], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    match n {
        2 => split::<2>(data, &mut out),
        4 => split::<4>(data, &mut out),
        8 => split::<8>(data, &mut out),
        _ => out.copy_from_slice(data),
    }
    out
}

/// The inverse of [`to_planes`], into `out`.
pub(crate) fn from_planes(data: &[u8], n: usize, out: &mut [u8]) {
    match n {
        2 => join::<2>(data, out),
        4 => join::<4>(data, out),
        8 => join::<8>(data, out),
        _ => out.copy_from_slice(data),
    }
}

/// [`to_planes`] for `N`-byte elements: one pass over the input, element
/// by element, writing `N` sequential planes (the compiler unrolls it).
fn split<const N: usize>(data: &[u8], out: &mut [u8]) {
    let elems = data.len() / N;
    let (planes, tail) = out.split_at_mut(elems * N);
    let mut planes: Vec<&mut [u8]> = planes.chunks_exact_mut(elems.max(1)).take(N).collect();
    for (e, el) in data.chunks_exact(N).enumerate() {
        for k in 0..N {
            planes[k][e] = el[k];
        }
    }
    tail.copy_from_slice(&data[elems * N..]);
}

/// The inverse of [`split`].
fn join<const N: usize>(data: &[u8], out: &mut [u8]) {
    let elems = data.len() / N;
    let planes: Vec<&[u8]> = data[..elems * N]
        .chunks_exact(elems.max(1))
        .take(N)
        .collect();
    for (e, el) in out[..elems * N].chunks_exact_mut(N).enumerate() {
        for k in 0..N {
            el[k] = planes[k][e];
        }
    }
    out[elems * N..].copy_from_slice(&data[elems * N..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_round_trip() {
        for (n, len) in [2usize, 4, 8]
            .into_iter()
            .flat_map(|n| [(n, 0), (n, 3), (n, 1003), (n, 4096)])
        {
            let data: Vec<u8> = (0..len as u32).map(|i| (i * 37 % 251) as u8).collect();
            let grouped = to_planes(&data, n);
            let mut back = vec![0u8; data.len()];
            from_planes(&grouped, n, &mut back);
            assert_eq!(back, data, "{n} planes, {len} bytes");
            if len >= 2 * n {
                // Plane 0 holds byte 0 of every element.
                assert_eq!(grouped[1], data[n], "{n} planes");
            }
        }
    }
}
