//! `Checkpointer::save_overlapped`: the copy into the staging pool runs
//! while the caller's work (forward and backward) runs, and the math-stop
//! is only what was not hidden.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_core::{Checkpointer, MemoryTier, TensorMut, TensorRef, TierPolicy, TrainingState};

const N: usize = 8 << 20; // 32 MiB of f32

/// A state of one model tensor and nothing else.
fn bare<'a>(step: u64, t: &'a TensorRef<'a>) -> TrainingState<'a> {
    TrainingState::builder(step)
        .model([t])
        .without_optimizer()
        .without_loop_state()
        .build()
        .expect("state")
}

fn checkpointer(tier: Arc<MemoryTier>) -> Checkpointer {
    Checkpointer::builder("overlap")
        .tier(tier, TierPolicy::keep_last(4))
        .overlap_copy_threads(1)
        .build()
        .expect("checkpointer")
}

fn restore(tier: Arc<MemoryTier>) -> (u64, Vec<f32>) {
    let ckpt = checkpointer(tier);
    let mut back = vec![0f32; N];
    let r = ckpt
        .restore(&mut [&mut TensorMut::from_slice("w", &[N as u64], &mut back)])
        .expect("restore")
        .expect("a checkpoint");
    (r.step, back)
}

/// The copy runs while the work does (the work sees the pool's blocks
/// taken), the copy's own time is reported, the math-stop leaves the work
/// out, and the bytes are the ones at the call.
#[test]
fn the_copy_runs_during_the_work_and_the_math_stop_leaves_the_work_out() {
    let tier = Arc::new(MemoryTier::new());
    let ckpt = checkpointer(tier.clone());
    let mut w: Vec<f32> = (0..N).map(|i| i as f32).collect();
    // Warm the pool (its first use allocates and pre-faults it).
    {
        let t = TensorRef::from_slice("w", &[N as u64], &w);
        let s = bare(1, &t);
        ckpt.save(&s)
            .expect("test setup")
            .wait()
            .expect("test setup");
    }
    let plain = {
        let t = TensorRef::from_slice("w", &[N as u64], &w);
        let s = bare(2, &t);
        let h = ckpt.save(&s).expect("test setup");
        h.wait().expect("test setup");
        h.report()
    };
    assert!(!plain.overlapped);
    let blocks = ckpt.staging_stats().expect("pool allocated").blocks;
    assert!(
        wait_until(|| ckpt
            .staging_stats()
            .is_some_and(|st| st.free_blocks == blocks)),
        "the earlier saves give their blocks back"
    );
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = bare(3, &t);
    let call = Instant::now();
    let (h, (sum, saw_copy, worked)) = ckpt.save_overlapped(&s, || {
        let began = Instant::now();
        // "Forward and backward": reads the tensor being copied...
        let sum: f64 = w.iter().step_by(4096).map(|x| f64::from(*x)).sum();
        // ...while the copy takes the pool's blocks. Seeing them taken from
        // inside the work is the overlap itself: an order, not a duration
        // (bounded only against a hang).
        let saw_copy = wait_until(|| {
            ckpt.staging_stats()
                .is_some_and(|st| st.free_blocks < blocks)
        });
        (sum, saw_copy, began.elapsed())
    });
    let took = call.elapsed();
    let h = h.expect("save");
    drop(s);
    // The update, after the copy: never seen by step 3.
    w.iter_mut().for_each(|x| *x = -1.0);
    let r = h.wait().expect("durable");
    assert!(sum > 0.0);
    assert!(r.overlapped);
    assert!(saw_copy, "the copy ran while the work did");
    assert!(took >= worked, "the call waits for the work");
    assert!(r.copy > Duration::ZERO);
    // The math-stop counts only what the loop waited beyond the work: the
    // work's own time is never in it. (How small it is when the work is
    // longer than the copy is a figure: `ckpt-bench train --overlap`,
    // BENCHMARKS.md "Overlapped saves".)
    assert!(
        r.math_stop + worked <= took,
        "math-stop {:?} + work {worked:?} > the call's {took:?}",
        r.math_stop
    );
    let (step, back) = restore(tier);
    assert_eq!(step, 3);
    assert!(
        back.iter().enumerate().all(|(i, x)| *x == i as f32),
        "step 3 holds the bytes at the call"
    );
}

/// Work shorter than the copy: the math-stop is the rest of the copy.
#[test]
fn work_shorter_than_the_copy_waits_for_the_rest() {
    let tier = Arc::new(MemoryTier::new());
    let tier_for_restore = tier.clone();
    let ckpt = Checkpointer::builder("overlap")
        .tier(tier, TierPolicy::keep_last(4))
        // 64 MiB/s: 32 MiB take at least 0.5 s.
        .overlap_copy_bandwidth(64 << 20)
        .build()
        .expect("test setup");
    let w = vec![1f32; N];
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = bare(1, &t);
    let call = Instant::now();
    let (h, worked) = ckpt.save_overlapped(&s, || {
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        t.elapsed()
    });
    let took = call.elapsed();
    let r = h.expect("test setup").wait().expect("test setup");
    // What holds however slow the machine: the cap makes the copy last at
    // least 0.5 s, the call returns only once the copy is done, and the
    // math-stop is the call's time less the work's. (What part of the copy
    // 100 ms of work hides is a figure: `ckpt-bench train --overlap
    // --fwd-passes 0`, BENCHMARKS.md "Overlapped saves".)
    assert!(
        r.copy >= Duration::from_millis(450),
        "the cap holds the copy to 64 MiB/s: {:?}",
        r.copy
    );
    assert!(
        took >= r.copy,
        "the call ({took:?}) returned before the copy ({:?}) was done",
        r.copy
    );
    assert!(
        r.math_stop + worked <= took,
        "math-stop {:?} + work {worked:?} > the call's {took:?}",
        r.math_stop
    );
    assert!(r.overlapped);
    let (step, back) = restore(tier_for_restore);
    assert_eq!(step, 1);
    assert!(back.iter().all(|x| *x == 1.0), "step 1 holds the bytes");
}

/// Polls `f` until it holds; false after a minute (a hang guard only).
fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// A panic in the caller's work: the copy is finished before the panic
/// goes on (the borrow ends only then), and the checkpointer saves again.
#[test]
fn a_panic_in_the_work_waits_for_the_copy_and_leaves_the_checkpointer_usable() {
    let tier = Arc::new(MemoryTier::new());
    let ckpt = checkpointer(tier.clone());
    let w = vec![2f32; N];
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = bare(1, &t);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ckpt.save_overlapped(&s, || panic!("backward failed"))
    }));
    assert!(panicked.is_err());
    drop(s);
    let s = bare(2, &t);
    ckpt.save(&s)
        .expect("test setup")
        .wait()
        .expect("the next save commits");
    drop(ckpt);
    let (step, back) = restore(tier);
    assert_eq!(step, 2);
    assert!(back.iter().all(|x| *x == 2.0));
}

#[test]
fn zero_overlap_threads_or_bandwidth_are_config_errors() {
    for b in [
        Checkpointer::builder("x").overlap_copy_threads(0),
        Checkpointer::builder("x").overlap_copy_bandwidth(0),
    ] {
        let Err(e) = b
            .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
            .build()
        else {
            panic!("refused")
        };
        assert!(e.to_string().contains("overlapped"), "{e}");
    }
}
