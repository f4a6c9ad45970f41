//! GPU staging (feature `cuda`): tensors in device memory saved through the
//! (registered) staging pool and restored to host memory, bit-exact.
//!
//! Tests that need a GPU open device 0 first and, when that fails (no
//! driver, no device), print `skipping <test>: <reason>` and return.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use ckpt_core::cuda::{CudaDevice, DeviceBuffer, DeviceTensor};
use ckpt_core::{
    Checkpointer, DType, Error, MemoryTier, TensorMut, TensorRef, TensorView, TierPolicy,
    TrainingState,
};

const BLOCK: usize = 64 << 10;

fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            None
        }
    }
}

/// Non-trivial bytes, different per tensor.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    ckpt_core::rng::pattern(len, seed)
}

fn state<'a>(step: u64, views: &[&'a dyn TensorView]) -> TrainingState<'a> {
    TrainingState::builder(step)
        .model(views.iter().copied())
        .without_optimizer()
        .without_loop_state()
        .build()
        .expect("state")
}

/// Restores every `(name, bytes)` into fresh host buffers and checks them.
fn assert_restores(ckpt: &Checkpointer, step: u64, want: &[(String, Vec<u8>)]) {
    let mut bufs: Vec<Vec<u8>> = want.iter().map(|(_, b)| vec![0u8; b.len()]).collect();
    let mut targets: Vec<TensorMut<'_>> = want
        .iter()
        .zip(bufs.iter_mut())
        .map(|((name, b), buf)| TensorMut::new(name.clone(), DType::U8, &[b.len() as u64], buf))
        .collect();
    let mut refs: Vec<&mut dyn ckpt_core::TensorViewMut> =
        targets.iter_mut().map(|t| t as _).collect();
    let restored = ckpt
        .restore(&mut refs)
        .expect("restore")
        .expect("a checkpoint");
    assert_eq!(restored.step, step);
    drop(targets);
    for ((name, b), got) in want.iter().zip(&bufs) {
        assert!(got == b, "tensor `{name}` differs after restore");
    }
}

#[test]
fn open_without_a_driver_is_an_error_not_a_panic() {
    match CudaDevice::open(0) {
        Ok(d) => eprintln!("CUDA device 0: {}", d.name()),
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, Error::Cuda(_)), "{e:?}");
            assert!(msg.contains("driver"), "{msg}");
            eprintln!("no GPU here: {msg}");
        }
    }
    // A device that cannot exist is an error on every machine.
    let e = CudaDevice::open(1 << 20).expect_err("no such device");
    assert!(matches!(e, Error::Cuda(_)), "{e:?}");
}

#[test]
fn device_tensor_without_a_cuda_checkpointer_is_a_config_error() {
    let ckpt = Checkpointer::builder("nogpu")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
        .build()
        .expect("build");
    // SAFETY: never read: a checkpointer without a CUDA device refuses the
    // save before any copy.
    let t = unsafe { DeviceTensor::from_raw("layers.3.w", DType::F32, &[4], 0x1000, 16) };
    let host = vec![0f32; 4];
    let h = TensorRef::from_slice("b", &[4], &host);
    let err = ckpt.save(&state(1, &[&h, &t])).expect_err("refused");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("`layers.3.w`"), "{err}");
}

#[test]
fn device_tensors_round_trip_through_staging() {
    let Some(dev) = gpu("device_tensors_round_trip_through_staging") else {
        return;
    };
    // Sizes around and across block boundaries, and an empty tensor.
    let sizes = [0, 1, 4097, BLOCK, 3 * BLOCK + 123, (1 << 20) + 7];
    let host: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| bytes(n, i as u64))
        .collect();
    let bufs: Vec<DeviceBuffer> = host
        .iter()
        .map(|h| DeviceBuffer::from_host(&dev, h).expect("upload"))
        .collect();
    for (h, b) in host.iter().zip(&bufs) {
        let mut back = vec![0u8; h.len()];
        b.copy_to_host(&mut back).expect("download");
        assert!(back == *h, "device buffer round trip");
    }
    let dts: Vec<DeviceTensor<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| b.tensor(format!("gpu.{i}"), DType::U8, &[b.len() as u64]))
        .collect();
    // Host tensors between the device ones: mixed blocks.
    let extra = [bytes(BLOCK + 5, 100), bytes(777, 101)];
    let hts: Vec<TensorRef<'_>> = extra
        .iter()
        .enumerate()
        .map(|(i, b)| TensorRef::new(format!("cpu.{i}"), DType::U8, &[b.len() as u64], b))
        .collect();
    let mut views: Vec<&dyn TensorView> = Vec::new();
    let mut want = Vec::new();
    for (i, t) in dts.iter().enumerate() {
        views.push(t);
        want.push((format!("gpu.{i}"), host[i].clone()));
        if let Some(h) = hts.get(i) {
            views.push(h);
            want.push((format!("cpu.{i}"), extra[i].clone()));
        }
    }
    for crc_while_staging in [false, true] {
        let ckpt = Checkpointer::builder("gpu")
            .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
            .block_size(BLOCK)
            .chunk_size(4096 * 3)
            .checksum_while_staging(crc_while_staging)
            .copy_threads(3)
            .cuda(dev.clone())
            .build()
            .expect("build");
        for step in 1..=2 {
            let r = ckpt
                .save(&state(step, &views))
                .expect("save")
                .wait()
                .expect("durable");
            assert!(r.is_durable());
        }
        assert_restores(&ckpt, 2, &want);
    }
}

