//! The run's lineage: which committed steps a rollback abandoned
//! ([`Lineage`]), read with every listing that needs it, and recorded by
//! the coordinator when a job resumes from an older step.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::layout;
use crate::format::manifest::{Lineage, Rollback};
use crate::tier::{PutMode, Tier};

/// The lineage record of `run` on `tier`; empty when there is none.
pub async fn read(tier: &dyn Tier, run: &str) -> Result<Lineage> {
    let path = layout::lineage_path(run);
    match tier.get(&path).await {
        Ok(b) => Lineage::parse(&path, &b),
        Err(Error::NotFound { .. }) => Ok(Lineage::default()),
        Err(e) => Err(e),
    }
}

/// Appends `rollback` to the lineage record of `run` on `tier` (the
/// coordinator only), unless the record already ends with the same
/// rollback; returns the record as written.
pub async fn record(tier: &dyn Tier, run: &str, rollback: Rollback) -> Result<Lineage> {
    let mut l = read(tier, run).await?;
    if l.rollbacks
        .last()
        .is_some_and(|r| r.to_step == rollback.to_step && r.incarnation == rollback.incarnation)
    {
        return Ok(l);
    }
    l.format = 1;
    l.rollbacks.push(rollback);
    tier.put(
        &layout::lineage_path(run),
        Bytes::from(l.to_json()?),
        PutMode::Overwrite,
    )
    .await?;
    Ok(l)
}

/// `steps` (committed on `tier`, ascending) without those `lineage`
/// abandons. Only steps above the lowest rollback are looked at, by their
/// manifest's lineage count; a manifest that cannot be read is kept (the
/// restore that reads it skips it as a data fault).
pub(crate) async fn current(
    tier: &dyn Tier,
    run: &str,
    steps: Vec<u64>,
    lineage: &Lineage,
) -> Vec<u64> {
    let Some(floor) = lineage.floor() else {
        return steps;
    };
    let mut out = Vec::with_capacity(steps.len());
    for s in steps {
        if s <= floor {
            out.push(s);
            continue;
        }
        match crate::store::load_manifest(tier, run, s).await {
            Ok(m) if lineage.abandons(s, m.lineage) => {
                tracing::debug!(
                    step = s,
                    lineage = m.lineage,
                    "step abandoned by a rollback"
                );
            }
            _ => out.push(s),
        }
    }
    out
}

/// The longest lineage record of `run` over `tiers` (records only grow, by
/// appending): what a restore follows. Tiers that cannot be read are
/// skipped.
pub async fn longest(tiers: &[std::sync::Arc<dyn Tier>], run: &str) -> Lineage {
    let mut best = Lineage::default();
    for t in tiers {
        match read(t.as_ref(), run).await {
            Ok(l) if l.rollbacks.len() > best.rollbacks.len() => best = l,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(tier = %t.location(), error = %e, "cannot read the lineage record")
            }
        }
    }
    best
}

/// The coordinator's view at a commit on `tier`: the longer of `known` and
/// the tier's record, written back to the tier when the tier's is shorter
/// (it missed a rollback while it was down). Returns the rollback count
/// the step is committed with.
pub(crate) async fn for_commit(tier: &dyn Tier, run: &str, known: &Lineage) -> Result<u64> {
    let on_tier = read(tier, run).await?;
    if on_tier.rollbacks.len() >= known.rollbacks.len() {
        return Ok(on_tier.rollbacks.len() as u64);
    }
    let mut l = known.clone();
    l.format = 1;
    tier.put(
        &layout::lineage_path(run),
        Bytes::from(l.to_json()?),
        PutMode::Overwrite,
    )
    .await?;
    tracing::info!(tier = %tier.location(), rollbacks = l.rollbacks.len(), "lineage record repaired");
    Ok(l.rollbacks.len() as u64)
}
