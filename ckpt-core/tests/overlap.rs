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

/// Work longer than the copy hides it: the loop waits for a small part of
/// it, the copy's own time is reported, the bytes are the ones at the call.
#[test]
fn work_longer_than_the_copy_hides_it() {
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
    let work = (plain.copy * 6).max(Duration::from_millis(150));
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = bare(3, &t);
    let call = Instant::now();
    let (h, sum) = ckpt.save_overlapped(&s, || {
        // "Forward and backward": reads the tensor being copied.
        let sum: f64 = w.iter().step_by(4096).map(|x| f64::from(*x)).sum();
        std::thread::sleep(work);
        sum
    });
    let took = call.elapsed();
    let h = h.expect("save");
    drop(s);
    // The update, after the copy: never seen by step 3.
    w.iter_mut().for_each(|x| *x = -1.0);
    let r = h.wait().expect("durable");
    assert!(sum > 0.0);
    assert!(r.overlapped);
    assert!(took >= work, "the call waits for the work");
    assert!(r.copy > Duration::ZERO);
    assert!(
        r.math_stop < r.copy / 4 + Duration::from_millis(5),
        "math-stop {:?} should be a small part of the copy {:?} when the work ({work:?}) is longer",
        r.math_stop,
        r.copy
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
    let ckpt = Checkpointer::builder("overlap")
        .tier(tier, TierPolicy::keep_last(4))
        // 64 MiB/s: 32 MiB take at least 0.5 s.
        .overlap_copy_bandwidth(64 << 20)
        .build()
        .expect("test setup");
    let w = vec![1f32; N];
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = bare(1, &t);
    let (h, worked) = ckpt.save_overlapped(&s, || {
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        t.elapsed()
    });
    let r = h.expect("test setup").wait().expect("test setup");
    assert!(
        r.copy >= Duration::from_millis(450),
        "the cap holds the copy to 64 MiB/s: {:?}",
        r.copy
    );
    // What the work did not hide is waited for (the copy began a little
    // before the work, after the planning).
    assert!(
        r.math_stop + worked + Duration::from_millis(50) >= r.copy,
        "math-stop {:?} is the part of the copy {:?} not hidden by {worked:?} of work",
        r.math_stop,
        r.copy
    );
    assert!(r.math_stop < r.copy, "100 ms were hidden");
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