#[test]
fn staging_pool_is_registered_in_chunks() {
    let Some(dev) = gpu("staging_pool_is_registered_in_chunks") else {
        return;
    };
    let ckpt = Checkpointer::builder("pinned")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
        .block_size(BLOCK)
        .staging_capacity(16 * BLOCK as u64)
        .cuda_register_chunk(4 * BLOCK)
        .cuda(dev.clone())
        .build()
        .expect("build");
    let pool = ckpt.staging_stats().expect("pool allocated at build");
    assert!(pool.cuda_registered, "{pool:?}");
    assert_eq!(pool.cuda_registered_chunks, 4);

    // A pool sized by the first save is registered too.
    let ckpt = Checkpointer::builder("pinned-lazy")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
        .block_size(BLOCK)
        .cuda(dev.clone())
        .build()
        .expect("build");
    let data = bytes(5 * BLOCK, 7);
    let buf = DeviceBuffer::from_host(&dev, &data).expect("upload");
    let t = buf.tensor("w", DType::U8, &[data.len() as u64]);
    ckpt.save(&state(1, &[&t]))
        .expect("save")
        .wait()
        .expect("durable");
    let pool = ckpt.staging_stats().expect("pool");
    assert!(pool.cuda_registered, "{pool:?}");
    assert_eq!(pool.cuda_registered_chunks, 1, "5 blocks fit one chunk");

    // A chunk that is not a whole number of blocks is refused.
    let err = Checkpointer::builder("bad-chunk")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
        .block_size(BLOCK)
        .cuda_register_chunk(BLOCK + 4096)
        .cuda(dev)
        .build()
        .expect_err("refused");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

#[test]
fn pool_smaller_than_a_device_state_streams_through() {
    let Some(dev) = gpu("pool_smaller_than_a_device_state_streams_through") else {
        return;
    };
    let host: Vec<Vec<u8>> = (0..4).map(|i| bytes(5 * BLOCK + 99, i)).collect();
    let bufs: Vec<DeviceBuffer> = host
        .iter()
        .map(|h| DeviceBuffer::from_host(&dev, h).expect("upload"))
        .collect();
    let dts: Vec<DeviceTensor<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| b.tensor(format!("w.{i}"), DType::U8, &[b.len() as u64]))
        .collect();
    let views: Vec<&dyn TensorView> = dts.iter().map(|t| t as _).collect();
    let ckpt = Checkpointer::builder("stream")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
        .block_size(BLOCK)
        .staging_capacity(4 * BLOCK as u64)
        .cuda(dev)
        .build()
        .expect("build");
    let r = ckpt
        .save(&state(9, &views))
        .expect("save")
        .wait()
        .expect("durable");
    assert!(r.is_durable());
    let want: Vec<(String, Vec<u8>)> = host
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("w.{i}"), h.clone()))
        .collect();
    assert_restores(&ckpt, 9, &want);
}

#[test]
fn math_stop_covers_the_device_copies() {
    let Some(dev) = gpu("math_stop_covers_the_device_copies") else {
        return;
    };
    let data = bytes(8 << 20, 3);
    let buf = DeviceBuffer::from_host(&dev, &data).expect("upload");
    let t = buf.tensor("w", DType::U8, &[data.len() as u64]);
    let ckpt = Checkpointer::builder("mathstop")
        .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
        .cuda(dev)
        .build()
        .expect("build");
    let h = ckpt.save(&state(1, &[&t])).expect("save");
    let math_stop = h.math_stop();
    let r = h.wait().expect("durable");
    assert!(!math_stop.is_zero());
    assert_eq!(r.math_stop, math_stop);
    assert_eq!(r.staged_bytes, data.len() as u64);
    assert_eq!(r.bytes, data.len() as u64);
}
