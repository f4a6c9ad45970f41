//! Fuzzes the shard-header parser. The first 8 bytes of the input give the
//! file length the header is checked against; the rest is the start of the
//! file. Parsing must never panic, and every tensor it accepts must lie
//! inside the file, after the header.

#![no_main]

use ckpt_core::format::shard_file::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (file_len, bytes) = match data.split_first_chunk::<8>() {
        Some((len, rest)) => (u64::from_le_bytes(*len), rest),
        None => (data.len() as u64, data),
    };
    for len in [file_len, bytes.len() as u64] {
        if let Ok((tensors, _meta)) = parse_header("rank-00000.safetensors", bytes, len) {
            for t in &tensors {
                assert!(
                    t.range.start <= t.range.end && t.range.end <= len && t.range.start >= 8,
                    "tensor `{}` at {:?} outside a file of {len} bytes",
                    t.name,
                    t.range
                );
            }
        }
    }
});
