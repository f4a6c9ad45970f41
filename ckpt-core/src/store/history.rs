//! The save history kept in the checkpoint store: one small JSON record
//! per save the coordinator saw finish (step, wall time, math-stop, time to
//! durable and bytes per tier), under `<run>/saves/`, outside every step
//! directory, so retention and gc never touch it. With the failure log it
//! is what `ckpt report` reads.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::tier::Tier;

/// Records kept; the oldest are deleted, every [`TRIM_EVERY`] appends.
pub const MAX_SAVES: usize = 10_000;
/// How often an append trims the history (a listing of it).
pub const TRIM_EVERY: u64 = 64;

/// One tier's part of a save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierRecord {
    /// The tier's location.
    pub tier: String,
    /// Whether the step was committed there.
    pub committed: bool,
    /// Seconds from the start of the save to durable there (math-stop,
    /// flush and commit).
    pub durable_s: f64,
    /// Bytes written to it.
    pub written: u64,
    /// Bytes left in place (incremental saves).
    #[serde(default)]
    pub referenced: u64,
}

/// One save, as its coordinator saw it finish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveRecord {
    /// Step saved.
    pub step: u64,
    /// When the save started, Unix seconds.
    pub started_unix_s: f64,
    /// The math-stop (the time the training loop stood still), seconds.
    pub math_stop_s: f64,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// The incarnation that saved it.
    pub incarnation: String,
    /// Per tier, in tier order.
    pub tiers: Vec<TierRecord>,
}

fn prefix(run: &str) -> String {
    format!("{run}/saves/")
}

/// Appends `record`; every [`TRIM_EVERY`]-th append (by `count`) trims the
/// history to [`MAX_SAVES`].
pub async fn append(tier: &dyn Tier, run: &str, record: &SaveRecord, count: u64) -> Result<()> {
    let path = format!(
        "{}{:020}-{:020}.json",
        prefix(run),
        (record.started_unix_s * 1e6) as u64,
        record.step
    );
    let body = serde_json::to_vec(record).unwrap_or_default();
    let keep = count.is_multiple_of(TRIM_EVERY).then_some(MAX_SAVES);
    crate::store::events::put_and_trim(tier, &prefix(run), &path, Bytes::from(body), keep).await
}

/// The save history of `run`, oldest first. Unreadable records are
/// skipped with a warning: the history informs a report, it is not
/// critical.
pub async fn read(tier: &dyn Tier, run: &str) -> Result<Vec<SaveRecord>> {
    let mut objects = tier.list(&prefix(run)).await?;
    objects.sort_by(|a, b| a.path.cmp(&b.path));
    let mut out = Vec::with_capacity(objects.len());
    for o in objects.iter().filter(|o| o.path.ends_with(".json")) {
        match tier.get(&o.path).await {
            Ok(b) => match serde_json::from_slice::<SaveRecord>(&b) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(path = %o.path, error = %e, "ignoring an unreadable save record")
                }
            },
            Err(e) => {
                tracing::warn!(path = %o.path, error = %e, "ignoring an unreadable save record")
            }
        }
    }
    Ok(out)
}
