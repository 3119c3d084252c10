//! Shared test harness: real databases (one fresh database per test), real Redis servers, a real proxyfleet
//! server on 127.0.0.1:0. Services that are not reachable make a test skip with a printed reason, unless
//! `PROXYFLEET_TEST_REQUIRE_SERVICES=1` (as in `.ci/run`), which turns the skip into a failure.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxyfleet::clock::ManualClock;
use proxyfleet::config::{RawConfig, Secret, ServeConfig};
use proxyfleet::server::{RunningServer, ServeOptions};
use proxyfleet::store::{Operator, Role, Store};
use serde_json::Value;
use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
    MySql,
}

pub fn require_services() -> bool {
    std::env::var("PROXYFLEET_TEST_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// Skip (or, when services are required, fail) with a reason.
pub fn skip(reason: &str) {
    assert!(
        !require_services(),
        "required service unavailable: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A database of its own for one test, dropped afterwards.
pub struct TestDb {
    pub url: String,
    cleanup: Option<(Db, String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn create(db: Db) -> Option<TestDb> {
        let admin = match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                return Some(TestDb {
                    url,
                    cleanup: None,
                    _dir: Some(dir),
                });
            }
            Db::Postgres => env_or(
                "PROXYFLEET_TEST_POSTGRES_URL",
                "postgres://root@127.0.0.1:5432/test",
            ),
            Db::MySql => env_or(
                "PROXYFLEET_TEST_MYSQL_URL",
                "mysql://root@127.0.0.1:3306/test",
            ),
        };
        sqlx::any::install_default_drivers();
        let mut conn = match sqlx::AnyConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                skip(&format!("{db:?} at {admin} unreachable: {e}"));
                return None;
            }
        };
        let name = format!("pf_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let url = replace_db(&admin, &name);
        Some(TestDb {
            url,
            cleanup: Some((db, admin, name)),
            _dir: None,
        })
    }
}

fn replace_db(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("database url");
    u.set_path(name);
    u.to_string()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((db, admin, name)) = self.cleanup.take() else {
            return;
        };
        // Drop runs inside a runtime; do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let force = if db == Db::Postgres {
                    " WITH (FORCE)"
                } else {
                    ""
                };
                if let Ok(mut c) = sqlx::AnyConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}{force}"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}

/// The shared Redis (from `PROXYFLEET_TEST_REDIS_URL`, default 127.0.0.1:6379), or `None` with a printed skip.
pub async fn shared_redis() -> Option<String> {
    let url = env_or("PROXYFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let ok = async {
        let client = redis::Client::open(url.as_str()).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<String>(&mut c).await.ok()
    };
    match tokio::time::timeout(Duration::from_secs(2), ok).await {
        Ok(Some(_)) => Some(url),
        _ => {
            skip(&format!("Redis at {url} unreachable"));
            None
        }
    }
}

/// A private `redis-server` on a free port, which a test may pause, stop and restart.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            skip("redis-server binary not found");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut r = RedisServer { port, child: None };
        r.restart();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port and wait until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze the process (SIGSTOP): connections stay open but nothing answers, the worst case for a client.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let client = redis::Client::open(self.url()).expect("url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("KEYS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}

/// What a test server should look like.
pub struct Opts {
    pub db: Db,
    pub redis: Option<String>,
    pub raw: RawConfig,
    /// How the data-plane lock is watched.
    pub lock_timing: proxyfleet::store::LockTiming,
}

impl Opts {
    pub fn new(db: Db) -> Self {
        Opts {
            db,
            redis: None,
            raw: RawConfig::default(),
            lock_timing: Default::default(),
        }
    }
}

/// A real server on 127.0.0.1:0 with its own database, data directory and manual clock.
pub struct TestServer {
    pub base: String,
    pub clock: ManualClock,
    pub http: reqwest::Client,
    pub running: Option<RunningServer>,
    pub redis_prefix: String,
    pub data_dir: tempfile::TempDir,
    pub db: TestDb,
    /// The settings it started with (for restarts).
    pub raw: RawConfig,
}

pub const ADMIN_PASSWORD: &str = "Corr3ct-Horse-Battery";

impl TestServer {
    /// `None` when a needed service is unavailable (the skip has been printed).
    pub async fn start(opts: Opts) -> Option<TestServer> {
        let db = TestDb::create(opts.db).await?;
        let data_dir = tempfile::tempdir().expect("tempdir");
        let prefix = format!("pftest:{}:", uuid::Uuid::new_v4().simple());
        let raw = RawConfig {
            data_dir: Some(data_dir.path().to_owned()),
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            database_url: Some(Secret::new(db.url.clone())),
            redis_addr: opts.redis.clone().map(Secret::new),
            redis_prefix: Some(prefix.clone()),
            shutdown_timeout_secs: Some(5),
            ..RawConfig::default()
        };
        // The test's own settings win over the harness defaults.
        let prefix = opts.raw.redis_prefix.clone().unwrap_or(prefix);
        let raw = raw.overlay(opts.raw);
        let config = ServeConfig::resolve(raw.clone()).expect("config");
        let clock = ManualClock::default();
        let running = proxyfleet::server::start(
            config,
            ServeOptions {
                clock: Arc::new(clock.clone()),
                lock_timing: opts.lock_timing,
            },
        )
        .await
        .expect("server starts");
        let base = format!("http://{}", running.addr);
        if opts.redis.is_some() {
            // Wait (bounded) for the background connection so that tests exercise the Redis path.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !running.state.redis.as_ref().is_some_and(|r| r.is_up())
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Some(TestServer {
            base,
            clock,
            http: reqwest::Client::builder()
                .user_agent("proxyfleet-tests/1")
                .build()
                .expect("client"),
            running: Some(running),
            redis_prefix: prefix,
            data_dir,
            db,
            raw,
        })
    }

    /// Where devices connect, when the test enabled the tunnel.
    pub fn tunnel(&self) -> String {
        self.running
            .as_ref()
            .expect("running")
            .tunnel_addr
            .expect("tunnel enabled")
            .to_string()
    }

    pub fn store(&self) -> &Store {
        &self.running.as_ref().expect("running").store
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn create_operator(&self, username: &str, password: &str, role: Role) -> Operator {
        let r = self.running.as_ref().expect("running");
        r.state
            .auth
            .create_operator(username, password, role)
            .await
            .expect("create operator")
    }

    /// Create an admin `admin` and return a token for it.
    pub async fn admin_token(&self) -> String {
        self.create_operator("admin", ADMIN_PASSWORD, Role::Admin)
            .await;
        self.login("admin", ADMIN_PASSWORD).await
    }

    pub async fn try_login(&self, username: &str, password: &str) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1.0/auth/login"))
            .json(&serde_json::json!({"username": username, "password": password}))
            .send()
            .await
            .expect("request")
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let resp = self.try_login(username, password).await;
        assert_eq!(resp.status(), 200, "login as {username}");
        let v: Value = resp.json().await.expect("json");
        v["token"].as_str().expect("token").to_owned()
    }

    /// Unauthenticated GET, body as text.
    pub async fn text(&self, path: &str) -> String {
        let r = self.http.get(self.url(path)).send().await.expect("request");
        r.text().await.expect("body")
    }

    /// Unauthenticated GET, body as JSON.
    pub async fn json(&self, path: &str) -> Value {
        let r = self.http.get(self.url(path)).send().await.expect("request");
        r.json().await.expect("JSON body")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.http
            .patch(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// Stop gracefully and start again on the same database and data directory (listeners get new ports).
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let config = ServeConfig::resolve(self.raw.clone()).expect("config");
        let running = proxyfleet::server::start(
            config,
            ServeOptions {
                clock: Arc::new(self.clock.clone()),
                ..ServeOptions::default()
            },
        )
        .await
        .expect("server restarts");
        self.base = format!("http://{}", running.addr);
        self.running = Some(running);
    }

    pub fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("running")
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.cancel_token().cancel();
        }
    }
}

/// The body of an error response, checked to be `{"error": "..."}` and nothing else.
pub async fn error_of(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.expect("error body is JSON");
    let obj = v.as_object().expect("error body is an object");
    assert_eq!(obj.len(), 1, "error body has only `error`: {v}");
    obj["error"].as_str().expect("error is a string").to_owned()
}

/// Generate `#[tokio::test]`s named `sqlite`, `postgres` and `mysql` in a module named after the test function.
#[macro_export]
macro_rules! on_all_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { super::$name(common::Db::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { super::$name(common::Db::Postgres).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() { super::$name(common::Db::MySql).await }
        }
    )*};
}

