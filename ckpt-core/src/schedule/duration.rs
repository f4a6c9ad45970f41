//! Human-friendly durations on the command line: `90`, `90s`, `250ms`,
//! `4m`, `1.5h`, `2d`, `1h30m`.

use std::time::Duration;

/// Seconds per unit suffix.
const UNITS: [(&str, f64); 5] = [
    ("ms", 1e-3),
    ("s", 1.0),
    ("m", 60.0),
    ("h", 3600.0),
    ("d", 86_400.0),
];

/// Parses a duration: one or more `<number><unit>` parts (units ms, s, m,
/// h, d), or a bare number of seconds. Used as a clap value parser.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let secs = parse_seconds(text)?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration `{text}` is too large"))
}

/// Same as [`parse_duration`], in seconds.
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    let err = || {
        format!(
            "invalid duration `{text}`: expected a number of seconds or numbers with units ms, s, m, h, d (e.g. 90, 250ms, 4m, 1.5h, 1h30m)"
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err());
    }
    if let Ok(v) = s.parse::<f64>() {
        return check(v, text);
    }
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale = UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, f)| *f)
            .ok_or_else(err)?;
        total += value * scale;
        rest = &rest[unit_len..];
    }
    check(total, text)
}

fn check(v: f64, text: &str) -> Result<f64, String> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "invalid duration `{text}`: must be a finite, non-negative time"
        ))
    }
}

/// Formats seconds compactly: `250ms`, `8.50s`, `84.9s`, `4m00s`,
/// `2h13m`, `3d04h`.
pub fn format_secs(s: f64) -> String {
    if !s.is_finite() {
        return "∞".to_string();
    }
    if s < 1.0 {
        return format!("{:.0}ms", s * 1000.0);
    }
    if s < 10.0 {
        return format!("{s:.2}s");
    }
    if s < 100.0 {
        return format!("{s:.1}s");
    }
    let total = s.round() as u64;
    if total < 3600 {
        format!("{}m{:02}s", total / 60, total % 60)
    } else if total < 86_400 {
        format!("{}h{:02}m", total / 3600, (total % 3600) / 60)
    } else {
        format!("{}d{:02}h", total / 86_400, (total % 86_400) / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_bare_numbers() {
        assert_eq!(parse_seconds("90"), Ok(90.0));
        assert_eq!(parse_seconds("1.5"), Ok(1.5));
        assert_eq!(parse_seconds("90s"), Ok(90.0));
        assert_eq!(parse_seconds("250ms"), Ok(0.25));
        assert_eq!(parse_seconds("4m"), Ok(240.0));
        assert_eq!(parse_seconds("1h"), Ok(3600.0));
        assert_eq!(parse_seconds("1.5h"), Ok(5400.0));
        assert_eq!(parse_seconds("2d"), Ok(172_800.0));
        assert_eq!(parse_seconds("1h30m"), Ok(5400.0));
        assert_eq!(parse_seconds(" 2m30s "), Ok(150.0));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", "h", "1x", "1hh", "-1s", "-3", "1..2s", "NaN", "inf", "s1", "1 h",
        ] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("1e300").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_secs(0.25), "250ms");
        assert_eq!(format_secs(1.0), "1.00s");
        assert_eq!(format_secs(84.86), "84.9s");
        assert_eq!(format_secs(240.0), "4m00s");
        assert_eq!(format_secs(3600.0), "1h00m");
        assert_eq!(format_secs(7999.5), "2h13m");
        assert_eq!(format_secs(100_000.0), "1d03h");
    }
}
