//! The hourly usage chart: inline SVG bars, one per UTC hour of the last seven days, from the API's usage history.

use maud::{html, Markup};
use serde_json::Value;

use super::format::{bytes, time};

const HOUR_MS: i64 = 3_600_000;
/// Hours shown: the API's default range, seven days.
const HOURS: i64 = 7 * 24;
/// Drawing size in SVG units (the chart scales to its container's width).
const W: i64 = 840;
const H: i64 = 160;
const BAR: i64 = W / HOURS;

/// One bucket: start of the hour (Unix ms), bytes up, bytes down.
struct Bucket {
    hour: i64,
    up: u64,
    down: u64,
}

fn buckets(history: &Value) -> (i64, Vec<Bucket>) {
    let until = history["until"].as_i64().unwrap_or(0);
    let n = |v: &Value| v.as_i64().and_then(|x| u64::try_from(x).ok()).unwrap_or(0);
    let rows = history["hours"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let list = rows
        .iter()
        .filter_map(|h| {
            Some(Bucket {
                hour: h["hour_ms"].as_i64()?,
                up: n(&h["bytes_up"]),
                down: n(&h["bytes_down"]),
            })
        })
        .collect();
    (until, list)
}

/// The chart for a usage history answer (`GET …/usage`), with a text summary for screen readers.
pub fn usage_chart(history: &Value) -> Markup {
    let (until, list) = buckets(history);
    // The last bar is the hour that contains `until - 1`.
    let last_hour = (until - 1).div_euclid(HOUR_MS) * HOUR_MS;
    let first_hour = last_hour - (HOURS - 1) * HOUR_MS;
    let shown: Vec<&Bucket> = list
        .iter()
        .filter(|b| b.hour >= first_hour && b.hour <= last_hour)
        .collect();
    let total: u64 = shown.iter().map(|b| b.up + b.down).sum();
    let peak = shown.iter().max_by_key(|b| b.up + b.down);
    let max = peak.map_or(0, |b| b.up + b.down).max(1);
    let summary = match peak {
        Some(p) if total > 0 => format!(
            "Hourly usage, last 7 days: {} in total; busiest hour {} with {}.",
            bytes(total),
            time(&crate::clock::rfc3339(p.hour)),
            bytes(p.up + p.down)
        ),
        _ => "Hourly usage, last 7 days: no traffic yet.".to_owned(),
    };
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {}", H + 20)) role="img" aria-label=(summary) preserveAspectRatio="none" {
                line x1="0" y1=(H) x2=(W) y2=(H) class="axis" {}
                @for b in &shown {
                    @let total = b.up + b.down;
                    @let x = (b.hour - first_hour) / HOUR_MS * BAR;
                    @let h = scaled(total, max);
                    rect x=(x) y=(H - h) width=(BAR - 1) height=(h) {
                        title { (time(&crate::clock::rfc3339(b.hour))) ": " (bytes(total))
                            " (up " (bytes(b.up)) ", down " (bytes(b.down)) ")" }
                    }
                }
                // One tick per UTC midnight in the window, labelled with the day that starts there.
                @for (x, label) in day_ticks(first_hour, last_hour) {
                    line x1=(x) y1=(H) x2=(x) y2=(H + 4) class="axis" {}
                    // A label too close to the right edge ends at its tick instead of running off the chart.
                    @if x > W - 40 {
                        text x=(x - 2) y=(H + 15) class="tick" text-anchor="end" { (label) }
                    } @else {
                        text x=(x + 2) y=(H + 15) class="tick" { (label) }
                    }
                }
                text x=(W - 2) y="12" class="tick" text-anchor="end" { "peak " (bytes(max)) }
            }
            figcaption { (summary) }
        }
    }
}

/// Bar height for `v` of `max`, at least 1 unit for any traffic so that small hours stay visible.
fn scaled(v: u64, max: u64) -> i64 {
    if v == 0 {
        return 0;
    }
    let h = u128::from(v) * u128::from(H.unsigned_abs()) / u128::from(max);
    i64::try_from(h).unwrap_or(H).clamp(1, H)
}

const DAY_MS: i64 = 24 * HOUR_MS;

/// Where each UTC midnight from `first_hour` to `last_hour` falls on the chart, with its day's label.
fn day_ticks(first_hour: i64, last_hour: i64) -> Vec<(i64, String)> {
    let first_midnight = first_hour + (DAY_MS - first_hour.rem_euclid(DAY_MS)) % DAY_MS;
    (0..)
        .map(|d| first_midnight + d * DAY_MS)
        .take_while(|&m| m <= last_hour)
        .map(|m| ((m - first_hour) / HOUR_MS * BAR, day_label(m)))
        .collect()
}

/// `12-01` for the day a bucket starts in.
fn day_label(ms: i64) -> String {
    let t = crate::clock::rfc3339(ms);
    t.get(5..10).unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_busiest_hour_and_old_hours_are_left_out() {
        let until = 1_764_576_000_000 + 30 * 60_000; // half past an hour
        let hour = until / HOUR_MS * HOUR_MS;
        let history = serde_json::json!({"since": 0, "until": until, "hours": [
            {"hour_ms": hour, "bytes_up": 1_000_000, "bytes_down": 1_000_000},
            {"hour_ms": hour - HOUR_MS, "bytes_up": 0, "bytes_down": 500_000},
            {"hour_ms": hour - 200 * HOUR_MS, "bytes_up": 9_000_000_000u64, "bytes_down": 0},
        ]});
        let svg = usage_chart(&history).into_string();
        assert_eq!(
            svg.matches("<rect").count(),
            2,
            "the 200-hour-old bucket is outside the week"
        );
        assert!(
            svg.contains(&format!("height=\"{H}\"")),
            "the busiest hour is full height"
        );
        assert!(
            svg.contains("height=\"40\""),
            "a quarter of the peak is a quarter of the height"
        );
        assert!(svg.contains("2.5 MB in total"), "{svg}");
        let empty = usage_chart(&serde_json::json!({"until": until, "hours": []})).into_string();
        assert!(empty.contains("no traffic yet"));
    }

    /// Day labels sit at UTC midnights: the bar of an hour on 12-01 is right of the `12-01` tick, never under
    /// the day before's label.
    #[test]
    fn day_ticks_sit_at_utc_midnights() {
        // 2026-12-01T18:50Z: the window starts at 2026-11-24T19:00Z, not at a midnight.
        let until = 1_796_151_000_000;
        assert_eq!(
            crate::clock::rfc3339(until).get(..16),
            Some("2026-12-01T18:50")
        );
        let last_hour = (until - 1).div_euclid(HOUR_MS) * HOUR_MS;
        let first_hour = last_hour - (HOURS - 1) * HOUR_MS;
        let ticks = day_ticks(first_hour, last_hour);
        let labels: Vec<&str> = ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(
            labels,
            ["11-25", "11-26", "11-27", "11-28", "11-29", "11-30", "12-01"]
        );
        for (x, label) in &ticks {
            let midnight = first_hour + x / BAR * HOUR_MS;
            assert!(
                crate::clock::rfc3339(midnight).ends_with("T00:00:00.000Z"),
                "{label} at {x}"
            );
        }
        let today_bar = (last_hour - first_hour) / HOUR_MS * BAR;
        let today_tick = ticks.last().unwrap().0;
        assert!(
            today_tick <= today_bar && today_bar - today_tick == 18 * BAR,
            "18:00 is 18 bars after midnight"
        );
    }
}
