//! The `ckpt` CLI on a real directory written by the quickstart.

mod common;

use std::process::Command;

use common::{example, run};

fn ckpt_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckpt")
}

fn write_checkpoints(dir: &std::path::Path) {
    let out = run(Command::new(example("quickstart"))
        .arg("--dir")
        .arg(dir)
        .args([
            "--steps",
            "30",
            "--every",
            "10",
            "--state-mb",
            "1",
            "--keep",
            "5",
            "--quiet",
        ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ls_inspect_verify_export_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoints(dir.path());

    let ls = run(Command::new(ckpt_bin())
        .arg("ls")
        .arg(dir.path())
        .arg("--json"));
    assert!(ls.status.success());
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| r["step"].as_u64().expect("step"))
            .collect::<Vec<_>>(),
        vec![10, 20, 30]
    );
    assert!(rows.iter().all(|r| r["run"] == "quickstart"
        && r["world_size"] == 1
        && r["bytes"].as_u64().expect("bytes") > 1 << 20));

    let inspect = run(Command::new(ckpt_bin())
        .arg("inspect")
        .arg(dir.path())
        .args(["--step", "20", "--json"]));
    assert!(inspect.status.success());
    let m: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("manifest json");
    assert_eq!(m["step"], 20);
    assert_eq!(m["tensors"]["adam.v.mlp.w1"]["role"], "optimizer");
    assert_eq!(
        m["ranks"][0]["loop_state"]["data_loader"]["cursor"],
        20 * 32
    );

    let verify = run(Command::new(ckpt_bin())
        .arg("verify")
        .arg(dir.path())
        .arg("--all"));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&verify.stdout)
            .matches("ok ")
            .count(),
        3
    );

    // Shard files are valid safetensors files, readable by the reference crate.
    let shard = dir
        .path()
        .join("quickstart/step-00000000000000000030/rank-00000.safetensors");
    let bytes = std::fs::read(&shard).expect("shard");
    let st =
        safetensors::SafeTensors::deserialize(&bytes).expect("shard is a valid safetensors file");
    assert_eq!(st.tensor("mlp.w1").expect("tensor").shape(), &[64, 32]);

    // Export assembles the global tensors into one standard file.
    let out = dir.path().join("export.safetensors");
    let export = run(Command::new(ckpt_bin())
        .arg("export")
        .arg(dir.path())
        .args(["--step", "30", "--out"])
        .arg(&out));
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let exported = std::fs::read(&out).expect("export");
    let ex = safetensors::SafeTensors::deserialize(&exported).expect("export is valid safetensors");
    assert_eq!(ex.len(), 15);
    assert_eq!(
        ex.tensor("adam.m.emb.table").expect("t").data(),
        st.tensor("adam.m.emb.table").expect("t").data()
    );

    // gc keeps the newest N.
    let gc = run(Command::new(ckpt_bin())
        .arg("gc")
        .arg(dir.path())
        .args(["--keep-last", "1"]));
    assert!(gc.status.success());
    let ls = run(Command::new(ckpt_bin())
        .arg("ls")
        .arg(dir.path())
        .arg("--json"));
    assert_eq!(String::from_utf8_lossy(&ls.stdout).lines().count(), 1);
}

#[test]
fn verify_names_the_file_and_chunk_of_a_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoints(dir.path());
    let shard = dir
        .path()
        .join("quickstart/step-00000000000000000020/rank-00000.safetensors");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(&shard, &bytes).expect("corrupt");

    let verify = run(Command::new(ckpt_bin())
        .arg("verify")
        .arg(dir.path())
        .arg("--all"));
    assert_eq!(
        verify.status.code(),
        Some(1),
        "verify must fail on corruption"
    );
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(text.contains("FAILED quickstart step 20"), "{text}");
    assert!(text.contains("rank-00000.safetensors, chunk"), "{text}");
    assert!(
        text.contains("ok     quickstart step 30"),
        "other steps still verify: {text}"
    );

    // The quickstart resumes from step 30 (intact): corruption of an older
    // step does not matter; then corrupt 30 and it falls back to 10.
    let newest = dir
        .path()
        .join("quickstart/step-00000000000000000030/rank-00000.safetensors");
    let mut b = std::fs::read(&newest).expect("shard");
    b.truncate(b.len() - 10);
    std::fs::write(&newest, &b).expect("truncate");
    let out = run(Command::new(example("quickstart"))
        .arg("--dir")
        .arg(dir.path())
        .args([
            "--steps",
            "30",
            "--every",
            "10",
            "--state-mb",
            "1",
            "--keep",
            "5",
        ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("resumed from step 10"), "{text}");
    assert!(
        text.contains("step Some(30)") && text.contains("step Some(20)"),
        "skips must be reported: {text}"
    );
}

#[test]
fn bad_locations_and_missing_steps_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new(ckpt_bin()).arg("inspect").arg(dir.path()));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no committed checkpoint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_checkpoints(dir.path());
    let out = run(Command::new(ckpt_bin())
        .arg("inspect")
        .arg(dir.path())
        .args(["--step", "999"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step-00000000000000000999") && err.contains("[10, 20, 30]"),
        "{err}"
    );
    let out = run(Command::new(ckpt_bin()).arg("ls").arg("ftp://nowhere"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported scheme `ftp://`"));
}
