//! Fuzzes the manifest parsers: `MANIFEST.json` and `rank-<r>.json` are
//! read from storage and untrusted. Parsing must never panic, and whatever
//! parses must serialize back to a document that parses again.

#![no_main]

use ckpt_core::{Manifest, RankManifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse("MANIFEST.json", data) {
        let again = Manifest::parse("MANIFEST.json", &m.to_json());
        assert!(
            again.is_ok(),
            "a parsed manifest does not re-parse: {again:?}"
        );
    }
    if let Ok(r) = RankManifest::parse("rank-00000.json", data) {
        let again = RankManifest::parse("rank-00000.json", &r.to_json());
        assert!(
            again.is_ok(),
            "a parsed rank manifest does not re-parse: {again:?}"
        );
    }
});
