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

/// The lineage record of `run` on `tier`, or, when the record is proven
/// damaged (its seal refused), the rollbacks its manifests show: every
/// MANIFEST carries the rollback count it was committed under, so rollback
/// `k` resumed below the lowest step committed with a count above `k`.
/// What that infers abandoned truly is (a current step is never taken for
/// an abandoned one); a step between a rollback's real target and the
/// first step committed after it may be taken for current, which restore
/// never prefers over that newer step. Said once per read, as a warning.
pub async fn read_or_infer(tier: &dyn Tier, run: &str) -> Result<Lineage> {
    match read(tier, run).await {
        Err(e) if e.is_proven_corrupt() => {
            let l = infer(tier, run).await?;
            tracing::warn!(tier = %tier.location(), run, rollbacks = l.rollbacks.len(), error = %e, "the lineage record is damaged: following the rollbacks the manifests show");
            Ok(l)
        }
        other => other,
    }
}

async fn infer(tier: &dyn Tier, run: &str) -> Result<Lineage> {
    let objects = tier.list(&format!("{run}/")).await?;
    let mut counts = Vec::new();
    for step in crate::store::listing::manifest_steps(&objects, run) {
        match crate::store::load_manifest(tier, run, step).await {
            Ok(m) => counts.push((step, m.lineage)),
            Err(e) if e.is_proven_corrupt() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Lineage::inferred(&counts))
}

/// Appends `rollback` to the lineage record of `run` on `tier` (the
/// coordinator only), unless the record already ends with the same
/// rollback; returns the record as written.
pub async fn record(tier: &dyn Tier, run: &str, rollback: Rollback) -> Result<Lineage> {
    record_over(tier, run, rollback, &Lineage::default()).await
}

/// [`record`] by a coordinator that knows the rollbacks `known`: a record
/// proven damaged on `tier` is rebuilt from `known` (when the tier's
/// manifests show no rollback beyond it) before `rollback` is appended.
pub(crate) async fn record_over(
    tier: &dyn Tier,
    run: &str,
    rollback: Rollback,
    known: &Lineage,
) -> Result<Lineage> {
    let mut l = match read(tier, run).await {
        Ok(l) => l,
        Err(e)
            if e.is_proven_corrupt()
                && highest_manifest_lineage(tier, run).await? <= known.rollbacks.len() as u64 =>
        {
            tracing::warn!(tier = %tier.location(), error = %e, "the lineage record was damaged: rebuilt from the coordinator's record");
            known.clone()
        }
        Err(e) => return Err(e),
    };
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
        match read_or_infer(t.as_ref(), run).await {
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
///
/// - A committer that knows fewer rollbacks than the tier records started
///   before the newest of them (a writer of an older incarnation): its
///   step would count as current although the run rolled back past it.
///   Refused ([`Error::CommitConflict`]).
/// - A record proven damaged (its seal refused) is rebuilt from `known`,
///   once every manifest on the tier agrees that `known` holds all the
///   rollbacks they were committed under; else the commit is refused with
///   the damage (nobody knows the rollbacks the record held).
pub(crate) async fn for_commit(tier: &dyn Tier, run: &str, known: &Lineage) -> Result<u64> {
    let path = layout::lineage_path(run);
    let on_tier = match read(tier, run).await {
        Ok(l) => l,
        Err(e) if e.is_proven_corrupt() => {
            let highest = highest_manifest_lineage(tier, run).await?;
            if highest > known.rollbacks.len() as u64 {
                return Err(e);
            }
            write(tier, run, known).await?;
            tracing::warn!(tier = %tier.location(), rollbacks = known.rollbacks.len(), error = %e, "the lineage record was damaged: rebuilt from the coordinator's record");
            return Ok(known.rollbacks.len() as u64);
        }
        Err(e) => return Err(e),
    };
    if on_tier.rollbacks.len() > known.rollbacks.len() {
        return Err(Error::CommitConflict {
            path,
            reason: format!(
                "the tier records {} rollback(s) and this committer knows {}: it started before the newest rollback (a writer of an older incarnation), so its step would not belong to the run's lineage",
                on_tier.rollbacks.len(),
                known.rollbacks.len()
            ),
        });
    }
    if on_tier.rollbacks.len() == known.rollbacks.len() {
        return Ok(on_tier.rollbacks.len() as u64);
    }
    write(tier, run, known).await?;
    tracing::info!(tier = %tier.location(), rollbacks = known.rollbacks.len(), "lineage record repaired");
    Ok(known.rollbacks.len() as u64)
}

async fn write(tier: &dyn Tier, run: &str, l: &Lineage) -> Result<()> {
    let mut l = l.clone();
    l.format = 1;
    tier.put(
        &layout::lineage_path(run),
        Bytes::from(l.to_json()?),
        PutMode::Overwrite,
    )
    .await
}

/// The largest rollback count any readable MANIFEST of `run` on `tier` was
/// committed with (a lower bound on the rollbacks its record held).
async fn highest_manifest_lineage(tier: &dyn Tier, run: &str) -> Result<u64> {
    let objects = tier.list(&format!("{run}/")).await?;
    let mut highest = 0;
    for step in crate::store::listing::manifest_steps(&objects, run) {
        match crate::store::load_manifest(tier, run, step).await {
            Ok(m) => highest = highest.max(m.lineage),
            Err(e) if e.is_proven_corrupt() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(highest)
}
