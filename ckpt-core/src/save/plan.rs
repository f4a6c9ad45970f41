//! The plan of one save, computed before any byte moves and without a
//! runtime: the shard file's layout (header bytes, where each tensor's data
//! lands), which tensors are copied into the staging pool (host or GPU
//! memory) and which are kept by reference (shared `Bytes`), and the sizes.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::manifest::Replication;
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
    /// memory needs `has_gpu` (a checkpointer given a CUDA device). With a
    /// replica group (`replicas`: the ranks holding this rank's state,
    /// itself included), every tensor is still staged and checksummed here
    /// but written by one replica only, [`writers`] balancing the bytes.
    pub(crate) fn new(
        run: &str,
        rank: u32,
        state: &TrainingState<'a>,
        has_gpu: bool,
        replicas: &[u32],
    ) -> Result<Self> {
        let step = state.step();
        let writer = writers(state, replicas);
        let written = |i: usize| writer.get(i).is_none_or(|w| *w == rank);
        let specs: Vec<_> = state
            .tensors()
            .iter()
            .enumerate()
            .filter(|(i, _)| written(*i))
            .map(|(_, t)| (t.view.name(), t.view.dtype(), t.view.shape()))
            .collect();
        let metadata = BTreeMap::from([
            ("format".to_string(), "ckpt/1".to_string()),
            ("run".to_string(), run.to_string()),
            ("step".to_string(), step.to_string()),
            ("rank".to_string(), rank.to_string()),
        ]);
        let layout = shard_file::layout(&specs, &metadata)?;

        let mut sources = Vec::new();
        let mut tensors = Vec::with_capacity(state.tensors().len());
        let mut offsets = layout.offsets.iter();
        for (i, t) in state.tensors().iter().enumerate() {
            let write = written(i);
            let offset = if write {
                *offsets
                    .next()
                    .ok_or_else(|| Error::Internal("shard layout is short of tensors".into()))?
            } else {
                0
            };
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
                replication: writer.get(i).map(|&w| Replication {
                    group: replicas.to_vec(),
                    writer: w,
                }),
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

/// Which replica writes each tensor of `state`: none (an empty list) when
/// the state is not replicated. Every replica computes the same answer from
/// the same tensors: by name, each to the replica that has been given the
/// fewest bytes so far (the lowest rank on a tie), so no replica writes
/// much more than its share.
pub(crate) fn writers(state: &TrainingState<'_>, replicas: &[u32]) -> Vec<u32> {
    if replicas.len() < 2 {
        return Vec::new();
    }
    let tensors = state.tensors();
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].view.name().cmp(tensors[b].view.name()));
    let mut load = vec![0u64; replicas.len()];
    let mut writer = vec![0u32; tensors.len()];
    for i in order {
        let (slot, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(k, l)| (**l, *k))
            .unwrap_or((0, &0));
        load[slot] += tensors[i].view.bytes().len() as u64;
        writer[i] = replicas[slot];
    }
    writer
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
        let plan = SavePlan::new("r", 2, &state(&[&ta, &tb, &tc]), false, &[]).expect("plan");
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

    #[test]
    fn replicas_write_disjoint_balanced_sets_and_stage_everything() {
        let bufs: Vec<Vec<u8>> = [100usize, 300, 50, 50, 200, 10]
            .iter()
            .map(|&n| vec![1u8; n])
            .collect();
        let views: Vec<TensorRef<'_>> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| TensorRef::new(format!("t{i}"), crate::DType::U8, &[b.len() as u64], b))
            .collect();
        let refs: Vec<&dyn TensorView> = views.iter().map(|v| v as &dyn TensorView).collect();
        let st = state(&refs);
        let group = [3, 7];
        let plans: Vec<SavePlan<'_>> = group
            .iter()
            .map(|&r| SavePlan::new("r", r, &st, false, &group).expect("plan"))
            .collect();
        let mut written = [0u64; 2];
        for (k, plan) in plans.iter().enumerate() {
            // Everything is staged (and checksummed) on every replica.
            assert_eq!(plan.staged_bytes, 710);
            for t in &plan.tensors {
                let rep = t.replication.as_ref().expect("replicated");
                assert_eq!(rep.group, group);
                if rep.writer == group[k] {
                    written[k] += t.len;
                }
            }
            assert_eq!(
                plan.layout.file_len - plan.header().len() as u64,
                written[k],
                "the shard file holds what this replica writes"
            );
        }
        assert_eq!(written[0] + written[1], 710, "each tensor written once");
        assert!(written[0].abs_diff(written[1]) <= 300, "{written:?}");
        // Both replicas assign the same writer to every tensor.
        for i in 0..6 {
            assert_eq!(
                plans[0].tensors[i].replication,
                plans[1].tensors[i].replication
            );
        }
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
        let err = SavePlan::new("r", 0, &state(&[&t]), false, &[]).expect_err("no GPU");
        assert!(
            matches!(&err, Error::Config(m) if m.contains("`layers.0.w`") && m.contains("step 9")),
            "{err:?}"
        );
        let plan = SavePlan::new("r", 0, &state(&[&t]), true, &[]).expect("with a GPU");
        assert_eq!(plan.staged_bytes, 16);
    }
}
