//! N ranks save their shards of the same global tensors concurrently into
//! one store; M ranks restore any other sharding of them, and every byte
//! comes back exactly where it belongs in the global tensor. Commits that
//! cannot be whole (overlapping pieces, a missing rank, a rank of another
//! incarnation) never happen.

use std::sync::Arc;
use std::time::Duration;

use ckpt::rng::Rng;
use ckpt::{
    Checkpointer, DType, Error, LocalTier, MemoryTier, RestoreOptions, Restored, SaveReport,
    ShardSpec, TensorMut, TensorRef, TensorView, Tier, TierPolicy, TrainingState, format::layout,
    store,
};
use proptest::prelude::*;

const RUN: &str = "reshard";

/// One global tensor of a case and how it is cut.
#[derive(Debug, Clone)]
struct TensorPlan {
    dtype: DType,
    shape: Vec<u64>,
    /// Saved by `ShardSpec::split` along `save_dim`, or by an uneven
    /// guillotine tiling drawn from `seed`.
    uneven: bool,
    save_dim: usize,
    restore_dim: usize,
    seed: u64,
}

#[derive(Debug, Clone)]
struct Case {
    savers: u32,
    restorers: u32,
    step: u64,
    on_disk: bool,
    tensors: Vec<TensorPlan>,
}

