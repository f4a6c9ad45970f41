//! SVG plots of `plan` (cost curve) and `simulate` (time waterfall),
//! drawn with plotters.

use std::path::Path;

use ckpt_core::schedule::{cost_terms, expected_overhead};

use crate::sim::IntervalSummary;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::CliError;
use ckpt_core::schedule::format_secs;

/// Inputs of the plan cost curve.
pub struct CostCurve<'a> {
    /// Exposed save time δ, seconds.
    pub delta: f64,
    /// Job MTBF, seconds.
    pub mtbf: f64,
    /// Restart time, seconds.
    pub restart: f64,
    /// Detection latency, seconds (0 if none).
    pub latency: f64,
    /// (policy name, save period in seconds) drawn as vertical lines.
    pub markers: &'a [(String, f64)],
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn wrap(path: &Path, r: DrawResult) -> Result<(), CliError> {
    r.map_err(|e| CliError::io(format!("cannot write plot {}: {e}", path.display())))
}

const MARKER_COLORS: [RGBColor; 4] = [
    RGBColor(0, 114, 178),
    RGBColor(86, 180, 233),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
];

/// Overhead versus save period: writing term δ/τ, rollback term
/// (τ/2 + L + R)/M, their sum, the exact 1 − A_L(τ), and each policy's
/// period as a vertical line.
pub fn plan_plot(path: &Path, c: &CostCurve<'_>) -> Result<(), CliError> {
    wrap(path, draw_plan(path, c))
}

