//! `ckpt-bench plan`: the checkpoint interval of every policy for given
//! save time, MTBF, restart time and detection latency.

use std::path::PathBuf;
use std::time::Duration;

use ckpt_core::schedule::{
    availability_optimum, availability_with_latency, daly, fleet_mtbf, latency_aware_interval,
    retention_floor, young,
};
use serde::Serialize;

use crate::CliError;
use crate::plot;
use ckpt_core::schedule::{format_secs, parse_duration};

/// Arguments of `ckpt-bench plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// MTBF of the whole job (e.g. 1h). Alternatively give --nodes and --node-mtbf.
    #[arg(long, value_parser = parse_duration)]
    mtbf: Option<Duration>,
    /// Exposed (blocking) save time δ (e.g. 1s, 250ms).
    #[arg(long, value_parser = parse_duration)]
    save_time: Duration,
    /// Restart time R: from failure to restored state (e.g. 4m).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    restart: Duration,
    /// Error-detection latency L (e.g. 2m): adds the latency-aware policy.
    #[arg(long, value_parser = parse_duration)]
    detect_latency: Option<Duration>,
    /// Number of retained snapshots K for the latency-aware policy.
    #[arg(long, default_value_t = 2)]
    keep: u64,
    /// Number of nodes N; with --node-mtbf the job MTBF is node-mtbf / N.
    #[arg(long)]
    nodes: Option<u64>,
    /// MTBF of one node (e.g. 1825d for five years).
    #[arg(long, value_parser = parse_duration)]
    node_mtbf: Option<Duration>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the cost curve to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// One policy's interval and its expected cost.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRow {
    /// Policy name.
    pub name: &'static str,
    /// The formula's interval, seconds (compute time for Young/Daly).
    pub tau_s: f64,
    /// Save period (start to start), seconds.
    pub period_s: f64,
    /// 1 − availability at the save period.
    pub overhead: f64,
    /// Availability at the save period.
    pub availability: f64,
    /// Snapshots needed to cover the detection latency (when given).
    pub retention_floor: Option<u64>,
}

/// Inputs and result of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Job MTBF, seconds.
    pub mtbf_s: f64,
    /// Save time δ, seconds.
    pub save_time_s: f64,
    /// Restart time R, seconds.
    pub restart_s: f64,
    /// Detection latency L, seconds, when given.
    pub latency_s: Option<f64>,
    /// Retained snapshots K.
    pub keep: u64,
    /// Young, Daly, availability and (with L) latency-aware rows.
    pub rows: Vec<PolicyRow>,
}

/// JSON form of a plan (one flat object).
#[derive(Debug, Serialize)]
struct PlanJson {
    mtbf_s: f64,
    save_time_s: f64,
    restart_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detect_latency_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep: Option<u64>,
    young_s: f64,
    young_period_s: f64,
    young_overhead: f64,
    young_availability: f64,
    daly_s: f64,
    daly_period_s: f64,
    daly_overhead: f64,
    daly_availability: f64,
    availability_s: f64,
    availability_overhead: f64,
    availability_availability: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_aware_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_aware_overhead: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_aware_availability: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_floor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    young_retention_floor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daly_retention_floor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    availability_retention_floor: Option<u64>,
}

/// Resolves the job MTBF from `--mtbf` and/or `--nodes`/`--node-mtbf`.
pub fn resolve_mtbf(
    mtbf: Option<Duration>,
    nodes: Option<u64>,
    node_mtbf: Option<Duration>,
) -> Result<f64, CliError> {
    if nodes == Some(0) {
        return Err(CliError::usage("--nodes must be at least 1"));
    }
    let m = match (mtbf, nodes, node_mtbf) {
        (Some(m), None, None) | (Some(m), Some(_), None) => m.as_secs_f64(),
        (m, Some(n), Some(x)) => {
            let fleet = fleet_mtbf(x.as_secs_f64(), n);
            if let Some(m) = m {
                let m = m.as_secs_f64();
                if (m - fleet).abs() > 1e-3 * fleet {
                    return Err(CliError::usage(format!(
                        "--mtbf {} disagrees with --node-mtbf {} / --nodes {n} = {}; give either --mtbf or the node figures, or make them agree",
                        format_secs(m),
                        format_secs(x.as_secs_f64()),
                        format_secs(fleet)
                    )));
                }
            }
            fleet
        }
        (_, None, Some(_)) => {
            return Err(CliError::usage(
                "--node-mtbf needs --nodes (the job MTBF is node-mtbf / nodes)",
            ));
        }
        (None, Some(_), None) => {
            return Err(CliError::usage(
                "--nodes needs --node-mtbf, or give the job MTBF with --mtbf",
            ));
        }
        (None, None, None) => {
            return Err(CliError::usage(
                "give the job MTBF with --mtbf, or --nodes and --node-mtbf",
            ));
        }
    };
    if m <= 0.0 {
        return Err(CliError::usage("the MTBF must be positive"));
    }
    Ok(m)
}

