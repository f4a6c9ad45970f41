//! The parsers of untrusted input (`Manifest::parse`, `RankManifest::parse`,
//! `shard_file::parse_header`) return errors, never panic, on arbitrary
//! bytes, on valid documents with flipped bytes, and on valid documents whose
//! numbers, arrays and strings were replaced by extreme values. The same
//! inputs drive the cargo-fuzz targets in `fuzz/`.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use ckpt_core::{
    Checkpointer, DType, Manifest, MemoryTier, RankManifest, ShardSpec, TensorRef, Tier,
    TierPolicy, TrainingState, format::layout, format::shard_file,
};
use proptest::prelude::*;
use serde_json::Value;

/// A real two-rank checkpoint's `MANIFEST.json` and rank manifests, and a
/// shard header.
struct Seeds {
    manifest: Vec<u8>,
    ranks: Vec<Vec<u8>>,
    header: Vec<u8>,
}

static SEEDS: LazyLock<Seeds> = LazyLock::new(|| {
    let tier = MemoryTier::new();
    std::thread::scope(|s| {
        for rank in 0..2u32 {
            let tier = tier.clone();
            s.spawn(move || {
                let ckpt = Checkpointer::builder("fuzz")
                    .tier(Arc::new(tier), TierPolicy::keep_last(2))
                    .rank(rank, 2)
                    .chunk_size(4096)
                    .build()
                    .expect("checkpointer");
                let shard = ShardSpec::split(vec![6, 3000], 0, 2, u64::from(rank)).expect("split");
                let w = vec![rank as f32; (shard.numel()) as usize];
                let b = vec![7u8; 10];
                let scalar = [1.5f64];
                let tw = TensorRef::from_slice("w", &shard.shape.clone(), &w).with_shard(shard);
                let tb = TensorRef::from_slice(format!("b{rank}"), &[10], &b);
                let ts = TensorRef::from_slice(format!("s{rank}"), &[], &scalar);
                let state = TrainingState::builder(5)
                    .model([&tw, &tb])
                    .optimizer([&ts])
                    .rng(&[rank])
                    .data_loader(&5u64)
                    .lr_schedule(&0.1f64)
                    .build()
                    .expect("state");
                ckpt.save(&state).expect("save").wait().expect("durable");
            });
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = layout::step_dir("fuzz", 5);
    let manifest = rt
        .block_on(tier.get(&layout::manifest_path("fuzz", 5)))
        .expect("manifest")
        .to_vec();
    let ranks = (0..2)
        .map(|r| {
            rt.block_on(tier.get(&format!("{dir}/{}", layout::rank_manifest_file(r))))
                .expect("rank manifest")
                .to_vec()
        })
        .collect();
    let meta = BTreeMap::from([("run".to_string(), "fuzz".to_string())]);
    let header = shard_file::layout(
        &[
            ("a", DType::F32, &[2, 3][..]),
            ("b", DType::U8, &[5][..]),
            ("s", DType::F64, &[][..]),
            ("e", DType::BF16, &[0, 4][..]),
        ],
        &meta,
    )
    .expect("layout")
    .header;
    Seeds {
        manifest,
        ranks,
        header,
    }
});

/// Parses `bytes` as both manifests, as they are and resealed (so that a
/// mutation reaches the JSON validation behind the self-checksum): never
/// panics, and what parses serializes back to a document that parses
/// again.
fn parse_manifests(bytes: &[u8]) {
    for doc in [bytes.to_vec(), ckpt_core::format::manifest::seal(bytes)] {
        if let Ok(m) = Manifest::parse("m", &doc) {
            let json = m.to_json().expect("serializes");
            Manifest::parse("m", &json).expect("a parsed manifest re-parses");
        }
        if let Ok(r) = RankManifest::parse("r", &doc) {
            let json = r.to_json().expect("serializes");
            RankManifest::parse("r", &json).expect("a parsed rank manifest re-parses");
        }
    }
}

/// Parses a shard header: never panics, and every tensor it accepts lies
/// after the length prefix and inside the file.
fn parse_header(bytes: &[u8], len: u64) {
    if let Ok((tensors, _)) = shard_file::parse_header("h", bytes, len) {
        for t in tensors {
            assert!(
                t.range.start >= 8 && t.range.start <= t.range.end && t.range.end <= len,
                "tensor `{}` at {:?} outside a file of {len} bytes",
                t.name,
                t.range
            );
        }
    }
}

fn parse_all(bytes: &[u8]) {
    parse_manifests(bytes);
    for len in [0, bytes.len() as u64, bytes.len() as u64 + 4096, u64::MAX] {
        parse_header(bytes, len);
    }
}

const EXTREMES: [u64; 10] = [
    0,
    1,
    3,
    4095,
    4096,
    1 << 30,
    u32::MAX as u64,
    (u32::MAX as u64) + 1,
    1 << 63,
    u64::MAX,
];

/// Replaces the nodes of `v` whose depth-first index is in `picks` (modulo
/// the node count) with something hostile chosen by the pick's byte.
fn mutate(v: &mut Value, picks: &[(usize, u8)]) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, k: &mut usize, target: usize, op: u8) {
        if *k == target {
            *v = match (v.take(), op % 8) {
                (_, 0) => Value::from(EXTREMES[op as usize % EXTREMES.len()]),
                (_, 1) => Value::from(-1i64),
                (_, 2) => Value::Null,
                (Value::Array(mut a), 3) => {
                    a.pop();
                    Value::Array(a)
                }
                (Value::Array(mut a), 4) => {
                    if let Some(x) = a.first().cloned() {
                        a.push(x);
                    }
                    Value::Array(a)
                }
                (_, 5) => Value::from("../../etc"),
                (_, 6) => Value::Array(vec![Value::from(u64::MAX); 3]),
                (old, _) => old,
            };
            *k += 1;
            return;
        }
        *k += 1;
        match v {
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, k, target, op)),
            Value::Object(o) => o.values_mut().for_each(|x| walk(x, k, target, op)),
            _ => {}
        }
    }
    for &(i, op) in picks {
        let n = count(v);
        let mut k = 0;
        walk(v, &mut k, i % n, op);
    }
}

