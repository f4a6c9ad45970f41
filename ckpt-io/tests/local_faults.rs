//! Faults under real conditions on a `LocalTier`: corrupted, truncated and
//! missing shards, missing and garbage manifests, manifests pointing past
//! their file, directories without permission, an immutable directory, and
//! a full disk (a small tmpfs). Each test asserts the typed error, naming
//! the path, tensor or step, and that every checkpoint committed before the
//! fault stays loadable through a `Checkpointer`.
//!
//! Tests that need privileges or tools (tmpfs, chattr, dropping root for
//! permission checks) print why on stderr when they cannot run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ckpt_core::{
    Checkpointer, Error, Manifest, RestoreOptions, Restored, SaveReport, TensorMut, TensorRef,
    Tier, TierPolicy, TrainingState, format::layout, store,
};
use ckpt_io::LocalTier;

const RUN: &str = "r";
/// Elements of tensor `w` (f32): 20 000 bytes, five 4 KiB chunks.
const W: usize = 5000;
const CHUNK: u64 = 4096;

fn w_data(step: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + step * 97) % 100_003) as f32 * 0.125)
        .collect()
}

fn b_data(step: u64) -> Vec<u8> {
    (0..100u64).map(|i| (i * 7 + step) as u8).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

struct Store {
    root: PathBuf,
    tier: Arc<LocalTier>,
    ckpt: Checkpointer,
    /// Elements of `w` saved at each step.
    sizes: std::collections::BTreeMap<u64, usize>,
}

impl Store {
    fn open(root: &Path) -> Self {
        Self::open_with(root, 1)
    }

    /// A store whose tier writes `in_flight` blocks of a shard at once.
    fn open_with(root: &Path, in_flight: usize) -> Self {
        let tier = Arc::new(
            LocalTier::new(root)
                .expect("local tier")
                .with_writes_in_flight(in_flight),
        );
        let ckpt = Checkpointer::builder(RUN)
            .tier(tier.clone(), TierPolicy::keep_last(10))
            .chunk_size(CHUNK)
            .block_size(8192)
            .build()
            .expect("checkpointer");
        Self {
            root: root.to_path_buf(),
            tier,
            ckpt,
            sizes: Default::default(),
        }
    }

    fn save_n(&mut self, step: u64, n: usize) -> ckpt_core::Result<SaveReport> {
        let (w, b) = (w_data(step, n), b_data(step));
        let tw = TensorRef::from_slice("w", &[n as u64], &w);
        let tb = TensorRef::from_slice("b", &[100], &b);
        let state = TrainingState::builder(step)
            .model([&tw, &tb])
            .without_optimizer()
            .rng(&[step])
            .data_loader(&(step * 3))
            .without_lr_schedule()
            .build()?;
        let r = self.ckpt.save(&state)?.wait();
        if r.is_ok() {
            self.sizes.insert(step, n);
        }
        r
    }

    fn save(&mut self, step: u64) -> SaveReport {
        self.save_n(step, W)
            .unwrap_or_else(|e| panic!("save of step {step}: {e}"))
    }

    /// Restores (newest, or `opts.step`) and checks the data is exactly
    /// what was saved at the restored step.
    fn restore(&self, opts: &RestoreOptions) -> ckpt_core::Result<Restored> {
        let n = match opts.step {
            Some(s) => self.sizes.get(&s).copied().unwrap_or(W),
            None => self.sizes.values().last().copied().unwrap_or(W),
        };
        let mut w = vec![0f32; n];
        let mut b = vec![0u8; 100];
        let r = self
            .ckpt
            .restore_with(
                &mut [
                    &mut TensorMut::from_slice("w", &[n as u64], &mut w),
                    &mut TensorMut::from_slice("b", &[100], &mut b),
                ],
                opts,
            )?
            .ok_or_else(|| Error::NotFound {
                path: "no checkpoint at all".into(),
            })?;
        assert_eq!(w, w_data(r.step, n), "tensor w of step {}", r.step);
        assert_eq!(b, b_data(r.step), "tensor b of step {}", r.step);
        assert_eq!(r.loop_state.data_loader::<u64>().ok(), Some(r.step * 3));
        Ok(r)
    }

    fn newest(&self) -> Restored {
        self.restore(&RestoreOptions::default())
            .expect("restore of the newest loadable checkpoint")
    }

    /// Every step in `steps` restores exactly, without falling back.
    fn assert_loadable(&self, steps: &[u64]) {
        for &s in steps {
            let r = self
                .restore(&RestoreOptions::default().step(s))
                .unwrap_or_else(|e| panic!("committed step {s} must stay loadable: {e}"));
            assert_eq!((r.step, r.fell_back()), (s, false), "{:?}", r.skipped);
        }
    }

    fn step_dir(&self, step: u64) -> PathBuf {
        self.root.join(layout::step_dir(RUN, step))
    }

    fn shard(&self, step: u64) -> PathBuf {
        let path = rt()
            .block_on(ckpt_core::store::shard_file(
                self.tier.as_ref(),
                RUN,
                step,
                0,
            ))
            .expect("shard file");
        self.root.join(path)
    }

    fn manifest_file(&self, step: u64) -> PathBuf {
        self.root.join(layout::manifest_path(RUN, step))
    }

    fn manifest(&self, step: u64) -> ckpt_core::Result<Manifest> {
        rt().block_on(store::load_manifest(self.tier.as_ref(), RUN, step))
    }

    fn committed(&self) -> Vec<u64> {
        rt().block_on(store::committed_steps(self.tier.as_ref(), RUN))
            .expect("list committed steps")
    }

    /// Reads step `step` the way restore does, returning its typed error.
    fn read_step(&self, step: u64) -> ckpt_core::Result<u64> {
        let m = self.manifest(step)?;
        let n = self.sizes[&step];
        let mut w = vec![0f32; n];
        ckpt_core::CheckpointStore::new(self.tier.clone())?.read(
            &m,
            &mut [&mut TensorMut::from_slice("w", &[n as u64], &mut w)],
        )
    }
}

fn three_steps() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Store::open(dir.path());
    for step in 1..=3 {
        s.save(step);
    }
    assert_eq!(s.committed(), [1, 2, 3]);
    (dir, s)
}