/// Computes the plan. Overhead and availability of every policy use
/// A_L(period) with L = 0 when no latency is given.
pub fn compute(
    mtbf_s: f64,
    delta: f64,
    restart_s: f64,
    latency_s: Option<f64>,
    keep: u64,
) -> Result<Plan, CliError> {
    if delta <= 0.0 {
        return Err(CliError::usage("--save-time must be positive"));
    }
    let l = latency_s.unwrap_or(0.0);
    let row = |name, tau_s: f64, period_s: f64| {
        let a = availability_with_latency(period_s, delta, mtbf_s, restart_s, l);
        PolicyRow {
            name,
            tau_s,
            period_s,
            overhead: 1.0 - a,
            availability: a,
            retention_floor: latency_s.map(|l| retention_floor(period_s, l)),
        }
    };
    let y = young(delta, mtbf_s);
    let d = daly(delta, mtbf_s);
    let a = availability_optimum(delta, mtbf_s, restart_s);
    let mut rows = vec![
        row("young", y, y + delta),
        row("daly", d, d + delta),
        row("availability", a, a),
    ];
    if let Some(l) = latency_s {
        let t = latency_aware_interval(delta, mtbf_s, restart_s, l, keep).ok_or_else(|| {
            CliError::usage(format!(
                "--keep {keep} cannot cover a detection latency of {}: keep at least 2 snapshots",
                format_secs(l)
            ))
        })?;
        rows.push(row("latency-aware", t, t));
    }
    Ok(Plan {
        mtbf_s,
        save_time_s: delta,
        restart_s,
        latency_s,
        keep,
        rows,
    })
}

fn to_json(p: &Plan) -> PlanJson {
    let get = |name: &str| p.rows.iter().find(|r| r.name == name);
    let nan = PolicyRow {
        name: "",
        tau_s: f64::NAN,
        period_s: f64::NAN,
        overhead: f64::NAN,
        availability: f64::NAN,
        retention_floor: None,
    };
    let young = get("young").unwrap_or(&nan);
    let daly = get("daly").unwrap_or(&nan);
    let avail = get("availability").unwrap_or(&nan);
    let lat = get("latency-aware");
    PlanJson {
        mtbf_s: p.mtbf_s,
        save_time_s: p.save_time_s,
        restart_s: p.restart_s,
        detect_latency_s: p.latency_s,
        keep: p.latency_s.map(|_| p.keep),
        young_s: young.tau_s,
        young_period_s: young.period_s,
        young_overhead: young.overhead,
        young_availability: young.availability,
        daly_s: daly.tau_s,
        daly_period_s: daly.period_s,
        daly_overhead: daly.overhead,
        daly_availability: daly.availability,
        availability_s: avail.tau_s,
        availability_overhead: avail.overhead,
        availability_availability: avail.availability,
        latency_aware_s: lat.map(|r| r.tau_s),
        latency_aware_overhead: lat.map(|r| r.overhead),
        latency_aware_availability: lat.map(|r| r.availability),
        retention_floor: lat.and_then(|r| r.retention_floor),
        young_retention_floor: young.retention_floor,
        daly_retention_floor: daly.retention_floor,
        availability_retention_floor: avail.retention_floor,
    }
}

fn table(p: &Plan) -> String {
    let mut out = format!(
        "M = {} ({:.0} s), δ = {}, R = {}",
        format_secs(p.mtbf_s),
        p.mtbf_s,
        format_secs(p.save_time_s),
        format_secs(p.restart_s)
    );
    if let Some(l) = p.latency_s {
        out += &format!(", L = {}, K = {}", format_secs(l), p.keep);
    }
    out += "\n\n";
    let floors = p.latency_s.is_some();
    out += &format!(
        "{:<14} {:>10} {:>12} {:>10} {:>13}",
        "policy", "τ", "save period", "overhead", "availability"
    );
    if floors {
        out += &format!(" {:>10}", "keep ≥");
    }
    out += "\n";
    for r in &p.rows {
        out += &format!(
            "{:<14} {:>10} {:>12} {:>9.3}% {:>12.3}%",
            r.name,
            format_secs(r.tau_s),
            format_secs(r.period_s),
            100.0 * r.overhead,
            100.0 * r.availability
        );
        if let Some(k) = r.retention_floor {
            let mark = if k > p.keep { " *" } else { "" };
            out += &format!(" {k:>10}{mark}");
        }
        out += "\n";
    }
    out += "\nτ: Young and Daly give compute time between saves (period = τ + δ); the\n\
            availability optima give the save period. Overhead = 1 − availability,\n\
            with availability (1 − δ/period)·M/(M + period/2 + L + R)";
    out += if floors {
        ".\n\"keep ≥\": snapshots to retain so that one taken ≥ L before detection survives;\n\
         * = not feasible with the K snapshots given: an error detected L late could find\n\
         no trustworthy checkpoint left.\n"
    } else {
        " (L = 0).\n"
    };
    out
}

