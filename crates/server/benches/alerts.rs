//! Offline-detector benchmark: 100,000 devices heartbeating every 30 s, 1 % of them going silent; the detector
//! scans every 5 s (simulated time, so a run takes seconds, not minutes). Reports how many offline events came
//! out (must be exactly the number that went silent), how late each was against the 120 s threshold (must be under
//! one scan interval), and the detector's cost per scan.
//!
//! Run: `cargo bench -p proxyfleet-server --bench alerts`. Settings: `BENCH_DEVICES` (default 100000),
//! `BENCH_SILENT_PERCENT` (default 1), `BENCH_DATABASE_URL` (default a fresh SQLite file).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxyfleet::clock::{Clock, ManualClock};
use proxyfleet::monitor::{Detector, Rules};
use proxyfleet::store::{NewOperator, Role, Store};

mod support;
use support::env_num;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n = env_num("BENCH_DEVICES", 100_000);
    let silent = n * env_num("BENCH_SILENT_PERCENT", 1) / 100;
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}/alerts.db", dir.path().display()));
    let store = Store::connect(&url, 4).await.unwrap();
    let clock = ManualClock::default();
    let t0 = clock.now_ms();
    let op = store
        .create_operator(NewOperator {
            username: "benchop",
            password_hash: "x",
            role: Role::Operator,
            now: t0,
        })
        .await
        .unwrap();
    store
        .put_webhook_endpoint(
            &op.id,
            Some("https://hooks.example.com/x"),
            Some("sealed"),
            t0,
        )
        .await
        .unwrap();
    let setup = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("device-{i:06}")).collect();
    let ids = store
        .create_enrolled_devices(&op.id, &names, t0)
        .await
        .unwrap();
    let beat = |now: i64, which: &[String]| {
        which
            .iter()
            .map(|id| (id.clone(), now, "198.51.100.1".to_owned()))
            .collect::<Vec<_>>()
    };
    store.record_seen(&beat(t0, &ids)).await.unwrap();
    println!(
        "offline detector: {n} devices, {silent} go silent, heartbeats every 30 s, scans every 5 s, store {}",
        store.backend().name()
    );
    println!(
        "  setup (devices + first heartbeat): {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let rules = Rules::default();
    // Started well before: no startup grace in the way.
    let detector = Detector::new(store.clone(), Arc::new(clock.clone()), rules, None);
    clock.advance(Duration::from_millis(rules.startup_grace as u64));
    // The first `silent` devices stop here; the rest keep heartbeating.
    let live = &ids[silent..];
    let quiet_since = clock.now_ms();
    store.record_seen(&beat(quiet_since, &ids)).await.unwrap();
    let rss_before = support::rss(std::process::id()) / 1024;
    let mut scan_wall = Vec::new();
    let mut scan_cpu = 0.0;
    let mut next_beat = quiet_since + 30_000;
    // Scans do not line up with the silence: half a scan interval off.
    clock.advance(Duration::from_millis(2_500));
    let mut offline_total = 0;
    // Four minutes of simulated time: everybody silent must be alerted by 120 s + one scan.
    while clock.now_ms() < quiet_since + 240_000 {
        clock.advance(Duration::from_secs(5));
        if clock.now_ms() >= next_beat {
            store
                .record_seen(&beat(clock.now_ms(), live))
                .await
                .unwrap();
            next_beat += 30_000;
        }
        let (cpu, wall) = (support::cpu_secs(std::process::id()), Instant::now());
        let r = detector.scan().await.unwrap();
        scan_wall.push(wall.elapsed());
        scan_cpu += support::cpu_secs(std::process::id()) - cpu;
        offline_total += r.offline_alerts;
        assert_eq!(r.recovered + r.suppressed + r.deferred, 0);
    }
    let rss_after = support::rss(std::process::id()) / 1024;
    let events = store
        .webhook_events(&op.id, i64::try_from(n).unwrap())
        .await
        .unwrap();
    let mut late_max = 0i64;
    for e in &events {
        let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(v["type"], "device.offline");
        let lateness = e.created_at - quiet_since - rules.offline_after;
        assert!(
            (0..=5_000).contains(&lateness),
            "event {lateness} ms after the threshold"
        );
        late_max = late_max.max(lateness);
    }
    assert_eq!(
        events.len(),
        silent,
        "exactly one offline event per silent device"
    );
    assert_eq!(offline_total, silent);
    scan_wall.sort();
    let p50 = scan_wall[scan_wall.len() / 2];
    let max = scan_wall[scan_wall.len() - 1];
    println!(
        "  offline events: {} (expected {silent}); latest {late_max} ms after the 120 s threshold",
        events.len()
    );
    println!(
        "  scan of {n} devices: p50 {:.1} ms, max {:.1} ms (max includes writing the {silent} alerts)",
        p50.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
    let scans = scan_wall.len() as f64;
    println!(
        "  detector CPU: {:.1} ms per scan = {:.2} % of one core at one scan per 5 s",
        scan_cpu / scans * 1000.0,
        scan_cpu / scans / 5.0 * 100.0
    );
    println!(
        "  process RSS: {:.1} MiB before the scans, {:.1} MiB after (detector keeps no per-device state in memory)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
}