/// Asserts restore skipped step 3 for an error `why` accepts, and loaded
/// step 2.
fn assert_fell_back_from_3(s: &Store, why: impl Fn(&Error) -> bool) {
    let r = s.newest();
    assert_eq!(r.step, 2, "restore must fall back to step 2");
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    assert_eq!(r.skipped[0].step, Some(3));
    assert!(
        why(&r.skipped[0].error),
        "skipped for {:?}",
        r.skipped[0].error
    );
    s.assert_loadable(&[1, 2]);
}

/// Whether `path` is step 3's shard file.
fn is_shard_3(path: &str) -> bool {
    path.rsplit_once('/').is_some_and(|(dir, name)| {
        dir.ends_with("step-00000000000000000003") && layout::is_rank_data_file(name, 0)
    })
}

/// Whether `path` (a file or a tier path) is a shard file of rank 0.
fn is_shard(path: impl AsRef<std::path::Path>) -> bool {
    path.as_ref()
        .file_name()
        .is_some_and(|n| layout::is_rank_data_file(&n.to_string_lossy(), 0))
}

#[test]
fn corrupted_byte_in_a_shard_is_located_and_restore_falls_back() {
    let (_dir, s) = three_steps();
    let m = s.manifest(3).expect("manifest");
    let w = &m.tensors["w"].pieces[0];
    let mut bytes = fs::read(s.shard(3)).expect("read shard");
    bytes[(w.offset + 2 * CHUNK + 5) as usize] ^= 0x01;
    fs::write(s.shard(3), &bytes).expect("write shard");

    match s.read_step(3) {
        Err(Error::Corrupt { path, chunk, .. }) => {
            assert!(is_shard_3(&path), "{path}");
            assert_eq!(chunk, 2);
        }
        other => panic!("expected Corrupt in chunk 2, got {other:?}"),
    }
    assert_fell_back_from_3(
        &s,
        |e| matches!(e, Error::Corrupt { path, chunk: 2, .. } if is_shard_3(path)),
    );
}

