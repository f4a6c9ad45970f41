//! Every benchmark subcommand runs end to end on a small state and prints
//! the JSON keys BENCHMARKS.md quotes, with values that hang together.

use std::process::Command;

use serde_json::Value;

/// Runs `ckpt-bench ARGS --json --dir DIR`; returns its JSON lines.
fn bench(args: &[&str], dir: &std::path::Path) -> Vec<Value> {
    bench_with(Command::new(env!("CARGO_BIN_EXE_ckpt-bench")), args, dir)
}

/// [`bench`] with `cmd` (its environment set) as the command.
fn bench_with(mut cmd: Command, args: &[&str], dir: &std::path::Path) -> Vec<Value> {
    let out = cmd
        .args(args)
        .args(["--json", "--dir"])
        .arg(dir)
        .output()
        .expect("run ckpt-bench");
    assert!(
        out.status.success(),
        "ckpt-bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

#[test]
fn stage_flush_restore_report_ours_beside_the_floors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = ["--state-bytes", "16M", "--tensors", "4", "--iters", "2"];
    let stage = bench(&[&["stage"][..], &small].concat(), dir.path());
    assert_eq!(stage.len(), 1);
    let s = &stage[0];
    for key in [
        "async_math_stop_s",
        "blocking_math_stop_s",
        "memcpy_floor_s",
        "ratio_to_floor",
        "speedup_vs_blocking",
    ] {
        assert!(num(s, key) > 0.0, "{key} in {s}");
    }
    assert!(num(s, "peak_rss_bytes") >= num(s, "state_bytes"));
    assert_eq!(s["flush_while_staging"], false);
    let early = bench(
        &[&["stage", "--flush-while-staging"][..], &small].concat(),
        dir.path(),
    );
    assert_eq!(early[0]["flush_while_staging"], true);
    assert!(num(&early[0], "async_math_stop_s") > 0.0);

    let flush = bench(&[&["flush"][..], &small].concat(), dir.path());
    assert!(num(&flush[0], "durable_s") > 0.0);
    assert!(num(&flush[0], "raw_write_floor_s") > 0.0);
    let best = num(&flush[0], "best_floor_s");
    assert!(best > 0.0 && best <= num(&flush[0], "raw_write_floor_s"));
    assert!(num(&flush[0], "ratio_to_best_floor") > 0.0);
    // The save's staging copy and what follows it until durable.
    let (copy, after) = (
        num(&flush[0], "copy_s"),
        num(&flush[0], "durable_after_copy_s"),
    );
    assert!(copy > 0.0 && after > 0.0 && after < num(&flush[0], "durable_s"));
    // Both O_DIRECT floors, or neither (a file system without O_DIRECT).
    let direct = [
        flush[0]["raw_write_direct_s"].as_f64(),
        flush[0]["raw_write_direct_in_flight_s"].as_f64(),
    ];
    assert_eq!(direct[0].is_some(), direct[1].is_some(), "{}", flush[0]);
    for d in direct.into_iter().flatten() {
        assert!(best <= d, "the best floor is the fastest: {}", flush[0]);
    }
    // Several writes in flight, and the flush while staging: the same
    // save, committed.
    let qd = bench(
        &[
            &[
                "flush",
                "--local-writes-in-flight",
                "3",
                "--flush-while-staging",
            ][..],
            &small,
        ]
        .concat(),
        dir.path(),
    );
    assert_eq!(qd[0]["local_writes_in_flight"], 3);
    assert_eq!(qd[0]["flush_while_staging"], true);
    assert!(num(&qd[0], "durable_s") > 0.0);

    let restore = bench(&[&["restore"][..], &small].concat(), dir.path());
    assert!(num(&restore[0], "restore_s") > 0.0);
    assert!(num(&restore[0], "raw_read_floor_s") > 0.0);
    // Nothing is left behind in the directory under test.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The state of the `--alongside` tests: 32 MiB in 4 tensors, 2 iterations
/// (one in each order).
const SMALL_ALONGSIDE: [&str; 6] = ["--state-bytes", "32M", "--tensors", "4", "--iters", "2"];

/// `flush --alongside peer`: the local tier's time to durable with a peer
/// tier attached to the same saves, and the pool's occupancy over a save.
#[test]
fn flush_alongside_a_peer_tier_reports_both_and_the_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with = |extra: &[&str]| {
        let mut args = vec!["flush", "--alongside", "peer"];
        args.extend_from_slice(&SMALL_ALONGSIDE);
        args.extend_from_slice(extra);
        let out = bench(&args, dir.path());
        let with = out[0]["alongside"].clone();
        check_alongside(&with, 32 << 20, "peer://127.0.0.1:");
        with
    };
    with(&[]);
    // Rate-limited to 64 MiB/s, the peer tier takes about half a second
    // for 32 MiB; the local tier does not wait for it.
    let limited = with(&["--alongside-rate", "64M"]);
    assert_eq!(limited["rate_limit"].as_u64(), Some(64 << 20), "{limited}");
    assert!(num(&limited, "alongside_durable_s") >= 0.3, "{limited}");
    assert!(
        num(&limited, "local_durable_s") < num(&limited, "alongside_durable_s"),
        "{limited}"
    );
}

/// What `--alongside` reports hangs together: both tiers durable, the pool
/// full of the save at some point and empty once every tier is done.
fn check_alongside(with: &Value, bytes: u64, location: &str) {
    assert!(
        with["location"]
            .as_str()
            .is_some_and(|l| l.starts_with(location)),
        "{with}"
    );
    assert!(num(with, "local_durable_s") > 0.0, "{with}");
    assert!(num(with, "alongside_durable_s") > 0.0, "{with}");
    assert!(num(with, "local_ratio_to_alone") > 0.0, "{with}");
    // One ratio per iteration (2), one balanced pair of them.
    let pairs = with["local_ratio_pairs"].as_array().expect("pairs");
    assert_eq!(pairs.len(), 2, "{with}");
    assert!(num(with, "local_ratio_balanced") > 0.0, "{with}");
    let staging = with["staging"].as_array().expect("staging samples");
    assert!(
        (2..=ckpt_core::STAGING_SAMPLES + 1).contains(&staging.len()),
        "{with}"
    );
    let at = |s: &Value| s[0].as_f64().expect("time");
    let used = |s: &Value| s[1].as_u64().expect("bytes");
    assert!(staging.windows(2).all(|w| at(&w[0]) <= at(&w[1])), "{with}");
    let peak = staging.iter().map(used).max().unwrap_or(0);
    assert!(
        peak >= bytes,
        "the pool held the whole save at its peak: {with}"
    );
    assert_eq!(staging.last().map(used), Some(0), "{with}");
}

#[test]
fn fingerprint_reports_the_replica_check_beside_the_memcpy_floor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bench(
        &[
            "fingerprint",
            "--state-bytes",
            "16M",
            "--tensors",
            "4",
            "--iters",
            "2",
            "--replicas",
            "3",
        ],
        dir.path(),
    );
    let f = &out[0];
    for key in [
        "fingerprint_s",
        "memcpy_floor_s",
        "memcpy_parallel_floor_s",
        "verify_replicas_s",
    ] {
        assert!(num(f, key) > 0.0, "{key} in {f}");
    }
    assert!(num(f, "exchange_s") <= num(f, "verify_replicas_s"), "{f}");
    assert_eq!(f["replicas"], 3);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn staging_size_accounts_for_every_save() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = bench(
        &[
            "staging-size",
            "--state-bytes",
            "32M",
            "--fractions",
            "0.5,2",
            "--interval",
            "10ms",
            "--saves",
            "4",
        ],
        dir.path(),
    );
    assert_eq!(rows.len(), 4, "2 fractions x 2 policies: {rows:?}");
    for r in &rows {
        let skipped = num(r, "skipped_saves");
        let durable = num(r, "durable_saves");
        assert_eq!(
            skipped + durable,
            4.0,
            "every save is skipped or durable: {r}"
        );
        if r["when_busy"] == "wait" {
            assert_eq!(skipped, 0.0, "the wait policy never skips: {r}");
        }
        assert!(num(r, "pool_bytes") >= num(r, "state_bytes") * num(r, "pool_fraction") * 0.99);
    }
    // A pool half the state streams: saves wait for blocks the flush
    // returns (the bench counts waits over 1 ms; a fast flush can return a
    // block sooner, so not every save need count).
    let half_wait = rows
        .iter()
        .find(|r| r["when_busy"] == "wait" && num(r, "pool_fraction") == 0.5)
        .expect("0.5 wait row");
    assert!(num(half_wait, "waited_saves") >= 1.0, "{half_wait}");
    assert!(num(half_wait, "waited_total_s") > 0.0, "{half_wait}");
}

