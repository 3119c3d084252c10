//! Data-plane benchmark: what a customer gets through proxyfleet's doors, side by side with going direct and with
//! the do-it-yourself peer stack (Debian's `microsocks` on the "device" behind a `rathole` reverse tunnel).
//!
//! Run: `bench/proxy.sh` (builds the release binaries, installs the peer tools if missing, then runs
//! `cargo bench -p proxyfleet-server --bench proxy`; see bench/README.md). Everything is on loopback: the real
//! `proxyfleet` server and `proxyfleet-agent` run as their own processes (so their memory and CPU are read alone
//! from /proc); the target (an HTTP server answering `GET /bytes/N` with N bytes) and every client run in this
//! process. It prints, in one run:
//!
//! 1. throughput of one large download: direct, SOCKS5 door, HTTP CONNECT door, peer stack; ratios to targets;
//! 2. new-flow latency: time to first byte of a 100-byte response, new TCP connection per request, p50/p99; and
//!    for absolute-form `GET http://…` through the HTTP door, on a new client connection each and on one kept open;
//! 3. concurrent flows through the SOCKS5 door: aggregate throughput and server RSS per open flow;
//! 4. the cost of a cached customer credential check, in process, against one bcrypt verification.
//!
//! Settings (environment): `BENCH_DOWNLOAD_MIB` (512), `BENCH_DOWNLOAD_RUNS` (3, the median is reported),
//! `BENCH_LATENCY_REQUESTS` (1000), `BENCH_FLOWS` (200), `BENCH_FLOW_MIB` (16), `BENCH_AUTH_CHECKS` (200000),
//! `BENCH_CROWD_REPEAT` (0: how many more times figure 3 runs on the same server, to show its memory after flows
//! came and went), `BENCH_TRANSPORT` (`quic`, or `tcp` for the device tunnel's TLS-over-TCP fallback),
//! `BENCH_SERVER_BIN` / `BENCH_AGENT_BIN` (default `target/release/…`), `BENCH_PEER_SCRIPT` (default
//! `../shared/bench/peer-rathole.sh` beside the workspace), `BENCH_PEER_SOCKS` (`host:port` of a peer stack already
//! running: the script is then not used), `PEER_STATE_DIR`, `RATHOLE_BIN`, `MICROSOCKS_BIN` (passed to the script).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_socks::tcp::Socks5Stream;

mod support;
use support::{cpu_secs, env_num, free_port, rss};

const MIB: u64 = 1024 * 1024;
/// The benchmark operator's password (meets the server's composition rule).
const OPERATOR_PASSWORD: &str = "Qx7!long-Passphrase";
/// Size of the small response timed in the latency test, bytes.
const SMALL: u64 = 100;
/// Client read buffer and target write chunk, bytes.
const CHUNK: usize = 256 * 1024;

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// A child process killed when dropped, so a panic anywhere leaves nothing running.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Target and clients

/// An HTTP server that answers `GET /bytes/N` with N bytes from a preallocated buffer, then closes.
async fn spawn_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let data: Arc<[u8]> = (0..CHUNK).map(|i| i as u8).collect::<Vec<u8>>().into();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve_target(s, data.clone()));
        }
    });
    addr
}

async fn serve_target(mut s: TcpStream, data: Arc<[u8]>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let n: usize = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.strip_prefix("GET /bytes/"))
        .and_then(|h| h.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut out =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n").into_bytes();
    // A small answer goes out in one write (one segment); a large one in big chunks.
    let first = n.min(data.len());
    out.extend_from_slice(&data[..first]);
    s.write_all(&out).await?;
    let mut left = n - first;
    while left > 0 {
        let k = left.min(data.len());
        s.write_all(&data[..k]).await?;
        left -= k;
    }
    s.shutdown().await
}

/// How a client reaches the target.
#[derive(Clone)]
enum Via {
    Direct,
    /// A SOCKS5 proxy; with credentials (RFC 1929) or without.
    Socks5(SocketAddr, Option<(String, String)>),
    /// An HTTP proxy's `CONNECT`, with a `Proxy-Authorization: Basic` value.
    Connect(SocketAddr, String),
    /// A port forward: whatever connects to it is carried to the target, no proxy handshake.
    Forward(SocketAddr),
}

