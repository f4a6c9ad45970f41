//! Failure log: the events from which the job MTBF is estimated.
//!
//! The log is a chronological list of [`FailureEvent`]s, serialised as
//! JSON (an array, or one object per line). Where it is stored is up to
//! the caller; this module only defines the types and the pure reduction
//! [`failure_stats`] to (failures, exposure) that feeds
//! [`MtbfEstimator`](super::MtbfEstimator).

use serde::{Deserialize, Serialize};

/// What happened at a [`FailureEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureEventKind {
    /// The job crashed (recorded by a supervisor or a dying process).
    Crash,
    /// The job stopped on purpose (end of training, preemption handled
    /// cleanly, operator stop).
    CleanStop,
    /// A process of the job started (first launch or restart).
    Start,
    /// An error was detected in the running job (e.g. replicas of a shard
    /// that disagree: silent data corruption) and it rolled back; it counts
    /// as a failure, but the job did not stop.
    DetectedError,
}

/// One entry of the failure log.
///
/// ```
/// use ckpt_core::schedule::{FailureEvent, FailureEventKind};
/// let e = FailureEvent::crash(1_700_000_000.5, 1200);
/// let json = serde_json::to_string(&e).unwrap_or_default();
/// assert_eq!(json, r#"{"wall_time_unix_s":1700000000.5,"step":1200,"kind":"crash"}"#);
/// let back: FailureEvent = serde_json::from_str(&json).unwrap_or(FailureEvent::start(0.0, 0));
/// assert_eq!(back.kind, FailureEventKind::Crash);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FailureEvent {
    /// Wall-clock time of the event, Unix seconds.
    pub wall_time_unix_s: f64,
    /// Training step at the event (the restored step for a `Start`).
    pub step: u64,
    /// What happened.
    pub kind: FailureEventKind,
    /// For a `Start` that restored a step: when that step's save started,
    /// Unix seconds (what `ckpt report` measures rolled-back time from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_unix_s: Option<f64>,
}

impl FailureEvent {
    /// A `Start` event.
    pub fn start(wall_time_unix_s: f64, step: u64) -> Self {
        Self {
            wall_time_unix_s,
            step,
            kind: FailureEventKind::Start,
            saved_unix_s: None,
        }
    }

    /// A `Crash` event.
    pub fn crash(wall_time_unix_s: f64, step: u64) -> Self {
        Self {
            wall_time_unix_s,
            step,
            kind: FailureEventKind::Crash,
            saved_unix_s: None,
        }
    }

    /// A `CleanStop` event.
    pub fn clean_stop(wall_time_unix_s: f64, step: u64) -> Self {
        Self {
            wall_time_unix_s,
            step,
            kind: FailureEventKind::CleanStop,
            saved_unix_s: None,
        }
    }

    /// A detected error (e.g. a replica mismatch) at `step`.
    pub fn detected_error(wall_time_unix_s: f64, step: u64) -> Self {
        Self {
            wall_time_unix_s,
            step,
            kind: FailureEventKind::DetectedError,
            saved_unix_s: None,
        }
    }
}

/// Failures and exposure extracted from a failure log.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FailureStats {
    /// Number of runs that ended without a clean stop.
    pub failures: u64,
    /// Total running time (seconds) over which those failures could occur.
    pub exposure_s: f64,
}

/// Reduces a failure log to (failures k, exposure T).
///
/// Rules, applied after a stable sort by time (events with a non-finite
/// time are ignored):
/// * a run begins at a `Start` and ends at the next event of any kind;
///   its length counts as exposure;
/// * a run that ends with a `Crash`, or with another `Start` (the process
///   died without a trace), counts as one failure; a `CleanStop` ends it
///   without failure;
/// * a `Crash` or `CleanStop` outside a run (a duplicate report, or a log
///   whose beginning was truncated) is ignored;
/// * a run still open at the end of the log adds `now_unix_s − start`
///   to the exposure when `now_unix_s` is given.
///
/// When a crash leaves no trace, the next `Start` also counts the downtime
/// before it as exposure, which slightly overestimates the MTBF; recording
/// `Crash` events avoids that.
///
/// ```
/// use ckpt_core::schedule::{failure_stats, FailureEvent};
/// let log = [
///     FailureEvent::start(0.0, 0),
///     FailureEvent::crash(3600.0, 900),
///     FailureEvent::start(3700.0, 800),
///     FailureEvent::start(5000.0, 1100), // died silently
///     FailureEvent::clean_stop(6000.0, 1400),
/// ];
/// let s = failure_stats(&log, None);
/// assert_eq!(s.failures, 2);
/// assert_eq!(s.exposure_s, 3600.0 + 1300.0 + 1000.0);
/// ```
pub fn failure_stats(events: &[FailureEvent], now_unix_s: Option<f64>) -> FailureStats {
    let mut sorted: Vec<&FailureEvent> = events
        .iter()
        .filter(|e| e.wall_time_unix_s.is_finite())
        .collect();
    sorted.sort_by(|a, b| a.wall_time_unix_s.total_cmp(&b.wall_time_unix_s));

    let mut stats = FailureStats::default();
    let mut running_since: Option<f64> = None;
    for e in sorted {
        let t = e.wall_time_unix_s;
        let ended = running_since.take();
        if let Some(t0) = ended {
            stats.exposure_s += (t - t0).max(0.0);
        }
        match e.kind {
            FailureEventKind::Start => {
                if ended.is_some() {
                    stats.failures += 1;
                }
                running_since = Some(t);
            }
            FailureEventKind::Crash => {
                if ended.is_some() {
                    stats.failures += 1;
                }
            }
            FailureEventKind::DetectedError => {
                stats.failures += 1;
                if ended.is_some() {
                    running_since = Some(t);
                }
            }
            FailureEventKind::CleanStop => {}
        }
    }
    if let (Some(t0), Some(now)) = (running_since, now_unix_s)
        && now.is_finite()
    {
        stats.exposure_s += (now - t0).max(0.0);
    }
    stats
}