/// Fire `n` wrong-password logins for `username` at once; count the answers by status.
pub async fn parallel_wrong_logins(
    s: &TestServer,
    username: &str,
    n: usize,
) -> std::collections::BTreeMap<u16, usize> {
    let url = s.url("/api/v1.0/auth/login");
    let body = serde_json::json!({"username": username, "password": "Wrong-Passw0rd!"});
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, url, body) = (s.http.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                http.post(&url)
                    .json(&body)
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for t in tasks {
        *counts.entry(t.await.expect("task")).or_insert(0) += 1;
    }
    counts
}

/// Read an HTTP request head, through its blank line, from a client of a test's target server; `None` if the client
/// goes away first.
pub async fn read_request_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    Some(head)
}

// ---- devices and agents -------------------------------------------------------------------------------------

/// A connection named `name` (unlimited) on a new device of the operator behind `token` that no agent runs: the
/// create answer.
pub async fn connection_on_new_device(s: &TestServer, token: &str, name: &str) -> Value {
    let r = s
        .post(
            "/api/v1.0/devices",
            token,
            serde_json::json!({ "name": "d" }),
        )
        .await;
    let device: Value = r.json().await.expect("device json");
    let r = s
        .post(
            "/api/v1.0/connections",
            token,
            serde_json::json!({ "name": name, "device_id": device["id"] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    r.json().await.expect("connection json")
}

/// A new device of the operator behind `token`, enrolled by the real agent library into a fresh state
/// directory: its id and the directory.
pub async fn enrolled_device(
    s: &TestServer,
    token: &str,
    name: &str,
) -> (String, tempfile::TempDir) {
    let r = s
        .post(
            "/api/v1.0/devices",
            token,
            serde_json::json!({ "name": name }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("device json");
    let dir = tempfile::tempdir().expect("agent dir");
    proxyfleet_agent::enroll(
        &s.tunnel(),
        v["pairing_code"].as_str().expect("code"),
        dir.path(),
    )
    .await
    .expect("enroll");
    (v["id"].as_str().expect("id").to_owned(), dir)
}

/// The options the tests run agents with: no battery, and private targets allowed (the tests' targets listen on
/// loopback).
pub fn agent_options(dir: &std::path::Path) -> proxyfleet_agent::RunOptions {
    proxyfleet_agent::RunOptions {
        power_supply_dir: dir.join("no-power-supply"),
        allow_private_targets: true,
        ..Default::default()
    }
}

/// A running agent: cancel the token to stop it; the task ends with the agent's outcome.
pub type Agent = (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
);

/// Run the real agent from `dir` with `opts`.
pub fn spawn_agent_opts(dir: &std::path::Path, opts: proxyfleet_agent::RunOptions) -> Agent {
    let cancel = tokio_util::sync::CancellationToken::new();
    let (c, d) = (cancel.clone(), dir.to_owned());
    let task = tokio::spawn(async move { proxyfleet_agent::run(&d, opts, c).await });
    (cancel, task)
}

/// The TLS identity an agent enrolled into `dir`, for tests that speak the tunnel protocol by hand.
pub fn device_tls(dir: &std::path::Path) -> rustls::ClientConfig {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let read = |f: &str| std::fs::read(dir.join(f)).expect("agent state file");
    proxyfleet_agent::tls::tunnel_tls(
        CertificateDer::from(read("ca.crt")),
        CertificateDer::from(read("device.crt")),
        PrivateKeyDer::from_pem_slice(&read("device.key")).expect("device key"),
    )
    .expect("device TLS")
}

type ControlCodec = proxyfleet_proto::FrameCodec<proxyfleet_proto::ControlFrame>;

/// A tunnel to the server with its control stream, driven by hand instead of by the agent: the test sends the
/// hello it wants (another protocol version, an older agent's capabilities) and reads the answer. Dropping it
/// closes the tunnel.
pub struct HandTunnel {
    pub send: tokio_util::codec::FramedWrite<proxyfleet_agent::conn::BoxWrite, ControlCodec>,
    pub recv: tokio_util::codec::FramedRead<proxyfleet_agent::conn::BoxRead, ControlCodec>,
    _conn: proxyfleet_agent::conn::Conn,
}

impl HandTunnel {
    /// Connect over QUIC as the device enrolled into `dir`, send `hello` and return the server's answer.
    pub async fn hello(
        s: &TestServer,
        dir: &std::path::Path,
        hello: proxyfleet_proto::Hello,
    ) -> (HandTunnel, proxyfleet_proto::ControlFrame) {
        use futures_util::{SinkExt, StreamExt};
        let conn = proxyfleet_agent::conn::connect_quic(&s.tunnel(), device_tls(dir))
            .await
            .expect("QUIC tunnel");
        let (recv, send) = conn.open_bi().await.expect("control stream");
        let codec = || ControlCodec::new(proxyfleet_proto::MAX_CONTROL_FRAME);
        let mut t = HandTunnel {
            send: tokio_util::codec::FramedWrite::new(send, codec()),
            recv: tokio_util::codec::FramedRead::new(recv, codec()),
            _conn: conn,
        };
        t.send
            .send(proxyfleet_proto::ControlFrame::Hello(hello))
            .await
            .expect("hello sent");
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), t.recv.next())
            .await
            .expect("answered in time")
            .expect("an answer")
            .expect("a valid frame");
        (t, answer)
    }
}
