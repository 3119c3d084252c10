//! Device-tunnel benchmark: server memory per idle connected device, server CPU spent on heartbeats, and the time
//! from agent start to "online" in the registry, all on loopback.
//!
//! Run: `cargo bench -p proxyfleet-server --bench tunnel` (see bench/README.md). The server is the real
//! `proxyfleet` binary in its own process (so its memory and CPU are measured alone, from /proc). The first 20
//! devices run the real agent (`proxyfleet_agent::run`) to time start-to-online; the rest are lightweight simulated
//! devices in this process that speak the same protocol (enrolled certificate, hello, heartbeats) over QUIC
//! connections sharing a few client endpoints, so that 10 000 of them fit on one machine.
//!
//! Settings (environment): `BENCH_DEVICES` (default `1000,10000`), `BENCH_HEARTBEAT_SECS` (default 5: heartbeats
//! are sped up so the CPU window sees many; the per-heartbeat cost is then scaled to the 30 s default),
//! `BENCH_CPU_SECS` (default 30), `BENCH_TRANSPORT` (`quic` or `tcp`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod support;
use support::{cpu_secs, env_num, free_port, rss};

struct Server {
    child: std::process::Child,
    api: String,
    tunnel: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(heartbeat: u64, quic: bool) -> Server {
    let bin = env!("CARGO_BIN_EXE_proxyfleet");
    let dir = tempfile::tempdir().unwrap();
    let mut create = Command::new(bin)
        .args([
            "operator",
            "create",
            "--username",
            "loadtest",
            "--password-stdin",
        ])
        .env("PROXYFLEET_DATA_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    create
        .stdin
        .take()
        .unwrap()
        .write_all(b"Bench-Mark-Passw0rd\n")
        .unwrap();
    assert!(create.wait().unwrap().success());
    let (api, tunnel) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            &api,
            "--tunnel-listen",
            &tunnel,
            "--log-level",
            "warn",
        ])
        .args([
            "--tunnel-heartbeat-secs",
            &heartbeat.to_string(),
            "--tunnel-quic",
            &quic.to_string(),
        ])
        .env("PROXYFLEET_DATA_DIR", dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Server {
        child,
        api: format!("http://{api}"),
        tunnel,
        _dir: dir,
    }
}

async fn online_count(http: &reqwest::Client, s: &Server, token: &str) -> usize {
    let v: Value = http
        .get(format!("{}/api/v1.0/devices", s.api))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|d| d["status"] == "online")
        .count()
}

/// A simulated device: like the agent, it retries with jittered exponential backoff until it is online, and
/// only `handshakes` of them handshake at once (a fleet coming online, not 10 000 handshakes in one instant).
async fn sim_device_retrying(
    endpoint: quinn::Endpoint,
    server: std::net::SocketAddr,
    dir: std::path::PathBuf,
    cancel: CancellationToken,
    handshakes: std::sync::Arc<tokio::sync::Semaphore>,
    failures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tcp: bool,
) {
    let mut delay = Duration::from_millis(500);
    while !cancel.is_cancelled() {
        if sim_device(&endpoint, server, &dir, &cancel, &handshakes, tcp)
            .await
            .is_ok()
        {
            return;
        }
        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>() * 0.5)).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}

/// The agent's tunnel handshake and heartbeats, nothing else, on a shared client endpoint.
async fn sim_device(
    endpoint: &quinn::Endpoint,
    server: std::net::SocketAddr,
    dir: &std::path::Path,
    cancel: &CancellationToken,
    handshakes: &tokio::sync::Semaphore,
    tcp: bool,
) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use proxyfleet_proto::control::{ControlFrame, Heartbeat, Hello};
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let read = |f: &str| std::fs::read(dir.join(f));
    let tls = proxyfleet_agent::tls::tunnel_tls(
        CertificateDer::from(read("ca.crt")?),
        CertificateDer::from(read("device.crt")?),
        PrivateKeyDer::from_pem_slice(&read("device.key")?)?,
    )?;
    let permit = handshakes.acquire().await?;
    // Over QUIC the device shares a client endpoint; over TCP it gets its own TLS connection and yamux session.
    let (held, recv, send): (
        Box<dyn std::any::Any + Send>,
        proxyfleet_agent::conn::BoxRead,
        proxyfleet_agent::conn::BoxWrite,
    ) = if tcp {
        let conn = proxyfleet_agent::conn::connect_tcp(&server.to_string(), tls).await?;
        let (recv, send) = conn.open_bi().await?;
        (Box::new(conn), recv, send)
    } else {
        let config = proxyfleet_agent::tls::quic_client(tls, Duration::from_secs(10))?;
        let conn = endpoint
            .connect_with(config, server, proxyfleet_proto::enroll::TUNNEL_SERVER_NAME)?
            .await?;
        let (send, recv) = conn.open_bi().await?;
        (Box::new(conn), Box::new(recv), Box::new(send))
    };
    let codec =
        || proxyfleet_proto::FrameCodec::<ControlFrame>::new(proxyfleet_proto::MAX_CONTROL_FRAME);
    let mut w = tokio_util::codec::FramedWrite::new(send, codec());
    let mut r = tokio_util::codec::FramedRead::new(recv, codec());
    let hello = Hello {
        protocol_version: proxyfleet_proto::PROTOCOL_VERSION,
        agent_version: "sim".into(),
        capabilities: 1,
    };
    w.send(ControlFrame::Hello(hello)).await?;
    let Some(Ok(ControlFrame::HelloAck(ack))) = r.next().await else {
        anyhow::bail!("no hello ack")
    };
    drop(permit);
    let mut tick =
        tokio::time::interval(Duration::from_secs(u64::from(ack.heartbeat_interval_secs)));
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let hb = Heartbeat { uptime_secs: started.elapsed().as_secs(), metrics: Default::default() };
                w.send(ControlFrame::Heartbeat(hb)).await?;
            }
            f = r.next() => if f.is_none() { break },
        }
    }
    drop(held);
    Ok(())
}

