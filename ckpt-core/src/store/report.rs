//! A run's history from the store alone: its saves (the save history),
//! its process lives, failures and restarts (the failure log), how much
//! work each restart rolled back, and where the run's wall time went.

use serde::Serialize;

use crate::schedule::{FailureEvent, FailureEventKind, daly, failure_stats, young};
use crate::store::history::SaveRecord;

/// One restart: the life that ended, and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restart {
    /// When the new process started, Unix seconds.
    pub started_unix_s: f64,
    /// The step it restored.
    pub restored_step: u64,
    /// When the previous life ended (its crash record, else its last
    /// save), Unix seconds.
    pub ended_unix_s: f64,
    /// The step it had reached (its crash record, else its last save).
    pub ended_step: u64,
    /// Whether the end is recorded (a crash record) or estimated from the
    /// last save (a process killed outright records nothing).
    pub recorded: bool,
    /// Whether the previous life ended on a detected error (a rollback
    /// without a crash).
    pub detected_error: bool,
    /// Steps of work lost: reached, minus restored.
    pub rollback_steps: u64,
    /// Wall time of that work: from the restored step's save to the end.
    pub rollback_s: f64,
    /// From the end of the previous life to the start of this one.
    pub downtime_s: f64,
}

/// Where the run's wall time went; the parts add up to `wall_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Waterfall {
    /// From the first start to the last event or save.
    pub wall_s: f64,
    /// Training that counted.
    pub useful_s: f64,
    /// The loop standing still for saves (every math-stop).
    pub checkpoint_stall_s: f64,
    /// Training done again after restarts.
    pub rolled_back_s: f64,
    /// Between a life's end and the next start.
    pub restart_s: f64,
}

/// What `ckpt report` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// The run.
    pub run: String,
    /// Every save in the history, oldest first.
    pub saves: Vec<SaveRecord>,
    /// When the run began (its first start), Unix seconds.
    pub started_unix_s: f64,
    /// Process starts.
    pub starts: usize,
    /// Every restart, oldest first.
    pub restarts: Vec<Restart>,
    /// Where the wall time went.
    pub waterfall: Waterfall,
    /// The measured exposed save time: the median math-stop, seconds.
    pub exposed_save_s: Option<f64>,
    /// Failures and running time in the failure log, and their ratio.
    pub failures: u64,
    /// Seconds of running time the failure log covers.
    pub exposure_s: f64,
    /// Observed MTBF (exposure over failures), seconds.
    pub mtbf_s: Option<f64>,
    /// The save interval Young's formula gives for these, seconds.
    pub interval_young_s: Option<f64>,
    /// The interval Daly's higher-order formula gives, seconds.
    pub interval_daly_s: Option<f64>,
}

