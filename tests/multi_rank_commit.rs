//! The multi-rank example as a job: 4 rank processes commit through one
//! shared directory. A rank killed mid-run makes the launcher restart all
//! ranks, which resume from the newest committed step and end bit-exact
//! with an uninterrupted run; a rank that dies in the middle of a commit
//! leaves that step uncommitted and the previous one intact. With peer
//! memory, a killed rank restarts alone, restores its shard from its
//! buddy's server while the others roll back in-process, and the job ends
//! bit-exact as well.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ckpt::{Error, LocalTier, Tier, format::layout, store};
use common::{digest, example};

const RUN: &str = "multi_rank";
/// Arguments every run of this file shares.
const JOB: [&str; 10] = [
    "--ranks",
    "4",
    "--steps",
    "40",
    "--every",
    "5",
    "--state-mb",
    "2",
    "--timeout-s",
    "20",
];

/// Runs the launcher without peer memory (the shared directory only, a
/// lost rank restarts the whole job) to completion, killing it (and,
/// through its pipes, its ranks) if it takes longer than `limit`.
fn launch(dir: &Path, extra: &[&str], limit: Duration) -> Output {
    launch_mode(dir, "--no-peer", extra, limit)
}

/// As [`launch`], with every rank's shard replicated in the next rank's
/// peer server; a killed rank restarts alone.
fn launch_peer(dir: &Path, extra: &[&str], limit: Duration) -> Output {
    launch_mode(dir, "--peer", extra, limit)
}

fn launch_mode(dir: &Path, mode: &str, extra: &[&str], limit: Duration) -> Output {
    launch_env(dir, mode, extra, limit, &[])
}

fn launch_env(
    dir: &Path,
    mode: &str,
    extra: &[&str],
    limit: Duration,
    env: &[(&str, &str)],
) -> Output {
    launch_at(dir.as_os_str(), mode, extra, limit, env)
}

/// As [`launch_env`], on any location (a directory or `s3://...`).
fn launch_at(
    location: &std::ffi::OsStr,
    mode: &str,
    extra: &[&str],
    limit: Duration,
    env: &[(&str, &str)],
) -> Output {
    // `limit` is a hang guard, not a figure: what a job takes on an idle
    // machine, given three times over for a loaded one.
    let limit = limit * 3;
    let mut child = Command::new(example("multi_rank"))
        .envs(env.iter().copied())
        .arg("--dir")
        .arg(location)
        .args(JOB)
        .arg(mode)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start multi_rank");
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("stdout")));
    let err = pipe(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "multi_rank {extra:?} ran longer than {limit:?}:\n{}",
                String::from_utf8_lossy(&out.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The digest of an uninterrupted run, computed once for the whole file.
fn reference() -> &'static str {
    static REFERENCE: OnceLock<String> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = launch(dir.path(), &[], Duration::from_secs(60));
        assert!(
            out.status.success(),
            "uninterrupted run failed\n{}",
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        for r in 0..4 {
            assert!(
                stdout.contains(&format!("rank {r}: fresh start")),
                "rank {r} should start fresh\n{stdout}"
            );
        }
        assert!(stdout.contains("restarts: 0"), "{stdout}");
        digest(&out)
    })
}

/// The step every rank restored from in the last incarnation, checking
/// that all four name the same step and the shared directory.
fn restored_step(stdout: &str, dir: &Path, after: &str) -> u64 {
    let dir = dir.canonicalize().expect("canonical dir");
    restored_step_at(stdout, &dir.display().to_string(), after)
}

/// As [`restored_step`], for any shared location.
fn restored_step_at(stdout: &str, location: &str, after: &str) -> u64 {
    let tail = stdout
        .rsplit_once(after)
        .unwrap_or_else(|| panic!("no {after:?} in output:\n{stdout}"))
        .1;
    let steps: Vec<u64> = (0..4)
        .map(|r| {
            let prefix = format!("rank {r}: restored step ");
            let line = tail
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("rank {r} did not restore:\n{stdout}"));
            let rest = &line[prefix.len()..];
            let (step, from) = rest.split_once(" from ").expect("`from` in restore line");
            assert!(
                from.starts_with(location),
                "rank {r} restored from {from}, expected the shared location {location}"
            );
            step.parse().expect("restored step")
        })
        .collect();
    assert!(
        steps.iter().all(|s| *s == steps[0]),
        "ranks restored different steps: {steps:?}\n{stdout}"
    );
    steps[0]
}