#[tokio::main]
async fn main() {
    let counts: Vec<usize> = std::env::var("BENCH_DEVICES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let heartbeat = env_num("BENCH_HEARTBEAT_SECS", 5);
    let cpu_window = env_num("BENCH_CPU_SECS", 30);
    let quic = std::env::var("BENCH_TRANSPORT").as_deref() != Ok("tcp");
    let http = reqwest::Client::new();
    println!(
        "proxyfleet tunnel benchmark: transport {}, heartbeat every {heartbeat} s",
        if quic { "quic" } else { "tcp" }
    );

    for n in counts {
        let server = start_server(heartbeat, quic);
        // Wait for the API.
        let deadline = Instant::now() + Duration::from_secs(30);
        while http
            .get(format!("{}/healthz", server.api))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let login: Value = http
            .post(format!("{}/api/v1.0/auth/login", server.api))
            .json(&json!({"username": "loadtest", "password": "Bench-Mark-Passw0rd"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = login["token"].as_str().unwrap().to_owned();
        let pid = server.child.id();

        // Devices and enrollment (not measured).
        let states = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for i in 0..n {
            let (http, api, token, tunnel, sem) = (
                http.clone(),
                server.api.clone(),
                token.clone(),
                server.tunnel.clone(),
                sem.clone(),
            );
            let dir = states.path().join(format!("d{i}"));
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                let v: Value = http
                    .post(format!("{api}/api/v1.0/devices"))
                    .bearer_auth(&token)
                    .json(&json!({"name": format!("sim-{i}")}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                proxyfleet_agent::enroll(&tunnel, v["pairing_code"].as_str().unwrap(), &dir)
                    .await
                    .unwrap();
                (dir, v["id"].as_str().unwrap().to_owned())
            }));
        }
        let mut dirs = Vec::new();
        let mut ids = Vec::new();
        for t in tasks {
            let (dir, id) = t.await.unwrap();
            dirs.push(dir);
            ids.push(id);
        }
        println!(
            "[{n} devices] created and enrolled in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_before = rss(pid);

        // Time to online, for the first devices one at a time; then the rest all at once.
        let cancel = CancellationToken::new();
        let opts = proxyfleet_agent::RunOptions {
            power_supply_dir: "/nonexistent".into(),
            ..Default::default()
        };
        let mut to_online = Vec::new();
        let sample = n.min(20);
        for (dir, id) in dirs.iter().zip(&ids).take(sample) {
            let t = Instant::now();
            let (d, o, c) = (dir.clone(), opts.clone(), cancel.clone());
            tokio::spawn(async move { proxyfleet_agent::run(&d, o, c).await });
            let url = format!("{}/api/v1.0/devices/{id}", server.api);
            loop {
                let v: Value = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if v["status"] == "online" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            to_online.push(t.elapsed());
        }
        to_online.sort();
        let t = Instant::now();
        let server_addr: std::net::SocketAddr = server.tunnel.parse().unwrap();
        let mut endpoints = Vec::new();
        let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(env_num(
            "BENCH_HANDSHAKES",
            256,
        ) as usize));
        let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for (i, dir) in dirs.iter().skip(sample).enumerate() {
            if i % 500 == 0 {
                endpoints.push(quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap());
            }
            let (e, d, c) = (
                endpoints.last().unwrap().clone(),
                dir.clone(),
                cancel.clone(),
            );
            let (h, f) = (handshakes.clone(), failures.clone());
            tokio::spawn(sim_device_retrying(e, server_addr, d, c, h, f, !quic));
            if i % 100 == 99 {
                tokio::task::yield_now().await;
            }
        }
        loop {
            let online = online_count(&http, &server, &token).await;
            if online >= n {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "only {online}/{n} online"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!(
            "[{n} devices] start to online (loopback, one at a time): p50 {:.1} ms, max {:.1} ms; all {n} online {:.1} s after the rest started ({} failed handshakes retried)",
            to_online[to_online.len() / 2].as_secs_f64() * 1e3,
            to_online.last().unwrap().as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64(),
            failures.load(std::sync::atomic::Ordering::Relaxed)
        );
        // Let every device send a few heartbeats, then measure.
        tokio::time::sleep(Duration::from_secs(heartbeat * 2 + 2)).await;
        let rss_after = rss(pid);
        let per_device = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;
        println!(
            "[{n} devices] server RSS {:.1} MiB idle-enrolled -> {:.1} MiB connected: {:.1} KiB per connected idle device",
            rss_before as f64 / 1048576.0,
            rss_after as f64 / 1048576.0,
            per_device / 1024.0
        );
        let cpu0 = cpu_secs(pid);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(cpu_window)).await;
        let cpu = cpu_secs(pid) - cpu0;
        let secs = t.elapsed().as_secs_f64();
        let heartbeats = n as f64 * secs / heartbeat as f64;
        let per_hb_us = cpu / heartbeats * 1e6;
        let at_30s = per_hb_us * 1e-6 * n as f64 / 30.0 * 100.0;
        println!(
            "[{n} devices] server CPU {:.2} s over {secs:.0} s ({:.1} % of one core) for ~{heartbeats:.0} heartbeats (plus QUIC keep-alives): {per_hb_us:.0} µs each; at the default 30 s interval: {at_30s:.2} % of one core",
            cpu,
            cpu / secs * 100.0
        );
        cancel.cancel();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
