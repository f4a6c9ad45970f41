//! Several ranks in one process (one thread and one checkpointer each, on
//! shared in-memory tiers): replicated shards written once and compared at
//! commit, the restore agreement, and the replica check between saves.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{
    Agreement, CheckpointStore, Checkpointer, DType, Error, MemoryTier, RestoreOptions, Result,
    ShardSpec, SharedTensor, TensorMut, TensorRef, TensorView, Tier, TierPolicy, TrainingState,
    format::layout,
};
use proptest::prelude::*;

const RUN: &str = "ranks";

/// An all-gather among threads: what a job's collective would do.
#[derive(Debug, Default)]
struct ThreadAgreement {
    world: usize,
    rounds: Mutex<BTreeMap<String, Vec<Option<Vec<u8>>>>>,
    cv: Condvar,
}

impl ThreadAgreement {
    fn new(world: usize) -> Arc<Self> {
        Arc::new(Self {
            world,
            ..Self::default()
        })
    }
}

impl Agreement for ThreadAgreement {
    fn all_gather(&self, round: &str, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let rank = serde_json::from_slice::<serde_json::Value>(&mine)
            .ok()
            .and_then(|v| v["rank"].as_u64())
            .expect("every payload names its rank") as usize;
        let mut rounds = self.rounds.lock().expect("lock");
        rounds
            .entry(round.to_string())
            .or_insert_with(|| vec![None; self.world])[rank] = Some(mine);
        self.cv.notify_all();
        let (rounds, timeout) = self
            .cv
            .wait_timeout_while(rounds, Duration::from_secs(20), |r| {
                r[round].iter().any(Option::is_none)
            })
            .expect("lock");
        if timeout.timed_out() {
            return Err(Error::AgreementTimeout {
                round: round.into(),
                missing: vec![],
                after: Duration::from_secs(20),
            });
        }
        Ok(rounds[round].iter().flatten().cloned().collect())
    }
}

fn floats(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 * 1e-6)
        .collect()
}

fn state<'a>(step: u64, views: &[&'a dyn TensorView]) -> TrainingState<'a> {
    TrainingState::builder(step)
        .model(views.iter().copied())
        .without_optimizer()
        .rng(&step)
        .without_data_loader()
        .without_lr_schedule()
        .build()
        .expect("state")
}