/// Parses a failure log given either as a JSON array of events or as JSON
/// Lines (one event object per non-empty line).
///
/// ```
/// use ckpt_core::schedule::parse_failure_log;
/// let lines = "{\"wall_time_unix_s\":1.0,\"step\":0,\"kind\":\"start\"}\n\
///              {\"wall_time_unix_s\":9.0,\"step\":5,\"kind\":\"clean_stop\"}\n";
/// assert_eq!(parse_failure_log(lines).map(|v| v.len()).ok(), Some(2));
/// assert!(parse_failure_log("[{\"oops\":1}]").is_err());
/// ```
pub fn parse_failure_log(text: &str) -> Result<Vec<FailureEvent>, serde_json::Error> {
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(text);
    }
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_log() {
        assert_eq!(failure_stats(&[], None), FailureStats::default());
        assert_eq!(failure_stats(&[], Some(10.0)), FailureStats::default());
    }

    #[test]
    fn open_run_counts_until_now() {
        let log = [FailureEvent::start(100.0, 0)];
        assert_eq!(failure_stats(&log, None).exposure_s, 0.0);
        let s = failure_stats(&log, Some(400.0));
        assert_eq!((s.failures, s.exposure_s), (0, 300.0));
        // A clock that went backwards adds nothing.
        assert_eq!(failure_stats(&log, Some(50.0)).exposure_s, 0.0);
        assert_eq!(failure_stats(&log, Some(f64::NAN)).exposure_s, 0.0);
    }

    #[test]
    fn crash_then_start_is_one_failure() {
        let log = [
            FailureEvent::start(0.0, 0),
            FailureEvent::crash(10.0, 5),
            FailureEvent::start(20.0, 0),
        ];
        let s = failure_stats(&log, Some(25.0));
        assert_eq!((s.failures, s.exposure_s), (1, 15.0));
    }

    #[test]
    fn clean_stop_then_start_is_no_failure() {
        let log = [
            FailureEvent::start(0.0, 0),
            FailureEvent::clean_stop(10.0, 5),
            FailureEvent::start(100.0, 5),
            FailureEvent::clean_stop(130.0, 9),
        ];
        let s = failure_stats(&log, None);
        assert_eq!((s.failures, s.exposure_s), (0, 40.0));
    }

    #[test]
    fn duplicate_and_orphan_reports_are_ignored() {
        let log = [
            FailureEvent::crash(-5.0, 0), // truncated log
            FailureEvent::start(0.0, 0),
            FailureEvent::crash(10.0, 5),
            FailureEvent::crash(11.0, 5), // duplicate report
            FailureEvent::clean_stop(12.0, 5),
        ];
        let s = failure_stats(&log, None);
        assert_eq!((s.failures, s.exposure_s), (1, 10.0));
    }

    #[test]
    fn unsorted_input_and_bad_times() {
        let log = [
            FailureEvent::start(20.0, 0),
            FailureEvent::start(0.0, 0),
            FailureEvent::crash(f64::NAN, 0),
            FailureEvent::clean_stop(30.0, 0),
        ];
        let s = failure_stats(&log, None);
        assert_eq!((s.failures, s.exposure_s), (1, 30.0));
    }

    #[test]
    fn json_roundtrip_array_and_lines() {
        let log = vec![
            FailureEvent::start(1.5, 0),
            FailureEvent::crash(2.5, 7),
            FailureEvent::clean_stop(3.5, 9),
        ];
        let array = serde_json::to_string(&log).unwrap_or_default();
        assert!(array.contains("\"clean_stop\""));
        assert_eq!(parse_failure_log(&array).ok(), Some(log.clone()));
        let lines: String = log
            .iter()
            .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
            .collect();
        assert_eq!(parse_failure_log(&lines).ok(), Some(log));
        assert_eq!(parse_failure_log("").ok(), Some(vec![]));
        assert!(parse_failure_log("{\"kind\":\"meteor\"}").is_err());
    }
}
