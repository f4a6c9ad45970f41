//! Micro-benchmarks of the integrity path: per-chunk crc32c of a staged
//! stream (one-shot and fed in block-sized pieces that do not line up with
//! chunks), verification, and blake3, beside a plain read of the same bytes
//! (the floor: checksumming cannot beat touching every byte once).
//!
//! `cargo bench -p ckpt-core --bench checksum`

use std::hint::black_box;

use ckpt_core::format::checksum::{ChunkedCrc, DEFAULT_CHUNK_SIZE, chunk_crcs, verify_chunks};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const LEN: usize = 64 << 20;

fn data() -> Vec<u8> {
    ckpt_core::rng::pattern(LEN, 1)
}

fn checksum(c: &mut Criterion) {
    let data = data();
    let mut g = c.benchmark_group("checksum_64MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(20);
    g.bench_function("floor_sum_u64", |b| {
        b.iter(|| {
            let s = data.chunks_exact(8).fold(0u64, |acc, w| {
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                acc.wrapping_add(u64::from_le_bytes(a))
            });
            black_box(s)
        })
    });
    g.bench_function("crc32c_chunked_4MiB", |b| {
        b.iter(|| black_box(chunk_crcs(black_box(&data), DEFAULT_CHUNK_SIZE)))
    });
    g.bench_function("crc32c_streamed_3MiB_pieces", |b| {
        // Staging blocks rarely line up with chunks: feed odd-sized pieces.
        b.iter(|| {
            let mut crc = ChunkedCrc::new(DEFAULT_CHUNK_SIZE);
            for piece in data.chunks(3 << 20) {
                crc.update(piece);
            }
            black_box(crc.finish())
        })
    });
    let table = chunk_crcs(&data, DEFAULT_CHUNK_SIZE);
    g.bench_function("verify_chunks_4MiB", |b| {
        b.iter(|| verify_chunks("bench", black_box(&data), DEFAULT_CHUNK_SIZE, 0, &table))
    });
    g.bench_function("blake3", |b| {
        b.iter(|| black_box(blake3::hash(black_box(&data))))
    });
    g.finish();
}

criterion_group!(benches, checksum);
criterion_main!(benches);
