//! Harness of the OpenVPN tests: network namespaces made by the test, a target (HTTP server and DNS responder)
//! reachable only from the device, a real agent inside the device's namespace, the real server inside the server's,
//! and real `openvpn` clients inside the customer's.
//!
//! ```text
//!  customer ns ── 10.201.1.0/24 ── server ns ── 10.201.2.0/24 ── device ns ── 10.201.3.0/24 ── target ns
//!  openvpn client, curl            proxyfleet + openvpn          agent                        HTTP :80, DNS :53
//! ```
//!
//! The test thread enters the server's namespace before it builds its runtime, so the server, its `openvpn` child
//! and its `ip`/`nft` commands all live there; the agent and the target run on threads of their own that entered
//! theirs. Namespaces, interfaces and the customer's resolv.conf are removed on drop.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxyfleet::config::RawConfig;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::common::{skip, Db, Opts, TestServer, ADMIN_PASSWORD};
use proxyfleet::store::Role;

/// What the README tells customers whose machine has IPv6 switched off to add to their profile.
pub const IPV6_OFF_LINES: &str =
    "pull-filter ignore \"ifconfig-ipv6\"\npull-filter ignore \"route-ipv6\"\n";
pub const SERVER_CUST: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
pub const CUST: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
pub const SERVER_DEV: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
pub const DEV_UP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
pub const DEV_OUT: Ipv4Addr = Ipv4Addr::new(10, 201, 3, 1);
pub const TARGET: Ipv4Addr = Ipv4Addr::new(10, 201, 3, 2);
pub const VPN_PORT: u16 = 1194;
/// The name the customer asks for; only the target's DNS responder knows it.
pub const TARGET_NAME: &str = "target-name";
/// The pushed DNS address (the default: the VPN subnet's .2).
pub const VPN_DNS: &str = "10.77.0.2";

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
    })
}

/// One network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Move the calling thread into this namespace (threads it starts afterwards are in it too).
    pub fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("netns file");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    fn addr(&self, dev: &str, cidr: &str) {
        sh(&["ip", "-n", &self.name, "addr", "add", cidr, "dev", dev]);
        sh(&["ip", "-n", &self.name, "link", "set", dev, "up"]);
    }

    /// A command inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    sh(&[
        "ip", "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev,
        "netns", &b.name,
    ]);
}

/// The four namespaces, wired.
pub struct Topology {
    pub srv: Netns,
    pub cust: Netns,
    pub dev: Netns,
    pub tgt: Netns,
    resolv_dir: PathBuf,
}

impl Topology {
    /// `None` (with the skip printed) when this machine cannot run the test.
    pub fn create(test: u32) -> Option<Topology> {
        if !is_root() {
            skip("the OpenVPN tests need root (network namespaces, tun devices)");
            return None;
        }
        for p in ["openvpn", "nft", "ip", "curl", "ping", "sysctl"] {
            if !have(p) {
                skip(&format!(
                    "{p} is not installed (scripts/install-test-deps.sh installs it)"
                ));
                return None;
            }
        }
        let tag = format!("v{test}x{}", std::process::id() % 100_000);
        let srv = Netns::create(format!("pf{tag}s"));
        let cust = Netns::create(format!("pf{tag}c"));
        let dev = Netns::create(format!("pf{tag}d"));
        let tgt = Netns::create(format!("pf{tag}t"));
        veth(&srv, "eth-cust", &cust, "eth-srv");
        veth(&srv, "eth-dev", &dev, "eth-srv");
        veth(&dev, "eth-tgt", &tgt, "eth-dev");
        srv.addr("eth-cust", &format!("{SERVER_CUST}/24"));
        cust.addr("eth-srv", &format!("{CUST}/24"));
        srv.addr("eth-dev", &format!("{SERVER_DEV}/24"));
        dev.addr("eth-srv", &format!("{DEV_UP}/24"));
        dev.addr("eth-tgt", &format!("{DEV_OUT}/24"));
        tgt.addr("eth-dev", &format!("{TARGET}/24"));
        // The device allows unprivileged ping sockets, as Android and systemd systems do (the raw-socket fallback's
        // reply matching has unit tests in the agent's `ping` module).
        sh(&[
            "ip",
            "netns",
            "exec",
            &dev.name,
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ]);
        // The customer's default gateway is the server (as a home router would be): redirect-gateway needs one.
        sh(&[
            "ip",
            "-n",
            &cust.name,
            "route",
            "add",
            "default",
            "via",
            &SERVER_CUST.to_string(),
        ]);
        // What a client's DNS integration does with the pushed address; `ip netns exec` mounts it.
        let resolv_dir = PathBuf::from(format!("/etc/netns/{}", cust.name));
        std::fs::create_dir_all(&resolv_dir).expect("resolv dir");
        std::fs::write(
            resolv_dir.join("resolv.conf"),
            format!("nameserver {VPN_DNS}\noptions timeout:2 attempts:2\n"),
        )
        .expect("resolv.conf");
        Some(Topology {
            srv,
            cust,
            dev,
            tgt,
            resolv_dir,
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.resolv_dir);
    }
}

/// Run `f` on a thread of its own inside `ns`, with a runtime of its own.
pub fn spawn_in<F, Fut>(ns: &Netns, f: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("netns file");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f());
    })
}

