//! Listing a tier's checkpoints and loading their manifests, following the
//! layout of [`crate::format::layout`] and the commit rule: a step exists
//! iff its `MANIFEST.json` exists and verifies.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::format::layout::{self, MANIFEST};
use crate::format::manifest::{HeaderSum, Lineage, Manifest};
use crate::tier::Tier;

/// Committed steps of `run` on `tier` in the run's current lineage,
/// ascending: steps a rollback abandoned ([`crate::format::manifest::Lineage`])
/// are left out even if their MANIFEST is still there. A MANIFEST that is
/// present but does not parse is not filtered here; loading it fails and
/// restore falls back.
pub async fn committed_steps(tier: &dyn Tier, run: &str) -> Result<Vec<u64>> {
    committed_in(tier, run, None).await
}

/// [`committed_steps`] under `lineage` when given (the longest record over
/// every tier a restore reads, so a tier that missed a rollback still
/// follows it), else under the tier's own record.
pub(crate) async fn committed_in(
    tier: &dyn Tier,
    run: &str,
    lineage: Option<&Lineage>,
) -> Result<Vec<u64>> {
    let objects = tier.list(&format!("{run}/")).await?;
    let steps = manifest_steps(&objects, run);
    let own;
    let lineage = match lineage {
        Some(l) => l,
        None if objects.iter().any(|o| o.path == layout::lineage_path(run)) => {
            own = crate::store::lineage::read_or_infer(tier, run).await?;
            &own
        }
        None => return Ok(steps),
    };
    Ok(crate::store::lineage::current(tier, run, steps, lineage).await)
}

/// The steps of `run` with a MANIFEST among `objects`, ascending.
pub(crate) fn manifest_steps(objects: &[crate::tier::ObjectMeta], run: &str) -> Vec<u64> {
    let mut steps: Vec<u64> = objects
        .iter()
        .filter_map(|o| layout::parse_path(&o.path))
        .filter(|(r, _, rest)| *r == run && *rest == MANIFEST)
        .map(|(_, s, _)| s)
        .collect();
    steps.sort_unstable();
    steps.dedup();
    steps
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

/// Path of `rank`'s shard file of `step`: the one its MANIFEST names if
/// the step is committed, else the one shard file of that rank in the
/// step directory (an uncommitted step's, for inspection and repair).
/// [`Error::NotFound`] if there is none, [`Error::Incomplete`] if an
/// uncommitted step holds several (attempts of several incarnations).
pub async fn shard_file(tier: &dyn Tier, run: &str, step: u64, rank: u32) -> Result<String> {
    let dir = layout::step_dir(run, step);
    if let Ok(m) = load_manifest(tier, run, step).await
        && let Some(r) = m.ranks.iter().find(|r| r.rank == rank)
    {
        return Ok(format!("{dir}/{}", r.file));
    }
    let mut found: Vec<String> = tier
        .list(&format!("{dir}/"))
        .await?
        .into_iter()
        .filter(|o| {
            o.path
                .rsplit('/')
                .next()
                .is_some_and(|name| layout::is_rank_data_file(name, rank))
        })
        .map(|o| o.path)
        .collect();
    match found.len() {
        0 => Err(Error::NotFound {
            path: format!("{dir}/rank-{rank:05}.*.safetensors"),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(Error::Incomplete {
            path: dir,
            reason: format!("rank {rank} has {} shard files: {found:?}", found.len()),
        }),
    }
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
    // Chunks an incremental save left in older steps' files: those files
    // must still be there (a step deleted by hand, a retention bug).
    let mut referenced: BTreeSet<(u64, &str)> = BTreeSet::new();
    let mut by: std::collections::BTreeMap<(u64, &str), &str> = Default::default();
    for (name, t) in &m.tensors {
        for p in t.pieces.iter().filter(|p| wanted(p.rank)) {
            for c in &p.chunks {
                if let Some(s) = c.step
                    && referenced.insert((s, c.file.as_str()))
                {
                    by.insert((s, c.file.as_str()), name.as_str());
                }
            }
        }
    }
    for (s, file) in referenced {
        let path = format!("{}/{file}", layout::step_dir(&m.run, s));
        match tier.size(&path).await {
            Ok(_) => {}
            Err(Error::NotFound { .. }) => {
                return Err(Error::Incomplete {
                    reason: format!(
                        "step {} keeps chunks of tensor `{}` in step {s}'s file, which is gone",
                        m.step,
                        by.get(&(s, file)).copied().unwrap_or("?")
                    ),
                    path,
                });
            }
            Err(e) => return Err(e),
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

/// A step whose history a listing should show: a save the coordinator
/// refused (`ABORTED.json`: replicas that differed, a rank that never
/// reported), or a commit that a resumed run took back (the audit copy
/// `MANIFEST.abandoned-<incarnation>.json`). The step may have been
/// committed again later, by another incarnation.
#[derive(Debug, Clone, PartialEq)]
pub struct StepNote {
    /// The step.
    pub step: u64,
    /// Whether the step is committed now.
    pub committed: bool,
    /// What happened to it.
    pub what: StepEvent,
}

/// What a [`StepNote`] records.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEvent {
    /// The coordinator refused the save of this step (never committed on
    /// any tier).
    Refused(crate::format::manifest::StepAborted),
    /// The step was committed, then uncommitted when the job resumed from
    /// an older step (the ranks could not all restore it); the name of the
    /// audit copy holds the incarnation that did so.
    Uncommitted {
        /// The audit copy, relative to the step directory.
        file: String,
    },
}

/// The refused and uncommitted steps of `run` still on `tier` (retention
/// removes them with their step directories), by step. A refusal marker
/// that does not parse is reported as an error naming its path.
pub async fn step_notes(tier: &dyn Tier, run: &str) -> Result<Vec<StepNote>> {
    let objects = tier.list(&format!("{run}/")).await?;
    let parsed: Vec<(u64, &str, &str)> = objects
        .iter()
        .filter_map(|o| {
            let (r, s, rest) = layout::parse_path(&o.path)?;
            (r == run).then_some((s, rest, o.path.as_str()))
        })
        .collect();
    let committed: BTreeSet<u64> = parsed
        .iter()
        .filter(|(_, rest, _)| *rest == MANIFEST)
        .map(|(s, _, _)| *s)
        .collect();
    let mut notes = Vec::new();
    for &(step, rest, path) in &parsed {
        let what = if rest == layout::ABORTED {
            let bytes = tier.get(path).await?;
            StepEvent::Refused(crate::format::manifest::StepAborted::parse(path, &bytes)?)
        } else if rest.starts_with("MANIFEST.abandoned-") {
            StepEvent::Uncommitted {
                file: rest.to_string(),
            }
        } else {
            continue;
        };
        notes.push(StepNote {
            step,
            committed: committed.contains(&step),
            what,
        });
    }
    notes.sort_by_key(|n| n.step);
    Ok(notes)
}
