//! The `proxyfleet` binary as an operator runs it: first run, configuration sources, `operator create`,
//! secrets kept out of output, graceful shutdown on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_proxyfleet");

/// A running `proxyfleet serve`, with its output collected line by line.
struct Serve {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    seen_out: Vec<String>,
    seen_err: Vec<String>,
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

impl Serve {
    fn spawn(cmd: &mut Command) -> Serve {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn proxyfleet");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Serve {
            child,
            stdout,
            stderr,
            seen_out: vec![],
            seen_err: vec![],
        }
    }

    /// Wait for the JSON log line announcing the listener and return its address.
    fn addr(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
                self.seen_err.push(line.clone());
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "API and dashboard listening" {
                        return v["fields"]["addr"].as_str().unwrap().to_owned();
                    }
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("server exited early with {status}: {:?}", self.seen_err);
            }
        }
        panic!("server never announced its address: {:?}", self.seen_err);
    }

    /// Wait until standard output has shown `needle` (what is printed once the server is up may come just after
    /// it announced its address).
    fn wait_out(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen_out.iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "never printed {needle:?}: {:?}",
                self.seen_out
            );
            self.drain();
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.stdout.recv_timeout(Duration::from_millis(200)) {
            self.seen_out.push(l);
        }
        while let Ok(l) = self.stderr.try_recv() {
            self.seen_err.push(l);
        }
    }

    /// Wait for the server to exit by itself, and collect what it wrote.
    fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}: {:?}",
                self.seen_err
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.exit_within(Duration::from_secs(10))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command with a clean environment apart from PATH, so the developer's own variables cannot leak in.
fn proxyfleet(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    c
}

fn create_operator(dir: &std::path::Path, username: &str, password: &str) -> std::process::Output {
    create_operator_with(dir, username, password, &[], &[])
}

/// `operator create` with more flags and environment variables.
fn create_operator_with(
    dir: &std::path::Path,
    username: &str,
    password: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = proxyfleet(&[
        "operator",
        "create",
        "--username",
        username,
        "--password-stdin",
    ]);
    cmd.args(flags).envs(env.iter().copied());
    let mut child = cmd
        .env("PROXYFLEET_DATA_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn first_run_prints_a_setup_link_generates_secrets_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Settings through the PROXYFLEET_* environment twins.
    let mut s = Serve::spawn(
        proxyfleet(&["serve", "--log-format", "json"])
            .env("PROXYFLEET_DATA_DIR", &data)
            .env("PROXYFLEET_LISTEN", "127.0.0.1:0"),
    );
    let addr = s.addr();
    let ready = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/readyz")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ready.stdout).contains("\"ready\""));
    let secret = data.join("jwt_secret");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(std::fs::read_to_string(&secret).unwrap().len() >= 32);
    let db = data.join("proxyfleet.db");
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600,
        "SQLite is the default store, private"
    );

    s.wait_out("operator create");
    let status = s.terminate();
    assert!(status.success(), "graceful exit on SIGTERM: {status}");
    let out = s.seen_out.join("\n");
    let link = out
        .lines()
        .find(|l| l.contains("/setup#"))
        .unwrap_or_else(|| panic!("no setup link in {out:?}"));
    let token = link.rsplit('#').next().unwrap();
    assert!(token.len() >= 40, "setup token has 256 bits: {token}");
    assert!(
        !s.seen_err.join("\n").contains(token),
        "the setup token is printed, never logged"
    );
    assert!(s.seen_err.iter().any(|l| l.contains("shut down")));
    // The command-line way names the data directory the server used.
    assert!(
        out.contains(&format!(
            "proxyfleet operator create --username NAME --password-stdin --data-dir {}",
            data.display()
        )),
        "{out}"
    );
    assert!(
        !s.seen_err.iter().any(|l| l.contains('\u{1b}')),
        "no terminal colours in logs written to a pipe"
    );

    // The secret is kept across restarts. Given a database URL, the server's hint says to pass it too (without
    // printing it: a URL may hold a password).
    let before = std::fs::read_to_string(&secret).unwrap();
    let url = format!("sqlite://{}", data.join("proxyfleet.db").display());
    let mut again = Serve::spawn(
        proxyfleet(&["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
            .env("PROXYFLEET_DATA_DIR", &data)
            .env("PROXYFLEET_DATABASE_URL", &url),
    );
    again.addr();
    again.wait_out("operator create");
    again.terminate();
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), before);
    let out = again.seen_out.join("\n");
    assert!(
        out.contains("--database-url <the server's database URL>") && !out.contains(&url),
        "{out}"
    );
}

