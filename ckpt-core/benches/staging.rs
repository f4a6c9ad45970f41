//! Micro-benchmarks of the staging copy, the part of a save the training
//! loop waits for: the math-stop of `Checkpointer::save` (flush excluded:
//! it runs outside the timed region) beside a plain `memcpy` of the same
//! bytes into a reused, pre-touched buffer (the floor).
//!
//! `cargo bench -p ckpt-core --bench staging`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_core::{Checkpointer, MemoryTier, TensorRef, TensorView, TierPolicy, TrainingState};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const STATE: usize = 256 << 20;

fn tensors(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| ckpt_core::rng::pattern(STATE / count, i as u64))
        .collect()
}

fn staging(c: &mut Criterion) {
    let mut g = c.benchmark_group("staging_256MiB");
    g.throughput(Throughput::Bytes(STATE as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for count in [4usize, 64] {
        let src = tensors(count);
        g.bench_with_input(BenchmarkId::new("floor_memcpy", count), &src, |b, src| {
            // As good a destination as the pool: THP-advised, pre-touched.
            let mut dst = memmap2::MmapMut::map_anon(STATE).expect("mmap");
            #[cfg(target_os = "linux")]
            let _ = dst.advise(memmap2::Advice::HugePage);
            dst.iter_mut().step_by(4096).for_each(|x| *x = 0);
            b.iter(|| {
                let mut off = 0;
                for t in src {
                    dst[off..off + t.len()].copy_from_slice(t);
                    off += t.len();
                }
                black_box(&mut dst);
            })
        });
        let views: Vec<TensorRef<'_>> = src
            .iter()
            .enumerate()
            .map(|(i, t)| {
                TensorRef::new(format!("t{i}"), ckpt_core::DType::U8, &[t.len() as u64], t)
            })
            .collect();
        for threads in [1usize, 2] {
            let ckpt = Checkpointer::builder("bench")
                .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
                .staging_capacity(STATE as u64)
                .copy_threads(threads)
                .build()
                .expect("checkpointer");
            let mut step = 0u64;
            g.bench_with_input(
                BenchmarkId::new(format!("save_math_stop_{threads}_threads"), count),
                &views,
                |b, views| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            step += 1;
                            let state = TrainingState::builder(step)
                                .model(views.iter().map(|v| v as &dyn TensorView))
                                .without_optimizer()
                                .without_loop_state()
                                .build()
                                .expect("state");
                            let t = Instant::now();
                            let h = ckpt.save(&state).expect("save");
                            total += h.math_stop().min(t.elapsed());
                            // The flush is not part of the math-stop.
                            h.wait().expect("flush");
                        }
                        total
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, staging);
criterion_main!(benches);