/// What the target saw.
#[derive(Default)]
pub struct TargetLog {
    /// Source address of every HTTP connection.
    pub http_peers: Mutex<Vec<IpAddr>>,
    /// (source address, name) of every DNS query.
    pub dns_queries: Mutex<Vec<(IpAddr, String)>>,
    /// The same, over TCP.
    pub dns_tcp_queries: Mutex<Vec<(IpAddr, String)>>,
    /// Body bytes the HTTP server handed to its sockets (`/big`).
    pub sent: AtomicU64,
}

/// Size of `/big`.
pub const BIG: usize = 8 * 1024 * 1024;
pub const HELLO: &str = "hello from the target\n";

/// Start the target (HTTP on :80, DNS on :53 over UDP and TCP) in `ns` until `stop`.
pub fn start_target(ns: &Netns, stop: CancellationToken) -> Arc<TargetLog> {
    let log = Arc::new(TargetLog::default());
    let l = log.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || async move {
        let http = tokio::net::TcpListener::bind((TARGET, 80))
            .await
            .expect("bind :80");
        let dns = tokio::net::UdpSocket::bind((TARGET, 53))
            .await
            .expect("bind :53");
        let dns_tcp = tokio::net::TcpListener::bind((TARGET, 53))
            .await
            .expect("bind tcp :53");
        let _ = ready_tx.send(());
        tokio::select! {
            _ = serve_http(http, l.clone()) => {}
            _ = serve_dns(dns, l.clone()) => {}
            _ = serve_dns_tcp(dns_tcp, l) => {}
            _ = stop.cancelled() => {}
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("target ready");
    log
}

async fn serve_http(l: tokio::net::TcpListener, log: Arc<TargetLog>) {
    loop {
        let Ok((mut s, peer)) = l.accept().await else {
            return;
        };
        log.http_peers.lock().unwrap().push(peer.ip());
        let log = log.clone();
        tokio::spawn(async move {
            let Some(head) = crate::common::read_request_head(&mut s).await else {
                return;
            };
            let big = head.starts_with(b"GET /big ");
            let len = if big { BIG } else { HELLO.len() };
            let h =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
            if s.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            if !big {
                let _ = s.write_all(HELLO.as_bytes()).await;
                return;
            }
            let chunk = vec![b'x'; 16 * 1024];
            let mut left = BIG;
            while left > 0 {
                let n = left.min(chunk.len());
                match s.write(&chunk[..n]).await {
                    Ok(0) | Err(_) => return,
                    Ok(w) => {
                        log.sent.fetch_add(w as u64, Ordering::Relaxed);
                        left -= w;
                    }
                }
            }
        });
    }
}

/// The answer of a DNS responder that knows one name: `target-name` → the target's address; other names get
/// NXDOMAIN. With the name asked; `None` for a message too short to be a query.
fn dns_answer(q: &[u8]) -> Option<(String, Vec<u8>)> {
    if q.len() < 12 {
        return None;
    }
    // Question: labels from offset 12, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    while i < q.len() && q[i] != 0 {
        let l = q[i] as usize;
        if i + 1 + l > q.len() {
            break;
        }
        labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + l]).to_string());
        i += 1 + l;
    }
    if i + 5 > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let question_end = i + 5;
    let name = labels.join(".");
    let known = name == TARGET_NAME;
    let answer = known && qtype == 1;
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&q[0..2]);
    r.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
    r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    if answer {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&TARGET.octets());
    }
    Some((name, r))
}

