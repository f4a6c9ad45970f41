//! The local tier's `O_DIRECT` writer on a real file system: a checkpoint
//! saved through a `Checkpointer` reads back bit-exact, and its files do not
//! land in the page cache (so a save does not evict the training job's own
//! cached files), against the buffered writer that leaves them there; with
//! one write in flight and with several.

use std::path::Path;
use std::sync::Arc;

use ckpt_core::{Checkpointer, TensorMut, TensorRef, TierPolicy, TrainingState};
use ckpt_io::LocalTier;

/// 24 MiB and 1000 bytes more (f32): the last page is partial, and the
/// file is several staging blocks.
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

/// Saves one step of `N` f32 through a tier on `dir` with `in_flight`
/// writes at once; returns the shard file and the data.
fn save(dir: &Path, direct: bool, in_flight: usize) -> (std::path::PathBuf, Vec<f32>) {
    let tier = Arc::new(
        LocalTier::new(dir)
            .expect("tier")
            .with_direct_writes(direct)
            .with_writes_in_flight(in_flight),
    );
    // Blocks of 1 MiB: the file is 24 of them, so several are in flight.
    let ckpt = Checkpointer::builder("dw")
        .tier(tier.clone(), TierPolicy::keep_last(2))
        .block_size(1 << 20)
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
    assert!(
        back == w,
        "restored bytes differ (direct: {direct}, {in_flight} in flight)"
    );
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
    for in_flight in [1, 4] {
        let d = base.path().join(format!("direct-{in_flight}"));
        let b = base.path().join(format!("buffered-{in_flight}"));
        let (direct_file, _) = save(&d, true, in_flight);
        let (buffered_file, _) = save(&b, false, in_flight);
        let (in_cache, pages) = resident(&direct_file);
        let (buffered_in_cache, buffered_pages) = resident(&buffered_file);
        eprintln!(
            "page cache after a save, {in_flight} in flight: O_DIRECT {in_cache} of {pages} pages, buffered {buffered_in_cache} of {buffered_pages}"
        );
        // The header and the partial last page went through the cache (and
        // the restore read it with O_DIRECT, which caches nothing).
        assert!(
            in_cache <= 8,
            "{in_flight} in flight: {in_cache} of {pages} pages of an O_DIRECT checkpoint are cached"
        );
        assert!(
            buffered_in_cache * 2 > buffered_pages,
            "the buffered writer's file should be mostly cached: {buffered_in_cache} of {buffered_pages}"
        );
    }
}

/// On tmpfs, with one write in flight and with several: the same bytes
/// back. Kernels before 6.6 refuse `O_DIRECT` there, and the writer falls
/// back to buffered writes (the fallback with writes in flight is also
/// unit-tested in `direct_write.rs` with a device that refuses).
#[test]
fn writes_in_flight_on_tmpfs_round_trip() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm on this host");
        return;
    }
    let base = tempfile::tempdir_in(shm).expect("tempdir");
    eprintln!(
        "/dev/shm takes O_DIRECT writes: {}",
        ckpt_io::supports_direct_writes(base.path())
    );
    for in_flight in [1, 4] {
        let (file, w) = save(&base.path().join(in_flight.to_string()), true, in_flight);
        let bytes = std::fs::read(&file).expect("read shard");
        assert!(bytes.len() > w.len() * 4, "{} bytes", bytes.len());
    }
}

/// Counts the blocks still alive: each `Bytes` below owns one (page-aligned,
/// as staging blocks are, so they go out with `O_DIRECT` from their own
/// memory).
struct Block(Arc<std::sync::atomic::AtomicUsize>, memmap2::MmapMut);

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        &self.1
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An aborted or dropped shard file gives back every block queued for its
/// writer thread (a cancelled save's pool must get them back) without
/// writing the queue out first, and an aborted one leaves no file at all.
#[test]
fn an_aborted_or_dropped_shard_file_releases_its_queued_blocks() {
    use ckpt_core::Tier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (abort, in_flight) in [(true, 1), (false, 1), (true, 4), (false, 4)] {
        let tier = LocalTier::new(dir.path())
            .expect("tier")
            .with_writes_in_flight(in_flight);
        let alive = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let mut w = tier.create("run/big.bin").await.expect("create");
            // 256 MiB, made first and then queued at once: far more than
            // the thread writes before it is told to stop.
            let blocks: Vec<bytes::Bytes> = (0..64)
                .map(|_| {
                    alive.fetch_add(1, Ordering::SeqCst);
                    let mut map = memmap2::MmapMut::map_anon(4 << 20).expect("block");
                    map.fill(7);
                    bytes::Bytes::from_owner(Block(alive.clone(), map))
                })
                .collect();
            for b in blocks {
                w.write(b).await.expect("write");
            }
            if abort {
                w.abort().await.expect("abort");
            } else {
                drop(w);
            }
        });
        // A dropped writer's thread stops on its own: wait for it, bounded.
        let start = std::time::Instant::now();
        while alive.load(Ordering::SeqCst) > 0 && start.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            alive.load(Ordering::SeqCst),
            0,
            "abort {abort}, {in_flight} in flight: blocks held"
        );
        assert!(
            !dir.path().join("run/big.bin").exists(),
            "abort {abort}, {in_flight} in flight: the file appeared under its final name"
        );
        let left: Vec<(std::ffi::OsString, u64)> = std::fs::read_dir(dir.path().join("run"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| (e.file_name(), e.metadata().map_or(0, |m| m.len())))
                    .collect()
            })
            .unwrap_or_default();
        if abort {
            assert!(left.is_empty(), "an aborted file left {left:?}");
        } else {
            // The crash-like leftover, for retention: it holds what was
            // written before the drop, not the whole queue.
            let written: u64 = left.iter().map(|(_, n)| n).sum();
            assert!(
                written < 128 << 20,
                "the dropped writer wrote its queue out: {left:?}"
            );
            for (name, _) in &left {
                std::fs::remove_file(dir.path().join("run").join(name)).expect("clean up");
            }
        }
    }
}