/// Builds the report of `run` from its failure log and save history;
/// `step_times` gives, for steps whose save record is missing (a process
/// that died before recording a save it had committed), the time the save
/// started (the manifest's `created_unix_ms`).
pub fn build(
    run: &str,
    events: &[FailureEvent],
    saves: &[SaveRecord],
    step_times: &std::collections::BTreeMap<u64, f64>,
) -> RunReport {
    let mut events: Vec<FailureEvent> = events
        .iter()
        .copied()
        .filter(|e| e.wall_time_unix_s.is_finite())
        .collect();
    events.sort_by(|a, b| a.wall_time_unix_s.total_cmp(&b.wall_time_unix_s));
    let mut saves = saves.to_vec();
    saves.sort_by(|a, b| a.started_unix_s.total_cmp(&b.started_unix_s));
    let starts: Vec<&FailureEvent> = events
        .iter()
        .filter(|e| e.kind == FailureEventKind::Start)
        .collect();
    let save_end = |s: &SaveRecord| {
        s.started_unix_s
            + s.tiers
                .iter()
                .map(|t| t.durable_s)
                .fold(s.math_stop_s, f64::max)
    };
    let mut restarts = Vec::new();
    for (i, start) in starts.iter().enumerate().skip(1) {
        let prev = starts[i - 1].wall_time_unix_s;
        let now = start.wall_time_unix_s;
        let in_life = |t: f64| t >= prev && t < now;
        // How the previous life ended: a clean stop is no restart.
        let last = events
            .iter()
            .rfind(|e| e.kind != FailureEventKind::Start && in_life(e.wall_time_unix_s));
        if last.is_some_and(|e| e.kind == FailureEventKind::CleanStop) {
            continue;
        }
        let last_save = saves.iter().rfind(|s| in_life(s.started_unix_s));
        let (ended_unix_s, ended_step, recorded, detected_error) = match last {
            Some(e) => (
                e.wall_time_unix_s,
                e.step,
                true,
                e.kind == FailureEventKind::DetectedError,
            ),
            None => match last_save {
                Some(s) => (save_end(s).min(now), s.step, false, false),
                None => (prev, starts[i - 1].step, false, false),
            },
        };
        // The wall time of the restored step: its save (the newest one
        // before this start).
        let restored_at = saves
            .iter()
            .filter(|s| s.step == start.step && s.started_unix_s < now)
            .map(|s| s.started_unix_s)
            .next_back()
            .or(start.saved_unix_s)
            .or_else(|| step_times.get(&start.step).copied());
        let rollback_s = restored_at.map_or(0.0, |t| (ended_unix_s - t).max(0.0));
        restarts.push(Restart {
            started_unix_s: now,
            restored_step: start.step,
            ended_unix_s,
            ended_step,
            recorded,
            detected_error,
            rollback_steps: ended_step.saturating_sub(start.step),
            rollback_s,
            downtime_s: (now - ended_unix_s).max(0.0),
        });
    }
    let first = starts.first().map(|e| e.wall_time_unix_s);
    let end = events
        .iter()
        .map(|e| e.wall_time_unix_s)
        .chain(saves.iter().map(save_end))
        .fold(f64::NAN, f64::max);
    let wall_s = match first {
        Some(f) if end.is_finite() => (end - f).max(0.0),
        _ => 0.0,
    };
    let checkpoint_stall_s: f64 = saves.iter().map(|s| s.math_stop_s).sum();
    let rolled_back_s: f64 = restarts.iter().map(|r| r.rollback_s).sum();
    let restart_s: f64 = restarts.iter().map(|r| r.downtime_s).sum();
    let waterfall = Waterfall {
        wall_s,
        useful_s: (wall_s - checkpoint_stall_s - rolled_back_s - restart_s).max(0.0),
        checkpoint_stall_s,
        rolled_back_s,
        restart_s,
    };
    let mut stops: Vec<f64> = saves.iter().map(|s| s.math_stop_s).collect();
    stops.sort_by(f64::total_cmp);
    let exposed_save_s = (!stops.is_empty()).then(|| stops[stops.len() / 2]);
    let stats = failure_stats(&events, end.is_finite().then_some(end));
    let mtbf_s = (stats.failures > 0).then(|| stats.exposure_s / stats.failures as f64);
    let (interval_young_s, interval_daly_s) = match (exposed_save_s, mtbf_s) {
        (Some(d), Some(m)) if d > 0.0 && m > 0.0 => (Some(young(d, m)), Some(daly(d, m))),
        _ => (None, None),
    };
    RunReport {
        run: run.to_string(),
        started_unix_s: first.unwrap_or(end),
        saves,
        starts: starts.len(),
        restarts,
        waterfall,
        exposed_save_s,
        failures: stats.failures,
        exposure_s: stats.exposure_s,
        mtbf_s,
        interval_young_s,
        interval_daly_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::history::TierRecord;

    fn save(step: u64, at: f64) -> SaveRecord {
        SaveRecord {
            step,
            started_unix_s: at,
            math_stop_s: 0.1,
            bytes: 100,
            incarnation: "i".into(),
            tiers: vec![TierRecord {
                tier: "t".into(),
                committed: true,
                durable_s: 0.5,
                written: 100,
                referenced: 0,
            }],
        }
    }

    #[test]
    fn restarts_roll_back_to_the_restored_save_and_the_waterfall_adds_up() {
        // Saves every 10 s of steps 10, 20, 30; a recorded crash at step
        // 37 (t = 137); restart at t = 140 from 30; an unrecorded kill
        // after the save of 50 (t = 160); restart at 170 from 50; clean
        // stop at 200.
        let events = [
            FailureEvent::start(100.0, 0),
            FailureEvent::crash(137.0, 37),
            FailureEvent::start(140.0, 30),
            FailureEvent::start(170.0, 50),
            FailureEvent::clean_stop(200.0, 80),
        ];
        let saves = [
            save(10, 110.0),
            save(20, 120.0),
            save(30, 130.0),
            save(40, 150.0),
            save(50, 160.0),
            save(60, 180.0),
        ];
        let r = build("r", &events, &saves, &Default::default());
        assert_eq!(r.starts, 3);
        assert_eq!(r.restarts.len(), 2);
        let (a, b) = (&r.restarts[0], &r.restarts[1]);
        assert!(a.recorded && (a.ended_step, a.restored_step, a.rollback_steps) == (37, 30, 7));
        assert!((a.rollback_s - 7.0).abs() < 1e-9 && (a.downtime_s - 3.0).abs() < 1e-9);
        // Estimated: the last save (50, durable at 160.5) ends the life.
        assert!(!b.recorded && (b.ended_step, b.rollback_steps) == (50, 0));
        assert!((b.rollback_s - 0.5).abs() < 1e-9 && (b.downtime_s - 9.5).abs() < 1e-9);
        let w = r.waterfall;
        assert!((w.wall_s - 100.0).abs() < 1e-9);
        let parts = w.useful_s + w.checkpoint_stall_s + w.rolled_back_s + w.restart_s;
        assert!((parts - w.wall_s).abs() < 1e-9, "{w:?}");
        assert!((w.checkpoint_stall_s - 0.6).abs() < 1e-9);
        assert_eq!(r.failures, 2);
        let m = r.mtbf_s.expect("mtbf");
        let y = r.interval_young_s.expect("young");
        assert!((y - (2.0 * 0.1 * m).sqrt()).abs() < 1e-9);
    }
}