fn header_json(header: &[u8]) -> Value {
    serde_json::from_slice(header[8..].trim_ascii_end()).expect("header json")
}

fn with_prefix(json: &[u8], prefix: u64) -> Vec<u8> {
    let mut out = prefix.to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        parse_all(&bytes);
    }

    #[test]
    fn json_like_bytes_never_panic(s in r#"\{("[a-z_]{1,12}":(-?[0-9]{1,22}|\[[0-9,]{0,40}\]|"[a-z]{0,5}"|null|\{\}),?){0,8}\}"#) {
        parse_all(s.as_bytes());
        parse_all(&with_prefix(s.as_bytes(), s.len() as u64));
    }

    #[test]
    fn flipped_bytes_in_valid_documents_never_panic(
        which in 0usize..4,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let seeds = &*SEEDS;
        let mut doc = match which {
            0 => seeds.manifest.clone(),
            1 | 2 => seeds.ranks[which - 1].clone(),
            _ => seeds.header.clone(),
        };
        for (at, b) in flips {
            let i = at.index(doc.len());
            doc[i] = b;
        }
        parse_all(&doc);
    }

    #[test]
    fn hostile_values_in_valid_manifests_never_panic(
        which in 0usize..3,
        picks in prop::collection::vec((any::<usize>(), any::<u8>()), 1..5),
    ) {
        let seeds = &*SEEDS;
        let doc = if which == 0 { &seeds.manifest } else { &seeds.ranks[which - 1] };
        let mut v: Value = serde_json::from_slice(doc).expect("seed json");
        mutate(&mut v, &picks);
        parse_manifests(&serde_json::to_vec(&v).expect("json"));
    }

    #[test]
    fn hostile_shard_headers_never_panic(
        picks in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        prefix in prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..64).prop_map(Some)],
        file_len in prop_oneof![Just(0u64), 0u64..20_000, Just(u64::MAX)],
    ) {
        let mut v = header_json(&SEEDS.header);
        mutate(&mut v, &picks);
        let json = serde_json::to_vec(&v).expect("json");
        let bytes = with_prefix(&json, prefix.unwrap_or(json.len() as u64));
        parse_header(&bytes, file_len);
    }
}

#[test]
fn seeds_are_valid() {
    let seeds = &*SEEDS;
    let m = Manifest::parse("m", &seeds.manifest).expect("manifest");
    assert_eq!((m.world_size, m.tensors["w"].pieces.len()), (2, 2));
    for r in &seeds.ranks {
        RankManifest::parse("r", r).expect("rank manifest");
    }
    let (tensors, _) = shard_file::parse_header("h", &seeds.header, u64::MAX).expect("header");
    assert_eq!(tensors.len(), 4);
    // `CKPT_FUZZ_SEEDS=fuzz/corpus` writes these documents as seeds for the
    // cargo-fuzz targets.
    if let Ok(dir) = std::env::var("CKPT_FUZZ_SEEDS") {
        let dir = std::path::Path::new(&dir);
        let write = |target: &str, name: &str, bytes: &[u8]| {
            let d = dir.join(target);
            std::fs::create_dir_all(&d).expect("seed dir");
            std::fs::write(d.join(name), bytes).expect("write seed");
        };
        write("manifest", "manifest.json", &seeds.manifest);
        for (r, bytes) in seeds.ranks.iter().enumerate() {
            write("manifest", &format!("rank-{r}.json"), bytes);
        }
        let mut h = (seeds.header.len() as u64 + 64).to_le_bytes().to_vec();
        h.extend_from_slice(&seeds.header);
        write("shard_header", "header.bin", &h);
    }
}