#[test]
fn train_reports_slowdowns_and_verifies_the_last_checkpoint() {
    // Two runs per mode: the second run's saves are new steps of the same
    // checkpoint run, and its last checkpoint is verified again.
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = bench(
        &[
            "train",
            "--state-bytes",
            "16M",
            "--steps",
            "6",
            "--every",
            "3",
            "--iters",
            "2",
        ],
        dir.path(),
    );
    let modes: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes, ["none", "async", "blocking"]);
    assert_eq!(num(&rows[0], "slowdown"), 0.0);
    assert_eq!(rows[1]["verified"], true);
    assert!(num(&rows[1], "math_stop_per_save_s") > 0.0);
    assert!(num(&rows[2], "math_stop_per_save_s") > 0.0);
}

#[test]
fn train_overlap_hides_the_copy_and_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = bench(
        &[
            "train",
            "--state-bytes",
            "32M",
            "--steps",
            "6",
            "--every",
            "2",
            "--iters",
            "1",
            "--overlap",
            "--modes",
            "none,async",
            // Read passes lasting several times the copy, so that the copy
            // finishes inside them even when other tests load the cores.
            "--fwd-passes",
            "16",
        ],
        dir.path(),
    );
    let modes: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes, ["none", "async", "overlapped"]);
    let (async_, over) = (&rows[1], &rows[2]);
    assert_eq!(over["verified"], true);
    assert_eq!(num(over, "fwd_passes"), 16.0);
    // Saves at steps 2 and 4 overlap steps 3 and 5 (the last is plain).
    assert_eq!(num(over, "saves_measured"), 2.0);
    assert!(
        num(over, "math_stop_per_save_s") < num(async_, "math_stop_per_save_s"),
        "sixteen read passes over 32 MiB hide its copy: {over} vs {async_}"
    );
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_ckpt-bench"))
        .args(["train", "--steps", "7", "--every", "3", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run ckpt-bench");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--steps (7)") && err.contains("--every (3)"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_ckpt-bench"))
        .args(["staging-size", "--fractions", "0,1", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run ckpt-bench");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fractions"));
}

#[path = "../../tests/common/s3s.rs"]
mod s3s;

/// Runs `ckpt-bench ARGS --json --dir DIR` with the bundled S3 server's
/// environment; returns its first JSON line.
fn s3_bench(s3: &s3s::Bundled, args: &[&str], dir: &std::path::Path) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpt-bench"));
    s3.env(&mut cmd);
    bench_with(cmd, args, dir)
        .into_iter()
        .next()
        .expect("a JSON line")
}

