//! `ckpt-bench simulate`: sweep checkpoint intervals over a discrete-event
//! simulation of a synchronous job with random failures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_core::schedule::{availability_optimum, daly, mtbf_from_failure_prob, young};

use crate::sim::{IntervalSummary, SimParams, best_interval, sweep};
use serde::Serialize;

use crate::CliError;
use crate::plot;
use ckpt_core::schedule::{format_secs, parse_duration};

/// Arguments of `ckpt-bench simulate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("failures").required(true).args(["fail_prob", "mtbf"])))]
pub struct SimulateArgs {
    /// Steps the job must complete.
    #[arg(long)]
    total_steps: u64,
    /// Duration of one step (e.g. 1s).
    #[arg(long, value_parser = parse_duration)]
    step_time: Duration,
    /// Full cost of one checkpoint (e.g. 60s).
    #[arg(long, value_parser = parse_duration)]
    ckpt_cost: Duration,
    /// Restart time after a failure (e.g. 120s).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    restart: Duration,
    /// Failure probability per step (Poisson in wall time with
    /// MTBF = step_time / −ln(1 − p)).
    #[arg(long)]
    fail_prob: Option<f64>,
    /// Job MTBF instead of --fail-prob (e.g. 2h).
    #[arg(long, value_parser = parse_duration)]
    mtbf: Option<Duration>,
    /// Fraction of the checkpoint cost that blocks the job (1 = fully
    /// blocking; less for asynchronous saves).
    #[arg(long, default_value_t = 1.0)]
    blocking_fraction: f64,
    /// Checkpoint intervals to compare, in steps (comma separated).
    /// Default: Young's interval times 1/8, 1/4, 1/2, 1, 2, 4 and 8.
    #[arg(long, value_delimiter = ',')]
    intervals: Vec<u64>,
    /// Runs per interval.
    #[arg(long, default_value_t = 50)]
    seeds: u64,
    /// First seed (runs use seed, seed + 1, ...).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON Lines: one object per interval, then a summary object.
    #[arg(long)]
    json: bool,
    /// Write a time waterfall per interval to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// Analytic optima beside the simulation, in steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Analytic {
    /// Young's interval, steps.
    pub young_steps: u64,
    /// Daly's interval, steps.
    pub daly_steps: u64,
    /// Availability-optimal period minus δ, steps.
    pub availability_steps: u64,
}

#[derive(Debug, Serialize)]
struct IntervalJson {
    interval_steps: u64,
    wall_mean_s: f64,
    wall_ci95_s: f64,
    efficiency_mean: f64,
    efficiency_ci95: f64,
    overhead_pct_mean: f64,
    overhead_pct_ci95: f64,
    failures_mean: f64,
    useful_mean_s: f64,
    checkpoint_mean_s: f64,
    wasted_mean_s: f64,
    restart_mean_s: f64,
}

#[derive(Debug, Serialize)]
struct SummaryJson {
    best_interval_steps: u64,
    young_steps: u64,
    daly_steps: u64,
    availability_steps: u64,
    mtbf_s: f64,
    exposed_ckpt_cost_s: f64,
    seeds: u64,
}

/// Builds and checks the simulation parameters.
fn params(a: &SimulateArgs) -> Result<SimParams, CliError> {
    let step_time_s = a.step_time.as_secs_f64();
    if a.total_steps == 0 {
        return Err(CliError::usage("--total-steps must be at least 1"));
    }
    if step_time_s <= 0.0 {
        return Err(CliError::usage("--step-time must be positive"));
    }
    if !(0.0..=1.0).contains(&a.blocking_fraction) {
        return Err(CliError::usage(format!(
            "--blocking-fraction must lie in [0, 1], got {}",
            a.blocking_fraction
        )));
    }
    let mtbf_s = match (a.fail_prob, a.mtbf) {
        (Some(p), None) => {
            if !(p > 0.0 && p < 1.0) {
                return Err(CliError::usage(format!(
                    "--fail-prob must lie strictly between 0 and 1, got {p}"
                )));
            }
            mtbf_from_failure_prob(step_time_s, p)
        }
        (None, Some(m)) => m.as_secs_f64(),
        _ => {
            return Err(CliError::usage(
                "give exactly one of --fail-prob and --mtbf",
            ));
        }
    };
    let p = SimParams {
        total_steps: a.total_steps,
        step_time_s,
        ckpt_cost_s: a.ckpt_cost.as_secs_f64(),
        restart_s: a.restart.as_secs_f64(),
        mtbf_s,
        blocking_fraction: a.blocking_fraction,
    };
    p.validate().map_err(|e| CliError::usage(e.to_string()))?;
    if a.seeds == 0 {
        return Err(CliError::usage("--seeds must be at least 1"));
    }
    if a.intervals.contains(&0) {
        return Err(CliError::usage("--intervals must all be at least 1 step"));
    }
    Ok(p)
}

/// Young's, Daly's and the availability optimum in steps, with δ the
/// exposed checkpoint cost f·C.
pub fn analytic(p: &SimParams) -> Analytic {
    let delta = p.exposed_cost_s();
    let steps = |s: f64| (s / p.step_time_s).round().max(1.0) as u64;
    Analytic {
        young_steps: steps(young(delta, p.mtbf_s)),
        daly_steps: steps(daly(delta, p.mtbf_s)),
        availability_steps: steps(availability_optimum(delta, p.mtbf_s, p.restart_s) - delta),
    }
}