/// Restore reads a local shard through aligned buffers of its own and
/// copies out while verifying; the bytes past the last aligned offset are
/// read straight into the caller's buffer. A flip in either part, and in
/// the first and last byte, is caught and named.
#[test]
fn corrupted_bytes_anywhere_in_a_tensor_are_caught() {
    let (_dir, s) = three_steps();
    let m = s.manifest(3).expect("manifest");
    let w = m.tensors["w"].pieces[0].clone();
    let clean = fs::read(s.shard(3)).expect("read shard");
    let last = w.length - 1;
    for at in [0, CHUNK - 1, 3 * CHUNK + 17, last - 100, last] {
        let mut bytes = clean.clone();
        bytes[(w.offset + at) as usize] ^= 0x40;
        fs::write(s.shard(3), &bytes).expect("write shard");
        match s.read_step(3) {
            Err(Error::Corrupt { path, chunk, .. }) => {
                assert!(is_shard_3(&path), "{path}");
                assert_eq!(chunk as u64, at / CHUNK, "byte {at}");
            }
            other => panic!("byte {at} of w flipped: expected Corrupt, got {other:?}"),
        }
    }
    fs::write(s.shard(3), &clean).expect("write shard");
    assert_eq!(s.read_step(3).expect("clean again"), w.length);
}