/// A query for `name`, type A, with id `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Ask `server` (from inside `ns`) for `name` over TCP; the answer message, or why there is none.
pub async fn dns_over_tcp(ns: &Netns, server: SocketAddr, name: &str) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let q = dns_query(0x5eed, name);
    spawn_in(ns, move || async move {
        let ask = async {
            let mut s = tokio::net::TcpStream::connect(server)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut msg = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
            msg.extend_from_slice(&q);
            s.write_all(&msg).await.map_err(|e| format!("write: {e}"))?;
            let len = s.read_u16().await.map_err(|e| format!("read: {e}"))?;
            let mut r = vec![0u8; usize::from(len)];
            s.read_exact(&mut r)
                .await
                .map_err(|e| format!("read: {e}"))?;
            Ok(r)
        };
        let r = tokio::time::timeout(Duration::from_secs(10), ask)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let _ = tx.send(r);
    });
    rx.await
        .unwrap_or_else(|_| Err("the asking thread died".into()))
}

/// The DNS responder over UDP.
async fn serve_dns(sock: tokio::net::UdpSocket, log: Arc<TargetLog>) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let Some((name, r)) = dns_answer(&buf[..n]) else {
            continue;
        };
        log.dns_queries.lock().unwrap().push((from.ip(), name));
        let _ = sock.send_to(&r, from).await;
    }
}

