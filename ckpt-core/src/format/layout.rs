//! Where things live inside a tier: the one place that knows the naming
//! scheme `<run>/step-<20 digits>/{MANIFEST.json, rank-<r>.json,
//! rank-<r>.<attempt>.safetensors}`.
//!
//! A shard's file name carries the save attempt that wrote it (12 hex
//! digits, fresh for every save), and the manifests record it: a writer
//! left over from an earlier incarnation, still flushing the same step,
//! writes a file no manifest names, and can never overwrite the bytes a
//! committed step points at.

use crate::error::{Error, Result};

/// Name of the commit marker. A checkpoint exists on a tier iff this object
/// exists in its step directory and parses.
pub const MANIFEST: &str = "MANIFEST.json";

/// Name of the marker the coordinator leaves in a step directory when it
/// gives up on committing the step (replicas that differ, ranks missing):
/// the other ranks stop waiting, and `ckpt ls` shows the refused step.
pub const ABORTED: &str = "ABORTED.json";

/// The run's record of rollbacks (`<run>/LINEAGE.json`).
pub fn lineage_path(run: &str) -> String {
    format!("{run}/LINEAGE.json")
}

/// Checks that a run name is safe as a path component.
pub fn validate_run(run: &str) -> Result<()> {
    let ok = !run.is_empty()
        && run.len() <= 128
        && !run.starts_with('.')
        && run
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidPath {
            path: run.to_string(),
            reason:
                "a run name must be 1..=128 characters of [A-Za-z0-9._-] and not start with `.`"
                    .into(),
        })
    }
}

/// `<run>/step-<step>` with the step zero-padded to 20 digits so that
/// lexicographic order is numeric order.
pub fn step_dir(run: &str, step: u64) -> String {
    format!("{run}/step-{step:020}")
}

/// Path of the commit marker of `step`.
pub fn manifest_path(run: &str, step: u64) -> String {
    format!("{}/{MANIFEST}", step_dir(run, step))
}

/// File name of a rank's shard written by save attempt `attempt`
/// (relative to the step directory).
pub fn rank_data_file(rank: u32, attempt: &str) -> String {
    format!("rank-{rank:05}.{}.safetensors", path_component(attempt))
}

/// A file that compaction wrote into a kept step's directory: the chunks
/// that step pointed at in steps retention deletes, copied as stored.
pub fn compact_file(attempt: &str) -> String {
    format!("compact.{}.chunks", path_component(attempt))
}

/// Whether `name` is a file [`compact_file`] names.
pub fn is_compact_file(name: &str) -> bool {
    name.starts_with("compact.") && name.ends_with(".chunks")
}

/// The `file` a rank manifest records for a replica it holds but does
/// not write: the writer's file, whose name the merge takes from the
/// writer's own manifest.
pub fn held_piece_file(writer: u32) -> String {
    format!("rank-{writer:05}.held")
}

/// Whether `name` (a file name in a step directory) is a shard file of
/// `rank`, written by any attempt.
pub fn is_rank_data_file(name: &str, rank: u32) -> bool {
    name.strip_prefix(&format!("rank-{rank:05}."))
        .and_then(|rest| rest.strip_suffix(".safetensors"))
        .is_some_and(|attempt| !attempt.is_empty() && !attempt.contains(['/', '.']))
}

/// A fresh save-attempt id: 12 hex digits from the incarnation, the step,
/// the process, the clock and a process-wide counter.
pub fn new_attempt(incarnation: &str, step: u64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(incarnation.as_bytes());
    h.update(&step.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&nanos.to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.finalize().to_hex()[..12].to_string()
}

/// File name of a rank's own manifest (relative to the step directory).
pub fn rank_manifest_file(rank: u32) -> String {
    format!("rank-{rank:05}.json")
}

/// File name (relative to the step directory) of the audit copy of a
/// MANIFEST that a resumed run uncommitted: the run went on from an older
/// step, this one is not part of its lineage.
pub fn abandoned_manifest_file(incarnation: &str) -> String {
    format!("MANIFEST.abandoned-{}.json", path_component(incarnation))
}

/// An incarnation (or any name) as one path component: ASCII letters,
/// digits, `-`, `_` and `.` kept, anything else `_`.
pub fn path_component(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Directory of the restore agreement's files of one incarnation
/// (`<run>/agree/<incarnation>`).
pub fn agreement_dir(run: &str, incarnation: &str) -> String {
    format!("{run}/agree/{}", path_component(incarnation))
}

/// Parses `<run>/step-<digits>/<rest>` into `(run, step, rest)`.
pub fn parse_path(path: &str) -> Option<(&str, u64, &str)> {
    let (run, tail) = path.split_once('/')?;
    let (dir, rest) = tail.split_once('/')?;
    let digits = dir.strip_prefix("step-")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((run, digits.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_sort_numerically() {
        let p = manifest_path("run-a", 42);
        assert_eq!(p, "run-a/step-00000000000000000042/MANIFEST.json");
        assert_eq!(parse_path(&p), Some(("run-a", 42, MANIFEST)));
        assert!(manifest_path("r", 9) < manifest_path("r", 10));
        assert_eq!(parse_path("r/step-12/MANIFEST.json"), None);
        assert!(validate_run("../etc").is_err());
        assert!(validate_run("a/b").is_err());
        validate_run("llama-7b_v2.1").expect("valid run name");
    }

    #[test]
    fn data_files_name_their_attempt() {
        let a = new_attempt("inc", 7);
        let b = new_attempt("inc", 7);
        assert_ne!(a, b, "two attempts at one step get two names");
        assert_eq!(a.len(), 12);
        let f = rank_data_file(3, &a);
        assert!(is_rank_data_file(&f, 3), "{f}");
        assert!(!is_rank_data_file(&f, 4), "{f}");
        assert!(!is_rank_data_file("rank-00003.json", 3));
        assert!(!is_rank_data_file("rank-00003.safetensors", 3));
    }
}
