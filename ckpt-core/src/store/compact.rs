//! Compaction: the chunks a kept step points at in steps that retention
//! deletes are copied into a file of the kept step's own, so those steps
//! can go and reference chains stay short.
//!
//! Crash safety, step by step: the copies are written and made durable
//! first (a crash leaves a file nothing names, removed by the next
//! compaction), then the step's MANIFEST is replaced atomically
//! (`PutMode::Overwrite`) by one whose chunk maps name the copies; only
//! then may gc delete the older steps, MANIFEST first. At every point each
//! committed step's references name bytes that exist.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::layout;
use crate::format::manifest::{ChunkLoc, Manifest};
use crate::store::retention::Retention;
use crate::tier::{PutMode, Tier};

/// What a compaction did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactReport {
    /// Kept steps whose chunk maps changed.
    pub compacted_steps: Vec<u64>,
    /// Chunks copied into kept steps' compaction files, and their stored
    /// bytes.
    pub copied_chunks: u64,
    /// Stored bytes copied.
    pub copied_bytes: u64,
    /// Chunks pointed at a copy an older kept step already made.
    pub redirected_chunks: u64,
    /// Compaction files of earlier, interrupted compactions removed.
    pub removed_stale_files: usize,
}

/// Compacts the steps of `run` that `retention` keeps: every chunk they
/// point at in a step it would delete is copied (verified against its
/// crc32c first, compressed frames as stored) into the oldest kept step
/// that needs it, and the newer kept steps point at that copy. Run
/// [`gc`](crate::store::gc) afterwards to delete the steps no longer
/// referenced.
///
/// Run it while the run is not saving: a save in flight may still point at
/// a step the following gc deletes (its commit then fails on that tier,
/// naming the step, and the tier's next save is whole).
pub async fn compact(tier: &dyn Tier, run: &str, retention: &Retention) -> Result<CompactReport> {
    retention.validate()?;
    let objects = tier.list(&format!("{run}/")).await?;
    let mut committed = crate::store::listing::manifest_steps(&objects, run);
    if objects.iter().any(|o| o.path == layout::lineage_path(run)) {
        let lineage = crate::store::lineage::read_or_infer(tier, run).await?;
        committed = crate::store::lineage::current(tier, run, committed, &lineage).await;
    }
    let (kept, _) = retention.select(&committed);
    let keep: BTreeSet<u64> = kept.iter().copied().collect();
    let mut report = CompactReport::default();
    // Where each chunk copied so far now is, by where it was, and where
    // every chunk of the kept steps compacted so far is, by content (so a
    // rerun after an interrupted compaction points at the copies the first
    // run made rather than copying again).
    let mut moved = Moved::default();
    for &step in &kept {
        let mut m = match crate::store::load_manifest(tier, run, step).await {
            Ok(m) => m,
            // A damaged step is no base for anything; leave it to verify.
            Err(e) if e.is_data_fault() => {
                tracing::warn!(step, error = %e, "not compacting an unreadable step");
                continue;
            }
            Err(e) => return Err(e),
        };
        report.removed_stale_files += remove_stale(tier, &objects, &m).await?;
        let (changed, copied) = compact_step(tier, &mut m, &keep, &mut moved, &mut report).await?;
        moved.learn(&m);
        if changed {
            let path = layout::manifest_path(run, step);
            tier.put(&path, Bytes::from(m.to_json()?), PutMode::Overwrite)
                .await?;
            report.compacted_steps.push(step);
            tracing::info!(step, copied, "compacted");
        }
    }
    Ok(report)
}

/// Where chunks that kept steps hold are.
#[derive(Default)]
struct Moved {
    /// By where the chunk was before it was copied.
    from: HashMap<(u64, String, u64), ChunkLoc>,
    /// By content: blake3 (hex) and length.
    content: HashMap<(String, u64), ChunkLoc>,
}

impl Moved {
    /// Where `p`'s chunk `k`, pointing at `loc`, can point instead.
    fn find(
        &self,
        loc: &ChunkLoc,
        p: &crate::format::manifest::Piece,
        k: usize,
        len: u64,
    ) -> Option<ChunkLoc> {
        if let Some(s) = loc.step
            && let Some(new) = self.from.get(&(s, loc.file.clone(), loc.offset))
        {
            return Some(new.clone());
        }
        let hash = p.chunk_blake3.get(k)?;
        self.content.get(&(hash.clone(), len)).cloned()
    }

