//! How numbers and times read on the dashboard: decimal byte units (as carriers bill: 1 MB = 1,000,000 bytes),
//! usage lines ("750 MB / 1 GB"), times in UTC, and parsing of the limit field.

/// One megabyte and one gigabyte, in bytes (decimal).
pub const MB: u64 = 1_000_000;
pub const GB: u64 = 1_000_000_000;
/// Largest limit the form accepts: 1,000,000 GB (1 EB).
const MAX_LIMIT: f64 = 1e18;

/// `n` bytes with a decimal unit and at most three significant digits: `0 B`, `980 kB`, `1.05 MB`, `1 GB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss)] // display only
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 999.5 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let digits = if v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else {
        2
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    };
    format!("{s} {}", UNITS[unit])
}

/// A connection's usage as a line and a percentage of its limit (none when unlimited).
pub fn usage(used: u64, limit: Option<u64>) -> (String, Option<u8>) {
    match limit {
        Some(l) if l > 0 => {
            let pct = (u128::from(used.min(l)) * 100 / u128::from(l)) as u8;
            (format!("{} / {}", bytes(used), bytes(l)), Some(pct))
        }
        _ => (format!("{} / unlimited", bytes(used)), None),
    }
}

/// An RFC 3339 UTC time from the API as `2026-12-01 07:33:05 UTC`; other text unchanged.
pub fn time(rfc3339: &str) -> String {
    match rfc3339.strip_suffix('Z') {
        Some(t) if t.len() >= 19 => format!("{} UTC", t[..19].replacen('T', " ", 1)),
        _ => rfc3339.to_owned(),
    }
}

/// An RFC 3339 UTC time as `12-01 07:33:05` for table cells (the column header says UTC).
pub fn short_time(rfc3339: &str) -> String {
    match rfc3339.get(5..19) {
        Some(t) if rfc3339.ends_with('Z') => t.replacen('T', " ", 1),
        _ => rfc3339.to_owned(),
    }
}

/// The limit form field: empty means unlimited; otherwise a positive number of `unit` (`MB` or `GB`).
pub fn parse_limit(value: &str, unit: &str) -> Result<Option<u64>, &'static str> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let scale = match unit {
        "GB" => GB,
        "MB" => MB,
        _ => return Err("Choose MB or GB."),
    };
    let v: f64 = value
        .replace(',', ".")
        .parse()
        .map_err(|_| "Enter a number, for example 500 or 1.5, or leave it empty for unlimited.")?;
    #[allow(clippy::cast_precision_loss)]
    let bytes = v * scale as f64;
    if !v.is_finite() || v <= 0.0 || bytes < 1.0 {
        return Err("The limit must be more than zero (leave it empty for unlimited).");
    }
    if bytes > MAX_LIMIT {
        return Err("That limit is too large.");
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked: 1 ≤ bytes ≤ 1e18
    Ok(Some(bytes.round() as u64))
}

/// A limit as the form shows it: whole gigabytes in GB, anything else in MB.
pub fn limit_field(limit: Option<u64>) -> (String, &'static str) {
    match limit {
        None => (String::new(), "GB"),
        Some(l) if l % GB == 0 => ((l / GB).to_string(), "GB"),
        Some(l) => {
            #[allow(clippy::cast_precision_loss)]
            let mb = l as f64 / MB as f64;
            (format!("{mb}"), "MB")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_a_bill() {
        let table = [
            (0, "0 B"),
            (999, "999 B"),
            (1000, "1 kB"),
            (750 * MB, "750 MB"),
            (GB, "1 GB"),
            (1_048_576, "1.05 MB"),
            (1_500 * MB, "1.5 GB"),
            (12_345_678, "12.3 MB"),
            (999_999, "1 MB"),
        ];
        for (n, want) in table {
            assert_eq!(bytes(n), want, "{n}");
        }
    }

    #[test]
    fn usage_lines_and_percentages() {
        assert_eq!(
            usage(750 * MB, Some(GB)),
            ("750 MB / 1 GB".into(), Some(75))
        );
        assert_eq!(usage(2 * MB, Some(MB)).1, Some(100), "capped at 100 %");
        assert_eq!(usage(5, None), ("5 B / unlimited".into(), None));
    }

    #[test]
    fn limits_parse_in_decimal_units() {
        assert_eq!(parse_limit("", "GB"), Ok(None));
        assert_eq!(parse_limit("1", "MB"), Ok(Some(MB)));
        assert_eq!(parse_limit("1.5", "GB"), Ok(Some(1_500 * MB)));
        assert_eq!(parse_limit("0,5", "MB"), Ok(Some(500_000)));
        assert!(parse_limit("0", "MB").is_err());
        assert!(parse_limit("-3", "GB").is_err());
        assert!(parse_limit("lots", "GB").is_err());
        assert!(parse_limit("1", "TB").is_err());
        assert!(parse_limit("inf", "GB").is_err());
        assert_eq!(limit_field(Some(2 * GB)), ("2".into(), "GB"));
        assert_eq!(limit_field(Some(1_500 * MB)), ("1500".into(), "MB"));
        assert_eq!(time("2026-12-01T07:33:05.123Z"), "2026-12-01 07:33:05 UTC");
        assert_eq!(short_time("2026-12-01T07:33:05.123Z"), "12-01 07:33:05");
    }
}
