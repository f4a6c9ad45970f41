//! Every `cargo run` line of README.md that runs the quickstart, the
//! multi-rank example or the `ckpt` CLI runs here, with the flags README
//! shows, and must succeed: what README tells a new user to type works.
//! Paths under `/tmp` become a temporary directory; `s3://ckpt-test/...`
//! becomes a fresh prefix on the bundled S3 server (the same bucket name
//! `scripts/s3-server.sh` creates).

mod common;

use std::process::Command;

use common::example;
use common::s3s::Bundled;

/// README's shell lines that run one of this package's binaries:
/// (binary, arguments).
fn readme_runs() -> Vec<(String, Vec<String>)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut inside_sh = false;
    let mut out = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            inside_sh = !inside_sh && line.trim() == "```sh";
            continue;
        }
        if !inside_sh {
            continue;
        }
        // `a && b`: each part on its own.
        for part in line.split("&&") {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (bin, rest) = match words.as_slice() {
                [
                    "cargo",
                    "run",
                    "--release",
                    "--example",
                    name,
                    "--",
                    rest @ ..,
                ] => (name.to_string(), rest),
                // An example behind a feature: run when this test is built
                // with it (CI builds every feature), said when not.
                [
                    "cargo",
                    "run",
                    "--release",
                    "--features",
                    features,
                    "--example",
                    name,
                    "--",
                    rest @ ..,
                ] => {
                    if features.split(',').all(enabled) {
                        (name.to_string(), rest)
                    } else {
                        eprintln!(
                            "SKIPPED `{name}`: this test is built without --features {features}"
                        );
                        continue;
                    }
                }
                [
                    "cargo",
                    "run",
                    "--release",
                    "--bin",
                    "ckpt",
                    "--",
                    rest @ ..,
                ] => ("ckpt".to_string(), rest),
                _ => continue,
            };
            out.push((bin, rest.iter().map(|s| s.to_string()).collect()));
        }
    }
    out
}

/// Whether this test binary was built with the package feature `f`.
fn enabled(f: &str) -> bool {
    (f == "burn" && cfg!(feature = "burn"))
        || (f == "burn-ndarray" && cfg!(feature = "burn-ndarray"))
        || (f == "cuda" && cfg!(feature = "cuda"))
}

#[test]
fn readme_commands_run() {
    let runs = readme_runs();
    assert!(
        runs.iter().any(|(b, _)| b == "quickstart") && runs.iter().any(|(b, _)| b == "ckpt"),
        "README runs no quickstart or ckpt command: {runs:?}"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = Bundled::get("readme_commands_run");
    let s3_prefix = s3.as_ref().map(|s| s.location("readme"));
    for (bin, args) in runs {
        let needs_s3 = args.iter().any(|a| a.starts_with("s3://"));
        let (Some(s3), Some(prefix)) = (&s3, &s3_prefix) else {
            if needs_s3 {
                eprintln!("SKIPPED `{bin} {}`: no S3 server", args.join(" "));
                continue;
            }
            run_one(&bin, &args, tmp.path(), None, "");
            continue;
        };
        run_one(&bin, &args, tmp.path(), Some(s3), prefix);
    }
}

fn run_one(bin: &str, args: &[String], tmp: &std::path::Path, s3: Option<&Bundled>, prefix: &str) {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if let Some(rest) = a.strip_prefix("s3://ckpt-test/") {
                format!("{prefix}/{rest}")
            } else if let Some(rest) = a.strip_prefix("/tmp/") {
                tmp.join(rest).to_string_lossy().into_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let program = if bin == "ckpt" {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_ckpt"))
    } else {
        example(bin)
    };
    let mut cmd = Command::new(program);
    if let Some(s3) = s3 {
        s3.env(&mut cmd);
    }
    let out = cmd.args(&args).output().expect("run");
    eprintln!("README: {bin} {} -> {}", args.join(" "), out.status);
    if args.iter().any(|a| a == "--crash-at-step") {
        // A run told to crash must crash, and say so (then the README's
        // next command resumes it).
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.signal() == Some(libc::SIGABRT)
                && String::from_utf8_lossy(&out.stdout).contains("crashing on purpose"),
            "README's `{bin} {}` should crash on purpose: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        out.status.success(),
        "README's `{bin} {}` failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if bin == "ckpt" && args.first().is_some_and(|a| a == "ls") {
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("quickstart"),
            "README's ckpt ls shows no checkpoint: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
