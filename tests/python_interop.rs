//! Python reads what ckpt writes: shard files and `ckpt export` output
//! opened with the Python `safetensors` package (`load_file`, and
//! `deserialize` for bf16, which numpy lacks), in a virtual environment
//! this test makes (`target/py-interop-venv`: pinned numpy and
//! safetensors from PyPI). Names, dtypes, shapes and every byte are
//! compared with what the Rust side saved.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ckpt::{Checkpointer, DType, LocalTier, TensorRef, TensorView, TierPolicy, TrainingState};

const PINS: [&str; 2] = ["numpy==2.4.6", "safetensors==0.8.0"];

/// The test's Python, with the pinned packages (made on first use).
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-interop-venv");
    let py = venv.join("bin/python");
    let stamp = venv.join("pins.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(&PINS.join("\n")) && py.exists() {
        return py;
    }
    let ok = |c: &mut Command, what: &str| {
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
        assert!(
            out.status.success(),
            "{what} failed (this test needs python3 with venv and PyPI):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    ok(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PINS),
        "pip install",
    );
    std::fs::write(&stamp, PINS.join("\n")).expect("stamp");
    py
}

/// One tensor as saved: dtype, shape, bytes.
struct Saved {
    dtype: DType,
    shape: Vec<u64>,
    bytes: Vec<u8>,
}

fn f32s(n: usize, scale: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| ((i as f32 - 7.0) * scale).to_le_bytes())
        .collect()
}

/// Saves step 1 of `run` in `dir` holding `tensors`.
fn save(dir: &Path, run: &str, tensors: &BTreeMap<&str, Saved>) {
    let ckpt = Checkpointer::builder(run)
        .tier(
            Arc::new(LocalTier::new(dir).expect("local tier")),
            TierPolicy::keep_last(2),
        )
        .build()
        .expect("checkpointer");
    let views: Vec<TensorRef<'_>> = tensors
        .iter()
        .map(|(name, t)| TensorRef::new(*name, t.dtype, &t.shape, &t.bytes))
        .collect();
    let state = TrainingState::builder(1)
        .model(views.iter().map(|v| v as &dyn TensorView))
        .without_optimizer()
        .rng(&1u64)
        .data_loader(&0u64)
        .lr_schedule(&0.1f64)
        .build()
        .expect("state");
    let r = ckpt.save(&state).expect("save").wait().expect("durable");
    assert!(r.is_durable(), "{r:?}");
}

#[test]
fn python_safetensors_reads_shard_files_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain: BTreeMap<&str, Saved> = BTreeMap::from([
        (
            "layer.w",
            Saved {
                dtype: DType::F32,
                shape: vec![64, 33],
                bytes: f32s(64 * 33, 0.25),
            },
        ),
        (
            "emb.f16",
            Saved {
                dtype: DType::F16,
                shape: vec![8, 4],
                bytes: (0..32u16)
                    .flat_map(|i| (0x3c00 + i * 17).to_le_bytes())
                    .collect(),
            },
        ),
        (
            "step.i64",
            Saved {
                dtype: DType::I64,
                shape: vec![5],
                bytes: [-2i64, -1, 0, 1, i64::MAX]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            },
        ),
        (
            "mask.u8",
            Saved {
                dtype: DType::U8,
                shape: vec![300],
                bytes: (0..300u32).map(|i| (i * 7 % 256) as u8).collect(),
            },
        ),
    ]);
    // bf16: the top halves of these f32s.
    let wide: Vec<f32> = (0..70).map(|i| i as f32 * 0.5 - 3.0).collect();
    let with_bf16: BTreeMap<&str, Saved> = BTreeMap::from([
        (
            "w.bf16",
            Saved {
                dtype: DType::BF16,
                shape: vec![10, 7],
                bytes: wide
                    .iter()
                    .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            },
        ),
        (
            "b.f32",
            Saved {
                dtype: DType::F32,
                shape: vec![7],
                bytes: f32s(7, 1.5),
            },
        ),
    ]);
    save(dir.path(), "plain", &plain);
    save(dir.path(), "bf16", &with_bf16);
    let mut files: Vec<(PathBuf, &BTreeMap<&str, Saved>, bool)> = Vec::new();
    for (run, tensors, bf16) in [("plain", &plain, false), ("bf16", &with_bf16, true)] {
        let step_dir = dir.path().join(ckpt::format::layout::step_dir(run, 1));
        files.push((common::shard_file(&step_dir, 0), tensors, bf16));
        let out = dir.path().join(format!("{run}.safetensors"));
        let export = common::run(
            Command::new(env!("CARGO_BIN_EXE_ckpt"))
                .args(["export", "--step", "1", "--run", run, "--out"])
                .arg(&out)
                .arg(dir.path()),
        );
        assert!(
            export.status.success(),
            "{}",
            String::from_utf8_lossy(&export.stderr)
        );
        files.push((out, tensors, bf16));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_safetensors.py");
    let out = common::run(
        Command::new(python())
            .arg(script)
            .args(files.iter().map(|f| &f.0)),
    );
    assert!(
        out.status.success(),
        "the Python reader failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for (path, tensors, bf16) in &files {
        let seen: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|v| v["file"] == path.to_str().expect("utf-8"))
            .collect();
        let names: Vec<&str> = seen.iter().filter_map(|v| v["name"].as_str()).collect();
        let want: Vec<&str> = tensors.keys().copied().collect();
        assert_eq!(names, want, "{}", path.display());
        for v in seen {
            let name = v["name"].as_str().expect("name");
            let t = &tensors[name];
            let what = format!("{} `{name}`: {v}", path.display());
            assert_eq!(v["load_file"], !bf16, "{what}");
            assert_eq!(
                v["dtype"],
                serde_json::to_value(t.dtype).expect("dtype"),
                "{what}"
            );
            let shape: Vec<u64> = serde_json::from_value(v["shape"].clone()).expect("shape");
            assert_eq!(shape, t.shape, "{what}");
            let hex: String = t.bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert!(v["hex"] == hex.as_str(), "{what}: bytes differ");
            if t.dtype == DType::BF16 {
                assert_eq!(v["as_f32_first"], f64::from(wide[0]), "{what}");
            }
        }
    }
}
