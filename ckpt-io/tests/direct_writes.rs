//! The local tier's `O_DIRECT` writer on a real file system: a checkpoint
//! saved through a `Checkpointer` reads back bit-exact, and its files do not
//! land in the page cache (so a save does not evict the training job's own
//! cached files), against the buffered writer that leaves them there.

use std::path::Path;
use std::sync::Arc;

use ckpt_core::{Checkpointer, TensorMut, TensorRef, TierPolicy, TrainingState};
use ckpt_io::LocalTier;

/// 24 MiB and 1000 bytes more: the last page is partial.
const N: usize = (6 << 20) + 250;

/// Pages of `path` in the page cache, and pages in all (`mincore`).
fn resident(path: &Path) -> (usize, usize) {
    let f = std::fs::File::open(path).expect("open shard");
    // SAFETY: a read-only shared map of a file nothing else truncates while
    // the test runs; only its residency is asked, no byte is read.
    let map = unsafe { memmap2::Mmap::map(&f) }.expect("map shard");
    let page = 4096;
    let pages = map.len().div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` is a live mapping of `map.len()` bytes at a page-aligned
    // address, and `vec` has one byte per page of it.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (vec.iter().filter(|b| **b & 1 == 1).count(), pages)
}

/// Saves one step of `N` f32 through a tier on `dir`; returns the shard
/// file and the data.
fn save(dir: &Path, direct: bool) -> (std::path::PathBuf, Vec<f32>) {
    let tier = Arc::new(
        LocalTier::new(dir)
            .expect("tier")
            .with_direct_writes(direct),
    );
    let ckpt = Checkpointer::builder("dw")
        .tier(tier.clone(), TierPolicy::keep_last(2))
        .build()
        .expect("checkpointer");
    let w: Vec<f32> = (0..N).map(|i| (i as f32) * 0.5 - 7.0).collect();
    let t = TensorRef::from_slice("w", &[N as u64], &w);
    let s = TrainingState::builder(1)
        .model([&t])
        .without_optimizer()
        .without_loop_state()
        .build()
        .expect("state");
    ckpt.save(&s).expect("save").wait().expect("durable");
    let mut back = vec![0f32; N];
    let ckpt = Checkpointer::builder("dw")
        .tier(tier, TierPolicy::keep_last(2))
        .build()
        .expect("checkpointer");
    ckpt.restore(&mut [&mut TensorMut::from_slice("w", &[N as u64], &mut back)])
        .expect("restore")
        .expect("a checkpoint");
    assert!(back == w, "restored bytes differ (direct: {direct})");
    let shard = walk(dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a shard file");
    (shard, w)
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn direct_writes_keep_checkpoints_out_of_the_page_cache() {
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    if !ckpt_io::supports_direct_writes(base.path()) {
        eprintln!(
            "SKIPPED: {} does not take O_DIRECT writes (the writer falls back to buffered; the round trip is checked by every other local test)",
            base.path().display()
        );
        return;
    }
    let (d, b) = (base.path().join("direct"), base.path().join("buffered"));
    let (direct_file, _) = save(&d, true);
    let (buffered_file, _) = save(&b, false);
    let (in_cache, pages) = resident(&direct_file);
    let (buffered_in_cache, buffered_pages) = resident(&buffered_file);
    eprintln!(
        "page cache after a save: O_DIRECT {in_cache} of {pages} pages, buffered {buffered_in_cache} of {buffered_pages}"
    );
    // The header and the partial last page went through the cache (and the
    // restore read it with O_DIRECT, which caches nothing).
    assert!(
        in_cache <= 8,
        "{in_cache} of {pages} pages of an O_DIRECT checkpoint are cached"
    );
    assert!(
        buffered_in_cache * 2 > buffered_pages,
        "the buffered writer's file should be mostly cached: {buffered_in_cache} of {buffered_pages}"
    );
}
