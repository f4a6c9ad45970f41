//! The quickstart's promise: a run that crashes and resumes ends with the
//! same bytes as a run that never stopped.

mod common;

use std::process::Command;

use common::{digest, durable_steps, example, resumed_from, run};

#[test]
fn crash_and_resume_is_bit_exact() {
    let qs = example("quickstart");
    let clean = tempfile::tempdir().expect("tempdir");
    let crashed = tempfile::tempdir().expect("tempdir");
    let common_args = ["--steps", "120", "--every", "10", "--state-mb", "4"];

    let reference = run(Command::new(&qs)
        .arg("--dir")
        .arg(clean.path())
        .args(common_args));
    assert!(
        reference.status.success(),
        "uninterrupted run failed: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let want = digest(&reference);

    let first = run(Command::new(&qs)
        .arg("--dir")
        .arg(crashed.path())
        .args(common_args)
        .args(["--crash-at-step", "73"]));
    assert!(!first.status.success(), "the crashing run must die");
    assert!(!String::from_utf8_lossy(&first.stdout).contains("final-state-blake3"));

    let resumed = run(Command::new(&qs)
        .arg("--dir")
        .arg(crashed.path())
        .args(common_args));
    assert!(
        resumed.status.success(),
        "resumed run failed: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let out = String::from_utf8_lossy(&resumed.stdout);
    // Saves are asynchronous: the saves of steps 60 and 70 may still have
    // been in flight when the process aborted at step 73 (a loaded machine
    // makes them slower than the steps). The resume starts from the newest
    // step reported durable, or a newer one whose report the abort cut off.
    let from = resumed_from(&resumed);
    let durable = durable_steps(&first);
    let newest = durable.iter().copied().max().unwrap_or(0);
    assert!(
        from > 0 && from.is_multiple_of(10) && from <= 70 && from >= newest,
        "resumed from step {from}; steps durable before the abort: {durable:?}:\n{out}"
    );
    assert_eq!(
        digest(&resumed),
        want,
        "resumed run diverged from the uninterrupted run"
    );
}

/// The same promise through an `s3://` location on the bundled server, as
/// README's quickstart command runs it.
#[test]
fn crash_and_resume_is_bit_exact_on_s3() {
    let Some(s3) = common::s3s::Bundled::get("crash_and_resume_is_bit_exact_on_s3") else {
        return;
    };
    let qs = example("quickstart");
    let loc = s3.location("quickstart-resume");
    let args = ["--steps", "60", "--every", "10", "--state-mb", "2"];
    let clean = tempfile::tempdir().expect("tempdir");
    let want = digest(&run(Command::new(&qs)
        .arg("--dir")
        .arg(clean.path())
        .args(args)
        .arg("--quiet")));
    let mut first = Command::new(&qs);
    s3.env(&mut first);
    let first = run(first
        .args(["--dir", &loc])
        .args(args)
        .args(["--crash-at-step", "43"]));
    assert!(!first.status.success(), "the crashing run must die");
    let mut again = Command::new(&qs);
    s3.env(&mut again);
    let resumed = run(again.args(["--dir", &loc]).args(args));
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    // It resumes from the newest step the crashed run saw durable (or a
    // newer one whose commit finished as it died), never an older one.
    let first_out = String::from_utf8_lossy(&first.stdout);
    let durable = first_out
        .lines()
        .filter(|l| l.contains(" durable on "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let from: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("resumed from step "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no resume line:\n{out}"));
    assert!(
        (durable..=40).contains(&from) && out.contains(&format!("on {loc}")),
        "resumed from {from}; the crashed run saw {durable} durable:\n{first_out}\n{out}"
    );
    assert_eq!(digest(&resumed), want, "resumed run diverged");
}

/// Incremental saves (`--incremental`) with frozen parameters: after the
/// first whole save each save writes only what changed, the run crashes
/// (SIGKILL-like abort) and resumes bit-exact against an uninterrupted run
/// that saved everything every time; `ckpt verify` reads every step back,
/// referenced chunks included; `ckpt gc` keeps the step the newest one
/// points into.
#[test]
fn incremental_saves_write_only_changes_and_resume_bit_exact() {
    let qs = example("quickstart");
    let args = [
        "--steps",
        "90",
        "--every",
        "10",
        "--state-mb",
        "2",
        "--frozen-mb",
        "24",
        "--keep",
        "2",
    ];
    let clean = tempfile::tempdir().expect("tempdir");
    let want = digest(&run(Command::new(&qs)
        .arg("--dir")
        .arg(clean.path())
        .args(args)
        .arg("--quiet")));

    let dir = tempfile::tempdir().expect("tempdir");
    let first = run(Command::new(&qs)
        .arg("--dir")
        .arg(dir.path())
        .args(args)
        .args(["--incremental", "--json", "--crash-at-step", "57"]));
    assert!(!first.status.success(), "the crashing run must die");
    // Per save: bytes written and bytes left in place.
    let saves = |out: &std::process::Output| -> Vec<(u64, u64, u64)> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "durable")
            .map(|v| {
                let t = &v["tiers"][0];
                (
                    v["step"].as_u64().expect("step"),
                    t["written"].as_u64().expect("written"),
                    t["referenced"].as_u64().expect("referenced"),
                )
            })
            .collect()
    };
    let durable = saves(&first);
    assert!(durable.len() >= 3, "{durable:?}");
    let (_, full, none) = durable[0];
    assert_eq!(none, 0, "the first save is whole: {durable:?}");
    for &(step, written, referenced) in &durable[1..] {
        // 24 MiB frozen of ~30 MiB: at most a quarter is written again.
        assert!(
            written * 4 < full && referenced >= 24 << 20,
            "step {step}: wrote {written} of {full}, referenced {referenced}: {durable:?}"
        );
    }

    let resumed = run(Command::new(&qs)
        .arg("--dir")
        .arg(dir.path())
        .args(args)
        .args(["--incremental", "--json"]));
    assert!(
        resumed.status.success(),
        "resumed run failed: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(digest(&resumed), want, "the incremental run diverged");
    // The new process's first save compares against the restored step's
    // chunk hashes: it too writes only what changed.
    let after = saves(&resumed);
    assert!(
        after
            .first()
            .is_some_and(|&(_, written, _)| written * 4 < full),
        "saves after the restart: {after:?} (a whole save is {full} bytes)"
    );

    let ckpt = |a: &[&str]| {
        run(Command::new(env!("CARGO_BIN_EXE_ckpt"))
            .args(a)
            .arg(dir.path()))
    };
    let verify = ckpt(&["verify", "--all"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // keep 2: the newest two, and the whole save they point into.
    let ls = String::from_utf8_lossy(&ckpt(&["ls"]).stdout).into_owned();
    let steps: Vec<u64> = ls
        .lines()
        .filter(|l| l.starts_with("quickstart "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(steps.len(), 3, "{ls}");
    assert_eq!(&steps[1..], &[80, 90], "{ls}");
    // gc --dry-run says the same: keep the referenced step too.
    let plan = String::from_utf8_lossy(&ckpt(&["gc", "--keep-last", "1", "--dry-run"]).stdout)
        .into_owned();
    assert!(
        plan.contains(&format!("would keep [{}, 90], delete [80]", steps[0])),
        "{plan}"
    );
    // What changed from 80 to 90: everything but the frozen tower.
    let diff =
        String::from_utf8_lossy(&ckpt(&["diff", "--from", "80", "--to", "90"]).stdout).into_owned();
    assert!(
        diff.contains("emb.table") && !diff.contains("frozen.tower"),
        "{diff}"
    );
    let inspect = String::from_utf8_lossy(&ckpt(&["inspect"]).stdout).into_owned();
    assert!(
        inspect.contains(&format!("bytes referenced in steps [{}]", steps[0])),
        "{inspect}"
    );
    // Export assembles the referenced bytes into one standard file.
    let out = dir.path().join("export.safetensors");
    let export = run(Command::new(env!("CARGO_BIN_EXE_ckpt"))
        .args(["export", "--out"])
        .arg(&out)
        .arg(dir.path()));
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let bytes = std::fs::read(&out).expect("export");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let tower = st.tensor("frozen.tower").expect("frozen.tower");
    assert_eq!(tower.shape(), &[24 << 18]);
}

/// Copies the directory tree `from` into `to`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// The compaction files (finished or half-written) in the quickstart run's
/// step directories under `dir`.
fn compaction_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("quickstart"))
        .expect("run dir")
        .filter_map(|e| std::fs::read_dir(e.ok()?.path()).ok())
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("compact."))
        .collect()
}

/// `ckpt gc --compact` killed with SIGKILL at many points of its work:
/// after each kill every committed step still verifies (no reference
/// dangles), and a rerun finishes the job: only the kept steps remain,
/// self-contained, bit-exact for a resume.
#[test]
fn gc_compact_killed_anywhere_leaves_every_committed_step_whole() {
    let qs = example("quickstart");
    let src = tempfile::tempdir().expect("tempdir");
    let args = [
        "--steps",
        "60",
        "--every",
        "10",
        "--state-mb",
        "2",
        "--frozen-mb",
        "24",
        "--keep",
        "10",
        "--incremental",
    ];
    let made = run(Command::new(&qs).arg("--dir").arg(src.path()).args(args));
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let ckpt = |dir: &std::path::Path, a: &[&str]| {
        run(Command::new(env!("CARGO_BIN_EXE_ckpt")).args(a).arg(dir))
    };
    let steps = |dir: &std::path::Path| -> Vec<u64> {
        String::from_utf8_lossy(&ckpt(dir, &["ls"]).stdout)
            .lines()
            .filter(|l| l.starts_with("quickstart "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect()
    };
    assert_eq!(steps(src.path()), vec![10, 20, 30, 40, 50, 60]);
    let gc = ["gc", "--compact", "--keep-last", "2"];
    // How long a whole run takes here (process start included): the
    // kills are spread over it.
    let timing = tempfile::tempdir().expect("tempdir");
    copy_tree(src.path(), timing.path());
    let t0 = std::time::Instant::now();
    assert!(ckpt(timing.path(), &gc).status.success());
    let whole = t0.elapsed();
    let (mut killed, mut midway) = (0, 0);
    for attempt in 0..16u32 {
        if attempt >= 8 && midway >= 2 {
            break;
        }
        let delay = whole * (attempt % 8 + 1) / 8;
        let delay_ms = delay.as_millis();
        let work = tempfile::tempdir().expect("tempdir");
        copy_tree(src.path(), work.path());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ckpt"))
            .args(gc)
            .arg(work.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ckpt gc");
        std::thread::sleep(delay);
        // SIGKILL; a no-op when it has already exited.
        let _ = child.kill();
        let status = child.wait().expect("wait");
        // What the kill left: steps still there, compaction files written.
        let left = steps(work.path());
        let copies = compaction_files(work.path()).len();
        eprintln!(
            "killed after {delay_ms} ms ({status}): steps {left:?}, compaction files {copies}"
        );
        if !status.success() {
            killed += 1;
            if left.len() < 6 || copies > 0 {
                midway += 1;
            }
        }
        let verify = ckpt(work.path(), &["verify", "--all"]);
        assert!(
            verify.status.success(),
            "killed after {delay_ms} ms ({status}): a committed step no longer verifies:\n{}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        let again = ckpt(work.path(), &gc);
        assert!(
            again.status.success(),
            "rerun after a kill at {delay_ms} ms: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert_eq!(
            steps(work.path()),
            vec![50, 60],
            "after a kill at {delay_ms} ms"
        );
        let verify = ckpt(work.path(), &["verify", "--all"]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        // No step but the kept ones is left on disk (a kill between a
        // step's last file and its directory can leave the directory
        // empty: it holds nothing, and nothing lists it).
        let dirs = std::fs::read_dir(work.path().join("quickstart"))
            .expect("run dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
            .filter(|e| std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
            .count();
        assert_eq!(dirs, 2, "after a kill at {delay_ms} ms");
        // One compaction file (step 50's, step 60 points into it); what a
        // killed run left half-written is gone.
        let copies = compaction_files(work.path());
        assert_eq!(copies.len(), 1, "after a kill at {delay_ms} ms: {copies:?}");
    }
    assert!(
        midway >= 1,
        "{killed} kills, none in the middle of the work (a whole run takes {whole:?})"
    );
}

/// `ckpt report` on a run with two injected crashes: both restarts are
/// named with the step each failed at, the step it restored and the work
/// rolled back; the waterfall's parts add up to the run's wall time, which
/// lies within the time the three processes took;
/// the SVG is drawn.
#[test]
fn report_names_both_restarts_and_the_waterfall_adds_up() {
    let qs = example("quickstart");
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "--steps",
        "150",
        "--every",
        "10",
        "--state-mb",
        "2",
        "--quiet",
    ];
    let t0 = std::time::Instant::now();
    for crash in [Some("47"), Some("113"), None] {
        let mut c = Command::new(&qs);
        c.arg("--dir").arg(dir.path()).args(args);
        if let Some(s) = crash {
            c.args(["--crash-at-step", s]);
        }
        let out = run(&mut c);
        assert_eq!(
            out.status.success(),
            crash.is_none(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let measured = t0.elapsed().as_secs_f64();
    let svg = dir.path().join("report.svg");
    let out = run(Command::new(env!("CARGO_BIN_EXE_ckpt"))
        .args(["report", "--json", "--svg"])
        .arg(&svg)
        .arg(dir.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["starts"], 3, "{r}");
    let restarts = r["restarts"].as_array().expect("restarts");
    assert_eq!(restarts.len(), 2, "{r}");
    for (x, crashed) in restarts.iter().zip([47u64, 113]) {
        let restored = x["restored_step"].as_u64().expect("restored");
        assert_eq!(x["ended_step"], crashed, "{x}");
        assert_eq!(x["recorded"], true, "{x}");
        // The newest save committed before the crash (under load more
        // than one may still have been in flight): a saved step below it.
        assert!(restored < crashed && restored % 10 == 0, "{x}");
        assert_eq!(
            x["rollback_steps"].as_u64(),
            Some(crashed - restored),
            "{x}"
        );
        assert!(x["rollback_s"].as_f64().expect("rollback_s") > 0.0, "{x}");
        assert!(x["downtime_s"].as_f64().expect("downtime_s") > 0.0, "{x}");
    }
    let w = &r["waterfall"];
    let f = |k: &str| w[k].as_f64().unwrap_or_else(|| panic!("{k} in {w}"));
    let wall = f("wall_s");
    let parts = f("useful_s") + f("checkpoint_stall_s") + f("rolled_back_s") + f("restart_s");
    assert!((parts - wall).abs() <= 0.02 * wall, "{w}");
    assert!(f("checkpoint_stall_s") > 0.0 && f("useful_s") > 0.0, "{w}");
    // The report's wall time lies inside the three processes' (what their
    // start and exit add is the machine's business, not the report's).
    assert!(
        wall > 0.0 && wall <= measured,
        "report wall {wall:.2} s, the three processes took {measured:.2} s"
    );
    // Saves 10..40, 50..110, 120..150: 15 records, less the ones a crash
    // cut off (a record is written after its save completes; a clean stop
    // waits for them, a crash does not).
    let saves = r["saves"].as_array().expect("saves").len();
    assert!((11..=15).contains(&saves), "{saves} saves");
    assert!(r["interval_young_s"].as_f64().is_some(), "{r}");
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(text.starts_with("<svg") && text.contains("waterfall") && text.contains("rolled back"));
    // The text form names both restarts.
    let out = run(Command::new(env!("CARGO_BIN_EXE_ckpt"))
        .arg("report")
        .arg(dir.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("restart 1: failure at step 47")
            && text.contains("restart 2: failure at step 113"),
        "{text}"
    );
}

/// `--overlap`: each save's copy runs during the next step's forward and
/// backward (`save_overlapped`). A crashed and resumed overlapped run ends
/// with the bytes of a plain run that never stopped, and with a training
/// step at least as long as the copy, the loop waits for a small part of it.
#[test]
fn overlapped_saves_crash_and_resume_bit_exact() {
    let qs = example("quickstart");
    let clean = tempfile::tempdir().expect("tempdir");
    let crashed = tempfile::tempdir().expect("tempdir");
    let args = ["--steps", "60", "--every", "10", "--state-mb", "16"];
    let want = digest(&run(Command::new(&qs)
        .arg("--dir")
        .arg(clean.path())
        .args(args)
        .arg("--quiet")));

    let first = run(Command::new(&qs)
        .arg("--dir")
        .arg(crashed.path())
        .args(args)
        .args([
            "--overlap",
            "--step-ms",
            "40",
            "--json",
            "--crash-at-step",
            "43",
        ]));
    assert!(!first.status.success(), "the crashing run must die");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&first.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let saves: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "save").collect();
    assert!(saves.len() >= 3, "saves at 10, 20, 30, 40: {events:?}");
    for s in &saves {
        assert_eq!(s["overlapped"], true, "{s}");
        let (stop, copy) = (
            s["math_stop_ms"].as_f64().expect("a number"),
            s["copy_ms"].as_f64().expect("a number"),
        );
        assert!(copy > 0.0, "{s}");
        // A 40 ms step hides a copy of 48 MiB; what the loop waits for is
        // the planning before it (allow for a loaded machine).
        assert!(
            stop < 0.5 * copy + 5.0,
            "math-stop {stop} ms of a {copy} ms copy: {s}"
        );
    }

    let resumed = run(Command::new(&qs)
        .arg("--dir")
        .arg(crashed.path())
        .args(args)
        .arg("--overlap"));
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let out = String::from_utf8_lossy(&resumed.stdout);
    // The save of step 40 ran during step 41 and may have been in flight at 43.
    assert!(
        out.contains("resumed from step 40") || out.contains("resumed from step 30"),
        "{out}"
    );
    assert_eq!(digest(&resumed), want, "overlapped resume diverged:\n{out}");
}