impl Via {
    /// A TCP stream to `target`, through the proxy when there is one (handshake done).
    async fn open(&self, target: SocketAddr) -> anyhow::Result<TcpStream> {
        let to = match self {
            Via::Direct => target,
            Via::Socks5(p, _) | Via::Connect(p, _) | Via::Forward(p) => *p,
        };
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        match self {
            Via::Direct | Via::Forward(_) => Ok(s),
            Via::Socks5(_, None) => Ok(Socks5Stream::connect_with_socket(s, target)
                .await?
                .into_inner()),
            Via::Socks5(_, Some((u, p))) => Ok(Socks5Stream::connect_with_password_and_socket(
                s, target, u, p,
            )
            .await?
            .into_inner()),
            Via::Connect(_, basic) => {
                let req = format!(
                    "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {basic}\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await?;
                // The target says nothing before our request, so nothing past the proxy's answer can be read here.
                let mut head = Vec::with_capacity(128);
                let mut buf = [0u8; 256];
                while !head.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).await?;
                    anyhow::ensure!(n > 0, "proxy closed during CONNECT");
                    head.extend_from_slice(&buf[..n]);
                }
                anyhow::ensure!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "CONNECT refused: {}",
                    String::from_utf8_lossy(&head)
                );
                Ok(s)
            }
        }
    }
}

/// Send `GET /bytes/n` and read the response head; returns how many body bytes came with it.
async fn request(s: &mut TcpStream, n: u64, buf: &mut [u8]) -> anyhow::Result<u64> {
    s.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: target\r\n\r\n").as_bytes())
        .await?;
    answer_head(s, buf).await
}

/// Read a `200` response head; returns how many body bytes came with it.
async fn answer_head(s: &mut TcpStream, buf: &mut [u8]) -> anyhow::Result<u64> {
    let mut filled = 0;
    loop {
        let k = s.read(&mut buf[filled..]).await?;
        anyhow::ensure!(k > 0, "target closed before the response head");
        filled += k;
        if let Some(p) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "bad response");
            return Ok((filled - p - 4) as u64);
        }
        anyhow::ensure!(filled < buf.len(), "response head too long");
    }
}

/// Read and discard `left` more bytes.
async fn drain(s: &mut TcpStream, mut left: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    while left > 0 {
        let k = s.read(buf).await?;
        anyhow::ensure!(k > 0, "stream ended {left} bytes early");
        left = left.saturating_sub(k as u64);
    }
    Ok(())
}

/// One whole GET of `n` bytes on a new flow; returns (time to first byte, total time).
async fn fetch(via: &Via, target: SocketAddr, n: u64, buf: &mut [u8]) -> (Duration, Duration) {
    let t = Instant::now();
    let mut s = via.open(target).await.unwrap();
    let got = request(&mut s, n, buf).await.unwrap();
    let first = t.elapsed();
    drain(&mut s, n - got, buf).await.unwrap();
    (first, t.elapsed())
}

// ---------------------------------------------------------------------------------------------------------------
// The systems under test

/// The real server and agent, one device online, one connection on it.
struct Fleet {
    // Dropped in this order: agent, server, then the data directory.
    agent: Kill,
    server: Kill,
    socks5: SocketAddr,
    http: SocketAddr,
    user: String,
    pass: String,
    _dir: tempfile::TempDir,
}

/// The server's REST API, as the benchmark operator once logged in.
struct Api {
    web: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// GET `path`, or POST `body` to it; the JSON answer.
    async fn call(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/api/v1.0/{path}", self.base);
        let mut req = match body {
            Some(b) => self.web.post(url).json(&b),
            None => self.web.get(url),
        };
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        let resp = req.send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }
}