/// Runs `f(rank)` on `world` threads and returns the results in rank order.
fn on_ranks<T: Send>(world: u32, f: impl Fn(u32) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                s.spawn({
                    let f = &f;
                    move || f(r)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn checkpointer(
    tiers: &[MemoryTier],
    rank: u32,
    world: u32,
    incarnation: &str,
    replicas: &[u32],
) -> Checkpointer {
    let mut b = Checkpointer::builder(RUN)
        .rank(rank, world)
        .incarnation(incarnation)
        .commit_timeout(Duration::from_secs(20))
        .replicas(replicas.iter().copied());
    if replicas.is_empty() {
        b = Checkpointer::builder(RUN)
            .rank(rank, world)
            .incarnation(incarnation)
            .commit_timeout(Duration::from_secs(20));
    }
    for t in tiers {
        b = b.tier(Arc::new(t.clone()), TierPolicy::keep_last(10));
    }
    b.build().expect("build")
}

/// Bytes of tensor data in the shard files of `step` on `tier`.
fn data_written(tier: &MemoryTier, step: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let m = rt
        .block_on(ckpt_core::store::load_manifest(tier, RUN, step))
        .expect("manifest");
    m.ranks
        .iter()
        .map(|r| r.file_len - r.header.map_or(0, |h| h.len))
        .sum()
}

#[test]
fn replicated_shards_are_written_once_and_restore_on_every_replica() {
    // 2 shards x 2 replicas: ranks {0, 1} hold shard 0, {2, 3} shard 1.
    let tier = MemoryTier::new();
    let n = 64 * 1024;
    let shards: Vec<Vec<Vec<f32>>> = (0..2)
        .map(|s| {
            (0..4)
                .map(|t| floats(n * (t + 1), s * 10 + t as u32))
                .collect()
        })
        .collect();
    on_ranks(4, |rank| {
        let shard = (rank / 2) as usize;
        let group = [rank / 2 * 2, rank / 2 * 2 + 1];
        let ckpt = checkpointer(std::slice::from_ref(&tier), rank, 4, "1", &group);
        let views: Vec<TensorRef<'_>> = shards[shard]
            .iter()
            .enumerate()
            .map(|(t, data)| {
                let len = data.len() as u64;
                TensorRef::from_slice(format!("t{t}"), &[len], data).with_shard(
                    ShardSpec::new(vec![2 * len], vec![shard as u64 * len], vec![len])
                        .expect("shard"),
                )
            })
            .collect();
        let refs: Vec<&dyn TensorView> = views.iter().map(|v| v as &dyn TensorView).collect();
        let r = ckpt
            .save(&state(1, &refs))
            .expect("save")
            .wait()
            .expect("durable");
        assert!(r.is_durable());
    });
    // Each piece written once: the files hold one copy of the state, and no
    // replica wrote more than its share plus one tensor.
    let one_copy: u64 = shards.iter().flatten().map(|t| t.len() as u64 * 4).sum();
    assert_eq!(data_written(&tier, 1), one_copy, "each piece written once");
    let store = CheckpointStore::new(Arc::new(tier.clone())).expect("store");
    let m = store.manifest(RUN, 1).expect("manifest");
    let per_rank: Vec<u64> = m
        .ranks
        .iter()
        .map(|r| r.file_len - r.header.map_or(0, |h| h.len))
        .collect();
    eprintln!("2-replica save: {one_copy} bytes of state, written per rank {per_rank:?}");
    let largest = (n * 4 * 4) as u64;
    for pair in per_rank.chunks(2) {
        assert!(pair[0].abs_diff(pair[1]) <= largest, "{per_rank:?}");
    }
    for (name, t) in &m.tensors {
        assert_eq!(t.pieces.len(), 2, "{name}: one piece per shard");
        for p in &t.pieces {
            assert_eq!(p.replicas.len(), 2, "{name}: both replicas matched");
            assert!(
                p.replicas.contains(&p.rank),
                "{name}: the writer is a replica"
            );
        }
    }
    // Every rank restores its own shard (whoever wrote it).
    on_ranks(4, |rank| {
        let shard = (rank / 2) as usize;
        let group = [rank / 2 * 2, rank / 2 * 2 + 1];
        let ckpt = checkpointer(std::slice::from_ref(&tier), rank, 4, "2", &group);
        let mut bufs: Vec<Vec<f32>> = shards[shard].iter().map(|t| vec![0f32; t.len()]).collect();
        let mut targets: Vec<TensorMut<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(t, b)| {
                let len = b.len() as u64;
                TensorMut::from_slice(format!("t{t}"), &[len], b).with_shard(
                    ShardSpec::new(vec![2 * len], vec![shard as u64 * len], vec![len])
                        .expect("shard"),
                )
            })
            .collect();
        let mut refs: Vec<&mut dyn ckpt_core::TensorViewMut> =
            targets.iter_mut().map(|t| t as _).collect();
        let r = ckpt
            .restore(&mut refs)
            .expect("restore")
            .expect("a checkpoint");
        assert_eq!(r.step, 1);
        drop(targets);
        assert_eq!(bufs, shards[shard], "rank {rank}");
    });
}

/// `world` replicas of one tensor; `flip` flips a bit of rank `flip.0`'s
/// copy at byte `flip.1`. Returns every rank's save outcome.
fn save_replicas(
    tiers: &[MemoryTier],
    world: u32,
    data: &Bytes,
    flip: Option<(u32, usize)>,
) -> Vec<ckpt_core::Result<ckpt_core::SaveReport>> {
    let group: Vec<u32> = (0..world).collect();
    on_ranks(world, |rank| {
        let ckpt = checkpointer(tiers, rank, world, "1", &group);
        let mut mine = data.clone();
        if let Some((r, at)) = flip
            && r == rank
        {
            let mut v = mine.to_vec();
            v[at] ^= 0x10;
            mine = Bytes::from(v);
        }
        let t = SharedTensor::new("big", DType::U8, &[mine.len() as u64], mine);
        ckpt.save(&state(7, &[&t])).expect("save").wait()
    })
}

#[test]
fn a_single_chunk_mismatch_in_a_1_gib_tensor_is_found_and_named() {
    let tiers = [MemoryTier::named("a"), MemoryTier::named("b")];
    let gib = 1usize << 30;
    let data = Bytes::from(ckpt_core::rng::pattern(gib, 1));
    // Byte in chunk 201 of 256 (4 MiB chunks).
    let at = 201 * (4 << 20) + 12345;
    let outcomes = save_replicas(&tiers, 2, &data, Some((1, at)));
    for (rank, o) in outcomes.iter().enumerate() {
        match o {
            Err(Error::NotCommitted { step: 7, failures }) => {
                assert_eq!(
                    failures.len(),
                    2,
                    "rank {rank}: both tiers refused the step"
                );
                for f in failures {
                    assert!(
                        matches!(&f.error, Error::ReplicaMismatch { step: 7, tensor, chunk: 201, ranks }
                            if tensor == "big" && ranks == &[0, 1]),
                        "rank {rank}: {:?}",
                        f.error
                    );
                }
            }
            other => panic!("rank {rank}: want NotCommitted, got {other:?}"),
        }
    }
    for t in &tiers {
        let store = CheckpointStore::new(Arc::new(t.clone())).expect("store");
        assert!(
            store.steps(RUN).expect("steps").is_empty(),
            "step 7 must not be committed"
        );
    }
}

#[test]
fn three_replicas_name_the_odd_one_out_and_log_a_detected_error() {
    let tiers = [MemoryTier::new()];
    let data = Bytes::from(ckpt_core::rng::pattern(1 << 20, 2));
    let outcomes = save_replicas(&tiers, 3, &data, Some((2, 5000)));
    for o in &outcomes {
        match o {
            Err(Error::NotCommitted { failures, .. }) => assert!(
                matches!(&failures[0].error, Error::ReplicaMismatch { chunk: 0, ranks, .. } if ranks == &[2]),
                "{:?}",
                failures[0].error
            ),
            other => panic!("want NotCommitted, got {other:?}"),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The coordinator left the reason for the other ranks and for `ckpt ls`.
    let marker = rt
        .block_on(tiers[0].get(&format!("{}/{}", layout::step_dir(RUN, 7), layout::ABORTED)))
        .expect("ABORTED marker");
    assert!(String::from_utf8_lossy(&marker).contains("ReplicaMismatch"));
    // The failure log counts it.
    let events = rt
        .block_on(tiers[0].list(&format!("{RUN}/events/")))
        .expect("events");
    assert!(
        events
            .iter()
            .any(|o| o.path.ends_with("-detected-error.json")),
        "{events:?}"
    );
    // Without the flip the same save commits.
    let ok = save_replicas(&[MemoryTier::new()], 3, &data, None);
    assert!(ok.iter().all(|o| o.is_ok()), "{ok:?}");
}

#[test]
fn replicas_that_declare_different_shapes_are_refused() {
    let tier = MemoryTier::new();
    let outcomes = on_ranks(2, |rank| {
        let ckpt = checkpointer(std::slice::from_ref(&tier), rank, 2, "1", &[0, 1]);
        let n = if rank == 0 { 100 } else { 101 };
        let w = vec![1f32; n];
        let t = TensorRef::from_slice("w", &[n as u64], &w);
        ckpt.save(&state(1, &[&t])).expect("save").wait()
    });
    for o in outcomes {
        match o {
            Err(Error::NotCommitted { failures, .. }) => assert!(
                matches!(&failures[0].error, Error::TensorMismatch { tensor, .. } if tensor == "w")
                    || matches!(&failures[0].error, Error::Incomplete { .. }),
                "{:?}",
                failures[0].error
            ),
            other => panic!("want NotCommitted, got {other:?}"),
        }
    }
}

#[test]
fn a_replica_that_never_reports_fails_the_step_within_the_timeout_naming_it() {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder(RUN)
        .rank(0, 2)
        .replicas([0, 1])
        .commit_timeout(Duration::from_millis(300))
        .tier(Arc::new(tier), TierPolicy::keep_last(2))
        .build()
        .expect("build");
    let w = vec![1f32; 1000];
    let t = TensorRef::from_slice("w", &[1000], &w);
    // That the wait returns at all is the timeout at work; how soon after
    // 300 ms is the machine's business, not the test's.
    let err = ckpt
        .save(&state(3, &[&t]))
        .expect("save")
        .wait()
        .expect_err("rank 1 never saves");
    match err {
        Error::NotCommitted { failures, .. } => assert!(
            matches!(&failures[0].error, Error::Incomplete { reason, .. } if reason.contains("ranks [1]")),
            "{:?}",
            failures[0].error
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn verify_replicas_between_saves_finds_a_flipped_bit() {
    let tier = MemoryTier::new();
    let a = ThreadAgreement::new(2);
    let data = ckpt_core::rng::pattern(3 << 20, 9);
    let results = on_ranks(2, |rank| {
        let ckpt = Checkpointer::builder(RUN)
            .rank(rank, 2)
            .replicas([0, 1])
            .agreement(a.clone())
            .chunk_size(1 << 20)
            .tier(Arc::new(tier.clone()), TierPolicy::keep_last(2))
            .build()
            .expect("build");
        let mut mine = data.clone();
        let t = TensorRef::new("w", DType::U8, &[mine.len() as u64], &mine);
        let clean = ckpt.verify_replicas(&state(4, &[&t]));
        drop(t);
        if rank == 1 {
            mine[(2 << 20) + 7] ^= 1;
        }
        let t = TensorRef::new("w", DType::U8, &[mine.len() as u64], &mine);
        (clean, ckpt.verify_replicas(&state(5, &[&t])))
    });
    for (clean, flipped) in results {
        let c = clean.expect("identical replicas pass");
        assert_eq!(c.bytes, 3 << 20);
        assert!(
            matches!(flipped, Err(Error::ReplicaMismatch { step: 5, ref tensor, chunk: 2, ref ranks })
                if tensor == "w" && ranks == &[0, 1]),
            "{flipped:?}"
        );
    }
}

/// 8 ranks saved steps 1..=6 on two tiers; `lost[s][r][t]` removes rank
/// r's shard file of step s from tier t. Every rank then restores (through
/// the storage agreement), in threads; all must agree on the newest step
/// every rank can read on some tier.
fn agreement_case(lost: &[[[bool; 2]; 8]; 6], incarnation: &str) {
    let tiers = [MemoryTier::named("fast"), MemoryTier::named("slow")];
    let world = 8u32;
    on_ranks(world, |rank| {
        let ckpt = checkpointer(&tiers, rank, world, "save", &[]);
        let w = vec![rank as f32; 256];
        for step in 1..=6u64 {
            let t = TensorRef::from_slice("w", &[256], &w).with_shard(
                ShardSpec::split(vec![256 * u64::from(world)], 0, world.into(), rank.into())
                    .expect("split"),
            );
            ckpt.save(&state(step, &[&t]))
                .expect("save")
                .wait()
                .expect("durable");
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (s, per_rank) in lost.iter().enumerate() {
        for (r, per_tier) in per_rank.iter().enumerate() {
            for (t, gone) in per_tier.iter().enumerate() {
                if *gone {
                    let path = rt
                        .block_on(ckpt_core::store::shard_file(
                            &tiers[t],
                            RUN,
                            s as u64 + 1,
                            r as u32,
                        ))
                        .expect("shard file");
                    rt.block_on(tiers[t].delete(&path)).expect("delete");
                }
            }
        }
    }
    let want = (1..=6u64)
        .rev()
        .find(|s| (0..8).all(|r| lost[*s as usize - 1][r].iter().any(|gone| !gone)));
    let got = on_ranks(world, |rank| {
        let ckpt = checkpointer(&tiers, rank, world, incarnation, &[]);
        let mut w = vec![0f32; 256];
        let mut t = TensorMut::from_slice("w", &[256], &mut w).with_shard(
            ShardSpec::split(vec![256 * u64::from(world)], 0, world.into(), rank.into())
                .expect("split"),
        );
        let r = ckpt.restore_with(&mut [&mut t], &RestoreOptions::default());
        drop(t);
        // The run goes on: the next save records the rollback first.
        if let Ok(Some(r)) = &r {
            let t = TensorRef::from_slice("w", &[256], &w).with_shard(
                ShardSpec::split(vec![256 * u64::from(world)], 0, world.into(), rank.into())
                    .expect("split"),
            );
            ckpt.save(&state(r.step + 1, &[&t]))
                .expect("save")
                .wait()
                .expect("the next step commits");
        }
        (r.map(|r| r.map(|r| r.step)), w)
    });
    for (rank, (r, w)) in got.iter().enumerate() {
        match (want, r) {
            (Some(s), Ok(Some(got))) => {
                assert_eq!(
                    *got, s,
                    "rank {rank} restored {got}, the newest common step is {s}"
                );
                assert!(w.iter().all(|x| *x == rank as f32), "rank {rank}'s data");
            }
            (None, Err(Error::NoCommonStep { .. })) => {}
            other => panic!("rank {rank}: want {want:?}, got {other:?}"),
        }
    }
    // The run continued from the agreed step: above it, only the step it
    // saved next is committed on every tier (the abandoned ones are out of
    // the lineage, their MANIFESTs kept as audit copies).
    if let Some(s) = want {
        for t in &tiers {
            let store = CheckpointStore::new(Arc::new(t.clone())).expect("store");
            let steps = store.steps(RUN).expect("steps");
            let above: Vec<u64> = steps.iter().copied().filter(|x| *x > s).collect();
            assert_eq!(
                above,
                vec![s + 1],
                "{} commits {steps:?} above {s}",
                t.location()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn eight_ranks_agree_on_the_newest_common_step(
        lost in prop::array::uniform6(prop::array::uniform8(prop::array::uniform2(prop::bool::weighted(0.3)))),
        case in 0u32..1_000_000,
    ) {
        agreement_case(&lost, &format!("case-{case}"));
    }
}

#[test]
fn one_empty_rank_is_an_error_and_all_empty_is_a_fresh_start() {
    let a = ThreadAgreement::new(2);
    let full = MemoryTier::named("full");
    // Rank 0 sees checkpoints; rank 1's only tier is empty.
    let ckpt = Checkpointer::builder(RUN)
        .tier(Arc::new(full.clone()), TierPolicy::keep_last(2))
        .build()
        .expect("build");
    let w = vec![1f32; 8];
    let t = TensorRef::from_slice("w", &[8], &w);
    ckpt.save(&state(2, &[&t]))
        .expect("save")
        .wait()
        .expect("durable");
    drop(ckpt);
    let results = on_ranks(2, |rank| {
        let tier = if rank == 0 {
            full.clone()
        } else {
            MemoryTier::named("empty")
        };
        let ckpt = Checkpointer::builder(RUN)
            .rank(rank, 2)
            .agreement(a.clone())
            .tier(Arc::new(tier), TierPolicy::keep_last(2))
            .build()
            .expect("build");
        let mut w = vec![0f32; 8];
        ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[8], &mut w)])
            .map(|r| r.map(|r| r.step))
    });
    for r in &results {
        match r {
            Err(Error::NoCommonStep { ranks, .. }) => {
                assert_eq!(ranks.len(), 1);
                assert_eq!(ranks[0].0, 1, "{ranks:?}");
                assert!(ranks[0].1.contains("no committed checkpoint"), "{ranks:?}");
            }
            other => panic!("a silent fresh start: {other:?}"),
        }
    }
    // Every rank empty: a fresh start for all.
    let b = ThreadAgreement::new(2);
    let results = on_ranks(2, |rank| {
        let ckpt = Checkpointer::builder(RUN)
            .rank(rank, 2)
            .agreement(b.clone())
            .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(2))
            .build()
            .expect("build");
        let mut w = vec![0f32; 8];
        ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[8], &mut w)])
            .map(|r| r.map(|r| r.step))
    });
    assert!(results.iter().all(|r| matches!(r, Ok(None))), "{results:?}");
}

/// Incremental saves on 4 ranks (2 shards x 2 replicas): each rank's
/// frozen piece is written once, later saves write only the trained one,
/// and a restarted job (new checkpointers, new incarnation) restores every
/// rank bit-exact and goes on saving incrementally from the restored step.
#[test]
fn incremental_saves_on_replicated_ranks_write_only_changes_across_a_restart() {
    let tier = MemoryTier::new();
    let n = 64 * 1024;
    let frozen: Vec<Vec<f32>> = (0..2).map(|s| floats(4 * n, 7 + s)).collect();
    let trained = |shard: usize, step: u64| floats(n, 1000 * step as u32 + shard as u32);
    let ckpt = |rank: u32, incarnation: &str| {
        Checkpointer::builder(RUN)
            .rank(rank, 4)
            .incarnation(incarnation)
            .commit_timeout(Duration::from_secs(20))
            .replicas([rank / 2 * 2, rank / 2 * 2 + 1])
            .chunk_size(16 * 1024)
            .tier(
                Arc::new(tier.clone()),
                TierPolicy::keep_last(10).incremental(8),
            )
            .build()
            .expect("build")
    };
    let spec = |shard: usize, len: u64| {
        ShardSpec::new(vec![2 * len], vec![shard as u64 * len], vec![len]).expect("shard")
    };
    let save = |c: &Checkpointer, rank: u32, step: u64| {
        let shard = (rank / 2) as usize;
        let t = trained(shard, step);
        let f = TensorRef::from_slice("frozen", &[frozen[shard].len() as u64], &frozen[shard])
            .with_shard(spec(shard, frozen[shard].len() as u64));
        let tr =
            TensorRef::from_slice("trained", &[n as u64], &t).with_shard(spec(shard, n as u64));
        let r = c
            .save(&state(step, &[&f, &tr]))
            .expect("save")
            .wait()
            .expect("durable");
        assert!(r.is_durable(), "rank {rank} step {step}: {r:?}");
    };
    let restore = |c: &Checkpointer, rank: u32| -> u64 {
        let shard = (rank / 2) as usize;
        let mut f = vec![0f32; frozen[shard].len()];
        let mut t = vec![0f32; n];
        let step = {
            let mut tf = TensorMut::from_slice("frozen", &[f.len() as u64], &mut f)
                .with_shard(spec(shard, frozen[shard].len() as u64));
            let mut tt = TensorMut::from_slice("trained", &[n as u64], &mut t)
                .with_shard(spec(shard, n as u64));
            c.restore(&mut [&mut tf, &mut tt])
                .expect("restore")
                .expect("a checkpoint")
                .step
        };
        assert!(
            f == frozen[shard],
            "rank {rank}: frozen bytes of step {step}"
        );
        assert!(
            t == trained(shard, step),
            "rank {rank}: trained bytes of step {step}"
        );
        step
    };
    on_ranks(4, |rank| {
        let c = ckpt(rank, "1");
        for step in 1..=3 {
            save(&c, rank, step);
        }
    });
    let whole = data_written(&tier, 1);
    let trained_bytes = (2 * n * 4) as u64;
    assert_eq!(whole, 5 * trained_bytes, "each piece written once");
    for step in [2, 3] {
        assert_eq!(data_written(&tier, step), trained_bytes, "step {step}");
    }
    // A restarted job: every rank restores step 3, then saves step 4
    // against the restored step's chunk hashes.
    let steps = on_ranks(4, |rank| {
        let c = ckpt(rank, "2");
        let step = restore(&c, rank);
        save(&c, rank, 4);
        step
    });
    assert_eq!(steps, vec![3; 4]);
    assert_eq!(
        data_written(&tier, 4),
        trained_bytes,
        "step 4 after the restart"
    );
    let steps = on_ranks(4, |rank| restore(&ckpt(rank, "3"), rank));
    assert_eq!(steps, vec![4; 4]);
    let store = CheckpointStore::new(Arc::new(tier.clone())).expect("store");
    for step in 1..=4 {
        let m = store.manifest(RUN, step).expect("manifest");
        let v = store.verify(&m);
        assert!(v.is_ok(), "step {step}: {v:?}");
    }
}
