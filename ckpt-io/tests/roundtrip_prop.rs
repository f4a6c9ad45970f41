//! Property: any set of tensors (every dtype, scalar, empty and
//! multi-dimensional shapes, staged or zero-copy) saved through a
//! `Checkpointer` into a `LocalTier`, with any chunk size, block size and
//! staging capacity (smaller or larger than the state), restores
//! bit-identically, for the newest and an older step.

use std::sync::Arc;

use bytes::Bytes;
use ckpt_core::{
    Checkpointer, DType, RestoreOptions, SharedTensor, TensorMut, TensorRef, TensorView,
    TensorViewMut, TierPolicy, TrainingState, checked_nbytes,
};
use ckpt_io::LocalTier;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct TensorCase {
    dtype: DType,
    shape: Vec<u64>,
    /// Saved by reference (`SharedTensor`) instead of staged.
    shared: bool,
}

#[derive(Debug, Clone)]
struct Case {
    tensors: Vec<TensorCase>,
    chunk_size: u64,
    block_size: usize,
    /// Staging capacity as a fraction of the state (above 1: larger).
    staging: f64,
    copy_threads: usize,
    seed: u64,
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::F16,
        DType::BF16,
        DType::U32,
        DType::I32,
        DType::F32,
        DType::U64,
        DType::I64,
        DType::F64,
    ])
}

fn shape() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        Just(vec![]),                           // scalar
        prop::collection::vec(0u64..=3, 1..=4), // small, often empty
        (1u64..=40_000).prop_map(|n| vec![n]),  // long vector
        (1u64..=200, 1u64..=200).prop_map(|(a, b)| vec![a, b]),
        (1u64..=20, 0u64..=20, 1u64..=30).prop_map(|(a, b, c)| vec![a, b, c]),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(
            (dtype(), shape(), any::<bool>()).prop_map(|(dtype, shape, shared)| TensorCase {
                dtype,
                shape,
                shared,
            }),
            1..=6,
        ),
        prop_oneof![Just(4096u64), Just(8192), 4096u64..=70_000, Just(1 << 20)],
        12u32..=16,
        prop_oneof![0.01f64..1.0, 1.0f64..3.0],
        1usize..=3,
        any::<u64>(),
    )
        .prop_map(
            |(tensors, chunk_size, shift, staging, copy_threads, seed)| Case {
                tensors,
                chunk_size,
                block_size: 1 << shift,
                staging,
                copy_threads,
                seed,
            },
        )
}

/// Deterministic bytes for tensor `i` of `step`; booleans stay 0 or 1.
fn bytes_for(t: &TensorCase, i: usize, seed: u64, step: u64) -> Vec<u8> {
    let n = checked_nbytes(&t.shape, t.dtype).expect("small shapes") as usize;
    let mut v = ckpt_core::rng::pattern(n, seed ^ ((i as u64) << 32) ^ step);
    if t.dtype == DType::Bool {
        v.iter_mut().for_each(|b| *b &= 1);
    }
    v
}

fn save(ckpt: &Checkpointer, case: &Case, step: u64) -> Vec<Vec<u8>> {
    let data: Vec<Vec<u8>> = case
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| bytes_for(t, i, case.seed, step))
        .collect();
    let refs: Vec<TensorRef<'_>> = case
        .tensors
        .iter()
        .zip(&data)
        .enumerate()
        .map(|(i, (t, d))| TensorRef::new(format!("t{i}"), t.dtype, &t.shape, d))
        .collect();
    let shared: Vec<SharedTensor> = case
        .tensors
        .iter()
        .zip(&data)
        .enumerate()
        .map(|(i, (t, d))| {
            SharedTensor::new(
                format!("t{i}"),
                t.dtype,
                &t.shape,
                Bytes::copy_from_slice(d),
            )
        })
        .collect();
    let views: Vec<&dyn TensorView> = case
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.shared {
                &shared[i] as &dyn TensorView
            } else {
                &refs[i] as &dyn TensorView
            }
        })
        .collect();
    let state = TrainingState::builder(step)
        .model(views)
        .without_optimizer()
        .rng(&[case.seed, step])
        .data_loader(&step)
        .without_lr_schedule()
        .build()
        .expect("state");
    let report = ckpt.save(&state).expect("save").wait().expect("durable");
    assert!(report.tiers.iter().all(|t| t.committed), "{report:?}");
    data
}

fn restore(ckpt: &Checkpointer, case: &Case, step: Option<u64>) -> (u64, Vec<Vec<u8>>) {
    let mut bufs: Vec<Vec<u8>> = case
        .tensors
        .iter()
        .map(|t| vec![0xa5; checked_nbytes(&t.shape, t.dtype).expect("small") as usize])
        .collect();
    let mut targets: Vec<TensorMut<'_>> = case
        .tensors
        .iter()
        .zip(bufs.iter_mut())
        .enumerate()
        .map(|(i, (t, b))| TensorMut::new(format!("t{i}"), t.dtype, &t.shape, b))
        .collect();
    let mut views: Vec<&mut dyn TensorViewMut> = targets
        .iter_mut()
        .map(|t| t as &mut dyn TensorViewMut)
        .collect();
    let opts = match step {
        Some(s) => RestoreOptions::default().step(s),
        None => RestoreOptions::default(),
    };
    let r = ckpt
        .restore_with(&mut views, &opts)
        .expect("restore")
        .expect("a checkpoint");
    assert!(!r.fell_back(), "{:?}", r.skipped);
    assert_eq!(r.loop_state.data_loader::<u64>().ok(), Some(r.step));
    drop(views);
    drop(targets);
    (r.step, bufs)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn saved_state_restores_bit_identically(case in case()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let total: u64 = case
            .tensors
            .iter()
            .filter(|t| !t.shared)
            .map(|t| checked_nbytes(&t.shape, t.dtype).expect("small"))
            .sum();
        let capacity = ((total as f64 * case.staging) as u64).max(1);
        let ckpt = Checkpointer::builder("prop")
            .tier(Arc::new(LocalTier::new(dir.path()).expect("tier")), TierPolicy::keep_last(2))
            .chunk_size(case.chunk_size)
            .block_size(case.block_size)
            .staging_capacity(capacity)
            .copy_threads(case.copy_threads)
            .build()
            .expect("checkpointer");
        let first = save(&ckpt, &case, 1);
        let second = save(&ckpt, &case, 2);
        let (step, got) = restore(&ckpt, &case, None);
        prop_assert_eq!(step, 2);
        for (i, (g, want)) in got.iter().zip(&second).enumerate() {
            prop_assert!(g == want, "tensor t{} ({:?}) of step 2 differs", i, case.tensors[i]);
        }
        let (step, got) = restore(&ckpt, &case, Some(1));
        prop_assert_eq!(step, 1);
        for (i, (g, want)) in got.iter().zip(&first).enumerate() {
            prop_assert!(g == want, "tensor t{} ({:?}) of step 1 differs", i, case.tensors[i]);
        }
    }
}