/// The `committed steps: [..]` line the launcher prints after losing a rank.
fn committed_at_failure(stdout: &str) -> Vec<u64> {
    let list = stdout
        .lines()
        .find_map(|l| l.strip_prefix("committed steps: "))
        .unwrap_or_else(|| panic!("no committed-steps line:\n{stdout}"));
    list.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("step"))
        .collect()
}

#[test]
fn killed_rank_restarts_the_job_and_it_ends_bit_exact() {
    let want = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = launch(
        dir.path(),
        &["--kill-rank", "2", "--kill-at-step", "23"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "killed run failed\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("killed rank 2 (SIGKILL) at step 23"),
        "{stdout}"
    );
    assert!(stdout.contains("restarts: 1"), "{stdout}");

    // The newest step committed before the kill: 20, or 15 if the save of
    // step 20 was still in flight when rank 2 died.
    let committed = committed_at_failure(&stdout);
    let newest = committed
        .iter()
        .copied()
        .filter(|s| *s < 23)
        .max()
        .unwrap_or_else(|| panic!("nothing committed before the kill:\n{stdout}"));
    assert!(
        newest == 20 || newest == 15,
        "newest committed {newest}\n{stdout}"
    );
    assert!(
        committed.iter().all(|s| *s <= 20),
        "a step after the kill was committed: {committed:?}"
    );
    let from = restored_step(&stdout, dir.path(), "restarting all 4 ranks");
    assert_eq!(
        from, newest,
        "all ranks must restore the newest committed step\n{stdout}"
    );
    assert_eq!(
        digest(&out),
        want,
        "the restarted job diverged from the uninterrupted one\n{stdout}"
    );
}

/// The shared location on S3 (the bundled server), as a job on a cluster
/// without a shared file system would run: a killed rank restarts the job,
/// every rank restores the same step from the bucket, bit-exact.
#[test]
fn killed_rank_restarts_the_job_from_s3_and_it_ends_bit_exact() {
    let Some(s3) = common::s3s::Bundled::get("killed_rank_restarts_the_job_from_s3") else {
        return;
    };
    let want = reference();
    let loc = s3.location("multi-rank");
    let out = launch_at(
        loc.as_ref(),
        "--no-peer",
        &["--kill-rank", "1", "--kill-at-step", "23"],
        Duration::from_secs(90),
        &[
            ("AWS_ENDPOINT_URL", &s3.endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", &s3.region()),
        ],
    );
    assert!(out.status.success(), "killed run failed\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("restarts: 1"), "{stdout}");
    restored_step_at(&stdout, &loc, "restarting all 4 ranks");
    assert_eq!(digest(&out), want, "diverged\n{stdout}");
}

#[test]
fn rank_dying_mid_commit_leaves_the_step_uncommitted() {
    let want = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    // Rank 3 dies while committing step 10: its shard file is durable, its
    // rank manifest never written. No restarts: the job stops there.
    let out = launch(
        dir.path(),
        &[
            "--abort-rank",
            "3",
            "--abort-during-save",
            "10",
            "--max-restarts",
            "0",
        ],
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "the job must fail\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("rank 3 died"), "{}", text(&out));
    assert!(!stdout.contains("final-state-blake3"), "{stdout}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tier = LocalTier::new(dir.path()).expect("tier");
    let steps = rt
        .block_on(store::committed_steps(&tier, RUN))
        .expect("list");
    assert_eq!(steps, vec![5], "only step 5 may be committed");
    assert_eq!(committed_at_failure(&stdout), vec![5]);
    match rt.block_on(tier.size(&layout::manifest_path(RUN, 10))) {
        Err(Error::NotFound { .. }) => {}
        other => panic!("step 10 must have no MANIFEST: {other:?}"),
    }
    // Rank 3 died between its shard and its rank manifest.
    let step10 = layout::step_dir(RUN, 10);
    let shard = common::shard_file(&dir.path().join(&step10), 3);
    assert!(
        std::fs::metadata(&shard).expect("rank 3's shard").len() > 0,
        "rank 3's shard of step 10 is durable"
    );
    assert!(matches!(
        rt.block_on(tier.size(&format!("{step10}/{}", layout::rank_manifest_file(3)))),
        Err(Error::NotFound { .. })
    ));
    // The previous step is whole and verifies, byte for byte.
    let m = rt
        .block_on(store::load_manifest(&tier, RUN, 5))
        .expect("manifest of step 5");
    assert_eq!(m.world_size, 4);
    let report = rt.block_on(store::verify_step(&tier, &m));
    assert!(
        report.is_ok(),
        "step 5 does not verify: {:?}",
        report.failures
    );
    assert!(report.bytes > 0);

    // A new launch resumes every rank from step 5, never from step 10, and
    // ends where the uninterrupted run did.
    let out = launch(dir.path(), &[], Duration::from_secs(60));
    assert!(out.status.success(), "resumed run failed\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(restored_step(&stdout, dir.path(), "started 4 ranks"), 5);
    assert_eq!(digest(&out), want, "{stdout}");
    let steps = rt
        .block_on(store::committed_steps(&tier, RUN))
        .expect("list");
    assert_eq!(steps.last(), Some(&40), "{steps:?}");
}

#[test]
fn kills_at_random_steps_resume_from_the_newest_commit() {
    let want = reference();
    let seed = common::seed_from_env("CKPT_MULTI_SEED");
    let mut rng = ckpt::rng::Rng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for round in 0..3 {
        let rank = rng.range(0, 4);
        // Half the kills land right after a save returned, with its flush
        // and commit in flight.
        let step = if rng.next_u64().is_multiple_of(2) {
            5 * rng.range(1, 8)
        } else {
            rng.range(1, 40)
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, s) = (rank.to_string(), step.to_string());
        let out = launch(
            dir.path(),
            &["--kill-rank", &r, "--kill-at-step", &s],
            Duration::from_secs(60),
        );
        let ctx = format!("round {round} (seed {seed}): kill rank {rank} at step {step}");
        assert!(out.status.success(), "{ctx}: failed\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let committed = committed_at_failure(&stdout);
        let after = stdout
            .rsplit_once("restarting all 4 ranks")
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("{ctx}: no restart\n{stdout}"));
        let from = match committed.iter().copied().filter(|c| *c <= step).max() {
            Some(newest) => {
                let from = restored_step(&stdout, dir.path(), "restarting all 4 ranks");
                assert_eq!(from, newest, "{ctx}\n{stdout}");
                Some(from)
            }
            None => {
                for r in 0..4 {
                    assert!(
                        after.contains(&format!("rank {r}: fresh start")),
                        "{ctx}: nothing committed, rank {r} must start fresh\n{stdout}"
                    );
                }
                None
            }
        };
        assert_eq!(digest(&out), want, "{ctx}\n{stdout}");
        // Everything committed in the end verifies.
        let tier = LocalTier::new(dir.path()).expect("tier");
        for s in rt
            .block_on(store::committed_steps(&tier, RUN))
            .expect("list")
        {
            let m = rt
                .block_on(store::load_manifest(&tier, RUN, s))
                .expect("manifest");
            let report = rt.block_on(store::verify_step(&tier, &m));
            assert!(report.is_ok(), "{ctx}: step {s}: {:?}", report.failures);
        }
        eprintln!("{ctx}: committed {committed:?} at the kill, resumed from {from:?}");
    }
}

/// The digest of an uninterrupted run with peer memory.
fn reference_peer() -> &'static str {
    static REFERENCE: OnceLock<String> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = launch_peer(dir.path(), &[], Duration::from_secs(60));
        assert!(
            out.status.success(),
            "uninterrupted peer run failed\n{}",
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("restarts: 0"), "{stdout}");
        digest(&out)
    })
}

#[test]
fn killed_rank_restarts_alone_and_restores_from_its_buddy() {
    let want = reference_peer();
    // Peer memory changes where state is kept, never what it is.
    assert_eq!(want, reference(), "peer and shared-only runs differ");
    let dir = tempfile::tempdir().expect("tempdir");
    // Every save is committed on both tiers before the next step, so the
    // newest committed step is on the peer tier when rank 1 dies (without
    // this, the step-20 save can still be in flight on the peer tier under
    // load, and restore rightly takes step 20 from the shared directory).
    let out = launch_env(
        dir.path(),
        "--peer",
        &["--kill-rank", "1", "--kill-at-step", "23"],
        Duration::from_secs(60),
        &[("CKPT_MULTI_WAIT_DURABLE", "1")],
    );
    assert!(
        out.status.success(),
        "killed peer run failed\n{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("killed rank 1 (SIGKILL) at step 23"),
        "{stdout}"
    );
    assert!(stdout.contains("restarts: 1"), "{stdout}");
    // Every rank restored the same step; rank 1's new process found its
    // shard in its buddy's (rank 2's) memory.
    let restored = restores_after(&stdout, "restarting rank 1 alone", 4);
    let steps: Vec<u64> = restored.iter().map(|(s, _)| *s).collect();
    assert!(
        restored[1].1.starts_with("peer://"),
        "rank 1 restored from {}, expected its buddy's memory\n{stdout}",
        restored[1].1
    );
    assert!(
        steps.iter().all(|s| *s == steps[0]) && (steps[0] == 20 || steps[0] == 15),
        "ranks restored {steps:?}, expected all 20 (or 15)\n{stdout}"
    );
    assert_eq!(
        digest(&out),
        want,
        "the rolled-back job diverged from the uninterrupted one\n{stdout}"
    );
}

/// The digest of an uninterrupted run (no peers) with these extra
/// arguments, computed once per argument list for the whole file.
fn reference_with(extra: &[&str]) -> String {
    static RUNS: std::sync::Mutex<Vec<(Vec<String>, String)>> = std::sync::Mutex::new(Vec::new());
    let key: Vec<String> = extra.iter().map(ToString::to_string).collect();
    let mut runs = RUNS.lock().expect("reference runs");
    if let Some((_, d)) = runs.iter().find(|(k, _)| *k == key) {
        return d.clone();
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = launch(dir.path(), extra, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "uninterrupted run {extra:?} failed\n{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("restarts: 0"));
    let d = digest(&out);
    runs.push((key, d.clone()));
    d
}

/// The `sdc-detected step=S tensor=T rank=R` line, as (S, T, R).
fn sdc_line(stdout: &str) -> (u64, String, String) {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sdc-detected "))
        .unwrap_or_else(|| panic!("no sdc-detected line:\n{stdout}"));
    let field = |k: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_string()
    };
    (
        field("step=").parse().expect("step"),
        field("tensor="),
        field("rank="),
    )
}

#[test]
fn bit_flip_in_one_replica_is_refused_and_the_job_ends_bit_exact() {
    // 2 shards x 2 replicas: ranks 0 and 1 hold shard 0, ranks 2 and 3
    // shard 1. Rank 1's weights get one flipped bit after step 12. Each
    // shard's embedding table and moments are 16 MiB, large enough to be
    // cut into blocks (4 MiB checksum chunks).
    let job = ["--replicas", "2", "--state-mb", "32"];
    let want = reference_with(&job);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = launch(
        dir.path(),
        &[&job[..], &["--inject-sdc", "1:12", "--keep", "10"]].concat(),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The first save after the flip is refused on every tier; with two
    // replicas both are named (neither is known to be the good one).
    let (step, tensor, ranks) = sdc_line(&stdout);
    assert_eq!(step, 15, "{stdout}");
    assert!(!tensor.is_empty());
    assert_eq!(ranks, "0,1", "{stdout}");
    // Every rank rolls back to step 10, the newest clean step, and the run
    // ends where the uninterrupted one did.
    assert_eq!(
        restored_step(&stdout, dir.path(), "rolling every rank back"),
        10
    );
    assert_eq!(digest(&out), want, "{stdout}");

    // Write volume: each byte is written once, by one of its replicas, so
    // the replicated job writes what an unreplicated one of the same model
    // would, spread evenly over the four ranks (within one 4 MiB chunk).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tier = LocalTier::new(dir.path()).expect("tier");
    let m = rt
        .block_on(store::load_manifest(&tier, RUN, 40))
        .expect("manifest of step 40");
    let logical: u64 = m
        .tensors
        .values()
        .map(|t| t.shape.iter().product::<u64>() * t.dtype.size() as u64)
        .sum();
    let written: Vec<u64> =
        m.tensors
            .values()
            .flat_map(|t| &t.pieces)
            .fold(vec![0u64; 4], |mut w, p| {
                w[p.rank as usize] += p.length;
                w
            });
    let total: u64 = written.iter().sum();
    eprintln!(
        "2-replica save of step 40: {logical} bytes of state (x2 replicas staged), \
         written per rank {written:?} = {total} bytes"
    );
    assert_eq!(total, logical, "each piece written exactly once");
    let share = logical / 4;
    for (r, w) in written.iter().enumerate() {
        assert!(
            *w <= share + (4 << 20),
            "rank {r} wrote {w} bytes, more than its share {share}: {written:?}"
        );
    }
    let emb = &m.tensors["emb.table"];
    assert_eq!(emb.pieces.len(), 4, "2 shards x 2 blocks: {:?}", emb.pieces);
    for p in m.tensors.values().flat_map(|t| &t.pieces) {
        assert_eq!(p.replicas.len(), 2, "every piece lists its two replicas");
        assert!(p.replicas.contains(&p.rank), "the writer is a replica");
    }

    // The CLI shows the refused save, the failure log's detected error and
    // who wrote each replicated piece.
    let cli = |args: &[&str]| {
        let out = common::run(Command::new(example("../ckpt")).args(args).arg(dir.path()));
        assert!(out.status.success(), "ckpt {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ls = cli(&["ls"]);
    let refused = ls
        .lines()
        .find(|l| l.contains("REFUSED"))
        .unwrap_or_else(|| panic!("no refused step in ckpt ls:\n{ls}"));
    assert!(
        refused.contains(" 15 REFUSED")
            && refused.contains("committed again later")
            && refused.contains(&format!("replicas of tensor `{tensor}` differ"))
            && refused.contains("ranks [0, 1]"),
        "{refused}"
    );
    assert!(
        ls.contains("1 detected error(s) (replicas that differed), at steps [15]"),
        "{ls}"
    );
    let json = cli(&["ls", "--json"]);
    let line = json
        .lines()
        .find(|l| l.contains("\"refused\""))
        .unwrap_or_else(|| panic!("{json}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("json line");
    assert_eq!(v["step"], 15);
    assert_eq!(v["refused"]["kind"], "ReplicaMismatch");
    assert_eq!(v["refused"]["ranks"], serde_json::json!([0, 1]));
    let inspect = cli(&["inspect"]);
    let emb = inspect
        .lines()
        .find(|l| l.starts_with("emb.table "))
        .unwrap_or_else(|| panic!("{inspect}"));
    assert!(
        inspect.contains("WRITTEN BY (OF REPLICAS)")
            && emb.matches(" (0,1)").count() == 2
            && emb.matches(" (2,3)").count() == 2,
        "{emb}"
    );
}

#[test]
fn with_three_replicas_the_odd_one_out_is_named() {
    let job = ["--ranks", "3", "--replicas", "3"];
    let want = reference_with(&job);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = launch(
        dir.path(),
        &["--ranks", "3", "--replicas", "3", "--inject-sdc", "2:15"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The flip lands right before the save of step 15: only mlp.w1 differs,
    // and ranks 0 and 1 outvote rank 2.
    assert_eq!(
        sdc_line(&stdout),
        (15, "mlp.w1".to_string(), "2".to_string()),
        "{stdout}"
    );
    assert_eq!(digest(&out), want, "{stdout}");
}

#[test]
fn relaunch_resumes_every_rank_from_the_newest_step_all_can_verify() {
    let want = reference();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for damage in ["corrupt", "missing"] {
        let dir = tempfile::tempdir().expect("tempdir");
        // The job dies at step 27 with no restarts left; every save
        // committed before the next step, so 25 is the newest.
        let out = launch_env(
            dir.path(),
            "--no-peer",
            &[
                "--kill-rank",
                "1",
                "--kill-at-step",
                "27",
                "--max-restarts",
                "0",
            ],
            Duration::from_secs(60),
            &[("CKPT_MULTI_WAIT_DURABLE", "1")],
        );
        assert!(!out.status.success(), "{}", text(&out));
        let tier = LocalTier::new(dir.path()).expect("tier");
        let committed = rt
            .block_on(store::committed_steps(&tier, RUN))
            .expect("list");
        assert_eq!(committed.last(), Some(&25), "{committed:?}");

        // Rank 2's shard of step 25 is damaged on the only tier it has.
        let file = common::shard_file(&dir.path().join(layout::step_dir(RUN, 25)), 2);
        match damage {
            "corrupt" => {
                let mut bytes = std::fs::read(&file).expect("read shard");
                let at = bytes.len() - 100;
                bytes[at] ^= 0x10;
                std::fs::write(&file, bytes).expect("write shard");
            }
            _ => std::fs::remove_file(&file).expect("remove shard"),
        }

        // Launching again resumes the job: all four ranks from step 20 (the
        // newest step every rank can verify), never a mix of 20 and 25.
        let out = launch(dir.path(), &[], Duration::from_secs(60));
        assert!(out.status.success(), "{damage}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            restored_step(&stdout, dir.path(), "started 4 ranks"),
            20,
            "{damage}"
        );
        assert!(
            stdout.contains("newer committed steps [25] could not be restored by every rank"),
            "{damage}: {stdout}"
        );
        assert_eq!(digest(&out), want, "{damage}: {stdout}");
        // The first launch's agreement files are gone (the coordinator
        // removes earlier incarnations' after a commit); the last one's stay.
        let agree: Vec<_> = std::fs::read_dir(dir.path().join(RUN).join("agree"))
            .expect("agreement dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(agree.len(), 1, "{damage}: {agree:?}");
        // Step 25 was uncommitted (audited) and saved again; what is
        // committed in the end verifies.
        for s in rt
            .block_on(store::committed_steps(&tier, RUN))
            .expect("list")
        {
            let m = rt
                .block_on(store::load_manifest(&tier, RUN, s))
                .expect("manifest");
            let report = rt.block_on(store::verify_step(&tier, &m));
            assert!(report.is_ok(), "{damage}: step {s}: {:?}", report.failures);
        }
    }
}

/// Where each rank restored from after the last restart: `(step, tier)`.
fn restores_after(stdout: &str, marker: &str, ranks: u32) -> Vec<(u64, String)> {
    let after = stdout
        .rsplit_once(marker)
        .unwrap_or_else(|| panic!("no `{marker}` in:\n{stdout}"))
        .1;
    (0..ranks)
        .map(|r| {
            let prefix = format!("rank {r}: restored step ");
            let line = after
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("rank {r} did not restore:\n{stdout}"));
            let (step, from) = line[prefix.len()..]
                .split_once(" from ")
                .expect("`from` in restore line");
            (step.parse().expect("step"), from.to_string())
        })
        .collect()
}

/// Six ranks with each shard erasure-coded 4+2 over the peer servers: two
/// ranks SIGKILLed at once (their servers and memory gone) restart alone
/// and rebuild their shards from the survivors' fragments while the
/// others roll back in memory; a third lost server makes every rank fall
/// back to the shared directory, saying why. Both end bit-exact.
#[test]
fn erasure_coded_peers_survive_two_lost_ranks_and_fall_back_on_three() {
    let six = ["--ranks", "6", "--steps", "30"];
    let want = reference_with(&six);
    for (kill, from_peers) in [("1,4", true), ("1,2,4", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = [
            &six[..],
            &[
                "--peer-ec",
                "4+2",
                "--kill-ranks",
                kill,
                "--kill-at-step",
                "18",
            ],
        ]
        .concat();
        let out = launch_env(
            dir.path(),
            "--peer",
            &extra,
            Duration::from_secs(90),
            &[("CKPT_MULTI_WAIT_DURABLE", "1")],
        );
        assert!(out.status.success(), "kill {kill} failed\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("erasure-coded 4+2"), "{stdout}");
        assert!(
            stdout.contains(&format!(
                "killed ranks [{}] (SIGKILL) at step 18",
                kill.replace(',', ", ")
            )),
            "{stdout}"
        );
        assert!(stdout.contains("restarts: 1"), "kill {kill}: {stdout}");
        let restored = restores_after(&stdout, "alone as incarnation", 6);
        assert!(
            restored.iter().all(|(s, _)| *s == 15),
            "kill {kill}: every rank restores step 15: {restored:?}"
        );
        for (r, (_, from)) in restored.iter().enumerate() {
            assert_eq!(
                from.starts_with("peer-ec4+2://"),
                from_peers,
                "kill {kill}: rank {r} restored from {from}\n{stdout}"
            );
        }
        if !from_peers {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("3 of 6 fragments readable") && err.contains("4 needed"),
                "kill {kill}: the fallback says why\n{err}"
            );
        }
        assert_eq!(digest(&out), want, "kill {kill}: diverged\n{stdout}");
    }
}