/// The DNS responder over TCP (RFC 1035 4.2.2: each message after its two-byte length).
async fn serve_dns_tcp(l: tokio::net::TcpListener, log: Arc<TargetLog>) {
    use tokio::io::AsyncReadExt;
    loop {
        let Ok((mut s, from)) = l.accept().await else {
            return;
        };
        let log = log.clone();
        tokio::spawn(async move {
            while let Ok(len) = s.read_u16().await {
                let mut q = vec![0u8; usize::from(len)];
                if s.read_exact(&mut q).await.is_err() {
                    return;
                }
                let Some((name, r)) = dns_answer(&q) else {
                    return;
                };
                log.dns_tcp_queries.lock().unwrap().push((from.ip(), name));
                let mut out = u16::try_from(r.len()).unwrap().to_be_bytes().to_vec();
                out.extend_from_slice(&r);
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The server, an operator, and one device whose agent runs in the device namespace.
pub struct Vpn {
    pub s: TestServer,
    pub token: String,
    pub device_id: String,
    pub agent_stop: CancellationToken,
    pub work: tempfile::TempDir,
}

impl Vpn {
    /// Start the server (in the calling thread's namespace: the server's) with the OpenVPN door, and bring a device
    /// online.
    pub async fn start(topo: &Topology, extra: RawConfig) -> Vpn {
        let raw = RawConfig {
            tunnel_listen: Some(SocketAddr::new(SERVER_DEV.into(), 0)),
            openvpn_listen: Some(SocketAddr::new(SERVER_CUST.into(), VPN_PORT)),
            openvpn_keepalive_secs: Some(2),
            proxy_public_host: Some(SERVER_CUST.to_string()),
            // Longer than the 3 s the supervisor gives `openvpn` to send its exit notices before SIGKILL, so the
            // server's shutdown waits for it instead of giving up on a task still running.
            shutdown_timeout_secs: Some(5),
            ..RawConfig::default()
        }
        .overlay(extra);
        let s = TestServer::start(Opts {
            raw,
            ..Opts::new(Db::Sqlite)
        })
        .await
        .expect("server");
        assert!(
            s.running().state.proxy.openvpn.is_some(),
            "the OpenVPN door is on"
        );
        s.create_operator("vpnop", ADMIN_PASSWORD, Role::Admin)
            .await;
        let token = s.login("vpnop", ADMIN_PASSWORD).await;
        let work = tempfile::tempdir().expect("tempdir");
        let (device_id, agent_stop) =
            enroll_agent(&s, &token, topo, &work.path().join("agent")).await;
        let vpn = Vpn {
            s,
            token,
            device_id,
            agent_stop,
            work,
        };
        vpn.until("the device is online", Duration::from_secs(20), || async {
            vpn.device().await["status"] == "online"
        })
        .await;
        vpn
    }

    /// Another device of the operator's, its agent running in the device namespace; waits until it is online.
    /// Returns its id and its agent's stop token.
    pub async fn add_device(&self, topo: &Topology, name: &str) -> (String, CancellationToken) {
        let (id, stop) =
            enroll_agent(&self.s, &self.token, topo, &self.work.path().join(name)).await;
        self.until(
            "the new device is online",
            Duration::from_secs(20),
            || async {
                let r = self
                    .s
                    .get(&format!("/api/v1.0/devices/{id}"), &self.token)
                    .await;
                r.json::<Value>().await.expect("json")["status"] == "online"
            },
        )
        .await;
        (id, stop)
    }

    pub async fn device(&self) -> Value {
        let r = self
            .s
            .get(
                &format!("/api/v1.0/devices/{}", self.device_id),
                &self.token,
            )
            .await;
        r.json().await.expect("json")
    }

    /// Create a connection on the device; the answer (with `password` and `ovpn`).
    pub async fn create(&self, limit: Option<u64>) -> Value {
        let r = self
            .s
            .post(
                "/api/v1.0/connections",
                &self.token,
                json!({ "name": "vpn customer", "device_id": self.device_id, "bandwidth_limit_bytes": limit }),
            )
            .await;
        assert_eq!(r.status(), 201);
        r.json().await.expect("json")
    }

    pub async fn connection(&self, id: &str) -> Value {
        let r = self
            .s
            .get(&format!("/api/v1.0/connections/{id}"), &self.token)
            .await;
        r.json().await.expect("json")
    }

    /// Poll `check` until it holds, failing the test after `within`.
    pub async fn until<F, Fut>(&self, what: &str, within: Duration, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Write a profile to a file of the test's.
    pub fn profile_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.work.path().join(name);
        std::fs::write(&p, text).expect("profile");
        p
    }

    pub fn door(&self) -> &proxyfleet::openvpn::Door {
        self.s
            .running()
            .state
            .proxy
            .openvpn
            .as_deref()
            .expect("door")
    }
}

/// A real `openvpn` client in the customer namespace; killed on drop.
pub struct Client {
    child: Child,
    pub log: PathBuf,
}

impl Client {
    pub fn start(cust: &Netns, profile: &Path) -> Client {
        Client::start_with(cust, profile, &[])
    }

    /// With `extra` options after the profile's (they override it).
    pub fn start_with(cust: &Netns, profile: &Path, extra: &[&std::ffi::OsStr]) -> Client {
        let log = profile.with_extension("log");
        let _ = std::fs::remove_file(&log);
        let child = cust
            .command("openvpn")
            .arg("--config")
            .arg(profile)
            .args(extra)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openvpn client");
        Client { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the client's log contains `needle`; false after `within`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn connected(&self, within: Duration) -> bool {
        self.wait_log("Initialization Sequence Completed", within)
            .await
    }

    /// Whether the process has ended, waiting up to `within`.
    pub async fn exited(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.child.try_wait().ok().flatten().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` in the customer namespace: (exit success, body length, body text up to 200 bytes).
pub async fn curl(cust: &Netns, url: &str, max_secs: u32) -> (bool, usize, String) {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &cust.name, "curl", "-sS", "--max-time"])
        .arg(max_secs.to_string())
        .arg(url)
        .output()
        .await
        .expect("curl");
    let body = out.stdout;
    if !out.status.success() {
        eprintln!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (
        out.status.success(),
        body.len(),
        String::from_utf8_lossy(&body[..body.len().min(200)]).to_string(),
    )
}

/// Print the server namespace's routing and filter state (for a failing test's log).
pub fn dump(ns: &Netns) {
    for args in [
        vec!["ip", "rule"],
        vec!["ip", "route", "show", "table", "all"],
        vec!["ip", "-s", "link"],
        vec!["nft", "list", "ruleset"],
    ] {
        let out = ns.command(args[0]).args(&args[1..]).output();
        if let Ok(o) = out {
            eprintln!(
                "--- {args:?}\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// Create a device through the API and run an agent enrolled as it in the device namespace (its state directory's
/// name is the device's name). Returns the device id and the agent's stop token.
async fn enroll_agent(
    s: &TestServer,
    token: &str,
    topo: &Topology,
    state: &Path,
) -> (String, CancellationToken) {
    let name = state
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("phone")
        .to_owned();
    let r = s
        .post("/api/v1.0/devices", token, json!({ "name": name }))
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("json");
    let device_id = v["id"].as_str().expect("id").to_owned();
    let code = v["pairing_code"].as_str().expect("code").to_owned();
    let state = state.to_owned();
    std::fs::create_dir_all(&state).expect("agent dir");
    let agent_stop = CancellationToken::new();
    let (tunnel, stop) = (s.tunnel(), agent_stop.clone());
    spawn_in(&topo.dev, move || async move {
        proxyfleet_agent::enroll(&tunnel, &code, &state)
            .await
            .expect("enroll");
        let opts = proxyfleet_agent::RunOptions {
            power_supply_dir: state.join("none"),
            // The target lives at a private address of this lab.
            allow_private_targets: true,
            dns_server: Some(SocketAddr::new(TARGET.into(), 53)),
            ..Default::default()
        };
        let _ = proxyfleet_agent::run(&state, opts, stop).await;
    });
    (device_id, agent_stop)
}
