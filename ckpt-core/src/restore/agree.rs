//! Restore agreement: with several ranks, every rank ends its restore on
//! the same step, the newest one that every rank can read and verify its
//! own pieces of (each rank possibly from a different tier: its buddy's
//! memory, a shared directory, S3). The model, the optimizer and the loop
//! state of every rank then come from one step.
//!
//! In rounds: each rank restores the newest step it can at or below the
//! round's ceiling and publishes it; every rank reads all proposals; the
//! minimum becomes the next ceiling, and the ranks above it restore again,
//! until all propose the same step. A rank that has nothing to propose ends
//! the agreement with [`Error::NoCommonStep`] naming it, unless no rank has
//! any checkpoint at all (a fresh start). The exchange goes through an
//! [`Agreement`]: by default the storage itself ([`StorageAgreement`]),
//! or the job's own collective (NCCL, MPI, gloo) behind the same trait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::TensorViewMut;
use crate::restore::{Found, Restorer, block_on};
use crate::tier::{PutMode, Tier};

/// How the ranks of a job exchange what they can restore: an all-gather.
/// Implement it over the job's collective (NCCL, MPI, gloo) to agree
/// without touching storage; the default (a storage agreement) goes
/// through a tier every rank reaches.
pub trait Agreement: Send + Sync + std::fmt::Debug {
    /// Every rank calls this with the same `round` (unique within an
    /// incarnation of the job) and its own `mine`; returns every rank's
    /// bytes, in rank order. Must be bounded in time: a rank that never
    /// calls makes it fail ([`Error::AgreementTimeout`]).
    fn all_gather(&self, round: &str, mine: Vec<u8>) -> Result<Vec<Vec<u8>>>;
}

/// An agreement whose rounds carry a prefix: one call of a collective
/// (a restore) among several of the same checkpointer.
#[derive(Debug)]
pub(crate) struct Numbered {
    inner: Arc<dyn Agreement>,
    prefix: String,
}

impl Numbered {
    pub(crate) fn new(inner: Arc<dyn Agreement>, prefix: String) -> Self {
        Self { inner, prefix }
    }
}

impl Agreement for Numbered {
    fn all_gather(&self, round: &str, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.inner
            .all_gather(&format!("{}{round}", self.prefix), mine)
    }
}

/// What one rank says in a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Proposal {
    rank: u32,
    /// The newest step at or below the ceiling it restored (and verified).
    step: Option<u64>,
    /// The newest step committed on any of its tiers.
    newest_committed: Option<u64>,
    /// Whether one of its tiers could not be listed.
    unlisted: bool,
    /// Why it has nothing, if so.
    why: Option<String>,
}

/// Runs the agreement; returns the agreed step, restored into `targets`.
pub(crate) fn restore_agreed(
    r: &mut Restorer<'_>,
    agreement: &dyn Agreement,
    exact: Option<u64>,
    targets: &mut [&mut dyn TensorViewMut],
) -> Result<Option<Found>> {
    let mut ceiling = exact;
    let mut current: Option<Found> = None;
    for round in 0u32.. {
        if current
            .as_ref()
            .is_some_and(|c| ceiling.is_some_and(|s| c.step > s))
        {
            current = None;
        }
        let mut failed = None;
        if current.is_none() {
            match r.newest_at_most(ceiling, targets) {
                Ok(f) => current = f,
                Err(e) => failed = Some(e),
            }
        }
        let mine = Proposal {
            rank: r.rank,
            step: current.as_ref().map(|c| c.step),
            newest_committed: r.newest_committed(),
            unlisted: !r.unlisted.is_empty(),
            why: match (&failed, &current) {
                (Some(e), _) => Some(e.to_string()),
                (None, None) if r.newest_committed().is_none() => Some(if r.unlisted.is_empty() {
                    "no committed checkpoint on its tiers".into()
                } else {
                    format!("cannot list its tiers: {}", super::describe(&r.skipped))
                }),
                (None, None) => Some(format!(
                    "no checkpoint at or below step {} verifies: {}",
                    ceiling.map_or("(newest)".into(), |c| c.to_string()),
                    super::describe(&r.skipped)
                )),
                _ => None,
            },
        };
        let all = gather(agreement, &format!("restore-{round}"), &mine)?;
        if let Some(e) = failed {
            return Err(e);
        }
        if all
            .iter()
            .all(|p| p.step.is_none() && p.newest_committed.is_none() && !p.unlisted)
        {
            // No rank has ever committed anything: a fresh start for all.
            return Ok(None);
        }
        let missing: Vec<(u32, String)> = all
            .iter()
            .filter(|p| p.step.is_none())
            .map(|p| (p.rank, p.why.clone().unwrap_or_default()))
            .collect();
        if !missing.is_empty() {
            return Err(Error::NoCommonStep {
                run: r.run.to_string(),
                ranks: missing,
            });
        }
        let lowest = all.iter().filter_map(|p| p.step).min();
        if all.iter().all(|p| p.step == lowest) {
            tracing::debug!(step = ?lowest, round, "ranks agree on the step to restore");
            let newer = all.iter().any(|p| p.newest_committed > lowest);
            return Ok(current.map(|mut f| {
                f.job_newer = newer;
                f
            }));
        }
        tracing::info!(mine = ?mine.step, agreed = ?lowest, "another rank cannot restore this step; restoring an older one with it");
        ceiling = lowest;
    }
    Err(Error::Internal("agreement rounds ran out".into()))
}