#[test]
fn a_log_level_that_is_no_level_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["verbose", "proxyfleet=loud", ""] {
        let out = proxyfleet(&["serve", "--listen", "127.0.0.1:0", "--log-level", bad])
            .env("PROXYFLEET_DATA_DIR", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("log_level"), "{bad:?}: {err}");
    }
}

/// Only the working directory's `.env` is read, not one in a parent directory.
#[test]
fn dotenv_is_read_from_the_working_directory_only() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let parents = dir.path().join("from-parent");
    std::fs::write(
        dir.path().join(".env"),
        format!("PROXYFLEET_DATA_DIR={}\n", parents.display()),
    )
    .unwrap();
    let doctor = || {
        let out = proxyfleet(&["doctor"]).current_dir(&sub).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    doctor();
    assert!(sub.join("data/proxyfleet.db").exists());
    assert!(!parents.exists(), "the parent directory's .env was read");
    let here = dir.path().join("from-here");
    std::fs::write(
        sub.join(".env"),
        format!("PROXYFLEET_DATA_DIR={}\n", here.display()),
    )
    .unwrap();
    doctor();
    assert!(here.join("proxyfleet.db").exists(), "./.env was not read");
}

#[test]
fn short_jwt_secret_stops_startup_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = proxyfleet(&["serve", "--listen", "127.0.0.1:0"])
        .env("PROXYFLEET_DATA_DIR", dir.path())
        .env("JWT_SECRET", "tooshort-S3CR3T")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("JWT_SECRET") && err.contains("at least 32 bytes"),
        "{err}"
    );
    assert!(!err.contains("tooshort-S3CR3T"), "secret printed: {err}");
}