/// Runs `ckpt-bench plan`.
pub fn run(args: PlanArgs) -> Result<(), CliError> {
    let mtbf_s = resolve_mtbf(args.mtbf, args.nodes, args.node_mtbf)?;
    let latency_s = args.detect_latency.map(|d| d.as_secs_f64());
    let plan = compute(
        mtbf_s,
        args.save_time.as_secs_f64(),
        args.restart.as_secs_f64(),
        latency_s,
        args.keep,
    )?;
    if let Some(path) = &args.plot {
        let markers: Vec<(String, f64)> = plan
            .rows
            .iter()
            .map(|r| match r.name {
                "latency-aware" => (format!("latency-aware (K = {})", plan.keep), r.period_s),
                name => (name.to_string(), r.period_s),
            })
            .collect();
        plot::plan_plot(
            path,
            &plot::CostCurve {
                delta: plan.save_time_s,
                mtbf: plan.mtbf_s,
                restart: plan.restart_s,
                latency: latency_s.unwrap_or(0.0),
                markers: &markers,
            },
        )?;
    }
    if args.json {
        let text = serde_json::to_string_pretty(&to_json(&plan))
            .map_err(|e| CliError::io(format!("cannot encode JSON: {e}")))?;
        crate::emit(&(text + "\n"))
    } else {
        crate::emit(&table(&plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: u64) -> Option<Duration> {
        Some(Duration::from_secs(x * 3600))
    }

    #[test]
    fn mtbf_resolution() {
        assert_eq!(resolve_mtbf(h(1), None, None).ok(), Some(3600.0));
        assert_eq!(resolve_mtbf(None, Some(1000), h(1000)).ok(), Some(3600.0));
        assert_eq!(resolve_mtbf(h(1), Some(1000), h(1000)).ok(), Some(3600.0));
        assert_eq!(resolve_mtbf(h(1), Some(1000), None).ok(), Some(3600.0));
        assert!(resolve_mtbf(h(2), Some(1000), h(1000)).is_err());
        assert!(resolve_mtbf(None, None, h(1)).is_err());
        assert!(resolve_mtbf(None, Some(3), None).is_err());
        assert!(resolve_mtbf(None, None, None).is_err());
        assert!(resolve_mtbf(None, Some(0), h(1)).is_err());
        assert!(resolve_mtbf(Some(Duration::ZERO), None, None).is_err());
    }

    #[test]
    fn example_plan() -> Result<(), CliError> {
        let p = compute(3600.0, 1.0, 240.0, Some(120.0), 2)?;
        let names: Vec<&str> = p.rows.iter().map(|r| r.name).collect();
        assert_eq!(names, ["young", "daly", "availability", "latency-aware"]);
        assert!((p.rows[0].tau_s - 7200f64.sqrt()).abs() < 1e-9);
        assert!((p.rows[2].tau_s - (1.0 + 7681f64.sqrt())).abs() < 1e-9);
        assert_eq!(p.rows[3].tau_s, 120.0);
        assert_eq!(p.rows[3].retention_floor, Some(2));
        assert_eq!(p.rows[0].retention_floor, Some(3));
        // The unconstrained optima need 3 snapshots, more than K = 2: the
        // latency-aware row is the only feasible one, and it pays a little
        // availability for that.
        for r in &p.rows[..3] {
            assert!(r.retention_floor > Some(2));
            assert!(r.availability >= p.rows[3].availability);
        }
        assert!(table(&p).contains("3 *"));
        let j = serde_json::to_value(to_json(&p)).map_err(|e| CliError::io(e.to_string()))?;
        for key in [
            "young_s",
            "daly_s",
            "availability_s",
            "latency_aware_s",
            "retention_floor",
            "mtbf_s",
            "young_overhead",
            "young_availability",
            "latency_aware_availability",
        ] {
            assert!(j.get(key).is_some(), "{key}");
        }
        Ok(())
    }

    #[test]
    fn plan_without_latency_has_no_latency_keys() -> Result<(), CliError> {
        let p = compute(3600.0, 1.0, 240.0, None, 2)?;
        assert_eq!(p.rows.len(), 3);
        let j = serde_json::to_value(to_json(&p)).map_err(|e| CliError::io(e.to_string()))?;
        assert!(j.get("latency_aware_s").is_none());
        assert!(j.get("retention_floor").is_none());
        assert!(table(&p).contains("availability"));
        assert!(compute(3600.0, 0.0, 0.0, None, 2).is_err());
        assert!(compute(3600.0, 1.0, 0.0, Some(60.0), 1).is_err());
        Ok(())
    }
}
