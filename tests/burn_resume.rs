//! `examples/burn_train.rs`, the burn training loop, run as a user runs
//! it: a run that crashes and resumes (into a freshly initialized burn
//! model and Adam) ends with the same bytes as a run that never stopped.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{digest, durable_steps, example, resumed_from, run};

#[test]
fn burn_crash_and_resume_is_bit_exact() {
    let bin = example("burn_train");
    let clean = tempfile::tempdir().expect("tempdir");
    let crashed = tempfile::tempdir().expect("tempdir");
    let args = ["--steps", "120", "--every", "10", "--hidden", "128"];

    let reference = run(Command::new(&bin)
        .arg("--dir")
        .arg(clean.path())
        .args(args)
        .arg("--quiet"));
    assert!(
        reference.status.success(),
        "uninterrupted run failed: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let want = digest(&reference);

    let first = run(Command::new(&bin)
        .arg("--dir")
        .arg(crashed.path())
        .args(args)
        .args(["--crash-at-step", "73"]));
    assert_eq!(
        first.status.signal(),
        Some(libc::SIGABRT),
        "the crashing run must abort: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!String::from_utf8_lossy(&first.stdout).contains("final-state-blake3"));

    let resumed = run(Command::new(&bin)
        .arg("--dir")
        .arg(crashed.path())
        .args(args));
    assert!(
        resumed.status.success(),
        "resumed run failed: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let out = String::from_utf8_lossy(&resumed.stdout);
    let from = resumed_from(&resumed);
    // Saves are asynchronous: at the abort, the saves of steps 60 and 70
    // may still have been in flight (a loaded machine makes them slower
    // than the steps). The resume starts from the newest step that was
    // durable, never from an older one and never from a save in flight.
    let durable = durable_steps(&first);
    let newest = durable.iter().copied().max().unwrap_or(0);
    assert!(
        from > 0 && from.is_multiple_of(10) && from <= 70 && from >= newest,
        "resumed from step {from}; steps durable before the abort: {durable:?}:\n{out}"
    );
    assert_eq!(
        digest(&resumed),
        want,
        "the resumed burn run diverged from the uninterrupted one:\n{out}"
    );

    // What was saved is a readable checkpoint: the module path names and
    // Adam's moments, verified by the CLI.
    let inspect = run(Command::new(env!("CARGO_BIN_EXE_ckpt")).args([
        "inspect",
        crashed.path().to_str().expect("test setup"),
        "--run",
        "burn",
    ]));
    let listing = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{listing}");
    for name in [
        "model.hidden.weight",
        "optimizer.hidden.weight.momentum.moment_1",
        "optimizer.output.bias.momentum.moment_2",
        "burn.meta",
    ] {
        assert!(listing.contains(name), "inspect lacks {name}:\n{listing}");
    }
    let verify = run(Command::new(env!("CARGO_BIN_EXE_ckpt")).args([
        "verify",
        crashed.path().to_str().expect("test setup"),
        "--all",
    ]));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// Without `--every` the scheduler picks the interval, as README runs it:
/// the run saves and its last step is durable.
#[test]
fn burn_train_saves_on_the_schedulers_interval() {
    let bin = example("burn_train");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new(&bin)
        .arg("--dir")
        .arg(dir.path())
        .args(["--steps", "40", "--hidden", "32"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("schedule: "), "{stdout}");
    assert!(stdout.contains("step    40  durable in"), "{stdout}");
    let again = run(Command::new(&bin)
        .arg("--dir")
        .arg(dir.path())
        .args(["--steps", "40", "--hidden", "32"]));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("resumed from step 40"), "{stdout}");
    assert_eq!(digest(&again), digest(&out));
}

/// `--background-capture`: burn's tensors are read on a thread of their
/// own while training goes on; the checkpoints still hold the state of
/// their step, so a crashed and resumed run ends with the bytes of a run
/// that never stopped.
#[test]
fn burn_background_capture_resumes_bit_exact() {
    let bin = example("burn_train");
    let clean = tempfile::tempdir().expect("tempdir");
    let crashed = tempfile::tempdir().expect("tempdir");
    let args = ["--steps", "90", "--every", "10", "--hidden", "256"];
    let want = digest(&run(Command::new(&bin)
        .arg("--dir")
        .arg(clean.path())
        .args(args)
        .arg("--quiet")));
    let first = run(Command::new(&bin)
        .arg("--dir")
        .arg(crashed.path())
        .args(args)
        .args(["--background-capture", "--crash-at-step", "67"]));
    assert_eq!(first.status.signal(), Some(libc::SIGABRT));
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(out.contains("captured in the background"), "{out}");
    let resumed = run(Command::new(&bin)
        .arg("--dir")
        .arg(crashed.path())
        .args(args)
        .arg("--background-capture"));
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{out}");
    let from = resumed_from(&resumed);
    assert!(
        from > 0 && from.is_multiple_of(10) && from <= 60,
        "resumed from {from}:\n{out}"
    );
    assert_eq!(digest(&resumed), want, "{out}");
}