/// The last lines of a log, for a failure message.
fn log_tail(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Wait up to 30 s for `ready`; on timeout, fail with the end of a log.
async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    log: &Path,
    ready: impl Fn() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready().await {
        assert!(Instant::now() < deadline, "{what}: {}", log_tail(log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Fleet {
    /// `quic`: the device tunnel over QUIC (the default), else over the TLS-over-TCP fallback.
    async fn start(quic: bool) -> Fleet {
        let release = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release");
        let server_bin = env_path("BENCH_SERVER_BIN", &format!("{release}/proxyfleet"));
        let agent_bin = env_path("BENCH_AGENT_BIN", &format!("{release}/proxyfleet-agent"));
        for b in [&server_bin, &agent_bin] {
            assert!(b.exists(), "{} missing: run bench/proxy.sh", b.display());
        }
        let dir = tempfile::tempdir().unwrap();
        let (data, state) = (dir.path().join("server"), dir.path().join("agent"));
        let mut create = Command::new(&server_bin)
            .args([
                "operator",
                "create",
                "--username",
                "benchop",
                "--password-stdin",
            ])
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        writeln!(create.stdin.take().unwrap(), "{OPERATOR_PASSWORD}").unwrap();
        assert!(create.wait().unwrap().success(), "operator create failed");

        let port = || format!("127.0.0.1:{}", free_port());
        let (api, tunnel, http, socks5) = (port(), port(), port(), port());
        let (server_log, agent_log) = (dir.path().join("server.log"), dir.path().join("agent.log"));
        let server = Kill(
            Command::new(&server_bin)
                .arg("serve")
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen", &api, "--tunnel-listen", &tunnel])
                .args(["--http-proxy-listen", &http, "--socks5-listen", &socks5])
                .args(["--log-level", "warn", "--tunnel-quic", &quic.to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&server_log).unwrap())
                .spawn()
                .unwrap(),
        );
        let mut api = Api {
            web: reqwest::Client::new(),
            base: format!("http://{api}"),
            token: String::new(),
        };
        let health = format!("{}/healthz", api.base);
        wait_for("server did not start", &server_log, || async {
            api.web.get(&health).send().await.is_ok()
        })
        .await;
        let login = json!({"username": "benchop", "password": OPERATOR_PASSWORD});
        api.token = api.call("auth/login", Some(login)).await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let device = api.call("devices", Some(json!({"name": "bench"}))).await;
        let id = device["id"].as_str().unwrap();
        let enrolled = Command::new(&agent_bin)
            .args(["enroll", "--server", &tunnel, "--code"])
            .arg(device["pairing_code"].as_str().unwrap())
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .status()
            .unwrap();
        assert!(
            enrolled.success(),
            "agent enroll failed: {}",
            log_tail(&agent_log)
        );
        let agent = Kill(
            Command::new(&agent_bin)
                .args(["run", "--allow-private-targets", "--state-dir"])
                .arg(&state)
                .env("RUST_LOG", "warn")
                .stderr(std::fs::File::create(&agent_log).unwrap())
                .spawn()
                .unwrap(),
        );
        let path = format!("devices/{id}");
        wait_for("device never came online", &agent_log, || async {
            api.call(&path, None).await["status"] == "online"
        })
        .await;
        let conn = json!({"name": "bench", "device_id": id});
        let conn = api.call("connections", Some(conn)).await;
        Fleet {
            agent,
            server,
            socks5: socks5.parse().unwrap(),
            http: http.parse().unwrap(),
            user: conn["username"].as_str().unwrap().to_owned(),
            pass: conn["password"].as_str().unwrap().to_owned(),
            _dir: dir,
        }
    }
}

/// The peer stack, started by the shared script and stopped by it (by the PIDs it tracks) when dropped.
struct Peer {
    socks: SocketAddr,
    /// The script and its state directory, when this benchmark started the stack.
    started: Option<(PathBuf, PathBuf)>,
    _state: Option<tempfile::TempDir>,
}

impl Peer {
    fn start() -> Result<Peer, String> {
        if let Ok(a) = std::env::var("BENCH_PEER_SOCKS") {
            let socks = a
                .parse()
                .map_err(|e| format!("BENCH_PEER_SOCKS={a}: {e}"))?;
            return Ok(Peer {
                socks,
                started: None,
                _state: None,
            });
        }
        let default = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/bench/peer-rathole.sh"
        );
        let script = env_path("BENCH_PEER_SCRIPT", default);
        if !script.exists() {
            return Err(format!(
                "{} not found (set BENCH_PEER_SCRIPT)",
                script.display()
            ));
        }
        // A state directory of our own unless one is given, so that a stale run cannot block this one.
        let (state, owned) = match std::env::var_os("PEER_STATE_DIR") {
            Some(d) => (PathBuf::from(d), None),
            None => {
                let d = tempfile::tempdir().unwrap();
                (d.path().to_owned(), Some(d))
            }
        };
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .env("PEER_STATE_DIR", &state)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        match String::from_utf8_lossy(&out.stdout).trim().parse::<u16>() {
            Ok(port) if out.status.success() => Ok(Peer {
                socks: SocketAddr::from(([127, 0, 0, 1], port)),
                started: Some((script, state)),
                _state: owned,
            }),
            _ => Err(String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; ")),
        }
    }

    /// The stack's processes by name (`microsocks`, `rathole-server`, `rathole-client`), from the script's PID file.
    fn pids(&self) -> Vec<(String, u32)> {
        let Some((_, state)) = &self.started else {
            return Vec::new();
        };
        let file = std::fs::read_to_string(state.join("pids")).unwrap_or_default();
        file.lines()
            .filter_map(|l| {
                let (name, pid) = l.split_once(' ')?;
                Some((name.to_owned(), pid.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some((script, state)) = &self.started {
            let _ = Command::new("bash")
                .arg(script)
                .arg("stop")
                .env("PEER_STATE_DIR", state)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What any relay of the same shape reaches on this machine: two hops between client and target, as proxyfleet
/// has (server, agent), each a `socat` process copying in 256 KiB reads — once with plain TCP between the hops, once
/// with TLS 1.3 (OpenSSL) between them, as proxyfleet's tunnel is always encrypted. No proxy protocol, no
/// multiplexing, no metering: these are ceilings for the shape, not competitors.
struct Ceiling {
    plain: SocketAddr,
    tls: SocketAddr,
    _procs: Vec<Kill>,
    _dir: tempfile::TempDir,
}

impl Ceiling {
    async fn start(target: SocketAddr) -> Result<Ceiling, String> {
        let socat = std::env::var("SOCAT_BIN").unwrap_or_else(|_| "socat".into());
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .map_err(|e| e.to_string())?;
        let pem = dir.path().join("hop.pem");
        std::fs::write(
            &pem,
            format!("{}{}", key.signing_key.serialize_pem(), key.cert.pem()),
        )
        .map_err(|e| e.to_string())?;
        let hop = |from: String, to: String| -> Result<Kill, String> {
            Command::new(&socat)
                .args(["-b", "262144", &from, &to])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(Kill)
                .map_err(|e| format!("{socat}: {e} (apt-get install socat)"))
        };
        let listen = |port: u16| format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork");
        let (p1, p2, t1, t2) = (free_port(), free_port(), free_port(), free_port());
        let procs = vec![
            hop(listen(p1), format!("TCP:127.0.0.1:{p2}"))?,
            hop(listen(p2), format!("TCP:{target}"))?,
            hop(listen(t1), format!("OPENSSL:127.0.0.1:{t2},verify=0"))?,
            hop(
                format!(
                    "OPENSSL-LISTEN:{t2},bind=127.0.0.1,reuseaddr,fork,cert={},verify=0",
                    pem.display()
                ),
                format!("TCP:{target}"),
            )?,
        ];
        let ceiling = Ceiling {
            plain: SocketAddr::from(([127, 0, 0, 1], p1)),
            tls: SocketAddr::from(([127, 0, 0, 1], t1)),
            _procs: procs,
            _dir: dir,
        };
        // Ready when a request goes all the way through.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; CHUNK];
        for via in [Via::Forward(ceiling.plain), Via::Forward(ceiling.tls)] {
            loop {
                let ok = async {
                    let mut s = via.open(target).await?;
                    let got = request(&mut s, SMALL, &mut buf).await?;
                    drain(&mut s, SMALL - got, &mut buf).await
                };
                match tokio::time::timeout(Duration::from_secs(2), ok).await {
                    Ok(Ok(())) => break,
                    _ if Instant::now() > deadline => {
                        return Err("socat hops did not come up".into())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(ceiling)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Measurements

const PEER: &str = "peer SOCKS5 (rathole + microsocks)";
const CEIL_PLAIN: &str = "ceiling: 2 hops, plain TCP (socat)";
const CEIL_TLS: &str = "ceiling: 2 hops, TLS between (socat)";

/// A path under test: its name, how to reach the target, and which processes do its relaying.
struct Route {
    name: &'static str,
    via: Via,
    /// The relaying processes, named.
    pids: Vec<(String, u32)>,
}

impl Route {
    fn new(name: &'static str, via: Via, pids: Vec<(String, u32)>) -> Route {
        Route { name, via, pids }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// Figure 1: one big download per route per round; the median round per route. Returns MiB/s per route.
async fn throughput(routes: &[Route], target: SocketAddr, mib: u64, runs: u64) -> Vec<f64> {
    println!("\n[1] one {mib} MiB download, median of {runs} runs (CPU: seconds per GiB, per relaying process)");
    let mut buf = vec![0u8; CHUNK];
    let mut samples = vec![Vec::new(); routes.len()];
    for _ in 0..runs {
        for (r, s) in routes.iter().zip(&mut samples) {
            let cpu0: Vec<f64> = r.pids.iter().map(|(_, p)| cpu_secs(*p)).collect();
            let (_, d) = fetch(&r.via, target, mib * MIB, &mut buf).await;
            let gib = mib as f64 / 1024.0;
            let cpu: Vec<f64> = r
                .pids
                .iter()
                .zip(cpu0)
                .map(|((_, p), c0)| (cpu_secs(*p) - c0) / gib)
                .collect();
            s.push((mib_s(mib * MIB, d), cpu));
        }
    }
    let mut out = Vec::new();
    for (r, mut s) in routes.iter().zip(samples) {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let runs: Vec<String> = s.iter().map(|x| format!("{:.0}", x.0)).collect();
        let (median, cpu) = &s[s.len() / 2];
        let parts: Vec<String> = r
            .pids
            .iter()
            .zip(cpu)
            .map(|((n, _), c)| format!("{n} {c:.2}"))
            .collect();
        let cpu = match parts.len() {
            0 => "-".to_owned(),
            _ => format!("{} = {:.2}", parts.join(" + "), cpu.iter().sum::<f64>()),
        };
        println!(
            "    {:<36} {median:>7.1} MiB/s   CPU s/GiB: {cpu}   (runs: {})",
            r.name,
            runs.join(", ")
        );
        out.push(*median);
    }
    out
}

/// Figure 2: time to first byte of a small response on a new connection, sequentially.
async fn latency(routes: &[Route], target: SocketAddr, n: usize) {
    println!(
        "\n[2] new-flow latency: time to first byte of {SMALL}-byte responses, {n} sequential requests, new TCP \
         connection each"
    );
    let mut buf = vec![0u8; CHUNK];
    for r in routes {
        for _ in 0..20 {
            fetch(&r.via, target, SMALL, &mut buf).await;
        }
        let mut ttfb = Vec::with_capacity(n);
        for _ in 0..n {
            ttfb.push(fetch(&r.via, target, SMALL, &mut buf).await.0);
        }
        report_latency(r.name, ttfb);
    }
}

/// One line of figure 2: p50, p99 and max of `ttfb`.
fn report_latency(name: &str, mut ttfb: Vec<Duration>) {
    ttfb.sort();
    println!(
        "    {:<36} p50 {:>6.3} ms   p99 {:>6.3} ms   max {:>6.3} ms",
        name,
        percentile(&ttfb, 0.50),
        percentile(&ttfb, 0.99),
        ttfb.last().unwrap().as_secs_f64() * 1e3
    );
}

/// Figure 2, continued: absolute-form `GET http://…` through the HTTP door, on a new client connection each time
/// and on one client connection kept open for all of them (each request is a flow of its own either way).
async fn forwarded_latency(proxy: SocketAddr, basic: &str, target: SocketAddr, n: usize) {
    let mut buf = vec![0u8; CHUNK];
    for (name, keep) in [
        ("proxyfleet absolute-form, new conn", false),
        ("proxyfleet absolute-form, kept conn", true),
    ] {
        let close = if keep { "" } else { "Connection: close\r\n" };
        let req = format!(
            "GET http://{target}/bytes/{SMALL} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {basic}\r\n\
             {close}\r\n"
        );
        let mut kept: Option<TcpStream> = None;
        let mut ttfb = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let t = Instant::now();
            // The door reads the request itself: a plain connection to it, no handshake first.
            let mut s = match kept.take() {
                Some(s) => s,
                None => Via::Forward(proxy).open(target).await.unwrap(),
            };
            s.write_all(req.as_bytes()).await.unwrap();
            let got = answer_head(&mut s, &mut buf).await.unwrap();
            // The first 20 warm up.
            if i >= 20 {
                ttfb.push(t.elapsed());
            }
            drain(&mut s, SMALL - got, &mut buf).await.unwrap();
            if keep {
                kept = Some(s);
            }
        }
        report_latency(name, ttfb);
    }
}

/// What the concurrent-flow test saw.
struct Crowd {
    /// Aggregate download rate, MiB/s.
    rate: f64,
    /// RSS of the watched process with every flow open (proxy handshake done, target connected), no data yet.
    open: u64,
    /// Highest RSS of the watched process while the flows were transferring.
    peak: u64,
}

/// Figure 3: `flows` downloads of `mib` each at once. Every flow is first opened end to end and waits (RSS is read
/// then); then all send their request together and read to the end; the rate is timed from then to the last byte.
async fn concurrent(via: &Via, target: SocketAddr, flows: usize, mib: u64, watch: u32) -> Crowd {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(flows);
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..flows {
        let (via, ready, mut go) = (via.clone(), ready_tx.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = via.open(target).await.unwrap();
            ready.send(()).await.unwrap();
            go.wait_for(|g| *g).await.unwrap();
            let mut buf = vec![0u8; CHUNK];
            let got = request(&mut s, mib * MIB, &mut buf).await.unwrap();
            drain(&mut s, mib * MIB - got, &mut buf).await.unwrap();
        }));
    }
    for i in 0..flows {
        let r = tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await;
        assert!(
            matches!(r, Ok(Some(()))),
            "only {i} of {flows} flows opened"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = rss(watch);
    let peak = Arc::new(AtomicU64::new(open));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss(watch), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let t = Instant::now();
    go_tx.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let d = t.elapsed();
    sampler.abort();
    Crowd {
        rate: mib_s(flows as u64 * mib * MIB, d),
        open,
        peak: peak.load(Ordering::Relaxed),
    }
}

/// Figure 4: a cached customer credential check against the directory, in process, and one bcrypt verification.
async fn credential_check(checks: u32) {
    use proxyfleet::auth::limiter::{LimitPolicy, LoginLimiter};
    use proxyfleet::clock::{Clock, SystemClock};
    use proxyfleet::store::{ConnectionSettings, NewOperator, Role, Store};
    println!(
        "\n[4] customer credential check, in process (proxyfleet::proxy::Directory::authenticate)"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}/b.db", dir.path().display()), 2)
        .await
        .unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let hasher = proxyfleet::auth::password::Hasher::new(2).await.unwrap();
    let (user, pw) = ("benchcustomer", "k3Y-customer-password");
    let hash = hasher.hash(pw).await.unwrap();
    let now = clock.now_ms();
    let op = store
        .create_operator(NewOperator {
            username: "benchop",
            password_hash: &hash,
            role: Role::Operator,
            now,
        })
        .await
        .unwrap();
    let settings = ConnectionSettings {
        name: "bench".into(),
        device_id: None,
        limit_bytes: None,
        disabled_at: None,
        allow_cidrs: String::new(),
        dedicated_port: None,
    };
    store
        .create_connection(&op.id, user, &hash, &settings, now)
        .await
        .unwrap();
    let limiter = LoginLimiter::new(LimitPolicy::default(), None, Arc::new(SystemClock));
    let token = tokio_util::sync::CancellationToken::new();
    let dir_ = proxyfleet::proxy::Directory::load(
        store,
        hasher.clone(),
        limiter,
        clock,
        token,
        (rand::random(), None),
    )
    .await
    .unwrap();
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let t = Instant::now();
    assert!(hasher.verify(pw, &hash).await.unwrap());
    let bcrypt = t.elapsed();
    let t = Instant::now();
    dir_.authenticate(user, pw, ip).await.unwrap();
    let first = t.elapsed();
    for _ in 0..1000 {
        dir_.authenticate(user, pw, ip).await.unwrap();
    }
    let t = Instant::now();
    for _ in 0..checks {
        std::hint::black_box(dir_.authenticate(user, pw, ip).await.unwrap());
    }
    let cached = t.elapsed().as_secs_f64() * 1e9 / f64::from(checks);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!(
        "    {:<48} {:>10}",
        "one bcrypt verification (cost 12)",
        ms(bcrypt)
    );
    println!(
        "    {:<48} {:>10}",
        "first check of a connection (uncached: bcrypt)",
        ms(first)
    );
    println!(
        "    {:<48} {:>10}",
        format!("cached check (mean of {checks})"),
        format!("{cached:.0} ns")
    );
    let ratio = bcrypt.as_secs_f64() * 1e9 / cached;
    println!("    -> a cached check is {ratio:.0}x cheaper than bcrypt");
}

/// Print one route's concurrent-flow figures; `idle` is the watched process's RSS before the flows.
fn report_crowd(name: &str, who: &str, c: &Crowd, idle: u64, flows: usize) {
    let mib = |b: u64| b as f64 / MIB as f64;
    let per = |b: u64| b.saturating_sub(idle) as f64 / flows as f64 / 1024.0;
    println!("    {name:<36} aggregate {:>7.1} MiB/s", c.rate);
    println!(
        "    {:<36} {who} RSS idle {:.1} MiB, {flows} flows open {:.1} MiB, peak {:.1} MiB",
        "",
        mib(idle),
        mib(c.open),
        mib(c.peak)
    );
    println!(
        "    {:<36} -> {:.1} KiB per open flow, {:.1} KiB per transferring flow (peak)",
        "",
        per(c.open),
        per(c.peak)
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

#[tokio::main]
async fn main() {
    let mib = env_num("BENCH_DOWNLOAD_MIB", 512);
    let runs = env_num("BENCH_DOWNLOAD_RUNS", 3).max(1);
    let requests = env_num("BENCH_LATENCY_REQUESTS", 1000) as usize;
    let flows = env_num("BENCH_FLOWS", 200) as usize;
    let flow_mib = env_num("BENCH_FLOW_MIB", 16);
    let checks = env_num("BENCH_AUTH_CHECKS", 200_000) as u32;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let quic = std::env::var("BENCH_TRANSPORT").as_deref() != Ok("tcp");
    println!(
        "proxyfleet data-plane benchmark on loopback, {cores} cores shared by target, clients and proxies; \
         device tunnel over {}",
        if quic { "QUIC" } else { "TLS over TCP" }
    );

    let target = spawn_target().await;
    let fleet = Fleet::start(quic).await;
    let peer = Peer::start();
    let creds = format!("{}:{}", fleet.user, fleet.pass);
    let basic = base64::engine::general_purpose::STANDARD.encode(creds);
    let fleet_pids = vec![
        ("server".into(), fleet.server.0.id()),
        ("agent".into(), fleet.agent.0.id()),
    ];
    let mut routes = vec![
        Route::new("direct", Via::Direct, Vec::new()),
        Route::new(
            "proxyfleet SOCKS5",
            Via::Socks5(fleet.socks5, Some((fleet.user.clone(), fleet.pass.clone()))),
            fleet_pids.clone(),
        ),
        Route::new(
            "proxyfleet HTTP CONNECT",
            Via::Connect(fleet.http, basic.clone()),
            fleet_pids,
        ),
    ];
    match &peer {
        Ok(p) => {
            routes.push(Route::new(PEER, Via::Socks5(p.socks, None), p.pids()));
        }
        Err(why) => println!("peer stack unavailable, its figures are left out: {why}"),
    }
    let ceiling = Ceiling::start(target).await;
    match &ceiling {
        Ok(c) => {
            routes.push(Route::new(CEIL_PLAIN, Via::Forward(c.plain), Vec::new()));
            routes.push(Route::new(CEIL_TLS, Via::Forward(c.tls), Vec::new()));
        }
        Err(why) => println!("reference ceilings unavailable, their figures are left out: {why}"),
    }
    // Warm up every route; the first flow of a connection runs bcrypt, later ones hit the cache.
    let mut buf = vec![0u8; CHUNK];
    for r in &routes {
        for _ in 0..3 {
            fetch(&r.via, target, MIB, &mut buf).await;
        }
    }

    let rates = throughput(&routes, target, mib, runs).await;
    let rate = |name: &str| routes.iter().position(|r| r.name == name).map(|i| rates[i]);
    let (direct, socks, http) = (rates[0], rates[1], rates[2]);
    println!(
        "    proxyfleet / direct: SOCKS5 {:.0} %, HTTP CONNECT {:.0} %   (target >= 40 %: {})",
        socks / direct * 100.0,
        http / direct * 100.0,
        verdict(socks.max(http) / direct >= 0.4)
    );
    if let Some(peer_rate) = rate(PEER) {
        println!(
            "    proxyfleet / peer:   SOCKS5 {:.2}x, HTTP CONNECT {:.2}x   (target >= 1.5x: {})",
            socks / peer_rate,
            http / peer_rate,
            verdict(socks.max(http) / peer_rate >= 1.5)
        );
    }
    if let (Some(plain), Some(tls)) = (rate(CEIL_PLAIN), rate(CEIL_TLS)) {
        println!(
            "    ceilings / direct:   plain {:.0} %, TLS {:.0} %;   proxyfleet's better door / TLS ceiling: {:.0} %",
            plain / direct * 100.0,
            tls / direct * 100.0,
            socks.max(http) / tls * 100.0
        );
    }

    // Latency and the crowd compare the real proxies only.
    routes.retain(|r| r.name != CEIL_PLAIN && r.name != CEIL_TLS);
    drop(ceiling);
    latency(&routes, target, requests).await;
    forwarded_latency(fleet.http, &basic, target, requests).await;

    println!("\n[3] {flows} concurrent flows, {flow_mib} MiB each: all opened first, then all downloading at once");
    let watch = fleet.server.0.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss(watch);
    let c = concurrent(&routes[1].via, target, flows, flow_mib, watch).await;
    report_crowd("proxyfleet SOCKS5", "server", &c, idle, flows);
    for _ in 0..env_num("BENCH_CROWD_REPEAT", 0) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = concurrent(&routes[1].via, target, flows, flow_mib, watch).await;
        report_crowd("proxyfleet SOCKS5 again", "server", &c, idle, flows);
    }
    if let (Ok(p), Some(r)) = (&peer, routes.iter().find(|r| r.name == PEER)) {
        if let Some((_, watch)) = p.pids().into_iter().find(|(n, _)| n == "rathole-server") {
            let idle = rss(watch);
            let c = concurrent(&r.via, target, flows, flow_mib, watch).await;
            report_crowd(PEER, "rathole server", &c, idle, flows);
        }
    }
    drop(peer);
    drop(fleet);

    credential_check(checks).await;
}
