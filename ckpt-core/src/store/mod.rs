//! The checkpoint store on one tier: listing, loading manifests, deleting
//! and garbage collection. Everything here follows the layout of
//! [`layout`] and the commit rule: a step exists iff its
//! `MANIFEST.json` exists and parses.

pub(crate) mod events;
pub(crate) mod retention;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::layout::{self, MANIFEST};
use crate::format::manifest::{HeaderSum, Manifest};
use crate::store::retention::Retention;
use crate::tier::Tier;

/// Committed steps of `run` on `tier`, ascending. A MANIFEST that is present
/// but does not parse is not filtered here (listing does not read it);
/// loading it fails and restore falls back.
pub async fn committed_steps(tier: &dyn Tier, run: &str) -> Result<Vec<u64>> {
    let objects = tier.list(&format!("{run}/")).await?;
    let mut steps: Vec<u64> = objects
        .iter()
        .filter_map(|o| layout::parse_path(&o.path))
        .filter(|(r, _, rest)| *r == run && *rest == MANIFEST)
        .map(|(_, s, _)| s)
        .collect();
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

/// Runs that have at least one committed step, sorted.
pub async fn runs(tier: &dyn Tier) -> Result<Vec<String>> {
    let objects = tier.list("").await?;
    let set: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| layout::parse_path(&o.path))
        .filter(|(_, _, rest)| *rest == MANIFEST)
        .map(|(r, _, _)| r.to_string())
        .collect();
    Ok(set.into_iter().collect())
}

/// Loads and validates the manifest of `step`, and checks that it describes
/// this run and step.
pub async fn load_manifest(tier: &dyn Tier, run: &str, step: u64) -> Result<Manifest> {
    let path = layout::manifest_path(run, step);
    let bytes = tier.get(&path).await?;
    let m = Manifest::parse(&path, &bytes)?;
    if m.run != run || m.step != step {
        return Err(Error::manifest(
            &path,
            format!("describes run {} step {}", m.run, m.step),
        ));
    }
    Ok(m)
}

/// Checks that every shard file the manifest names exists with the length
/// the manifest recorded, and that its header matches its recorded crc32c.
pub async fn check_files(tier: &dyn Tier, m: &Manifest) -> Result<()> {
    check_rank_files(tier, m, |_| true).await
}

/// Like [`check_files`], for the ranks `wanted` selects only (a restore
/// checks the files it will read, so one rank can restore its shard while
/// another rank's replica is gone). Reading the header costs one small
/// read per file.
pub async fn check_rank_files(
    tier: &dyn Tier,
    m: &Manifest,
    wanted: impl Fn(u32) -> bool,
) -> Result<()> {
    let dir = layout::step_dir(&m.run, m.step);
    for r in m.ranks.iter().filter(|r| wanted(r.rank)) {
        let path = format!("{dir}/{}", r.file);
        let size = tier.size(&path).await?;
        if size != r.file_len {
            return Err(Error::Incomplete {
                path,
                reason: format!("file is {size} bytes, the manifest says {}", r.file_len),
            });
        }
        if let Some(h) = r.header {
            check_header(tier, &path, h).await?;
        }
    }
    Ok(())
}

/// Reads a shard file's header and checks its crc32c.
pub async fn check_header(tier: &dyn Tier, path: &str, h: HeaderSum) -> Result<()> {
    let len = usize::try_from(h.len).map_err(|_| Error::manifest(path, "header too large"))?;
    let mut buf = vec![0u8; len];
    tier.read_into(path, 0, &mut buf).await?;
    let found = crc32c::crc32c(&buf);
    if found != h.crc32c {
        return Err(Error::CorruptHeader {
            path: path.to_string(),
            expected: h.crc32c,
            found,
        });
    }
    Ok(())
}

/// Deletes one step: MANIFEST first (uncommit), then everything else.
pub async fn delete_step(tier: &dyn Tier, run: &str, step: u64) -> Result<usize> {
    let dir = layout::step_dir(run, step);
    tier.delete(&layout::manifest_path(run, step)).await?;
    let objects = tier.list(&format!("{dir}/")).await?;
    for o in &objects {
        tier.delete(&o.path).await?;
    }
    Ok(objects.len() + 1)
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Committed steps deleted by the retention policy.
    pub deleted_steps: Vec<u64>,
    /// Uncommitted steps (crash leftovers) removed.
    pub removed_leftovers: Vec<u64>,
    /// Committed steps kept.
    pub kept_steps: Vec<u64>,
}

/// Applies `retention` to `run` and removes crash leftovers: uncommitted
/// step directories older than the newest committed step. Uncommitted
/// steps newer than it may belong to a save in progress and are left alone.
pub async fn gc(tier: &dyn Tier, run: &str, retention: &Retention) -> Result<GcReport> {
    let objects = tier.list(&format!("{run}/")).await?;
    let mut by_step: BTreeMap<u64, bool> = BTreeMap::new();
    for (r, s, rest) in objects.iter().filter_map(|o| layout::parse_path(&o.path)) {
        if r == run {
            *by_step.entry(s).or_default() |= rest == MANIFEST;
        }
    }
    let committed: Vec<u64> = by_step
        .iter()
        .filter(|(_, c)| **c)
        .map(|(s, _)| *s)
        .collect();
    let newest = committed.last().copied();
    let (kept_steps, deleted_steps) = retention.select(&committed);
    let mut report = GcReport {
        kept_steps,
        ..Default::default()
    };
    for s in deleted_steps {
        delete_step(tier, run, s).await?;
        report.deleted_steps.push(s);
    }
    if let Some(newest) = newest {
        for (&s, &c) in &by_step {
            if !c && s < newest {
                delete_step(tier, run, s).await?;
                report.removed_leftovers.push(s);
            }
        }
    }
    Ok(report)
}

/// A tier shared behind an `Arc`, as the pipeline holds them.
pub type SharedTier = Arc<dyn Tier>;