fn tensor_plan() -> impl Strategy<Value = TensorPlan> {
    (
        prop::sample::select(vec![DType::F32, DType::BF16, DType::U8, DType::I64]),
        prop::collection::vec(1u64..=20, 1..=3),
        any::<bool>(),
        0usize..3,
        0usize..3,
        any::<u64>(),
    )
        .prop_map(
            |(dtype, shape, uneven, save_dim, restore_dim, seed)| TensorPlan {
                save_dim: save_dim % shape.len(),
                restore_dim: restore_dim % shape.len(),
                dtype,
                shape,
                uneven,
                seed,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        1u32..8,
        1u32..8,
        0u64..1_000_000,
        any::<bool>(),
        prop::collection::vec(tensor_plan(), 2..=3),
    )
        .prop_map(|(savers, restorers, step, on_disk, tensors)| Case {
            savers,
            restorers,
            step,
            on_disk,
            tensors,
        })
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

fn contents(plan: &TensorPlan) -> Vec<u8> {
    let n = (numel(&plan.shape) as usize) * plan.dtype.size();
    let mut mix = Rng::seed_from_u64(plan.seed ^ 0x5eed);
    (0..n).map(|_| mix.next_u64() as u8).collect()
}

/// Cuts the global box into `parts` boxes: repeatedly splits a random box
/// along a random dimension at a random point; if the tensor has fewer
/// elements than `parts`, the remaining ranks hold empty pieces. Shuffled,
/// so any rank may hold any piece.
fn guillotine(global: &[u64], parts: u32, seed: u64) -> Vec<ShardSpec> {
    let mut mix = Rng::seed_from_u64(seed);
    let mut boxes = vec![ShardSpec::full(global.to_vec())];
    while boxes.len() < parts as usize {
        let splittable: Vec<usize> = (0..boxes.len())
            .filter(|&i| boxes[i].shape.iter().any(|&d| d >= 2))
            .collect();
        if splittable.is_empty() {
            break;
        }
        let i = splittable[mix.range(0, splittable.len() as u64) as usize];
        let dims: Vec<usize> = (0..global.len())
            .filter(|&d| boxes[i].shape[d] >= 2)
            .collect();
        let d = dims[mix.range(0, dims.len() as u64) as usize];
        let cut = mix.range(1, boxes[i].shape[d]);
        let mut right = boxes[i].clone();
        boxes[i].shape[d] = cut;
        right.offsets[d] += cut;
        right.shape[d] -= cut;
        boxes.push(right);
    }
    while boxes.len() < parts as usize {
        let mut empty = ShardSpec::full(global.to_vec());
        empty.shape[0] = 0;
        boxes.push(empty);
    }
    for i in (1..boxes.len()).rev() {
        let j = mix.range(0, i as u64 + 1) as usize;
        boxes.swap(i, j);
    }
    boxes
}

fn save_shards(plan: &TensorPlan, parts: u32) -> Vec<ShardSpec> {
    if plan.uneven {
        guillotine(&plan.shape, parts, plan.seed)
    } else {
        (0..parts)
            .map(|r| {
                ShardSpec::split(plan.shape.clone(), plan.save_dim, parts.into(), r.into())
                    .expect("split")
            })
            .collect()
    }
}

/// The bytes of `shard` cut out of the global tensor, element by element
/// through global coordinates (independent of the resharding planner).
fn cut(global: &[u8], shard: &ShardSpec, elem: usize) -> Vec<u8> {
    let n = numel(&shard.shape) as usize;
    let mut out = Vec::with_capacity(n * elem);
    let d = shard.shape.len();
    let mut idx = vec![0u64; d];
    for _ in 0..n {
        let g = (0..d).fold(0u64, |g, j| {
            g * shard.global_shape[j] + shard.offsets[j] + idx[j]
        });
        let g = g as usize * elem;
        out.extend_from_slice(&global[g..g + elem]);
        for j in (0..d).rev() {
            idx[j] += 1;
            if idx[j] < shard.shape[j] {
                break;
            }
            idx[j] = 0;
        }
    }
    out
}

fn name(i: usize) -> String {
    format!("layers.{i}.weight")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn checkpointer(
    rt: &tokio::runtime::Runtime,
    tier: &Arc<dyn Tier>,
    rank: u32,
    world: u32,
    incarnation: &str,
    commit_timeout: Duration,
) -> Checkpointer {
    Checkpointer::builder(RUN)
        .tier(tier.clone(), TierPolicy::keep_last(2))
        .rank(rank, world)
        .incarnation(incarnation)
        .chunk_size(4096)
        .copy_threads(1)
        .restore_threads(2)
        .commit_timeout(commit_timeout)
        .runtime(rt.handle().clone())
        .build()
        .expect("checkpointer")
}

/// Saves, from rank `rank`'s checkpointer, the pieces `shards` of the global
/// tensors `(name, dtype, global bytes)`. The rank's loop state records its
/// rank so restore can be checked to hand each rank its own.
fn save_pieces(
    ckpt: &Checkpointer,
    step: u64,
    tensors: &[(String, DType, Vec<u8>)],
    shards: &[ShardSpec],
) -> ckpt::Result<SaveReport> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .zip(shards)
        .map(|((_, dtype, bytes), s)| cut(bytes, s, dtype.size()))
        .collect();
    let views: Vec<TensorRef<'_>> = tensors
        .iter()
        .zip(shards)
        .zip(&data)
        .map(|(((name, dtype, _), s), d)| {
            TensorRef::new(name.clone(), *dtype, &s.shape, d).with_shard(s.clone())
        })
        .collect();
    let state = TrainingState::builder(step)
        .model(views.iter().map(|v| v as &dyn TensorView))
        .without_optimizer()
        .without_loop_state()
        .extra(&ckpt.rank_id())
        .build()?;
    ckpt.save(&state)?.wait()
}

/// What one restoring rank got: the report and one buffer per tensor.
type Restoration = ckpt::Result<Option<(Restored, Vec<Vec<u8>>)>>;

/// Restores `shards` of the tensors; returns the bytes and the report.
fn restore_pieces(
    ckpt: &Checkpointer,
    tensors: &[(String, DType, Vec<u8>)],
    shards: &[ShardSpec],
) -> Restoration {
    let mut bufs: Vec<Vec<u8>> = tensors
        .iter()
        .zip(shards)
        .map(|((_, dtype, _), s)| vec![0xa5; numel(&s.shape) as usize * dtype.size()])
        .collect();
    let mut targets: Vec<TensorMut<'_>> = tensors
        .iter()
        .zip(shards)
        .zip(bufs.iter_mut())
        .map(|(((name, dtype, _), s), b)| {
            TensorMut::new(name.clone(), *dtype, &s.shape, b).with_shard(s.clone())
        })
        .collect();
    let mut refs: Vec<&mut dyn ckpt::TensorViewMut> = targets.iter_mut().map(|t| t as _).collect();
    let r = ckpt.restore_with(&mut refs, &RestoreOptions::default())?;
    Ok(r.map(|r| (r, bufs)))
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let tier: Arc<dyn Tier> = if case.on_disk {
        Arc::new(LocalTier::new(dir.path()).expect("local tier"))
    } else {
        Arc::new(MemoryTier::new())
    };
    let tensors: Vec<(String, DType, Vec<u8>)> = case
        .tensors
        .iter()
        .enumerate()
        .map(|(i, p)| (name(i), p.dtype, contents(p)))
        .collect();
    let n = case.savers;
    // save_shards[t][r]: rank r's piece of tensor t.
    let saved: Vec<Vec<ShardSpec>> = case.tensors.iter().map(|p| save_shards(p, n)).collect();

    // N ranks save concurrently, one checkpointer each, on one shared store.
    let reports: Vec<ckpt::Result<SaveReport>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (tier, tensors, saved, rt) = (&tier, &tensors, &saved, &rt);
                s.spawn(move || {
                    let ckpt = checkpointer(rt, tier, r, n, "0", Duration::from_secs(30));
                    let mine: Vec<ShardSpec> =
                        saved.iter().map(|t| t[r as usize].clone()).collect();
                    save_pieces(&ckpt, case.step, tensors, &mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("saver thread"))
            .collect()
    });
    for (r, rep) in reports.iter().enumerate() {
        let rep = rep
            .as_ref()
            .map_err(|e| TestCaseError::fail(format!("rank {r} of {n} failed to save: {e}")))?;
        prop_assert!(rep.is_durable(), "rank {r}: {rep:?}");
    }
    let steps = rt
        .block_on(store::committed_steps(tier.as_ref(), RUN))
        .expect("list");
    prop_assert_eq!(steps, vec![case.step]);
    let manifest = rt
        .block_on(store::load_manifest(tier.as_ref(), RUN, case.step))
        .expect("manifest");
    prop_assert_eq!(manifest.world_size, n);
    let report = rt.block_on(store::verify_step(tier.as_ref(), &manifest));
    prop_assert!(report.is_ok(), "{:?}", report.failures);

    // M ranks restore their split, concurrently.
    let m = case.restorers;
    let results: Vec<Restoration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..m)
            .map(|r| {
                let (tier, tensors, rt) = (&tier, &tensors, &rt);
                s.spawn(move || {
                    let ckpt = checkpointer(rt, tier, r, m, "1", Duration::from_secs(30));
                    let want: Vec<ShardSpec> = case
                        .tensors
                        .iter()
                        .map(|p| {
                            ShardSpec::split(p.shape.clone(), p.restore_dim, m.into(), r.into())
                                .expect("split")
                        })
                        .collect();
                    restore_pieces(&ckpt, tensors, &want)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("restorer thread"))
            .collect()
    });
    for (r, res) in results.into_iter().enumerate() {
        let (restored, bufs) = res
            .map_err(|e| TestCaseError::fail(format!("restorer {r} of {m}: {e}")))?
            .ok_or_else(|| TestCaseError::fail(format!("restorer {r}: nothing to restore")))?;
        prop_assert_eq!(restored.step, case.step);
        prop_assert_eq!(restored.world_size, n);
        prop_assert!(restored.skipped.is_empty(), "{:?}", restored.skipped);
        // Each rank gets its own loop state; ranks beyond the saved world
        // get rank 0's.
        let owner: u32 = if (r as u32) < n { r as u32 } else { 0 };
        prop_assert_eq!(restored.loop_state.extra::<u32>().expect("extra"), owner);
        let mut needed = 0u64;
        for (t, ((name, dtype, global), p)) in tensors.iter().zip(&case.tensors).enumerate() {
            let want = ShardSpec::split(p.shape.clone(), p.restore_dim, m.into(), r as u64)
                .expect("split");
            let expect = cut(global, &want, dtype.size());
            prop_assert!(
                bufs[t] == expect,
                "restorer {r}/{m}: tensor {name} {dtype} {:?} shard {:?}+{:?} differs (saved by {n} ranks as {:?})",
                p.shape,
                want.offsets,
                want.shape,
                saved[t]
            );
            needed += saved[t]
                .iter()
                .filter(|s| s.intersect(&want).is_some())
                .map(|s| numel(&s.shape) * dtype.size() as u64)
                .sum::<u64>();
        }
        // Only the saved pieces that a requested shard overlaps are read,
        // each at most once.
        prop_assert!(
            restored.bytes_read <= needed,
            "restorer {r}: read {} bytes for {needed} needed",
            restored.bytes_read
        );
    }
    Ok(())
}

/// 16 cases by default (a few seconds); `CKPT_RESHARD_CASES` asks for more.
fn cases() -> u32 {
    std::env::var("CKPT_RESHARD_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn n_ranks_save_m_ranks_restore_any_split(case in case()) {
        run_case(&case)?;
    }
}

// ---------------------------------------------------------------------------
// Commits that must not happen.

fn matrix(rows: u64, cols: u64) -> (String, DType, Vec<u8>) {
    let mut mix = Rng::seed_from_u64(rows * 1000 + cols);
    let bytes = (0..rows * cols * 4).map(|_| mix.next_u64() as u8).collect();
    ("w".to_string(), DType::F32, bytes)
}

fn rows(global: &[u64], start: u64, len: u64) -> ShardSpec {
    let mut offsets = vec![0; global.len()];
    let mut shape = global.to_vec();
    offsets[0] = start;
    shape[0] = len;
    ShardSpec::new(global.to_vec(), offsets, shape).expect("shard")
}

/// Saves one piece per rank from concurrent threads; `None` leaves a rank
/// out. Returns each participating rank's outcome.
fn save_world(
    rt: &tokio::runtime::Runtime,
    tier: &Arc<dyn Tier>,
    step: u64,
    tensor: &(String, DType, Vec<u8>),
    pieces: &[Option<(ShardSpec, &str)>],
    timeout: Duration,
) -> Vec<Option<ckpt::Result<SaveReport>>> {
    let world = pieces.len() as u32;
    std::thread::scope(|s| {
        let handles: Vec<_> = pieces
            .iter()
            .enumerate()
            .map(|(r, p)| {
                p.as_ref().map(|(shard, incarnation)| {
                    s.spawn(move || {
                        let ckpt = checkpointer(rt, tier, r as u32, world, incarnation, timeout);
                        save_pieces(
                            &ckpt,
                            step,
                            std::slice::from_ref(tensor),
                            std::slice::from_ref(shard),
                        )
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.map(|h| h.join().expect("saver thread")))
            .collect()
    })
}

fn assert_not_committed(rt: &tokio::runtime::Runtime, tier: &Arc<dyn Tier>, step: u64) {
    let steps = rt
        .block_on(store::committed_steps(tier.as_ref(), RUN))
        .expect("list");
    assert!(!steps.contains(&step), "step {step} committed: {steps:?}");
    match rt.block_on(tier.size(&layout::manifest_path(RUN, step))) {
        Err(Error::NotFound { .. }) => {}
        other => panic!("MANIFEST of step {step} should not exist: {other:?}"),
    }
}

fn err_text(r: &Option<ckpt::Result<SaveReport>>) -> String {
    match r {
        Some(Err(e)) => e.to_string(),
        Some(Ok(rep)) => panic!("save unexpectedly committed: {rep:?}"),
        None => panic!("rank did not save"),
    }
}

#[test]
fn overlapping_pieces_are_never_committed() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let tier: Arc<dyn Tier> = Arc::new(LocalTier::new(dir.path()).expect("tier"));
    let tensor = matrix(6, 4);
    let g = [6u64, 4];
    // Rows 0..3, 2..4 and 5..6: six rows in all, as many as the tensor has,
    // but rows 2 overlap and row 4 is nobody's.
    let pieces = [
        Some((rows(&g, 0, 3), "0")),
        Some((rows(&g, 2, 2), "0")),
        Some((rows(&g, 5, 1), "0")),
    ];
    let out = save_world(&rt, &tier, 7, &tensor, &pieces, Duration::from_millis(800));
    let coordinator = err_text(&out[0]);
    assert!(
        coordinator.contains("overlap"),
        "coordinator error: {coordinator}"
    );
    for r in &out[1..] {
        let e = err_text(r);
        assert!(
            e.contains("the coordinator gave up") && e.contains("overlap"),
            "rank error (told by the coordinator, not timed out): {e}"
        );
    }
    assert_not_committed(&rt, &tier, 7);
    let reader = checkpointer(&rt, &tier, 0, 1, "x", Duration::from_secs(5));
    assert!(
        restore_pieces(
            &reader,
            std::slice::from_ref(&tensor),
            &[ShardSpec::full(g.to_vec())]
        )
        .expect("restore")
        .is_none(),
        "nothing may be restorable"
    );

    // The same step saved again by a new incarnation with a proper tiling
    // commits, and the leftovers of the failed attempt do not leak into it.
    let pieces = [
        Some((rows(&g, 0, 2), "1")),
        Some((rows(&g, 2, 3), "1")),
        Some((rows(&g, 5, 1), "1")),
    ];
    let out = save_world(&rt, &tier, 7, &tensor, &pieces, Duration::from_secs(30));
    for (r, o) in out.iter().enumerate() {
        let rep = o.as_ref().expect("saved").as_ref();
        assert!(rep.is_ok_and(SaveReport::is_durable), "rank {r}: {rep:?}");
    }
    let (restored, bufs) = restore_pieces(
        &reader,
        std::slice::from_ref(&tensor),
        &[ShardSpec::full(g.to_vec())],
    )
    .expect("restore")
    .expect("committed");
    assert_eq!(restored.step, 7);
    assert_eq!(bufs[0], tensor.2);
    let m = rt
        .block_on(store::load_manifest(tier.as_ref(), RUN, 7))
        .expect("manifest");
    assert_eq!(m.incarnation, "1");
}

#[test]
fn a_missing_rank_or_a_rank_of_another_incarnation_is_never_committed() {
    let rt = runtime();
    let tier: Arc<dyn Tier> = Arc::new(MemoryTier::new());
    let tensor = matrix(9, 3);
    let g = [9u64, 3];
    let timeout = Duration::from_millis(600);

    // Rank 2 of 3 never saves.
    let pieces = [
        Some((rows(&g, 0, 3), "0")),
        Some((rows(&g, 3, 3), "0")),
        None,
    ];
    let out = save_world(&rt, &tier, 3, &tensor, &pieces, timeout);
    let coordinator = err_text(&out[0]);
    assert!(
        coordinator.contains("ranks [2] did not finish"),
        "coordinator error: {coordinator}"
    );
    // Rank 1 waits as long as the coordinator: it hears the coordinator's
    // reason, or times out itself at the same moment.
    let e = err_text(&out[1]);
    assert!(
        (e.contains("the coordinator gave up") && e.contains("ranks [2] did not finish"))
            || e.contains("gave up waiting for the coordinator"),
        "rank error: {e}"
    );
    assert_not_committed(&rt, &tier, 3);

    // Rank 2 saved, but as part of an earlier incarnation of the job: its
    // piece is complete and valid, yet must not be merged.
    let stale = save_world(
        &rt,
        &tier,
        4,
        &tensor,
        &[None, None, Some((rows(&g, 6, 3), "0"))],
        timeout,
    );
    assert!(err_text(&stale[2]).contains("gave up waiting"));
    let pieces = [
        Some((rows(&g, 0, 3), "1")),
        Some((rows(&g, 3, 3), "1")),
        None,
    ];
    let out = save_world(&rt, &tier, 4, &tensor, &pieces, timeout);
    let coordinator = err_text(&out[0]);
    assert!(
        coordinator.contains("ranks [2] did not finish"),
        "coordinator error: {coordinator}"
    );
    assert_not_committed(&rt, &tier, 4);

    // All three of the same incarnation: committed.
    let pieces = [
        Some((rows(&g, 0, 3), "2")),
        Some((rows(&g, 3, 3), "2")),
        Some((rows(&g, 6, 3), "2")),
    ];
    let out = save_world(&rt, &tier, 4, &tensor, &pieces, Duration::from_secs(30));
    for (r, o) in out.iter().enumerate() {
        let rep = o.as_ref().expect("saved").as_ref();
        assert!(rep.is_ok_and(SaveReport::is_durable), "rank {r}: {rep:?}");
    }
    let steps = rt
        .block_on(store::committed_steps(tier.as_ref(), RUN))
        .expect("list");
    assert_eq!(steps, vec![4]);
}

#[test]
fn a_tensor_smaller_than_the_world_commits_with_empty_pieces() {
    let rt = runtime();
    let tier: Arc<dyn Tier> = Arc::new(MemoryTier::new());
    // Two rows over four ranks: ranks 2 and 3 hold nothing of it.
    let tensor = matrix(2, 5);
    let g = vec![2u64, 5];
    let pieces: Vec<Option<(ShardSpec, &str)>> = (0..4)
        .map(|r| Some((ShardSpec::split(g.clone(), 0, 4, r).expect("split"), "0")))
        .collect();
    assert_eq!(pieces[3].as_ref().map(|p| p.0.numel()), Some(0));
    let out = save_world(&rt, &tier, 1, &tensor, &pieces, Duration::from_secs(30));
    for (r, o) in out.iter().enumerate() {
        let rep = o.as_ref().expect("saved").as_ref();
        assert!(rep.is_ok_and(SaveReport::is_durable), "rank {r}: {rep:?}");
    }
    let m = rt
        .block_on(store::load_manifest(tier.as_ref(), RUN, 1))
        .expect("manifest");
    assert!(rt.block_on(store::verify_step(tier.as_ref(), &m)).is_ok());
    // Restored whole, and by 3 ranks along the columns.
    let reader = checkpointer(&rt, &tier, 0, 1, "x", Duration::from_secs(5));
    let (_, bufs) = restore_pieces(
        &reader,
        std::slice::from_ref(&tensor),
        &[ShardSpec::full(g.clone())],
    )
    .expect("restore")
    .expect("committed");
    assert_eq!(bufs[0], tensor.2);
    for r in 0..3 {
        let want = ShardSpec::split(g.clone(), 1, 3, r).expect("split");
        let (_, bufs) = restore_pieces(
            &reader,
            std::slice::from_ref(&tensor),
            std::slice::from_ref(&want),
        )
        .expect("restore")
        .expect("committed");
        assert_eq!(bufs[0], cut(&tensor.2, &want, 4));
    }
}