#[test]
fn config_file_is_read_and_overridden_by_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxyfleet.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:1\"\nsession_idle_timeout_secs = 0\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    // The file's invalid setting is reported by name…
    let out = proxyfleet(&["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("session_idle_timeout_secs"));
    // …and a flag overrides it; the environment overrides the file's listen address, the flag overrides both.
    let mut s = Serve::spawn(
        proxyfleet(&[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--session-idle-timeout-secs",
            "60",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("PROXYFLEET_LISTEN", "127.0.0.1:2"),
    );
    let addr = s.addr();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":1") && !addr.ends_with(":2"));
    assert!(
        dir.path().join("d/proxyfleet.db").exists(),
        "data_dir from the file is used"
    );
    s.terminate();

    std::fs::write(&cfg, "listne = \"127.0.0.1:1\"\n").unwrap();
    let out = proxyfleet(&["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listne`"));
}

#[test]
fn operator_create_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let weak = create_operator(dir.path(), "root_op", "Password1!");
    assert!(!weak.status.success());
    assert!(String::from_utf8_lossy(&weak.stderr).contains("too common"));

    let ok = create_operator(dir.path(), "root_op", "Gr4nite-Lantern-Seven");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("created operator root_op (admin)"));
    let second = create_operator(dir.path(), "helper", "Gr4nite-Lantern-Eight");
    assert!(String::from_utf8_lossy(&second.stdout).contains("(operator)"));
    let dup = create_operator(dir.path(), "ROOT_OP", "Gr4nite-Lantern-Seven");
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    // The composition rule is `serve`'s setting, and the command line follows it from every source: the
    // environment twin, the flag and the TOML file.
    let plain = "quiet lantern granite orbit";
    let refused = create_operator(dir.path(), "plain_op", plain);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("uppercase letter"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let toml = dir.path().join("proxyfleet.toml");
    std::fs::write(&toml, "password_composition_rule = false\n").unwrap();
    let toml = toml.to_str().unwrap();
    for (i, (flags, env)) in [
        (
            &[][..],
            &[("PROXYFLEET_PASSWORD_COMPOSITION_RULE", "false")][..],
        ),
        (&["--password-composition-rule=false"][..], &[][..]),
        (&["--config", toml][..], &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = create_operator_with(dir.path(), &format!("plain_op{i}"), plain, flags, env);
        assert!(
            out.status.success(),
            "{flags:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The flag wins over the file.
    let out = create_operator_with(
        dir.path(),
        "plain_op9",
        plain,
        &["--config", toml, "--password-composition-rule"],
        &[],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("uppercase letter"));

    let no_stdin = proxyfleet(&["operator", "create", "--username", "x_y_z"])
        .env("PROXYFLEET_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&no_stdin.stderr).contains("--password-stdin"));

    // The server now has an operator: no setup link, and the password works; secrets stay out of the logs.
    let mut s = Serve::spawn(
        proxyfleet(&["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("PROXYFLEET_DATA_DIR", dir.path())
            .env("JWT_SECRET", "J".repeat(20) + "-unique-jwt-secret-value")
            .env("REDIS_ADDR", "127.0.0.1:1")
            .env("REDIS_PASSWORD", "unique-redis-password"),
    );
    let addr = s.addr();
    let login = |pw: &str| {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(format!(
                "{{\"username\":\"root_op\",\"password\":\"{pw}\"}}"
            ))
            .arg(format!("http://{addr}/api/v1.0/auth/login"))
            .output()
            .unwrap()
    };
    assert_eq!(
        String::from_utf8_lossy(&login("Gr4nite-Lantern-Seven").stdout),
        "200"
    );
    assert_eq!(
        String::from_utf8_lossy(&login("Leaky-Guess-Passw0rd").stdout),
        "401"
    );
    s.terminate();
    let all = format!("{}\n{}", s.seen_out.join("\n"), s.seen_err.join("\n"));
    assert!(!all.contains("/setup#"));
    assert!(
        all.contains("login failed") && all.contains("bad_password"),
        "failed logins are logged: {all}"
    );
    for secret in [
        "unique-jwt-secret-value",
        "unique-redis-password",
        "Leaky-Guess-Passw0rd",
        "Gr4nite-Lantern-Seven",
    ] {
        assert!(!all.contains(secret), "{secret} appeared in the output");
    }
}

mod common;

/// The seed's `DB_*` variables (no URL, no driver: port 5432 means PostgreSQL) reach a real PostgreSQL database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_db_variables_reach_postgresql() {
    let Some(db) = common::TestDb::create(common::Db::Postgres).await else {
        return;
    };
    let url = url::Url::parse(&db.url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = proxyfleet(&["operator", "create", "--username", "pg_admin"])
        .env("PROXYFLEET_DATA_DIR", dir.path())
        .env("PROXYFLEET_PASSWORD_STDIN", "true")
        .env("DB_HOST", url.host_str().unwrap())
        .env("DB_PORT", url.port().unwrap_or(5432).to_string())
        .env("DB_USER", url.username())
        .env("DB_NAME", url.path().trim_start_matches('/'))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Gr4nite-Lantern-Seven\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("proxyfleet.db").exists(),
        "no SQLite file when DB_HOST is set"
    );
    let store = proxyfleet::store::Store::connect(&db.url, 1).await.unwrap();
    let op = store
        .operator_by_username("pg_admin")
        .await
        .unwrap()
        .expect("operator in PostgreSQL");
    assert_eq!(op.role, proxyfleet::store::Role::Admin);
    assert!(op.password_hash.starts_with("$2b$12$"));
    store.close().await;
}

/// A UDP port whose TCP twin is free too (the tunnel serves both on one number), for a server that must come back
/// on the same port.
fn free_tunnel_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// After a crash (SIGKILL, no goodbye to the devices) the restarted server answers a device's next packet on the
/// dead QUIC connection with a stateless reset the device accepts (its key is derived from the server's key in
/// the data directory), so the device is back within a heartbeat or two instead of after the 20 s idle timeout.
#[test]
fn after_a_crash_devices_are_back_without_waiting_out_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let made = create_operator(&data, "root_op", "Gr4nite-Lantern-Seven");
    assert!(made.status.success(), "{made:?}");
    let tunnel = format!("127.0.0.1:{}", free_tunnel_port());
    let serve = || {
        let mut s = Serve::spawn(
            proxyfleet(&["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
                .env("PROXYFLEET_DATA_DIR", &data)
                .env("PROXYFLEET_TUNNEL_LISTEN", &tunnel)
                .env("PROXYFLEET_TUNNEL_HEARTBEAT_SECS", "1"),
        );
        let addr = s.addr();
        (s, addr)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    // One API call's JSON answer.
    let call = |req: reqwest::RequestBuilder| -> serde_json::Value {
        rt.block_on(async { req.send().await.unwrap().json().await.unwrap() })
    };
    let login = |addr: &str| {
        let v = call(
            http.post(format!("http://{addr}/api/v1.0/auth/login"))
                .json(&serde_json::json!({"username": "root_op", "password": "Gr4nite-Lantern-Seven"})),
        );
        v["token"].as_str().unwrap().to_owned()
    };
    // The device's session as the API shows it: (status, connected_since).
    let session = |addr: &str, token: &str, id: &str| -> (String, String) {
        let v = call(
            http.get(format!("http://{addr}/api/v1.0/devices/{id}"))
                .bearer_auth(token),
        );
        (
            v["status"].as_str().unwrap_or_default().to_owned(),
            v["connected_since"].to_string(),
        )
    };
    let wait_online = |addr: &str, token: &str, id: &str, not: &str| {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let (status, at) = session(addr, token, id);
            if status == "online" && at != not && at != "null" {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "the device never came back: {status} {at}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let (mut s, addr) = serve();
    let token = login(&addr);
    let device = call(
        http.post(format!("http://{addr}/api/v1.0/devices"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"name": "phone"})),
    );
    let id = device["id"].as_str().unwrap().to_owned();
    let code = device["pairing_code"].as_str().unwrap().to_owned();
    let state = dir.path().join("agent");
    rt.block_on(proxyfleet_agent::enroll(&tunnel, &code, &state))
        .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let opts = proxyfleet_agent::RunOptions {
        power_supply_dir: dir.path().join("no-battery"),
        ..Default::default()
    };
    let agent = rt.spawn({
        let (state, cancel) = (state.clone(), cancel.clone());
        async move { proxyfleet_agent::run(&state, opts, cancel).await }
    });
    let first = wait_online(&addr, &token, &id, "");

    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let (mut s, addr) = serve();
    let back = Instant::now();
    let token = login(&addr);
    wait_online(&addr, &token, &id, &first);
    let took = back.elapsed();
    assert!(
        took < proxyfleet_proto::TUNNEL_IDLE_TIMEOUT / 2,
        "the device came back {took:?} after the server did"
    );
    eprintln!("device back {took:?} after the restarted server");
    cancel.cancel();
    let _ = rt.block_on(agent);
    s.terminate();
}

/// One process per database serves devices and proxy doors (decision 79). A second one stops at startup and says
/// why, while an API-only server beside it starts; once the first is gone, even killed without a goodbye, the
/// next one serves.
#[test]
fn a_second_data_plane_on_one_database_stops_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |doors: bool| {
        let mut cmd = proxyfleet(&["serve", "--listen", "127.0.0.1:0", "--log-format", "json"]);
        cmd.env("PROXYFLEET_DATA_DIR", &data);
        if doors {
            cmd.env("PROXYFLEET_SOCKS5_LISTEN", "127.0.0.1:0");
        }
        Serve::spawn(&mut cmd)
    };
    let mut first = serve(true);
    first.addr();

    let mut second = serve(true);
    let status = second.exit_within(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    let err = second.seen_err.join("\n");
    assert!(
        err.contains("another proxyfleet server already serves devices and proxy doors")
            && err.contains(&format!(
                "{}.lock",
                std::fs::canonicalize(data.join("proxyfleet.db"))
                    .unwrap()
                    .display()
            )),
        "{err}"
    );

    let mut api = serve(false);
    api.addr();
    api.wait_out("operator create");
    assert!(api.terminate().success(), "{:?}", api.seen_err);

    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let mut next = serve(true);
    next.addr();
    next.wait_out("operator create");
    assert!(next.terminate().success(), "{:?}", next.seen_err);
}

/// A SIGTERM that comes while the server is still starting stops it gracefully once it has started, rather than
/// killing it halfway (with its data-plane lock and perhaps a migration begun).
#[test]
fn a_sigterm_during_startup_stops_the_server_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Serve::spawn(
        proxyfleet(&["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("PROXYFLEET_DATA_DIR", dir.path().join("data"))
            .env("PROXYFLEET_SOCKS5_LISTEN", "127.0.0.1:0"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = s
            .stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the server never said its store was ready");
        let ready = line.contains("store ready");
        s.seen_err.push(line);
        if ready {
            break;
        }
    }
    let status = s.terminate();
    assert!(status.success(), "{status}: {:?}", s.seen_err);
    assert!(
        s.seen_err.iter().any(|l| l.contains("shut down")),
        "{:?}",
        s.seen_err
    );
}

/// A start that hangs (here on a database that accepts connections and never answers) holds the first signal
/// until it ends; a second signal stops the server at once.
#[test]
fn a_second_signal_stops_a_hanging_start_at_once() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://nobody@{}/none", silent.local_addr().unwrap());
    let (accepted, heard) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
            let _ = accepted.send(());
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut s = Serve::spawn(
        proxyfleet(&["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("PROXYFLEET_DATA_DIR", dir.path().join("data"))
            .env("PROXYFLEET_DATABASE_URL", &url),
    );
    // Connecting to the store: the signal handlers are in place by then.
    heard
        .recv_timeout(Duration::from_secs(30))
        .expect("the server never reached the database");
    s.sigterm();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .seen_err
        .iter()
        .any(|l| l.contains("a second signal stops at once"))
    {
        assert!(
            Instant::now() < deadline,
            "the first signal was not heard: {:?}",
            s.seen_err
        );
        if let Ok(l) = s.stderr.recv_timeout(Duration::from_millis(50)) {
            s.seen_err.push(l);
        }
    }
    s.sigterm();
    let status = s.exit_within(Duration::from_secs(10));
    assert!(!status.success());
    assert!(
        s.seen_err
            .iter()
            .any(|l| l.contains("stopped at once by a second signal")),
        "{:?}",
        s.seen_err
    );
}
