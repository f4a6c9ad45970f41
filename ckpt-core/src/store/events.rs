//! The failure log kept in the checkpoint store, so the MTBF estimate
//! survives restarts: every start of a rank-0 checkpointer appends a
//! `start` event, every clean `close()` a `clean_stop`; a start that follows
//! no clean stop counts as a failure (see
//! [`failure_stats`](crate::schedule::failure_stats)). Events are small JSON
//! objects under `<run>/events/`, outside every step directory, so listing,
//! retention and gc never touch them.

use bytes::Bytes;

use crate::error::Result;
use crate::schedule::{FailureEvent, FailureEventKind};
use crate::tier::{PutMode, Tier};

/// Events kept; older ones are deleted when a new one is written.
pub const MAX_EVENTS: usize = 1000;

/// Wall time now, seconds since the Unix epoch.
pub fn now_unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn prefix(run: &str) -> String {
    format!("{run}/events/")
}

/// Reads the failure log of `run`, oldest first. Unreadable events are
/// skipped with a warning: the log informs a scheduler, it is not critical.
pub async fn read(tier: &dyn Tier, run: &str) -> Result<Vec<FailureEvent>> {
    let mut objects = tier.list(&prefix(run)).await?;
    objects.sort_by(|a, b| a.path.cmp(&b.path));
    let mut events = Vec::with_capacity(objects.len());
    for o in objects.iter().filter(|o| o.path.ends_with(".json")) {
        match tier
            .get(&o.path)
            .await
            .map(|b| serde_json::from_slice::<FailureEvent>(&b))
        {
            Ok(Ok(e)) => events.push(e),
            Ok(Err(e)) => {
                tracing::warn!(path = %o.path, error = %e, "ignoring unreadable failure event")
            }
            Err(e) => {
                tracing::warn!(path = %o.path, error = %e, "ignoring unreadable failure event")
            }
        }
    }
    Ok(events)
}

/// Appends an event and trims the log to [`MAX_EVENTS`].
pub async fn append(tier: &dyn Tier, run: &str, event: &FailureEvent) -> Result<()> {
    let kind = match event.kind {
        FailureEventKind::Start => "start",
        FailureEventKind::Crash => "crash",
        FailureEventKind::CleanStop => "clean-stop",
        FailureEventKind::DetectedError => "detected-error",
    };
    let path = format!(
        "{}{:020}-{kind}.json",
        prefix(run),
        (event.wall_time_unix_s * 1e6) as u64
    );
    let body = serde_json::to_vec(event).unwrap_or_default();
    put_and_trim(
        tier,
        &prefix(run),
        &path,
        Bytes::from(body),
        Some(MAX_EVENTS),
    )
    .await
}

/// Writes `body` at `path` (under `prefix`, whose names sort oldest first)
/// and, with `keep`, deletes the oldest objects under `prefix` beyond that
/// many: the failure log's and the save history's append.
pub(crate) async fn put_and_trim(
    tier: &dyn Tier,
    prefix: &str,
    path: &str,
    body: Bytes,
    keep: Option<usize>,
) -> Result<()> {
    tier.put(path, body, PutMode::Overwrite).await?;
    let Some(keep) = keep else { return Ok(()) };
    let mut objects = tier.list(prefix).await?;
    if objects.len() > keep {
        objects.sort_by(|a, b| a.path.cmp(&b.path));
        for o in &objects[..objects.len() - keep] {
            tier.delete(&o.path).await?;
        }
    }
    Ok(())
}

/// Seconds since this process started (Linux: from `/proc`), used as the
/// measured restart time when a restore completes.
pub fn process_age() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; fields after ")" are positional.
    let after = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    let age = uptime - start_ticks / hz as f64;
    (age >= 0.0).then(|| std::time::Duration::from_secs_f64(age))
}
