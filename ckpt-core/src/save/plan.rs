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
    /// but each of its blocks is written by one replica only, [`blocks`]
    /// balancing the bytes; `chunk_size` is the checksum chunk, which block
    /// boundaries respect.
    pub(crate) fn new(
        run: &str,
        rank: u32,
        state: &TrainingState<'a>,
        has_gpu: bool,
        replicas: &[u32],
        chunk_size: u64,
    ) -> Result<Self> {
        let step = state.step();
        let blocks = blocks(state, replicas, chunk_size);
        let written = |b: &Block| b.writer.is_none_or(|w| w == rank);
        let mut specs = Vec::new();
        for (t, bs) in state.tensors().iter().zip(&blocks) {
            for b in bs.iter().filter(|b| written(b)) {
                specs.push((t.view.name(), t.view.dtype(), b.shape(t.view.shape())));
            }
        }
        let metadata = BTreeMap::from([
            ("format".to_string(), "ckpt/1".to_string()),
            ("run".to_string(), run.to_string()),
            ("step".to_string(), step.to_string()),
            ("rank".to_string(), rank.to_string()),
        ]);
        let specs: Vec<_> = specs.iter().map(|(n, d, s)| (*n, *d, &s[..])).collect();
        let layout = shard_file::layout(&specs, &metadata)?;

        let mut sources = Vec::new();
        let mut tensors = Vec::with_capacity(state.tensors().len());
        let mut offsets = layout.offsets.iter();
        for (t, bs) in state.tensors().iter().zip(&blocks) {
            let v = t.view;
            let bytes = v.bytes();
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
            for b in bs {
                let offset = if written(b) {
                    *offsets
                        .next()
                        .ok_or_else(|| Error::Internal("shard layout is short of tensors".into()))?
                } else {
                    0
                };
                let mut global_offsets = shard.offsets.clone();
                if let Some(first) = global_offsets.first_mut() {
                    *first += b.rows.0;
                }
                tensors.push(TensorCtx {
                    name: v.name().to_string(),
                    dtype: v.dtype(),
                    role: t.role,
                    global_shape: shard.global_shape.clone(),
                    global_offsets,
                    shape: b.shape(v.shape()),
                    offset,
                    src_start: b.bytes.0,
                    len: b.bytes.1 - b.bytes.0,
                    shared: shared
                        .as_ref()
                        .map(|s| s.slice(b.bytes.0 as usize..b.bytes.1 as usize)),
                    staged_index,
                    replication: b.writer.map(|w| Replication {
                        group: replicas.to_vec(),
                        writer: w,
                        first_chunk: b.bytes.0 / chunk_size,
                    }),
                });
            }
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

/// A part of one tensor of a save: its bytes `[start, end)`, rows
/// `[first, last)` along dimension 0, and the replica that writes it (none
/// when the state is not replicated: the rank writes everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Block {
    pub bytes: (u64, u64),
    pub rows: (u64, u64),
    pub writer: Option<u32>,
}

impl Block {
    /// The block's shape, of a tensor of shape `shape`.
    fn shape(&self, shape: &[u64]) -> Vec<u64> {
        let mut s = shape.to_vec();
        if let Some(first) = s.first_mut() {
            *first = self.rows.1 - self.rows.0;
        }
        s
    }
}

/// How `state` is split among the replicas in `replicas` for writing: per
/// tensor, its blocks. Not replicated (fewer than two replicas): one block
/// per tensor, no writer. Replicated: every replica computes the same
/// answer from the same tensors. The largest tensors are placed first
/// (largest-first, the name breaking ties); a tensor of at least two units
/// (a unit is a whole number of rows that is also a whole number of
/// checksum chunks, so a block's checksums are its tensor's) is cut into
/// up to one block per replica along dimension 0, each block going to a
/// different replica, the biggest to the least loaded; a smaller tensor
/// goes whole to the least-loaded replica. No replica then writes more
/// than its share by more than one unit or the largest unsplittable tensor.
pub(crate) fn blocks(
    state: &TrainingState<'_>,
    replicas: &[u32],
    chunk_size: u64,
) -> Vec<Vec<Block>> {
    let tensors = state.tensors();
    let whole = |i: usize, writer: Option<u32>| {
        let v = tensors[i].view;
        Block {
            bytes: (0, v.bytes().len() as u64),
            rows: (0, v.shape().first().copied().unwrap_or(1)),
            writer,
        }
    };
    if replicas.len() < 2 {
        return (0..tensors.len()).map(|i| vec![whole(i, None)]).collect();
    }
    let len = |i: usize| tensors[i].view.bytes().len() as u64;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        len(b)
            .cmp(&len(a))
            .then_with(|| tensors[a].view.name().cmp(tensors[b].view.name()))
    });
    let mut load = vec![0u64; replicas.len()];
    let mut out: Vec<Vec<Block>> = vec![Vec::new(); tensors.len()];
    for i in order {
        let n = len(i);
        let rows = tensors[i].view.shape().first().copied().unwrap_or(0);
        // Rows and checksum chunks both end on a unit boundary.
        let unit = (rows > 0 && n % rows == 0)
            .then(|| lcm(n / rows, chunk_size))
            .filter(|u| *u > 0);
        let units = unit.map_or(0, |u| n / u);
        // The replicas by load, least first (lowest slot on a tie).
        let mut slots: Vec<usize> = (0..replicas.len()).collect();
        slots.sort_by_key(|&k| (load[k], k));
        let Some(unit) = unit.filter(|_| units >= 2) else {
            load[slots[0]] += n;
            out[i].push(whole(i, Some(replicas[slots[0]])));
            continue;
        };
        let parts = units.min(replicas.len() as u64);
        let row_bytes = n / rows;
        let mut start = 0u64;
        let mut cut = Vec::with_capacity(parts as usize);
        for k in 0..parts {
            // Units spread evenly; the last block takes the tail.
            let end = if k + 1 == parts {
                n
            } else {
                start + unit * (units / parts + u64::from(k < units % parts))
            };
            cut.push((start, end));
            start = end;
        }
        // The biggest block to the least-loaded replica.
        let mut by_size: Vec<usize> = (0..cut.len()).collect();
        by_size.sort_by_key(|&k| (std::cmp::Reverse(cut[k].1 - cut[k].0), k));
        let mut blocks = vec![None; cut.len()];
        for (slot, k) in slots.iter().zip(by_size) {
            let (s, e) = cut[k];
            load[*slot] += e - s;
            blocks[k] = Some(Block {
                bytes: (s, e),
                rows: (s / row_bytes, e / row_bytes),
                writer: Some(replicas[*slot]),
            });
        }
        out[i] = blocks.into_iter().flatten().collect();
    }
    out
}

