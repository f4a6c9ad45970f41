//! Checksums: crc32c per fixed-size chunk for every byte written, blake3
//! where a tensor's identity matters (`ckpt inspect`, bit-exact resume
//! checks).

use crate::error::{Error, Result};

/// Default chunk size for per-chunk crc32c: 4 MiB. Small enough that a
/// corrupt chunk is located precisely and verification streams with reads,
/// large enough that the table of checksums stays small (256 entries per GiB).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// Number of chunks covering `len` bytes.
pub fn chunk_count(len: u64, chunk_size: u64) -> u64 {
    len.div_ceil(chunk_size.max(1))
}

/// crc32c of every `chunk_size` chunk of `data` (the last may be short).
///
/// ```
/// let crcs = ckpt_core::format::checksum::chunk_crcs(&[0u8; 10], 4);
/// assert_eq!(crcs.len(), 3);
/// ```
pub fn chunk_crcs(data: &[u8], chunk_size: u64) -> Vec<u32> {
    data.chunks(chunk_size.max(1) as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// Verifies `data`, which holds chunks `first_chunk..` of an object region,
/// against `expected` (the full table for that region). `data` must start on
/// a chunk boundary; its last chunk may be short only if it is the region's
/// last chunk.
pub fn verify_chunks(
    path: &str,
    data: &[u8],
    chunk_size: u64,
    first_chunk: usize,
    expected: &[u32],
) -> Result<()> {
    for (i, chunk) in data.chunks(chunk_size.max(1) as usize).enumerate() {
        let idx = first_chunk + i;
        let want = *expected.get(idx).ok_or_else(|| Error::Corrupt {
            path: path.to_string(),
            chunk: idx,
            expected: 0,
            found: crc32c::crc32c(chunk),
        })?;
        let found = crc32c::crc32c(chunk);
        if found != want {
            return Err(Error::Corrupt {
                path: path.to_string(),
                chunk: idx,
                expected: want,
                found,
            });
        }
    }
    Ok(())
}

/// crc32c per chunk over bytes fed in arbitrary pieces (the staged stream
/// arrives as block slices that do not line up with chunks).
#[derive(Debug, Clone)]
pub struct ChunkedCrc {
    chunk: u64,
    filled: u64,
    crc: u32,
    out: Vec<u32>,
}

impl ChunkedCrc {
    /// Starts a table for chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> Self {
        Self {
            chunk: chunk_size.max(1),
            filled: 0,
            crc: 0,
            out: Vec::new(),
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = ((self.chunk - self.filled) as usize).min(data.len());
            self.crc = crc32c::crc32c_append(self.crc, &data[..n]);
            self.filled += n as u64;
            data = &data[n..];
            if self.filled == self.chunk {
                self.out.push(self.crc);
                self.crc = 0;
                self.filled = 0;
            }
        }
    }

    /// The table, including a final short chunk.
    pub fn finish(mut self) -> Vec<u32> {
        if self.filled > 0 {
            self.out.push(self.crc);
        }
        self.out
    }
}

/// Hex blake3 digest of `data`.
pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_crc_matches_whole_chunks_whatever_the_pieces() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 253) as u8).collect();
        for piece in [1usize, 7, 100, 4096, 9999] {
            let mut c = ChunkedCrc::new(1000);
            for p in data.chunks(piece) {
                c.update(p);
            }
            assert_eq!(c.finish(), chunk_crcs(&data, 1000), "piece size {piece}");
        }
    }

    #[test]
    fn verify_detects_flipped_byte_and_names_chunk() {
        let mut data = vec![7u8; 100];
        let crcs = chunk_crcs(&data, 32);
        assert_eq!(crcs.len(), 4);
        verify_chunks("f", &data, 32, 0, &crcs).expect("clean data verifies");
        data[70] ^= 1;
        match verify_chunks("f", &data, 32, 0, &crcs) {
            Err(Error::Corrupt { chunk, path, .. }) => {
                assert_eq!(chunk, 2);
                assert_eq!(path, "f");
            }
            other => panic!("expected corrupt chunk 2, got {other:?}"),
        }
        // Verifying a suffix starting at chunk 3 only looks at the tail.
        verify_chunks("f", &data[96..], 32, 3, &crcs).expect("tail chunk is intact");
    }
}