/// One round of the exchange: every rank's proposal, checked.
fn gather(agreement: &dyn Agreement, round: &str, mine: &Proposal) -> Result<Vec<Proposal>> {
    let bytes = serde_json::to_vec(mine)
        .map_err(|e| Error::Internal(format!("cannot encode a restore proposal: {e}")))?;
    agreement
        .all_gather(round, bytes)?
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let p: Proposal = serde_json::from_slice(b).map_err(|e| Error::Decode {
                what: format!("rank {i}'s restore proposal in round {round}"),
                reason: e.to_string(),
            })?;
            if p.rank as usize != i {
                return Err(Error::Decode {
                    what: format!("rank {i}'s restore proposal in round {round}"),
                    reason: format!("it is rank {}'s", p.rank),
                });
            }
            Ok(p)
        })
        .collect()
}

/// An [`Agreement`] through a tier every rank reaches: each rank writes
/// `<run>/agree/<incarnation>/<round>/rank-<r>.json` and polls for the
/// others', for at most the timeout. Rounds are per incarnation, so one
/// incarnation never reads another's (the incarnation must be unique per
/// launch, as for the commit).
#[derive(Debug)]
pub struct StorageAgreement {
    tier: Arc<dyn Tier>,
    prefix: String,
    rank: u32,
    world: u32,
    timeout: Duration,
    handle: tokio::runtime::Handle,
}

impl StorageAgreement {
    /// Agreement among `world` ranks (this one is `rank`) of `run`'s
    /// incarnation `incarnation` through `tier`, each round bounded by
    /// `timeout`; tier requests run on `handle`.
    pub fn new(
        tier: Arc<dyn Tier>,
        run: &str,
        incarnation: &str,
        rank: u32,
        world: u32,
        timeout: Duration,
        handle: tokio::runtime::Handle,
    ) -> Self {
        Self {
            tier,
            prefix: crate::format::layout::agreement_dir(run, incarnation),
            rank,
            world,
            timeout,
            handle,
        }
    }

    fn path(&self, round: &str, rank: u32) -> String {
        format!("{}/{round}/rank-{rank:05}.json", self.prefix)
    }
}

impl Agreement for StorageAgreement {
    fn all_gather(&self, round: &str, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        block_on(&self.handle, async {
            self.tier
                .put(
                    &self.path(round, self.rank),
                    Bytes::from(mine),
                    PutMode::Overwrite,
                )
                .await?;
            let mut got: Vec<Option<Vec<u8>>> = vec![None; self.world as usize];
            let start = Instant::now();
            let mut pause = Duration::from_millis(5);
            loop {
                for r in 0..self.world {
                    if got[r as usize].is_some() {
                        continue;
                    }
                    match self.tier.get(&self.path(round, r)).await {
                        Ok(b) => got[r as usize] = Some(b.to_vec()),
                        Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                if got.iter().all(Option::is_some) {
                    return Ok(got.into_iter().flatten().collect());
                }
                if start.elapsed() > self.timeout {
                    return Err(Error::AgreementTimeout {
                        round: round.to_string(),
                        missing: (0..self.world)
                            .filter(|r| got[*r as usize].is_none())
                            .collect(),
                        after: self.timeout,
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        })
    }
}