fn lcm(a: u64, b: u64) -> u64 {
    let gcd = |mut x: u64, mut y: u64| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    match gcd(a, b) {
        0 => 0,
        g => (a / g).saturating_mul(b),
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
        let plan = SavePlan::new("r", 2, &state(&[&ta, &tb, &tc]), false, &[], 64).expect("plan");
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
            .map(|&r| SavePlan::new("r", r, &st, false, &group, 64).expect("plan"))
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
        assert_eq!(written[0] + written[1], 710, "each byte written once");
        // t1 (300 bytes, 4 units of 64) and t4 (200) are cut in two; the
        // rest go whole.
        assert!(written[0].abs_diff(written[1]) <= 64, "{written:?}");
        assert_eq!(plans[0].tensors.len(), 8);
        // Both replicas cut and assign every tensor the same way.
        for (a, b) in plans[0].tensors.iter().zip(&plans[1].tensors) {
            assert_eq!(
                (&a.name, &a.global_offsets, &a.shape, &a.replication, a.len),
                (&b.name, &b.global_offsets, &b.shape, &b.replication, b.len)
            );
        }
    }

    #[test]
    fn a_large_tensor_is_cut_on_row_and_chunk_boundaries_one_block_per_replica() {
        // 1000 rows of 48 bytes with 4 KiB chunks: a unit is 256 rows
        // (lcm(48, 4096) = 12288 bytes), so 3 whole units and a tail.
        let w = vec![0f32; 1000 * 12];
        let t = TensorRef::from_slice("emb", &[1000, 12], &w);
        let small = vec![0f32; 10];
        let s = TensorRef::from_slice("bias", &[10], &small);
        let st = state(&[&t, &s]);
        for group in [vec![0u32, 1], vec![0, 1, 2], vec![0, 1, 2, 3, 4]] {
            let bs = blocks(&st, &group, 4096);
            let emb = &bs[0];
            assert_eq!(emb.len(), group.len().min(3), "{group:?}: {emb:?}");
            let mut at = 0;
            let mut writers = Vec::new();
            for b in emb {
                assert_eq!(b.bytes.0, at, "blocks tile the tensor");
                assert_eq!(b.bytes.0 % 12288, 0, "starts on a unit");
                assert_eq!(b.rows, (b.bytes.0 / 48, b.bytes.1 / 48));
                at = b.bytes.1;
                writers.push(b.writer.expect("a writer"));
            }
            assert_eq!(at, 48_000);
            writers.sort_unstable();
            writers.dedup();
            assert_eq!(writers.len(), emb.len(), "one block per replica");
            assert_eq!(bs[1].len(), 1, "a small tensor goes whole");
        }
        // Not replicated: one block per tensor, no writer.
        let bs = blocks(&st, &[0], 4096);
        assert!(bs.iter().all(|b| b.len() == 1 && b[0].writer.is_none()));
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
        let err = SavePlan::new("r", 0, &state(&[&t]), false, &[], 64).expect_err("no GPU");
        assert!(
            matches!(&err, Error::Config(m) if m.contains("`layers.0.w`") && m.contains("step 9")),
            "{err:?}"
        );
        let plan = SavePlan::new("r", 0, &state(&[&t]), true, &[], 64).expect("with a GPU");
        assert_eq!(plan.staged_bytes, 16);
    }
}
