//! Garbage collection: retention applied to committed steps, and crash
//! leftovers removed. Deletion uncommits first (MANIFEST before data), so a
//! crash in the middle leaves an uncommitted leftover, never a committed
//! checkpoint with missing data.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::Result;
use crate::format::layout;
use crate::store::retention::Retention;
use crate::tier::Tier;

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
    /// Of those, the ones retention would have deleted but a kept step's
    /// chunks point into (incremental saves).
    pub kept_for_references: Vec<u64>,
    /// Files of earlier incarnations' restore agreements removed (only by
    /// the coordinator's retention after a commit, which knows the
    /// incarnation that is running).
    pub removed_agreement_files: usize,
}

/// What retention keeps and deletes of the committed `steps` of `run`:
/// `(kept, deleted, kept for references)`. A step whose files a kept
/// step's chunks point into (incremental saves) stays, whole and
/// committed: it is still a checkpoint of its own; references always name
/// the file holding the bytes, so nothing else needs to stay for it.
pub async fn select_with_references(
    tier: &dyn Tier,
    run: &str,
    steps: &[u64],
    retention: &Retention,
) -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
    let (mut kept, mut deleted) = retention.select(steps);
    // A step kept for references stays a checkpoint of its own: the steps
    // its chunks point into stay too, and theirs (to a fixed point).
    let mut for_references = Vec::new();
    let mut frontier = kept.clone();
    while !frontier.is_empty() {
        let referenced = referenced_by(tier, run, &frontier).await?;
        frontier.clear();
        deleted.retain(|s| {
            let keep = referenced.contains(s);
            if keep {
                for_references.push(*s);
                frontier.push(*s);
            }
            !keep
        });
    }
    for_references.sort_unstable();
    kept.extend(&for_references);
    kept.sort_unstable();
    Ok((kept, deleted, for_references))
}

