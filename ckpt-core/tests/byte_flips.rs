//! Every byte of a committed checkpoint is covered: a change of any single
//! byte of any file of a committed step (tensor data, the shard file's
//! safetensors header, the rank manifest, `MANIFEST.json`) is either
//! detected (verification fails and restore skips the step, falling back
//! to the previous one) or provably harmless (restore returns the same
//! step with bit-identical bytes and loop state).
//!
//! The manifests and the shard header are flipped at every byte; tensor
//! data at a sample of positions (every chunk, both ends of each).

use std::sync::Arc;

use ckpt_core::{
    CheckpointStore, Checkpointer, MemoryTier, RestoreOptions, TensorMut, TensorRef, Tier,
    TierPolicy, TrainingState, format::layout, store,
};

const RUN: &str = "flips";

fn floats(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 * 1e-6)
        .collect()
}

struct Fixture {
    tier: MemoryTier,
    /// The pristine objects of step 2.
    pristine: Vec<(String, Vec<u8>)>,
    w2: Vec<f32>,
    m2: Vec<f32>,
    rt: tokio::runtime::Runtime,
    store: CheckpointStore,
}

fn save(ckpt: &Checkpointer, step: u64, w: &[f32], m: &[f32]) {
    let tw = TensorRef::from_slice("model.w", &[64, 80], w);
    let tm = TensorRef::from_slice("adam.m.model.w", &[64, 80], m);
    let state = TrainingState::builder(step)
        .model([&tw])
        .optimizer([&tm])
        .rng(&[step, 11])
        .data_loader(&(step * 64))
        .lr_schedule(&1e-3)
        .build()
        .expect("state");
    ckpt.save(&state).expect("save").wait().expect("durable");
}

fn fixture() -> Fixture {
    let tier = MemoryTier::new();
    let ckpt = Checkpointer::builder(RUN)
        .tier(Arc::new(tier.clone()), TierPolicy::keep_last(3))
        // Several chunks per tensor, so flips land in different chunks.
        .chunk_size(4096)
        .build()
        .expect("build");
    save(&ckpt, 1, &floats(5120, 1), &floats(5120, 2));
    let (w2, m2) = (floats(5120, 3), floats(5120, 4));
    save(&ckpt, 2, &w2, &m2);
    drop(ckpt);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = format!("{}/", layout::step_dir(RUN, 2));
    let pristine = rt
        .block_on(tier.list(&dir))
        .expect("list")
        .into_iter()
        .map(|o| {
            let bytes = rt.block_on(tier.get(&o.path)).expect("get").to_vec();
            (o.path, bytes)
        })
        .collect::<Vec<_>>();
    assert_eq!(
        pristine.len(),
        3,
        "MANIFEST, rank manifest, shard: {pristine:?}"
    );
    Fixture {
        store: CheckpointStore::new(Arc::new(tier.clone())).expect("store"),
        tier,
        pristine,
        w2,
        m2,
        rt,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Restored step 2, bit-identical: the flip changed nothing that
    /// matters.
    Harmless,
    /// Verification failed and restore fell back to step 1.
    Detected,
}

impl Fixture {
    fn reset(&self) {
        for (path, bytes) in &self.pristine {
            self.tier.tamper(path, |b| b.clone_from(bytes));
        }
    }

    /// Flips `mask` into byte `at` of `path`, then verifies and restores.
    fn flip(&self, path: &str, at: usize, mask: u8) -> Outcome {
        self.reset();
        assert!(self.tier.tamper(path, |b| b[at] ^= mask));
        let verified = match self.rt.block_on(store::load_manifest(&self.tier, RUN, 2)) {
            Ok(m) => self.rt.block_on(store::verify_step(&self.tier, &m)).is_ok(),
            Err(_) => false,
        };
        let (mut w, mut m) = (vec![0f32; 5120], vec![0f32; 5120]);
        let mut tw = TensorMut::from_slice("model.w", &[64, 80], &mut w);
        let mut tm = TensorMut::from_slice("adam.m.model.w", &[64, 80], &mut m);
        let r = self
            .store
            .restore(
                RUN,
                &mut [&mut tw, &mut tm],
                &RestoreOptions::default().threads(1),
            )
            .unwrap_or_else(|e| panic!("{path} byte {at} ^ {mask:#04x}: restore failed: {e}"))
            .expect("a checkpoint");
        let what = format!("{path} byte {at} ^ {mask:#04x}");
        match r.step {
            2 => {
                assert!(
                    verified,
                    "{what}: restore used step 2 but verify fails on it"
                );
                assert!(
                    w == self.w2 && m == self.m2,
                    "{what}: restore returned step 2 with different bytes"
                );
                assert_eq!(
                    r.loop_state.data_loader::<u64>().expect("loader"),
                    128,
                    "{what}"
                );
                Outcome::Harmless
            }
            1 => {
                assert!(
                    !verified,
                    "{what}: verify passes but restore skipped step 2"
                );
                assert!(
                    r.skipped.iter().any(|s| s.step == Some(2)),
                    "{what}: {:?}",
                    r.skipped
                );
                Outcome::Detected
            }
            s => panic!("{what}: restored step {s}"),
        }
    }
}

/// A deterministic non-zero byte for position `at`.
fn mask(at: usize, salt: u64) -> u8 {
    let mut z = (at as u64)
        .wrapping_add(salt)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z ^= z >> 29;
    (z as u8) | 1
}

#[test]
fn every_manifest_and_header_byte_is_covered() {
    let f = fixture();
    let mut counts = std::collections::BTreeMap::<(String, &str), usize>::new();
    for (path, bytes) in f.pristine.clone() {
        let mut name = path.rsplit('/').next().unwrap_or_default().to_string();
        // Manifests: every byte. Shard file: every header byte.
        let span = if name.ends_with(".safetensors") {
            name = "shard".to_string();
            let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            8 + n as usize
        } else {
            bytes.len()
        };
        for at in 0..span {
            let o = f.flip(&path, at, mask(at, 1));
            *counts
                .entry((
                    name.clone(),
                    match o {
                        Outcome::Harmless => "harmless",
                        Outcome::Detected => "detected",
                    },
                ))
                .or_default() += 1;
        }
    }
    eprintln!("{counts:?}");
    // Every byte the restore reads is detected when flipped.
    for name in ["MANIFEST.json", "shard"] {
        assert!(
            counts.contains_key(&(name.to_string(), "detected")),
            "no flip of {name} was tried: {counts:?}"
        );
        assert!(
            !counts.contains_key(&(name.to_string(), "harmless")),
            "a flip in {name} went unnoticed: {counts:?}"
        );
    }
}

#[test]
fn tensor_data_flips_are_detected() {
    let f = fixture();
    let (path, bytes) = f
        .pristine
        .iter()
        .find(|(p, _)| p.ends_with(".safetensors"))
        .cloned()
        .expect("shard");
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut positions = vec![header, bytes.len() - 1];
    for chunk_start in (header..bytes.len()).step_by(4096) {
        positions.extend([chunk_start, chunk_start + 1, chunk_start + 2049]);
        positions.push((chunk_start + 4095).min(bytes.len() - 1));
    }
    positions.retain(|&p| p < bytes.len());
    for (i, at) in positions.iter().enumerate() {
        assert_eq!(
            f.flip(&path, *at, mask(*at, i as u64 + 7)),
            Outcome::Detected,
            "data byte {at}"
        );
    }
}
