//! The plan of one save, computed before any byte moves and without a
//! runtime: the shard file's layout (header bytes, where each tensor's data
//! lands), which tensors are copied into the staging pool (host or GPU
//! memory) and which are kept by reference (shared `Bytes`), and the sizes.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::shard_file::{self, ShardLayout};
use crate::model::{ShardSpec, TensorBytes, TrainingState};
use crate::save::copy::Source;
use crate::save::stream::TensorCtx;

/// One save, laid out.
#[derive(Debug)]
pub(crate) struct SavePlan<'a> {
    /// The shard file: header bytes and each tensor's offset.
    pub layout: ShardLayout,
    /// The staged tensors' bytes, in stream (layout) order.
    pub sources: Vec<Source<'a>>,
    /// Every tensor, in layout order, with where its bytes come from.
    pub tensors: Vec<TensorCtx>,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Bytes copied into the staging pool (the rest is kept by reference).
    pub staged_bytes: u64,
}

impl<'a> SavePlan<'a> {
    /// Lays out rank `rank`'s shard of `state` for `run`. A tensor in GPU
    /// memory needs `has_gpu` (a checkpointer given a CUDA device).
    pub(crate) fn new(
        run: &str,
        rank: u32,
        state: &TrainingState<'a>,
        has_gpu: bool,
    ) -> Result<Self> {
        let step = state.step();
        let specs: Vec<_> = state
            .tensors()
            .iter()
            .map(|t| (t.view.name(), t.view.dtype(), t.view.shape()))
            .collect();
        let metadata = BTreeMap::from([
            ("format".to_string(), "ckpt/1".to_string()),
            ("run".to_string(), run.to_string()),
            ("step".to_string(), step.to_string()),
            ("rank".to_string(), rank.to_string()),
        ]);
        let layout = shard_file::layout(&specs, &metadata)?;

        let mut sources = Vec::new();
        let mut tensors = Vec::with_capacity(specs.len());
        for (t, &offset) in state.tensors().iter().zip(&layout.offsets) {
            let v = t.view;
            let bytes = v.bytes();
            let len = bytes.len() as u64;
            let (shared, staged_index) = match bytes {
                TensorBytes::Shared(b) => (Some(b), None),
                TensorBytes::Host(h) => {
                    sources.push(Source::Host(h));
                    (None, Some(sources.len() - 1))
                }
                TensorBytes::Device(src) if has_gpu => {
                    sources.push(Source::Device {
                        src,
                        tensor: v.name(),
                    });
                    (None, Some(sources.len() - 1))
                }
                TensorBytes::Device(_) => {
                    return Err(Error::Config(no_gpu_message(step, v.name())));
                }
            };
            let shard = v
                .shard()
                .cloned()
                .unwrap_or_else(|| ShardSpec::full(v.shape().to_vec()));
            tensors.push(TensorCtx {
                name: v.name().to_string(),
                dtype: v.dtype(),
                role: t.role,
                global_shape: shard.global_shape,
                global_offsets: shard.offsets,
                shape: v.shape().to_vec(),
                offset,
                len,
                shared,
                staged_index,
            });
        }
        let staged_bytes = sources.iter().map(|s| s.len() as u64).sum();
        Ok(Self {
            bytes: state.nbytes(),
            layout,
            sources,
            tensors,
            staged_bytes,
        })
    }

    /// The header, shared by every tier's stream.
    pub(crate) fn header(&self) -> Bytes {
        Bytes::from(self.layout.header.clone())
    }
}

/// Why a save of a tensor in GPU memory cannot run on this checkpointer.
fn no_gpu_message(step: u64, tensor: &str) -> String {
    if cfg!(feature = "cuda") {
        format!(
            "step {step}: tensor `{tensor}` is in GPU memory but this checkpointer has no CUDA device: build it with `.cuda(CudaDevice::open(ordinal)?)`"
        )
    } else {
        format!(
            "step {step}: tensor `{tensor}` is in GPU memory but ckpt was built without the `cuda` feature"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::shard_file::DATA_ALIGN;
    use crate::model::{DeviceSource, SharedTensor, TensorRef, TensorSpec, TensorView};

    fn state<'a>(views: &[&'a dyn TensorView]) -> TrainingState<'a> {
        TrainingState::builder(9)
            .model(views.iter().copied())
            .without_optimizer()
            .without_loop_state()
            .build()
            .expect("state")
    }

    #[test]
    fn host_tensors_are_staged_shared_ones_kept_and_offsets_follow_the_header() {
        let a = vec![1f32; 10];
        let ta = TensorRef::from_slice("a", &[10], &a);
        let tb = SharedTensor::new("b", crate::DType::U8, &[7], Bytes::from_static(&[3; 7]));
        let c = vec![2u16; 3];
        let tc = TensorRef::from_slice("c", &[3], &c)
            .with_shard(ShardSpec::new(vec![9], vec![3], vec![3]).expect("shard"));
        let plan = SavePlan::new("r", 2, &state(&[&ta, &tb, &tc]), false).expect("plan");
        assert_eq!(plan.bytes, 40 + 7 + 6);
        assert_eq!(plan.staged_bytes, 40 + 6, "shared bytes are not staged");
        assert_eq!(plan.sources.len(), 2);
        let [pa, pb, pc] = &plan.tensors[..] else {
            panic!("three tensors")
        };
        assert_eq!(pa.offset % DATA_ALIGN, 0, "data starts page-aligned");
        assert_eq!((pb.offset, pc.offset), (pa.offset + 40, pa.offset + 47));
        assert_eq!(
            (pa.staged_index, pb.staged_index, pc.staged_index),
            (Some(0), None, Some(1))
        );
        assert!(pb.shared.is_some());
        assert_eq!(
            (pc.global_shape.clone(), pc.global_offsets.clone()),
            (vec![9], vec![3])
        );
        assert_eq!(plan.layout.file_len, pc.offset + 6);
        assert_eq!(plan.header().len() as u64, pa.offset);
    }

    /// A view whose bytes are in GPU memory.
    struct OnDevice(TensorSpec);

    impl TensorView for OnDevice {
        fn spec(&self) -> &TensorSpec {
            &self.0
        }
        fn bytes(&self) -> TensorBytes<'_> {
            // SAFETY: never dereferenced: the plan only records the range.
            TensorBytes::Device(unsafe { DeviceSource::from_raw(0x1000, 16) })
        }
    }

    #[test]
    fn a_device_tensor_needs_a_gpu_and_is_named() {
        let t = OnDevice(TensorSpec::new("layers.0.w", crate::DType::F32, [4]));
        let err = SavePlan::new("r", 0, &state(&[&t]), false).expect_err("no GPU");
        assert!(
            matches!(&err, Error::Config(m) if m.contains("`layers.0.w`") && m.contains("step 9")),
            "{err:?}"
        );
        let plan = SavePlan::new("r", 0, &state(&[&t]), true).expect("with a GPU");
        assert_eq!(plan.staged_bytes, 16);
    }
}