    /// Records every chunk of the compacted step `m` by its content.
    fn learn(&mut self, m: &Manifest) {
        let cs = m.chunk_size;
        for p in m.tensors.values().flat_map(|t| &t.pieces) {
            for (k, hash) in p.chunk_blake3.iter().enumerate() {
                let at = k as u64 * cs;
                let len = cs.min(p.length.saturating_sub(at));
                let loc = match p.chunks.get(k) {
                    Some(c) => ChunkLoc {
                        step: Some(c.step.unwrap_or(m.step)),
                        ..c.clone()
                    },
                    None if p.chunks.is_empty() => ChunkLoc {
                        step: Some(m.step),
                        file: p.file.clone(),
                        offset: p.offset + at,
                        zstd: None,
                        planes: 0,
                    },
                    None => continue,
                };
                self.content.entry((hash.clone(), len)).or_insert(loc);
            }
        }
    }
}

/// Copies or redirects `m`'s chunks that point outside `keep`; returns
/// whether its chunk maps changed and the stored bytes it copied.
async fn compact_step(
    tier: &dyn Tier,
    m: &mut Manifest,
    keep: &BTreeSet<u64>,
    moved: &mut Moved,
    report: &mut CompactReport,
) -> Result<(bool, u64)> {
    let (run, step, cs) = (m.run.clone(), m.step, m.chunk_size);
    let file = layout::compact_file(&layout::new_attempt(&m.incarnation, step));
    let path = format!("{}/{file}", layout::step_dir(&run, step));
    let mut writer = None;
    let mut at = 0u64;
    let mut changed = false;
    for (name, t) in m.tensors.iter_mut() {
        for p in t.pieces.iter_mut() {
            for k in 0..p.chunks.len() {
                let loc = p.chunks[k].clone();
                let Some(from) = loc.step.filter(|s| *s != step && !keep.contains(s)) else {
                    continue;
                };
                let key = (from, loc.file.clone(), loc.offset);
                let start = k as u64 * cs;
                let len = cs.min(p.length - start);
                if let Some(new) = moved.find(&loc, p, k, len) {
                    p.chunks[k] = new;
                    report.redirected_chunks += 1;
                    changed = true;
                    continue;
                }
                // Read and verify the chunk before it is copied: a bad
                // chunk is named here, never spread into a kept step.
                let spans = p.spans(&run, step, cs, start, start + len);
                let mut plain = vec![0u8; len as usize];
                crate::restore::read::read_spans(tier, &spans, &mut plain).await?;
                crate::restore::read::verify_spans(&spans, &plain, cs, &p.crc32c).map_err(|e| {
                    Error::Incomplete {
                        path: format!("{}/{}", layout::step_dir(&run, from), loc.file),
                        reason: format!(
                            "chunk {k} of tensor `{name}` (step {step} points at it): {e}"
                        ),
                    }
                })?;
                let stored = match loc.zstd {
                    None => Bytes::from(plain),
                    Some(z) => {
                        let src = format!("{}/{}", layout::step_dir(&run, from), loc.file);
                        tier.get_range(&src, loc.offset..loc.offset + z).await?
                    }
                };
                if writer.is_none() {
                    writer = Some(tier.create(&path).await?);
                }
                let n = stored.len() as u64;
                if let Some(w) = writer.as_mut()
                    && let Err(e) = w.write(stored).await
                {
                    if let Some(w) = writer.take() {
                        let _ = w.abort().await;
                    }
                    return Err(e);
                }
                let new = ChunkLoc {
                    step: None,
                    file: file.clone(),
                    offset: at,
                    ..loc
                };
                at += n;
                moved.from.insert(
                    key,
                    ChunkLoc {
                        step: Some(step),
                        ..new.clone()
                    },
                );
                p.chunks[k] = new;
                report.copied_chunks += 1;
                report.copied_bytes += n;
                changed = true;
            }
        }
    }
    if let Some(w) = writer {
        // Durable before any manifest names it.
        w.finish().await?;
    }
    Ok((changed, at))
}

/// Removes the compaction files in `m`'s step directory that `m` does not
/// name, and unfinished ones (left by a compaction that stopped before its
/// manifest was replaced).
async fn remove_stale(
    tier: &dyn Tier,
    objects: &[crate::tier::ObjectMeta],
    m: &Manifest,
) -> Result<usize> {
    let dir = format!("{}/", layout::step_dir(&m.run, m.step));
    let named: BTreeSet<&str> = m
        .tensors
        .values()
        .flat_map(|t| &t.pieces)
        .flat_map(|p| &p.chunks)
        .filter(|c| c.step.is_none())
        .map(|c| c.file.as_str())
        .collect();
    let mut removed = 0;
    for o in objects {
        let Some(name) = o.path.strip_prefix(&dir) else {
            continue;
        };
        // Its hidden temporaries too (a local tier's unfinished writes).
        let stale = (layout::is_compact_file(name) && !named.contains(name))
            || name.starts_with(".compact.");
        if stale {
            match tier.delete(&o.path).await {
                Ok(()) | Err(Error::NotFound { .. }) => removed += 1,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}