fn draw_plan(path: &Path, c: &CostCurve<'_>) -> DrawResult {
    let periods = c.markers.iter().map(|(_, t)| *t);
    let tmin = periods.clone().fold(f64::INFINITY, f64::min);
    let tmax = periods.fold(0.0, f64::max);
    let lo = (tmin / 30.0).max(c.delta * 1.02);
    let hi = tmax * 30.0;
    let n = 600;
    let taus: Vec<f64> = (0..=n)
        .map(|i| lo * (hi / lo).powf(i as f64 / n as f64))
        .collect();
    let terms: Vec<(f64, f64, f64)> = taus
        .iter()
        .map(|&t| {
            let (w, r) = cost_terms(t, c.delta, c.mtbf, c.restart, c.latency);
            (
                w,
                r,
                expected_overhead(t, c.delta, c.mtbf, c.restart, c.latency),
            )
        })
        .collect();
    let min_sum = terms
        .iter()
        .map(|(w, r, _)| w + r)
        .fold(f64::INFINITY, f64::min);
    let ymax = ((2.5 * min_sum).min(1.0) / 0.05).ceil() * 0.05;
    let clip = |f: &dyn Fn(&(f64, f64, f64)) -> f64| -> Vec<(f64, f64)> {
        taus.iter()
            .zip(&terms)
            .map(|(t, x)| (*t, f(x)))
            .filter(|(_, y)| *y <= ymax)
            .collect()
    };

    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut title = format!(
        "Checkpoint cost vs interval (M = {}, δ = {}, R = {}",
        format_secs(c.mtbf),
        format_secs(c.delta),
        format_secs(c.restart)
    );
    if c.latency > 0.0 {
        title += &format!(", L = {}", format_secs(c.latency));
    }
    title += ")";
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(nice_durations(lo, hi)),
            0.0..ymax,
        )?;
    chart
        .configure_mesh()
        .x_desc("save period τ (log scale)")
        .y_desc("share of wall time lost")
        .x_label_formatter(&|v| axis_secs(*v))
        .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    let rollback_label = if c.latency > 0.0 {
        "rollback (τ/2 + L + R)/M"
    } else {
        "rollback (τ/2 + R)/M"
    };
    let write_color = RGBColor(230, 159, 0);
    let roll_color = RGBColor(213, 94, 0);
    chart
        .draw_series(LineSeries::new(clip(&|x| x.0), write_color.stroke_width(2)))?
        .label("writing δ/τ")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], write_color.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(clip(&|x| x.1), roll_color.stroke_width(2)))?
        .label(rollback_label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], roll_color.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(clip(&|x| x.0 + x.1), BLACK.stroke_width(3)))?
        .label("sum (first-order overhead)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK.stroke_width(3)));
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(DashedLineSeries::new(
            clip(&|x| x.2),
            8,
            5,
            grey.stroke_width(2),
        ))?
        .label(if c.latency > 0.0 {
            "exact 1 − A_L(τ)"
        } else {
            "exact 1 − A(τ)"
        })
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], grey.stroke_width(2)));

    for (i, (name, t)) in c.markers.iter().enumerate() {
        let color = MARKER_COLORS[i % MARKER_COLORS.len()];
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new([(*t, 0.0), (*t, ymax)], style))?
            .label(format!("{name} optimum: {}", format_secs(*t)))
            .legend(move |(x, y)| PathElement::new([(x + 12, y - 7), (x + 12, y + 7)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Round durations (1-2-5 seconds, then minutes, hours, days) in [lo, hi].
fn nice_durations(lo: f64, hi: f64) -> Vec<f64> {
    const STEPS: [f64; 16] = [
        1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
        18_000.0, 43_200.0,
    ];
    let mut v: Vec<f64> = Vec::new();
    let mut scale = 1e-3;
    while scale <= 1.0 {
        v.extend([1.0, 2.0, 5.0].iter().map(|m| m * scale));
        scale *= 10.0;
    }
    v.extend(STEPS.iter().skip(3));
    let mut day = 86_400.0;
    while day <= hi {
        v.push(day);
        day *= 2.0;
    }
    v.into_iter().filter(|t| *t >= lo && *t <= hi).collect()
}

/// Axis label for a round duration: "500ms", "20s", "5m", "2h", "4d".
fn axis_secs(v: f64) -> String {
    let trim = |x: f64, unit: &str| {
        let s = format!("{x:.1}");
        format!("{}{unit}", s.trim_end_matches('0').trim_end_matches('.'))
    };
    if v < 1.0 {
        trim(v * 1000.0, "ms")
    } else if v < 60.0 {
        trim(v, "s")
    } else if v < 3600.0 {
        trim(v / 60.0, "m")
    } else if v < 86_400.0 {
        trim(v / 3600.0, "h")
    } else {
        trim(v / 86_400.0, "d")
    }
}

/// Stacked bars of mean useful work, checkpoint time, wasted work and
/// restarts per interval, with the mean efficiency above each bar.
pub fn simulate_plot(path: &Path, s: &[IntervalSummary], best: u64) -> Result<(), CliError> {
    wrap(path, draw_simulate(path, s, best))
}

type Layer = (&'static str, RGBColor, fn(&IntervalSummary) -> f64);

fn draw_simulate(path: &Path, s: &[IntervalSummary], best: u64) -> DrawResult {
    let layers: [Layer; 4] = [
        ("useful work", RGBColor(0, 158, 115), |x| x.mean_useful_s),
        ("checkpoint (blocking)", RGBColor(0, 114, 178), |x| {
            x.mean_checkpoint_s
        }),
        ("wasted work (rolled back)", RGBColor(213, 94, 0), |x| {
            x.mean_wasted_s
        }),
        ("restarts", RGBColor(204, 121, 167), |x| x.mean_restart_s),
    ];
    let n = s.len() as u32;
    let top_s = s.iter().map(|x| x.wall_s.mean).fold(0.0, f64::max);
    let (unit_s, unit, unit_name) = if top_s >= 7200.0 {
        (3600.0, "h", "hours")
    } else if top_s >= 120.0 {
        (60.0, "min", "minutes")
    } else {
        (1.0, "s", "seconds")
    };
    // Scale factor from seconds to the axis unit.
    let hours = 1.0 / unit_s;
    let ymax = (top_s * hours * 1.3).max(1e-9);

    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Where the wall time goes, per checkpoint interval (mean over seeds)",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        // Integer ranges include their end: 0..n−1 gives n segments (a
        // single bar gets an empty slot beside it: 0..0 would be empty).
        .build_cartesian_2d((0u32..n.max(2) - 1).into_segmented(), 0.0..ymax)?;
    let label = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => s
            .get(*i as usize)
            .map(|x| {
                if x.interval_steps == best {
                    format!("{} (best)", x.interval_steps)
                } else {
                    x.interval_steps.to_string()
                }
            })
            .unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(s.len())
        .x_label_formatter(&label)
        .y_label_formatter(&|v| format!("{v:.0} {unit}"))
        .x_desc("checkpoint interval (steps)")
        .y_desc(format!("mean wall time ({unit_name})"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    for (k, (name, color, _)) in layers.iter().enumerate() {
        let color = *color;
        let bars = s.iter().enumerate().map(|(i, x)| {
            let base: f64 = layers[..k].iter().map(|l| (l.2)(x)).sum::<f64>() * hours;
            let height = (layers[k].2)(x) * hours;
            let i = i as u32;
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), base),
                    (SegmentValue::Exact(i + 1), base + height),
                ],
                color.filled(),
            );
            r.set_margin(0, 0, 14, 14);
            r
        });
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    let text =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(s.iter().enumerate().map(|(i, x)| {
        Text::new(
            format!("{:.1}% efficient", 100.0 * x.efficiency.mean),
            (
                SegmentValue::CenterOf(i as u32),
                x.wall_s.mean * hours + ymax * 0.01,
            ),
            text.clone(),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ticks() {
        assert_eq!(
            nice_durations(3.0, 100.0),
            vec![5.0, 10.0, 20.0, 30.0, 60.0]
        );
        assert_eq!(axis_secs(0.5), "500ms");
        assert_eq!(axis_secs(30.0), "30s");
        assert_eq!(axis_secs(120.0), "2m");
        assert_eq!(axis_secs(5400.0), "1.5h");
        assert_eq!(axis_secs(172_800.0), "2d");
    }
}
