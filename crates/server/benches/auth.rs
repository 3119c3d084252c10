//! Operator-auth benchmark: login throughput (bounded by bcrypt cost 12) and the latency of an authenticated
//! `GET /api/v1.0/auth/sessions` at a steady request rate.
//!
//! Run: `cargo bench -p proxyfleet-server --bench auth` (see bench/README.md). The server runs in this process on
//! 127.0.0.1:0 with a fresh SQLite store (or `BENCH_DATABASE_URL`, and Redis with `BENCH_REDIS_URL`); the load
//! generator shares the machine's cores, which the figures include.
//!
//! Settings (environment): `BENCH_LOGIN_SECS` (default 10), `BENCH_LOGIN_CONCURRENCY` (default 2 × cores),
//! `BENCH_RATE` sessions requests per second (default 500), `BENCH_SECS` (default 15).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxyfleet::config::{RawConfig, Secret, ServeConfig};
use proxyfleet::server::ServeOptions;
use proxyfleet::store::Role;

mod support;
use support::env_num;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[tokio::main]
async fn main() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let dir = tempfile::tempdir().unwrap();
    let db_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let raw = RawConfig {
        data_dir: Some(dir.path().to_owned()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database_url: Some(Secret::new(db_url.clone())),
        redis_addr: std::env::var("BENCH_REDIS_URL").ok().map(Secret::new),
        redis_prefix: Some(format!("pfbench:{}:", std::process::id())),
        ..RawConfig::default()
    };
    let server =
        proxyfleet::server::start(ServeConfig::resolve(raw).unwrap(), ServeOptions::default())
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // let a configured Redis connect
    let username = format!("bench_{}", std::process::id());
    server
        .state
        .auth
        .create_operator(&username, "Bench-Mark-Passw0rd", Role::Admin)
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    println!(
        "proxyfleet auth benchmark: {cores} cores, store {}, redis {}",
        server.store.backend().name(),
        if server.state.redis.is_some() {
            "on"
        } else {
            "off"
        }
    );

    // 1. Login throughput: closed loop, `concurrency` clients logging in back to back.
    let login_secs = env_num("BENCH_LOGIN_SECS", 10);
    let concurrency = env_num("BENCH_LOGIN_CONCURRENCY", 2 * cores);
    let body = serde_json::json!({"username": username, "password": "Bench-Mark-Passw0rd"});
    let deadline = Instant::now() + Duration::from_secs(login_secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body) = (
            client.clone(),
            format!("{base}/api/v1.0/auth/login"),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "login: {} logins in {elapsed:.1} s = {:.1} logins/s with {concurrency} concurrent clients (p50 {:.0} ms, p99 {:.0} ms)",
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    );

    // 2. Authenticated GET /auth/sessions at a steady rate (open loop: latency counts from the scheduled send
    //    time, so a stall shows up instead of silently lowering the rate).
    let token = {
        let r = client
            .post(format!("{base}/api/v1.0/auth/login"))
            .json(&body)
            .send()
            .await
            .unwrap();
        r.json::<serde_json::Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let rate = env_num("BENCH_RATE", 500).max(1);
    let secs = env_num("BENCH_SECS", 15);
    let total = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let url = Arc::new(format!("{base}/api/v1.0/auth/sessions"));
    let token = Arc::new(token);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        handles.push(tokio::spawn(async move {
            let r = client
                .get(url.as_str())
                .bearer_auth(token.as_str())
                .send()
                .await
                .unwrap();
            let ok = r.status() == 200;
            let _ = r.bytes().await;
            (scheduled.elapsed(), ok)
        }));
    }
    let mut lat = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for h in handles {
        let (d, ok) = h.await.unwrap();
        if !ok {
            errors += 1;
        }
        lat.push(d);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "GET /auth/sessions: {} requests at {rate}/s target ({:.0}/s achieved) over {elapsed:.1} s: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, errors {errors}",
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.90).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    server.shutdown().await;
}