#[test]
fn truncated_shard_is_incomplete_and_restore_falls_back() {
    let (_dir, s) = three_steps();
    let len = fs::metadata(s.shard(3)).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(s.shard(3))
        .and_then(|f| f.set_len(len - 100))
        .expect("truncate");
    match s.read_step(3) {
        Err(Error::Incomplete { path, reason }) => {
            assert!(is_shard_3(&path), "{path}");
            assert!(reason.contains(&format!("{}", len - 100)), "{reason}");
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
    assert_fell_back_from_3(
        &s,
        |e| matches!(e, Error::Incomplete { path, .. } if is_shard_3(path)),
    );
}

#[test]
fn missing_shard_is_not_found_and_restore_falls_back() {
    let (_dir, s) = three_steps();
    fs::remove_file(s.shard(3)).expect("remove shard");
    match s.read_step(3) {
        Err(Error::NotFound { path }) => {
            assert!(is_shard_3(&path), "{path}")
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_fell_back_from_3(
        &s,
        |e| matches!(e, Error::NotFound { path } if is_shard_3(path)),
    );
}

#[test]
fn missing_manifest_means_the_step_is_not_committed() {
    let (_dir, s) = three_steps();
    fs::remove_file(s.manifest_file(3)).expect("remove manifest");
    assert_eq!(s.committed(), [1, 2]);
    match s.manifest(3) {
        Err(Error::NotFound { path }) => assert_eq!(path, layout::manifest_path(RUN, 3)),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let r = s.newest();
    assert_eq!(
        (r.step, r.fell_back()),
        (2, false),
        "an uncommitted step is not even a candidate"
    );
    s.assert_loadable(&[1, 2]);
    match s.restore(&RestoreOptions::default().step(3)) {
        Err(Error::NotFound { path }) => assert!(path.contains("MANIFEST.json"), "{path}"),
        other => panic!("restoring an uncommitted step: expected NotFound, got {other:?}"),
    }
}

#[test]
fn garbage_manifests_are_invalid_and_restore_falls_back() {
    let (_dir, s) = three_steps();
    let good = fs::read(s.manifest_file(3)).expect("read manifest");
    let other_step = fs::read(s.manifest_file(2)).expect("read manifest");
    let cases: [(&str, Vec<u8>); 4] = [
        ("not json", b"{ this is not json".to_vec()),
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("another step's", other_step),
    ];
    for (what, bytes) in cases {
        fs::write(s.manifest_file(3), &bytes).expect("write manifest");
        match s.manifest(3) {
            Err(Error::InvalidManifest { path, .. }) => {
                assert_eq!(path, layout::manifest_path(RUN, 3), "{what}")
            }
            other => panic!("{what} manifest: expected InvalidManifest, got {other:?}"),
        }
        assert_eq!(s.committed(), [1, 2, 3], "listing does not parse manifests");
        assert_fell_back_from_3(
            &s,
            |e| matches!(e, Error::InvalidManifest { path, .. } if path.ends_with("MANIFEST.json")),
        );
    }
}

/// Rewrites a manifest the way a buggy or malicious writer would: the
/// content changed and the self-checksum recomputed, so the change reaches
/// the manifest's validation.
fn edit_manifest(s: &Store, step: u64, f: impl FnOnce(&mut serde_json::Value)) {
    let path = s.manifest_file(step);
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read manifest")).expect("parse manifest");
    if let Some(o) = v.as_object_mut() {
        o.remove(ckpt_core::format::manifest::SEAL_KEY);
    }
    f(&mut v);
    let json = serde_json::to_vec_pretty(&v).expect("json");
    fs::write(&path, ckpt_core::format::manifest::seal(&json)).expect("write manifest");
}

/// The one tier error of a save that committed nowhere.
fn only_failure(err: &Error, step: u64) -> &Error {
    match err {
        Error::NotCommitted { step: s, failures } if *s == step && failures.len() == 1 => {
            &failures[0].error
        }
        other => panic!("want NotCommitted for step {step} on one tier, got {other:?}"),
    }
}

#[test]
fn manifest_with_a_piece_past_the_file_falls_back() {
    let (_dir, s) = three_steps();
    let file_len = fs::metadata(s.shard(3)).expect("stat").len();
    // The piece lies past the recorded file length: rejected when parsed.
    edit_manifest(&s, 3, |v| {
        v["tensors"]["w"]["pieces"][0]["offset"] = (file_len + 8).into();
    });
    match s.manifest(3) {
        Err(Error::InvalidManifest { path, reason }) => {
            assert_eq!(path, layout::manifest_path(RUN, 3));
            assert!(
                reason.contains("tensor `w`") && reason.contains("past the end"),
                "{reason}"
            );
        }
        other => panic!("expected InvalidManifest, got {other:?}"),
    }
    assert_fell_back_from_3(
        &s,
        |e| matches!(e, Error::InvalidManifest { reason, .. } if reason.contains("tensor `w`")),
    );

    // Self-consistent lie: the file length grows with the offset, so the
    // manifest parses; the real file is shorter and restore notices.
    edit_manifest(&s, 3, |v| {
        v["ranks"][0]["file_len"] = (file_len + 8 + 20_000).into();
    });
    s.manifest(3).expect("a consistent manifest parses");
    match s.read_step(3) {
        Err(Error::Incomplete { path, reason }) => {
            assert!(is_shard(&path), "{path}");
            assert!(reason.contains(&file_len.to_string()), "{reason}");
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
    assert_fell_back_from_3(
        &s,
        |e| matches!(e, Error::Incomplete { path, .. } if is_shard_3(path)),
    );
}

// ----------------------------------------------------------- permissions

const CHILD_DIR: &str = "CKPT_LOCAL_FAULTS_CHILD_DIR";
const CHILD_STARTED: &str = "ckpt-child-started uid=";
const CHILD_OK: &str = "ckpt-child-ok";

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions, touches no memory of ours and
    // cannot fail.
    unsafe { libc::geteuid() }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Restores a mode on drop, so a failed assertion never leaves a directory
/// that the temp-dir cleanup cannot remove.
struct ModeGuard(PathBuf, u32);

impl Drop for ModeGuard {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(self.1));
    }
}

fn is_permission_denied(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
}

/// Creating step `step`'s shard fails with a typed PermissionDenied naming
/// the step directory.
fn assert_create_denied(s: &Store, step: u64) {
    let path = format!(
        "{}/{}",
        layout::step_dir(RUN, step),
        layout::rank_data_file(0, "a1b2c3d4e5f6")
    );
    match rt().block_on(s.tier.create(&path)) {
        Err(Error::Io { path: p, source })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            assert!(p.ends_with(layout::step_dir(RUN, step)), "{}", p.display());
        }
        Err(e) => panic!("create of {path}: expected PermissionDenied, got {e}"),
        Ok(_) => panic!("create of {path} must fail"),
    }
}

/// The permission scenario, run by a user the permission bits apply to.
fn permission_scenario(base: &Path) {
    let root = base.join("store");
    let mut s = Store::open(&root);
    for step in 1..=3 {
        s.save(step);
    }

    // A step directory nobody may read or enter.
    {
        let _guard = ModeGuard(s.step_dir(3), 0o755);
        chmod(&s.step_dir(3), 0o000);
        let rt = rt();
        let manifest = layout::manifest_path(RUN, 3);
        match rt.block_on(s.tier.get(&manifest)) {
            Err(e @ Error::Io { .. }) if is_permission_denied(&e) => {
                assert!(e.to_string().contains(&manifest), "{e}")
            }
            other => panic!("get of {manifest}: expected PermissionDenied, got {other:?}"),
        }
        match rt.block_on(s.tier.list(&format!("{}/", layout::step_dir(RUN, 3)))) {
            Err(e @ Error::Io { .. }) if is_permission_denied(&e) => {
                assert!(e.to_string().contains("step-00000000000000000003"), "{e}")
            }
            other => panic!("list of an unreadable step: expected PermissionDenied, got {other:?}"),
        }
        let r = s.newest();
        assert_eq!(r.step, 2, "an unreadable step must not hide the older ones");
        s.assert_loadable(&[1, 2]);
    }
    s.assert_loadable(&[1, 2, 3]);

    // A run directory that cannot be written: the save fails naming the
    // path, committed checkpoints stay loadable, the next save works.
    {
        let _guard = ModeGuard(root.join(RUN), 0o755);
        chmod(&root.join(RUN), 0o555);
        let err = s
            .save_n(4, W)
            .expect_err("saving into a read-only directory");
        match only_failure(&err, 4) {
            e @ Error::Io { path, .. } => {
                assert!(is_permission_denied(e), "{e}");
                assert!(path.ends_with("step-00000000000000000004"), "{e}");
            }
            other => panic!("want a PermissionDenied Io error, got {other:?}"),
        }
        assert_create_denied(&s, 4);
        assert_eq!(s.newest().step, 3);
        s.assert_loadable(&[1, 2, 3]);
    }
    s.save(5);
    assert_eq!(s.newest().step, 5);

    // A root directory without any permission.
    {
        let _guard = ModeGuard(root.clone(), 0o755);
        chmod(&root, 0o000);
        match LocalTier::new(&root) {
            Err(e) => assert!(
                is_permission_denied(&e) && e.to_string().contains(&root.display().to_string()),
                "{e}"
            ),
            Ok(_) => panic!("a tier on a root without permissions must not open"),
        }
        let err = s
            .restore(&RestoreOptions::default())
            .expect_err("nothing can be read under an unreadable root");
        assert!(
            err.to_string().contains(&root.display().to_string()),
            "the error names the tier: {err}"
        );
    }
    s.assert_loadable(&[1, 2, 3, 5]);
}

/// Runs the current test again in a child process as `nobody`, with
/// `CHILD_DIR` set. Returns `Err(reason)` when no way to drop privileges
/// works; panics if the child ran and failed.
fn run_unprivileged(test: &str, dir: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("no test executable path: {e}"))?;
    std::os::unix::fs::chown(dir, Some(65534), Some(65534))
        .map_err(|e| format!("cannot chown {} to nobody: {e}", dir.display()))?;
    let args = format!("--exact {test} --nocapture --test-threads=1");
    let launchers: [(&str, Command); 2] = [
        ("setpriv", {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&exe)
                .args(args.split(' '))
                .env(CHILD_DIR, dir);
            c
        }),
        ("su nobody", {
            let mut c = Command::new("su");
            c.args(["-s", "/bin/sh", "-c"])
                .arg(format!(
                    "{CHILD_DIR}='{}' '{}' {args}",
                    dir.display(),
                    exe.display()
                ))
                .arg("nobody");
            c
        }),
    ];
    let mut why = Vec::new();
    for (name, mut cmd) in launchers {
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                why.push(format!("{name}: {e}"));
                continue;
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The harness prints `test NAME ... ` before the child's own lines.
        let started = stdout
            .lines()
            .find_map(|l| l.split_once(CHILD_STARTED))
            .map(|(_, uid)| uid.trim());
        match started {
            Some("0") | None => {
                why.push(format!(
                    "{name} did not start the test as an unprivileged user ({}): {}",
                    out.status,
                    stderr.lines().last().unwrap_or("")
                ));
            }
            Some(_) => {
                assert!(
                    out.status.success() && stdout.contains(CHILD_OK),
                    "the unprivileged run ({name}) failed:\n{stdout}\n{stderr}"
                );
                return Ok(());
            }
        }
    }
    Err(why.join("; "))
}

#[test]
fn directories_without_permission_fail_typed_and_keep_older_checkpoints() {
    const TEST: &str = "directories_without_permission_fail_typed_and_keep_older_checkpoints";
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        println!("{CHILD_STARTED}{}", euid());
        if euid() == 0 {
            return; // the launcher did not drop privileges; the parent reports it
        }
        permission_scenario(Path::new(&dir));
        println!("{CHILD_OK}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    if euid() != 0 {
        permission_scenario(dir.path());
        return;
    }
    // Root bypasses permission bits: run the scenario as `nobody`.
    if let Err(why) = run_unprivileged(TEST, dir.path()) {
        eprintln!(
            "SKIPPED {TEST}: running as root, which ignores permission bits, and no way to \
             drop privileges worked: {why}"
        );
    }
}

// ------------------------------------------------------ immutable (root)

/// `chattr +i` on the run directory: even root cannot create a step in it.
#[test]
fn immutable_run_directory_fails_the_save_and_keeps_checkpoints() {
    const TEST: &str = "immutable_run_directory_fails_the_save_and_keeps_checkpoints";
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Store::open(dir.path());
    s.save(1);
    s.save(2);
    let run_dir = dir.path().join(RUN);
    let set = Command::new("chattr").arg("+i").arg(&run_dir).output();
    match set {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED {TEST}: chattr +i failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED {TEST}: chattr is not available: {e}");
            return;
        }
    }
    struct Unfreeze(PathBuf);
    impl Drop for Unfreeze {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let guard = Unfreeze(run_dir);
    let err = s
        .save_n(3, W)
        .expect_err("no step directory can be created");
    let msg = err.to_string();
    assert!(
        matches!(only_failure(&err, 3), Error::Io { path, source }
            if path.ends_with("step-00000000000000000003")
                && source.kind() == std::io::ErrorKind::PermissionDenied),
        "{msg}"
    );
    assert_create_denied(&s, 3);
    assert_eq!(s.newest().step, 2);
    s.assert_loadable(&[1, 2]);
    drop(guard);
    s.save(4);
    assert_eq!(s.newest().step, 4);
    s.assert_loadable(&[1, 2]);
}

// ------------------------------------------------------------- disk full

#[path = "../../tests/common/tmpfs.rs"]
mod tmpfs;
use tmpfs::Tmpfs;

/// With one write in flight and with several (the disk fills in a
/// helper's write).
#[test]
fn full_disk_during_flush_fails_the_save_and_keeps_checkpoints() {
    for in_flight in [1, 4] {
        full_disk(in_flight);
    }
}

fn full_disk(in_flight: usize) {
    const TEST: &str = "full_disk_during_flush_fails_the_save_and_keeps_checkpoints";
    let disk = match Tmpfs::mount(4) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED {TEST}: needs a 4 MiB tmpfs: {why}");
            return;
        }
    };
    let root = disk.path().join("store");
    {
        let mut s = Store::open_with(&root, in_flight);
        // Two small checkpoints (~24 KiB each) first.
        s.save(1);
        s.save(2);
        // 6 MiB does not fit in 4 MiB.
        let err = s
            .save_n(3, 6 << 18)
            .expect_err("a save larger than the disk must fail");
        let failure = only_failure(&err, 3);
        assert!(failure.is_storage_full(), "{failure:?}");
        assert!(
            matches!(failure, Error::Io { path, .. } if is_shard(path)),
            "{failure:?}"
        );
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(s.committed(), [1, 2]);
        assert_eq!(s.newest().step, 2);
        s.assert_loadable(&[1, 2]);
        // The torn shard was removed: no hidden temporaries hold the space.
        let left: Vec<_> = fs::read_dir(s.step_dir(3))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "the failed save left {left:?}");

        // Typed: a put that does not fit is an Io error of kind StorageFull
        // naming the file.
        let big = bytes::Bytes::from(vec![7u8; 5 << 20]);
        match rt().block_on(s.tier.put("r/big.bin", big, ckpt_core::PutMode::Create)) {
            Err(Error::Io { path, source }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
                assert!(
                    path.to_string_lossy().contains("big.bin"),
                    "{}",
                    path.display()
                );
            }
            other => panic!("expected StorageFull, got {other:?}"),
        }

        // With the space given back, a save that needs most of the disk
        // succeeds.
        rt().block_on(store::delete_step(s.tier.as_ref(), RUN, 1))
            .expect("delete step 1");
        let report = s
            .save_n(4, 1 << 19)
            .expect("2 MiB fit once the failed save is gone");
        assert!(report.is_durable());
        assert_eq!(s.committed(), [2, 4]);
        s.assert_loadable(&[2, 4]);
    }
    // Make sure the mount is still there to unmount (the guard reports).
    let mut f = fs::File::create(disk.path().join("probe")).expect("tmpfs still mounted");
    f.write_all(b"ok").expect("write");
}