/// Default sweep: Young's interval times 1/8 … 8, deduplicated.
fn default_intervals(young_steps: u64) -> Vec<u64> {
    let mut v: Vec<u64> = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
        .iter()
        .map(|f| ((young_steps as f64 * f).round() as u64).max(1))
        .collect();
    v.dedup();
    v
}

fn table(p: &SimParams, seeds: u64, s: &[IntervalSummary], an: &Analytic, elapsed: f64) -> String {
    let mut out = format!(
        "{} steps × {}, checkpoint {} ({:.0}% blocking), restart {}, MTBF {} ({:.0} s), {} seeds per interval\n\n",
        p.total_steps,
        format_secs(p.step_time_s),
        format_secs(p.ckpt_cost_s),
        100.0 * p.blocking_fraction,
        format_secs(p.restart_s),
        format_secs(p.mtbf_s),
        p.mtbf_s,
        seeds
    );
    out += &format!(
        "{:>10} {:>24} {:>18} {:>16} {:>9}\n",
        "interval", "wall time (h, ±95% CI)", "efficiency", "overhead", "failures"
    );
    let ci = |x: f64, prec: usize| {
        if x.is_nan() {
            "n/a".to_string()
        } else {
            format!("{x:.prec$}")
        }
    };
    for x in s {
        out += &format!(
            "{:>10} {:>15.2} ± {:>6} {:>9.4} ± {:>6} {:>7.2}% ± {:>5} {:>9.1}\n",
            x.interval_steps,
            x.wall_s.mean / 3600.0,
            ci(x.wall_s.ci95 / 3600.0, 2),
            x.efficiency.mean,
            ci(x.efficiency.ci95, 4),
            x.overhead_pct.mean,
            ci(x.overhead_pct.ci95, 2),
            x.mean_failures
        );
    }
    if let Some(b) = best_interval(s) {
        out += &format!(
            "\nsimulated optimum: {} steps (efficiency {:.4})\n",
            b.interval_steps, b.efficiency.mean
        );
    }
    out += &format!(
        "analytic optimum:  Young {} steps, Daly {} steps, availability {} steps (δ = f·C = {})\n",
        an.young_steps,
        an.daly_steps,
        an.availability_steps,
        format_secs(p.exposed_cost_s())
    );
    out += &format!(
        "({} runs simulated in {:.3} s)\n",
        s.len() as u64 * seeds,
        elapsed
    );
    out
}

/// Runs `ckpt-bench simulate`.
pub fn run(args: SimulateArgs) -> Result<(), CliError> {
    let p = params(&args)?;
    let an = analytic(&p);
    let intervals = if args.intervals.is_empty() {
        default_intervals(an.young_steps)
    } else {
        args.intervals.clone()
    };
    let started = Instant::now();
    let summaries =
        sweep(&p, &intervals, args.seeds, args.seed).map_err(|e| CliError::usage(e.to_string()))?;
    let elapsed = started.elapsed().as_secs_f64();
    let best = best_interval(&summaries).map_or(0, |b| b.interval_steps);
    if let Some(path) = &args.plot {
        plot::simulate_plot(path, &summaries, best)?;
    }
    if args.json {
        let mut text = String::new();
        for x in &summaries {
            text += &json_line(&IntervalJson {
                interval_steps: x.interval_steps,
                wall_mean_s: x.wall_s.mean,
                wall_ci95_s: x.wall_s.ci95,
                efficiency_mean: x.efficiency.mean,
                efficiency_ci95: x.efficiency.ci95,
                overhead_pct_mean: x.overhead_pct.mean,
                overhead_pct_ci95: x.overhead_pct.ci95,
                failures_mean: x.mean_failures,
                useful_mean_s: x.mean_useful_s,
                checkpoint_mean_s: x.mean_checkpoint_s,
                wasted_mean_s: x.mean_wasted_s,
                restart_mean_s: x.mean_restart_s,
            })?;
        }
        text += &json_line(&SummaryJson {
            best_interval_steps: best,
            young_steps: an.young_steps,
            daly_steps: an.daly_steps,
            availability_steps: an.availability_steps,
            mtbf_s: p.mtbf_s,
            exposed_ckpt_cost_s: p.exposed_cost_s(),
            seeds: args.seeds,
        })?;
        crate::emit(&text)
    } else {
        crate::emit(&table(&p, args.seeds, &summaries, &an, elapsed))
    }
}

/// One record as a JSON line.
fn json_line<T: Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string(v)
        .map(|s| s + "\n")
        .map_err(|e| CliError::io(format!("cannot encode JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analytic_for_the_example() {
        let p = SimParams {
            total_steps: 100_000,
            step_time_s: 1.0,
            ckpt_cost_s: 60.0,
            restart_s: 120.0,
            mtbf_s: mtbf_from_failure_prob(1.0, 0.000125),
            blocking_fraction: 1.0,
        };
        let a = analytic(&p);
        assert_eq!(a.young_steps, 980);
        assert!(a.daly_steps < a.young_steps);
    }

    #[test]
    fn default_sweep_brackets_young() {
        assert_eq!(
            default_intervals(1000),
            vec![125, 250, 500, 1000, 2000, 4000, 8000]
        );
        assert_eq!(default_intervals(1), vec![1, 2, 4, 8]);
    }
}