/// The steps that the chunks of `kept` point into (incremental saves).
///
/// Only a MANIFEST proven damaged (its seal or its JSON refused) counts as
/// pointing into nothing: restore would never use it. Any other failure to
/// read one (an I/O error, a timeout, a server's 503, a peer that stopped
/// answering, a MANIFEST gone since the listing) is returned, and the
/// caller deletes nothing: a guess could delete what the newest checkpoint
/// needs.
async fn referenced_by(tier: &dyn Tier, run: &str, kept: &[u64]) -> Result<BTreeSet<u64>> {
    let mut referenced = BTreeSet::new();
    for &k in kept {
        match crate::store::load_manifest(tier, run, k).await {
            Ok(m) => referenced.extend(
                m.tensors
                    .values()
                    .flat_map(|t| t.pieces.iter().flat_map(|p| p.referenced_steps())),
            ),
            Err(e) if e.is_proven_corrupt() => {
                tracing::warn!(step = k, error = %e, "a kept step's MANIFEST is damaged: it points into nothing");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(referenced)
}

/// Applies `retention` to `run` and removes crash leftovers: uncommitted
/// step directories older than the newest committed step. Uncommitted
/// steps newer than it may belong to a save in progress and are left alone.
pub async fn gc(tier: &dyn Tier, run: &str, retention: &Retention) -> Result<GcReport> {
    gc_running(tier, run, retention, None, &|_, _| {}).await
}

/// [`gc`], calling `progress(step, bytes)` after each step it deletes
/// (retention's, then crash leftovers), with the bytes that step's files
/// held.
pub async fn gc_with_progress(
    tier: &dyn Tier,
    run: &str,
    retention: &Retention,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<GcReport> {
    gc_running(tier, run, retention, None, progress).await
}

/// [`gc`], run by the coordinator of incarnation `running` after a commit:
/// it also removes the restore-agreement files of every other incarnation
/// (every rank of `running` has agreed and is saving; earlier incarnations
/// are gone).
pub(crate) async fn gc_running(
    tier: &dyn Tier,
    run: &str,
    retention: &Retention,
    running: Option<&str>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<GcReport> {
    let objects = tier.list(&format!("{run}/")).await?;
    let mut stale_agreements = Vec::new();
    if let Some(inc) = running {
        let keep = format!("{}/", layout::agreement_dir(run, inc));
        let all = format!("{run}/agree/");
        stale_agreements = objects
            .iter()
            .filter(|o| o.path.starts_with(&all) && !o.path.starts_with(&keep))
            .map(|o| o.path.clone())
            .collect();
    }
    // Committed means committed in the current lineage: a step a rollback
    // abandoned is a leftover like an uncommitted one, even with its
    // MANIFEST still there.
    let mut committed = crate::store::listing::manifest_steps(&objects, run);
    if objects.iter().any(|o| o.path == layout::lineage_path(run)) {
        let lineage = crate::store::lineage::read_or_infer(tier, run).await?;
        committed = crate::store::lineage::current(tier, run, committed, &lineage).await;
    }
    let mut by_step: BTreeMap<u64, bool> = BTreeMap::new();
    let mut step_bytes: BTreeMap<u64, u64> = BTreeMap::new();
    for o in &objects {
        if let Some((r, s, _)) = layout::parse_path(&o.path)
            && r == run
        {
            *by_step.entry(s).or_default() |= committed.binary_search(&s).is_ok();
            *step_bytes.entry(s).or_default() += o.size;
        }
    }
    let bytes_of = |s: u64| step_bytes.get(&s).copied().unwrap_or(0);
    let newest = committed.last().copied();
    let (kept_steps, deleted_steps, kept_for_references) =
        select_with_references(tier, run, &committed, retention).await?;
    let mut report = GcReport {
        kept_steps,
        kept_for_references,
        ..Default::default()
    };
    // Newest first: chunks only point into older steps, so at every point
    // of the deletion (a crash included) each step still committed finds
    // the steps it points into.
    for &s in deleted_steps.iter().rev() {
        delete_step(tier, run, s).await?;
        progress(s, bytes_of(s));
    }
    report.deleted_steps = deleted_steps;
    if let Some(newest) = newest {
        // A leftover that a kept step's chunks point into (an abandoned
        // step a base was taken from) stays until nothing does.
        let referenced = referenced_by(tier, run, &report.kept_steps).await?;
        let lineage = crate::store::lineage::read_or_infer(tier, run).await?;
        for (&s, &c) in &by_step {
            if !c && s < newest && !referenced.contains(&s) {
                // The listing may be old by now (a gc that stalled, a
                // zombie's retention): a step committed since is no
                // leftover.
                if let Ok(m) = crate::store::load_manifest(tier, run, s).await
                    && !lineage.abandons(s, m.lineage)
                {
                    tracing::info!(step = s, "committed since the listing: not a leftover");
                    continue;
                }
                delete_step(tier, run, s).await?;
                progress(s, bytes_of(s));
                report.removed_leftovers.push(s);
            }
        }
    }
    for path in stale_agreements {
        match tier.delete(&path).await {
            Ok(()) | Err(crate::Error::NotFound { .. }) => report.removed_agreement_files += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Uncommits `steps` of `run` on `tier`: each committed one's MANIFEST is
/// first copied to `MANIFEST.abandoned-<incarnation>.json` (an audit
/// trail `ckpt inspect` can read), then deleted. Steps that are not
/// committed there are skipped. Returns the steps uncommitted.
pub async fn abandon_steps(
    tier: &dyn Tier,
    run: &str,
    steps: &[u64],
    incarnation: &str,
) -> Result<Vec<u64>> {
    abandon_steps_up_to(tier, run, steps, incarnation, u64::MAX).await
}

/// [`abandon_steps`] for rollback number `rollback` (counting from 0) of
/// the run's lineage: a step committed since under a larger rollback count
/// (the same number reused by the new lineage) is not this rollback's to
/// uncommit, and is left alone. An uncommit that runs late (a coordinator
/// that stalled, a retry) never removes the new lineage's step.
pub(crate) async fn abandon_steps_up_to(
    tier: &dyn Tier,
    run: &str,
    steps: &[u64],
    incarnation: &str,
    rollback: u64,
) -> Result<Vec<u64>> {
    let mut done = Vec::new();
    for &step in steps {
        let manifest = layout::manifest_path(run, step);
        let bytes = match tier.get(&manifest).await {
            Ok(b) => b,
            Err(crate::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        match crate::format::manifest::Manifest::parse(&manifest, &bytes) {
            Ok(m) if m.lineage > rollback => continue,
            _ => {}
        }
        let audit = format!(
            "{}/{}",
            layout::step_dir(run, step),
            layout::abandoned_manifest_file(incarnation)
        );
        tier.put(&audit, bytes.clone(), crate::PutMode::Overwrite)
            .await?;
        // Still the MANIFEST it read? An uncommit that stalled since (a
        // coordinator paused, a retry) must not delete the step the new
        // lineage committed under the same number. (A tier without a
        // conditional delete leaves the moment between this read and the
        // delete open.)
        match tier.get(&manifest).await {
            Ok(now) if now == bytes => {}
            Ok(_) | Err(crate::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
        tier.delete(&manifest).await?;
        done.push(step);
    }
    Ok(done)
}