/// `flush` and `restore` with `--tier s3`, on the bundled S3 server.
#[test]
fn flush_and_restore_on_s3() {
    let Some(s3) = s3s::Bundled::get("flush_and_restore_on_s3") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = s3.location("bench");
    for (sub, key) in [("flush", "durable_s"), ("restore", "restore_s")] {
        let v = s3_bench(
            &s3,
            &[
                sub,
                "--tier",
                "s3",
                "--s3-url",
                &url,
                "--state-bytes",
                "16M",
                "--tensors",
                "4",
                "--iters",
                "2",
            ],
            dir.path(),
        );
        assert!(num(&v, key) > 0.0, "{v}");
    }
}

/// `flush --alongside s3`: the bundled S3 server beside the local tier.
#[test]
fn flush_alongside_s3() {
    let Some(s3) = s3s::Bundled::get("flush_alongside_s3") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = s3.location("al");
    for checksum in ["crc64nvme", "sha256"] {
        let mut args = vec![
            "flush",
            "--alongside",
            "s3",
            "--s3-url",
            &url,
            "--s3-payload-checksum",
            checksum,
        ];
        args.extend_from_slice(&SMALL_ALONGSIDE);
        let v = s3_bench(&s3, &args, dir.path());
        check_alongside(&v["alongside"], 32 << 20, "s3://");
    }
    // What the runs wrote to the bucket is gone with them.
    let tier = ckpt_io::ObjectTier::from_url(
        &url,
        ckpt_io::ObjectTierConfig::default()
            .with_endpoint(s3.endpoint.clone())
            .with_region(s3.region()),
    )
    .expect("tier");
    let left = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(ckpt_core::Tier::list(&tier, ""))
        .expect("list");
    assert!(left.is_empty(), "left in the bucket: {left:?}");
}

/// `flush --alongside s3` with credentials the server refuses: every save
/// to it fails, the benchmark says so and still measures the local tier.
#[test]
fn flush_alongside_counts_the_attached_tiers_failed_saves() {
    let Some(s3) = s3s::Bundled::get("flush_alongside_counts_the_attached_tiers_failed_saves")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = s3.location("refused");
    let mut args = vec!["flush", "--alongside", "s3", "--s3-url", &url];
    args.extend_from_slice(&SMALL_ALONGSIDE);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpt-bench"));
    s3.env(&mut cmd);
    cmd.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let v = bench_with(cmd, &args, dir.path())
        .into_iter()
        .next()
        .expect("a JSON line");
    let with = &v["alongside"];
    assert_eq!(with["alongside_failed_saves"].as_u64(), Some(2), "{with}");
    assert!(with["alongside_durable_s"].is_null(), "{with}");
    assert!(num(with, "local_durable_s") > 0.0, "{with}");
    assert_eq!(
        with["local_ratio_pairs"].as_array().map(Vec::len),
        Some(2),
        "{with}"
    );
}

/// README's `ckpt-bench plan` command prints README's table.
#[test]
fn readme_plan_command_prints_the_readme_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let (cmd_line, rest) = readme
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with("$ cargo run --release -p ckpt-bench -- plan"))
        .map(|(i, l)| (l.to_string(), readme.lines().skip(i + 1)))
        .expect("README shows a `ckpt-bench plan` command");
    let args: Vec<&str> = cmd_line
        .split_once(" -- ")
        .expect("args after --")
        .1
        .split_whitespace()
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_ckpt-bench"))
        .args(&args)
        .output()
        .expect("run ckpt-bench plan");
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    let shown: Vec<&str> = rest.take_while(|l| !l.starts_with("```")).collect();
    assert!(shown.len() >= 5, "README's plan table: {shown:?}");
    for line in shown {
        assert!(
            printed.lines().any(|p| p.trim_end() == line.trim_end()),
            "README shows `{line}`, ckpt-bench prints:\n{printed}"
        );
    }
}
