//! Fuzzes the manifest parsers: `MANIFEST.json` and `rank-<r>.json` are
//! read from storage and untrusted. Parsing must never panic, and whatever
//! parses must serialize back to a document that parses again.

#![no_main]

use ckpt_core::{Manifest, RankManifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As read, and resealed so that mutations reach the JSON validation
    // behind the self-checksum.
    for doc in [data.to_vec(), ckpt_core::format::manifest::seal(data)] {
        if let Ok(m) = Manifest::parse("MANIFEST.json", &doc) {
            let json = m.to_json().expect("a parsed manifest serializes");
            let again = Manifest::parse("MANIFEST.json", &json);
            assert!(
                again.is_ok(),
                "a parsed manifest does not re-parse: {again:?}"
            );
        }
        if let Ok(r) = RankManifest::parse("rank-00000.json", &doc) {
            let json = r.to_json().expect("a parsed rank manifest serializes");
            let again = RankManifest::parse("rank-00000.json", &json);
            assert!(
                again.is_ok(),
                "a parsed rank manifest does not re-parse: {again:?}"
            );
        }
    }
});
