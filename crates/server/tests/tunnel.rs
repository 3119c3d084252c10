//! Devices end to end: the API creates them, the real agent library enrolls and connects over QUIC, the registry
//! shows them, revocation kicks them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    agent_options, device_tls, error_of, spawn_agent_opts, Agent, Db, HandTunnel, Opts, TestServer,
};
use proxyfleet::clock::Clock;
use proxyfleet::store::Role;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn server() -> Option<TestServer> {
    server_with(true).await
}

/// `quic: false` serves only the TLS-over-TCP transport, as if UDP to the server were blocked.
async fn server_with(quic: bool) -> Option<TestServer> {
    let mut opts = Opts::new(Db::Sqlite);
    opts.raw.tunnel_listen = Some("127.0.0.1:0".parse().unwrap());
    opts.raw.tunnel_heartbeat_secs = Some(1);
    opts.raw.tunnel_quic = Some(quic);
    TestServer::start(opts).await
}

async fn new_device(s: &TestServer, token: &str, name: &str) -> (String, String) {
    let r = s
        .post(
            "/api/v1.0/devices",
            token,
            json!({"name": name, "description": "test phone"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "pending");
    assert!(v["pairing_qr_svg"].as_str().unwrap().starts_with("<?xml"));
    assert!(v["pairing_expires_at"].as_str().unwrap().ends_with('Z'));
    // What the operator is told to enroll with is where the tunnel really listens.
    assert_eq!(v["enroll_server"].as_str(), Some(s.tunnel().as_str()));
    (
        v["id"].as_str().unwrap().to_owned(),
        v["pairing_code"].as_str().unwrap().to_owned(),
    )
}

/// The operator id behind a token (from the sessions listing's owner, via the operators API for admins).
async fn v_operator(s: &TestServer, token: &str) -> String {
    let ops: Value = s
        .get("/api/v1.0/operators", token)
        .await
        .json()
        .await
        .unwrap();
    ops[0]["id"].as_str().unwrap().to_owned()
}

/// A new device of the admin's, enrolled by the real agent library into a fresh state directory.
async fn enrolled(s: &TestServer, token: &str, name: &str) -> (String, tempfile::TempDir) {
    let (id, code) = new_device(s, token, name).await;
    let dir = tempfile::tempdir().unwrap();
    proxyfleet_agent::enroll(&s.tunnel(), &code, dir.path())
        .await
        .unwrap();
    (id, dir)
}

/// Wait for an agent's run loop to stop because the server refused its device; `since` bounds how long the
/// refusal took to arrive (the "within a second").
async fn expect_refused(task: tokio::task::JoinHandle<anyhow::Result<()>>, since: Option<Instant>) {
    let end = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("agent stopped")
        .unwrap();
    let err = end.unwrap_err();
    assert!(
        format!("{err:#}").contains("refused this device"),
        "{err:#}"
    );
    if let Some(t) = since {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "tunnel closed after {:?}",
            t.elapsed()
        );
    }
}

async fn device(s: &TestServer, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/v1.0/devices/{id}"), token).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Poll until `pred` holds for the device (bounded).
async fn wait_for(
    s: &TestServer,
    token: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = device(s, token, id).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "device never became {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server on loopback: its port.
async fn echo_target() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

fn spawn_agent(dir: &std::path::Path) -> Agent {
    spawn_agent_with(dir, None)
}

fn spawn_agent_with(
    dir: &std::path::Path,
    rebind: Option<std::sync::Arc<tokio::sync::Notify>>,
) -> Agent {
    spawn_agent_opts(
        dir,
        proxyfleet_agent::RunOptions {
            rebind,
            ..agent_options(dir)
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_happy_path_and_every_refusal() {
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, code) = new_device(&s, &token, "pixel-7").await;
    let dir = tempfile::tempdir().unwrap();

    // A wrong secret with the right CA pin: refused by the server, nothing saved.
    let (_, pin) = code.split_once('-').unwrap();
    let err = proxyfleet_agent::enroll(
        &s.tunnel(),
        &format!("AAAAAAAAAAAAAAAAAAAA-{pin}"),
        dir.path(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("pairing code is invalid, already used or expired"),
        "{err:#}"
    );
    assert!(!dir.path().join("device.crt").exists());
    // The right secret with another CA's pin: the agent refuses the server before sending the code.
    let (secret, _) = code.split_once('-').unwrap();
    let err = proxyfleet_agent::enroll(
        &s.tunnel(),
        &format!("{secret}-AAAAAAAAAAAAAAAA"),
        dir.path(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("could not connect"), "{err:#}");

    let enrolled = proxyfleet_agent::enroll(&s.tunnel(), &code, dir.path())
        .await
        .unwrap();
    assert_eq!(enrolled, id);
    use std::os::unix::fs::PermissionsExt;
    for f in ["device.key", "device.crt", "ca.crt", "agent.json"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let key = std::fs::read_to_string(dir.path().join("device.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    let v = device(&s, &token, &id).await;
    assert_eq!(v["status"], "offline");
    assert!(v["enrolled_at"].is_string() && v["pairing_expires_at"].is_null());

    // Used code.
    let other = tempfile::tempdir().unwrap();
    let err = proxyfleet_agent::enroll(&s.tunnel(), &code, other.path())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("already used or expired"),
        "{err:#}"
    );
    // Expired code.
    let (_, late) = new_device(&s, &token, "late").await;
    s.clock.advance(Duration::from_secs(16 * 60));
    let err = proxyfleet_agent::enroll(&s.tunnel(), &late, other.path())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("already used or expired"),
        "{err:#}"
    );

    // Another operator sees none of it.
    s.create_operator("other_op", "0ther-Operator-Phrase", Role::Operator)
        .await;
    let other_token = s.login("other_op", "0ther-Operator-Phrase").await;
    let r = s
        .get(&format!("/api/v1.0/devices/{id}"), &other_token)
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_of(r).await, "not found");
    let list: Value = s
        .get("/api/v1.0/devices", &other_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
    assert_eq!(
        s.post(
            &format!("/api/v1.0/devices/{id}/revoke"),
            &other_token,
            json!({})
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        s.delete(&format!("/api/v1.0/devices/{id}"), &other_token)
            .await
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_goes_online_heartbeats_and_is_kicked_on_revoke() {
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "lte-box").await;
    let (_cancel, task) = spawn_agent(dir.path());

    let v = wait_for(&s, &token, &id, "online with a heartbeat", |v| {
        v["status"] == "online" && v["last_heartbeat_at"].is_string()
    })
    .await;
    assert_eq!(v["transport"], "quic");
    assert_eq!(v["public_ip"], "127.0.0.1");
    assert_eq!(v["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(v["connected_since"].is_string());
    assert!(v["metrics"].is_object());

    // last_seen reaches the store in batches, from what the registry collected since the last flush.
    let running = s.running.as_ref().unwrap();
    let seen = running.state.registry.take_seen(s.clock.now_ms());
    assert!(
        seen.iter().any(|(d, _, ip)| d == &id && ip == "127.0.0.1"),
        "{seen:?}"
    );
    running.store.record_seen(&seen).await.unwrap();
    let row = running
        .store
        .device(&v_operator(&s, &token).await, &id)
        .await
        .unwrap()
        .unwrap();
    assert!(row.last_seen_at.is_some() && row.last_public_ip.as_deref() == Some("127.0.0.1"));

    // Rename and describe.
    let r = s
        .http
        .patch(s.url(&format!("/api/v1.0/devices/{id}")))
        .bearer_auth(&token)
        .json(&json!({"name": "lte-box-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "lte-box-2");

    // Revoke: the live tunnel closes within a second and the agent stops for good.
    let t = Instant::now();
    let r = s
        .post(&format!("/api/v1.0/devices/{id}/revoke"), &token, json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "revoked");
    let end = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("agent stopped")
        .unwrap();
    let took = t.elapsed();
    let err = end.unwrap_err();
    assert!(
        format!("{err:#}").contains("refused this device"),
        "{err:#}"
    );
    assert!(
        took < Duration::from_secs(1),
        "tunnel closed after {took:?}"
    );
    // The certificate is refused from now on.
    let (_c, again) = spawn_agent(dir.path());
    let err = tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("refused this device"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_replaces_its_stale_session() {
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "phone").await;
    let (_c1, first) = spawn_agent(dir.path());
    let v1 = wait_for(&s, &token, &id, "online", |v| v["status"] == "online").await;
    // The same identity connects again (a reboot, a new NAT mapping): it takes over at once.
    s.clock.advance(Duration::from_secs(1));
    let (c2, second) = spawn_agent(dir.path());
    let end = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("old session closed")
        .unwrap();
    assert!(format!("{:#}", end.unwrap_err()).contains("another agent"));
    let v2 = wait_for(&s, &token, &id, "online again", |v| v["status"] == "online").await;
    assert_ne!(v1["connected_since"], v2["connected_since"]);
    let m = s.text("/metrics").await;
    assert!(m.contains("proxyfleet_devices_online 1"), "{m}");
    // Delete: kicked at once, and gone from the list.
    let t = Instant::now();
    assert_eq!(
        s.delete(&format!("/api/v1.0/devices/{id}"), &token)
            .await
            .status(),
        204
    );
    expect_refused(second, Some(t)).await;
    assert_eq!(
        s.get(&format!("/api/v1.0/devices/{id}"), &token)
            .await
            .status(),
        404
    );
    c2.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_that_tunnel() {
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (good_id, good_code) = new_device(&s, &token, "good").await;
    let (bad_id, bad_code) = new_device(&s, &token, "bad").await;
    let (good_dir, bad_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    proxyfleet_agent::enroll(&s.tunnel(), &good_code, good_dir.path())
        .await
        .unwrap();
    proxyfleet_agent::enroll(&s.tunnel(), &bad_code, bad_dir.path())
        .await
        .unwrap();
    let (_c, _good) = spawn_agent(good_dir.path());
    wait_for(&s, &token, &good_id, "online", |v| v["status"] == "online").await;

    // A fake agent with a valid certificate sends garbage on its control stream.
    let tls = device_tls(bad_dir.path());
    let (endpoint, addr) = proxyfleet_agent::tls::endpoint_for(&s.tunnel())
        .await
        .unwrap();
    let config = proxyfleet_agent::tls::quic_client(tls, Duration::from_secs(5)).unwrap();
    let conn = endpoint
        .connect_with(config, addr, proxyfleet_proto::enroll::TUNNEL_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("server closes the bad tunnel");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(1)),
        "{closed:?}"
    );
    assert_eq!(device(&s, &token, &bad_id).await["status"], "offline");
    // The well-behaved device is untouched.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(device(&s, &token, &good_id).await["status"], "online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_opens_flows_from_its_own_network() {
    use proxyfleet::tunnel::link::{open_tcp, FlowError};
    use proxyfleet_proto::{Host, OpenResult};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "exit").await;
    let rebind = std::sync::Arc::new(tokio::sync::Notify::new());
    let (_c, _agent) = spawn_agent_with(dir.path(), Some(rebind.clone()));
    let before = wait_for(&s, &token, &id, "online", |v| v["status"] == "online").await;
    let live = s.running.as_ref().unwrap().state.registry.get(&id).unwrap();

    // A real target: an echo server.
    let port = echo_target().await;
    for host in [
        Host::V4([127, 0, 0, 1].into()),
        Host::Domain("localhost".into()),
    ] {
        let (mut r, mut w) = open_tcp(&*live.link, host.clone(), port).await.unwrap();
        let msg = format!("ping via {host}");
        w.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        r.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    // Connection migration: the device's UDP socket moves to a new local port (as after a Wi-Fi/cellular switch
    // or a NAT rebinding); the tunnel and an open flow survive.
    let (mut r, mut w) = open_tcp(&*live.link, Host::V4([127, 0, 0, 1].into()), port)
        .await
        .unwrap();
    w.write_all(b"before the move").await.unwrap();
    let mut back = [0u8; 15];
    r.read_exact(&mut back).await.unwrap();
    let old_peer = live.link.peer();
    s.clock.advance(Duration::from_secs(1)); // a reconnect would now show a new connected_since
    rebind.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.write_all(b"after the move!").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut back))
        .await
        .expect("flow survives")
        .unwrap();
    assert_eq!(&back, b"after the move!");
    let after = device(&s, &token, &id).await;
    assert_eq!(after["status"], "online");
    assert_eq!(
        after["connected_since"], before["connected_since"],
        "same session, no reconnect"
    );
    assert_ne!(
        live.link.peer().port(),
        old_peer.port(),
        "the server follows the device to its new address"
    );

    // Target failures come back typed.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = open_tcp(&*live.link, Host::V4([127, 0, 0, 1].into()), closed)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, FlowError::Target(OpenResult::Refused)),
        "{err:?}"
    );
    let err = open_tcp(&*live.link, Host::Domain("no-such-host.invalid".into()), 80)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, FlowError::Target(OpenResult::DnsFailure)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_rotation_runs_the_devices_command_and_reports_the_addresses() {
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let cases = [
        (
            Some("echo rotating; echo reconnected via modem"),
            true,
            "reconnected via modem",
        ),
        (Some("echo modem busy >&2; exit 3"), false, "modem busy"),
        (None, false, "no IP rotation command is configured"),
    ];
    let mut keep = Vec::new();
    for (i, (cmd, want_ok, want_msg)) in cases.into_iter().enumerate() {
        let (id, code) = new_device(&s, &token, &format!("rot-{i}")).await;
        let dir = tempfile::tempdir().unwrap();
        proxyfleet_agent::enroll(&s.tunnel(), &code, dir.path())
            .await
            .unwrap();
        let opts = proxyfleet_agent::RunOptions {
            rotate_command: cmd.map(str::to_owned),
            ..agent_options(dir.path())
        };
        keep.push((spawn_agent_opts(dir.path(), opts), dir));
        wait_for(&s, &token, &id, "online", |v| v["status"] == "online").await;
        let r = s
            .post(&format!("/api/v1.0/devices/{id}/rotate"), &token, json!({}))
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["ok"], want_ok, "{v}");
        assert!(v["message"].as_str().unwrap().contains(want_msg), "{v}");
        assert_eq!(v["ip_before"], "127.0.0.1");
        assert_eq!(v["ip_after"], "127.0.0.1");
        assert_eq!(v["changed"], false, "loopback cannot change its address");
        assert_eq!(
            device(&s, &token, &id).await["status"],
            "online",
            "rotation keeps the tunnel"
        );
    }
    // An offline device cannot rotate.
    let (offline, _) = new_device(&s, &token, "never-connected").await;
    let r = s
        .post(
            &format!("/api/v1.0/devices/{offline}/rotate"),
            &token,
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 409);
    assert_eq!(error_of(r).await, "device is offline");
}

/// On the TCP fallback a rotation cannot move the tunnel (a TCP connection keeps the address it was made from,
/// whose carrier mapping the rotation ended), so the agent makes it again once the command succeeded: the server
/// then reads the device's address from the new tunnel. A failed rotation keeps the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_tcp_fallback_a_rotation_makes_the_tunnel_again() {
    let Some(s) = server_with(false).await else {
        return;
    };
    let token = s.admin_token().await;
    let mut keep = Vec::new();
    for (cmd, ok) in [("echo modem busy; exit 1", false), ("echo rotated", true)] {
        let (id, dir) = enrolled(&s, &token, &format!("tcp-rot-{ok}")).await;
        let agent = spawn_agent_opts(
            dir.path(),
            proxyfleet_agent::RunOptions {
                rotate_command: Some(cmd.to_owned()),
                ..agent_options(dir.path())
            },
        );
        keep.push((agent, dir));
        wait_for(&s, &token, &id, "online over tcp", |v| {
            v["transport"] == "tcp"
        })
        .await;
        let session = || {
            s.running
                .as_ref()
                .unwrap()
                .state
                .registry
                .get(&id)
                .map(|l| l.session)
        };
        let before = session().unwrap();
        let r = s
            .post(&format!("/api/v1.0/devices/{id}/rotate"), &token, json!({}))
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["ok"], ok, "{v}");
        assert_eq!(
            v["message"],
            if ok { "rotated" } else { "modem busy" },
            "the command's own words reach the operator: {v}"
        );
        assert_eq!(v["ip_after"], "127.0.0.1", "{v}");
        let now = session();
        if ok {
            assert!(
                now.is_some_and(|n| n != before),
                "the tunnel was not made again"
            );
        } else {
            assert_eq!(now, Some(before), "a failed rotation keeps the tunnel");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_udp_the_agent_falls_back_to_tls_over_tcp() {
    use proxyfleet::tunnel::link::open_tcp;
    use proxyfleet_proto::Host;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some(s) = server_with(false).await else {
        return;
    };
    let token = s.admin_token().await;
    let (id, code) = new_device(&s, &token, "udp-blocked").await;
    let dir = tempfile::tempdir().unwrap();
    // Enrollment falls back too. Neither it nor the tunnel waits out the QUIC handshake's timeout: TCP joins the
    // race after a short head start (until session 12 a device with UDP blocked spent 4 s on QUIC first, and on
    // every reconnect after a QUIC session).
    let (quic_timeout, head_start) = (
        proxyfleet_agent::conn::QUIC_TIMEOUT,
        proxyfleet_agent::conn::QUIC_HEAD_START,
    );
    let t = Instant::now();
    proxyfleet_agent::enroll(&s.tunnel(), &code, dir.path())
        .await
        .unwrap();
    let enrolled_in = t.elapsed();
    assert!(
        enrolled_in >= head_start && enrolled_in < quic_timeout,
        "enrolled in {enrolled_in:?}"
    );
    let t = Instant::now();
    let (_c, agent) = spawn_agent(dir.path());
    let v = wait_for(&s, &token, &id, "online", |v| {
        v["status"] == "online" && v["last_heartbeat_at"].is_string()
    })
    .await;
    let online_in = t.elapsed();
    assert!(
        online_in < quic_timeout,
        "online over TCP after {online_in:?}"
    );
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["public_ip"], "127.0.0.1");

    // Flows work the same through the multiplexer.
    let port = echo_target().await;
    let live = s.running.as_ref().unwrap().state.registry.get(&id).unwrap();
    let mut flows = Vec::new();
    for i in 0..3 {
        let (mut r, mut w) = open_tcp(&*live.link, Host::V4([127, 0, 0, 1].into()), port)
            .await
            .unwrap();
        let msg = format!("flow {i} over tcp");
        w.write_all(msg.as_bytes()).await.unwrap();
        flows.push((r.read_u8().await.unwrap(), msg, r, w));
    }
    for (first, msg, mut r, _w) in flows {
        let mut rest = vec![0u8; msg.len() - 1];
        r.read_exact(&mut rest).await.unwrap();
        assert_eq!([vec![first], rest].concat(), msg.as_bytes());
    }

    // Revocation reaches a TCP agent too, with its reason.
    let t = Instant::now();
    assert_eq!(
        s.post(&format!("/api/v1.0/devices/{id}/revoke"), &token, json!({}))
            .await
            .status(),
        200
    );
    expect_refused(agent, Some(t)).await;
}

/// An agent on the TCP fallback keeps probing QUIC, and each probe to a blocked UDP port takes the whole 4 s QUIC
/// handshake timeout; the probes run beside the session, so flows asked for meanwhile open at once (they used to
/// wait for the probe to give up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_for_quic_never_holds_up_a_tcp_agents_flows() {
    use proxyfleet::tunnel::link::open_tcp;
    use proxyfleet_proto::Host;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some(s) = server_with(false).await else {
        return;
    };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "probing").await;
    let _agent = spawn_agent_opts(
        dir.path(),
        proxyfleet_agent::RunOptions {
            // A probe is always under way.
            quic_retry: Duration::from_millis(50),
            ..agent_options(dir.path())
        },
    );
    wait_for(&s, &token, &id, "online over tcp", |v| {
        v["transport"] == "tcp"
    })
    .await;
    let port = echo_target().await;
    let live = s.running.as_ref().unwrap().state.registry.get(&id).unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..10u8 {
        let asked = Instant::now();
        let (mut r, mut w) = open_tcp(&*live.link, Host::V4([127, 0, 0, 1].into()), port)
            .await
            .unwrap();
        w.write_all(&[i]).await.unwrap();
        assert_eq!(r.read_u8().await.unwrap(), i);
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a flow waited {slowest:?} for a QUIC probe"
    );
    assert_eq!(
        device(&s, &token, &id).await["transport"],
        "tcp",
        "same session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_agent_moves_to_quic_when_udp_works() {
    // With both transports served, an agent that starts on TCP (as after a UDP outage) probes QUIC and moves, once
    // no flow is open on the TCP tunnel.
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "roamer").await;
    // Start one session on TCP by hand, then let the agent's run loop (which prefers QUIC) take over.
    let opts = proxyfleet_agent::RunOptions {
        quic_retry: Duration::from_millis(300),
        ..agent_options(dir.path())
    };
    let state = dir.path().to_owned();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    // An idle target for a flow that stays open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    // The flow is opened first thing: before the first probe (300 ms).
    let link = {
        let s = &s;
        let id = id.clone();
        async move {
            loop {
                if let Some(l) = s.running.as_ref().unwrap().state.registry.get(&id) {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let mut first =
        tokio::spawn(async move { proxyfleet_agent::run::try_run_on_tcp(&state, &opts, &c).await });
    let live = tokio::time::timeout(Duration::from_secs(15), link)
        .await
        .unwrap();
    assert_eq!(live.link.transport(), "tcp");
    let flow = proxyfleet::tunnel::link::open_tcp(
        &*live.link,
        proxyfleet_proto::Host::V4([127, 0, 0, 1].into()),
        port,
    )
    .await
    .unwrap();
    // Probes succeed, but moving would end the open flow: the session stays while it is open.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut first)
            .await
            .is_err(),
        "the tunnel moved under an open flow"
    );
    drop(flow);
    let end = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("probe ran")
        .unwrap();
    assert!(
        matches!(end, proxyfleet_agent::run::SessionEnd::UpgradeToQuic),
        "{end:?}"
    );
    let (_c2, _agent) = spawn_agent(dir.path());
    wait_for(&s, &token, &id, "online over quic", |v| {
        v["transport"] == "quic"
    })
    .await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_another_protocol_version_is_refused_readably() {
    use proxyfleet_proto::control::{ControlFrame, Hello, RefusalCode};

    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "old-agent").await;
    let hello = Hello {
        protocol_version: proxyfleet_proto::PROTOCOL_VERSION + 1,
        agent_version: "9.9.9".into(),
        capabilities: 1,
    };
    match HandTunnel::hello(&s, dir.path(), hello).await.1 {
        ControlFrame::Refused(refusal) => {
            assert_eq!(refusal.code, RefusalCode::VersionMismatch);
            assert!(
                refusal.message.contains("protocol version"),
                "{}",
                refusal.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        device(&s, &token, &id).await["status"],
        "offline",
        "never registered"
    );
}

/// The agent puts the suite its CPU seals fastest first (AES-128-GCM on this machine's x86-64 with AES-NI, where
/// rustls' own order starts with AES-256), and the tunnel uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_seals_with_the_suite_the_agent_prefers() {
    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (_id, dir) = enrolled(&s, &token, "cipher").await;
    let tls = device_tls(dir.path());
    let want = proxyfleet_agent::tls::preferred_suite();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("aes") && std::is_x86_feature_detected!("pclmulqdq") {
        assert_eq!(want, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    assert_eq!(tls.crypto_provider().cipher_suites[0].suite(), want);
    assert_eq!(
        rustls::crypto::ring::default_provider().cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        "rustls' own first choice differs, so this shows the agent's"
    );
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(s.tunnel()).await.unwrap();
    let name =
        rustls::pki_types::ServerName::try_from(proxyfleet_proto::enroll::TUNNEL_SERVER_NAME)
            .unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    assert_eq!(
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|c| c.suite()),
        Some(want)
    );
}

/// The server learns from the hello what an agent can do, so an agent from before ping and DNS over TCP is shown
/// as outdated (and such flows are refused as unsupported, not counted as a dead device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_capabilities_are_shown_and_an_older_agent_is_told_apart() {
    use proxyfleet_proto::control::{caps, ControlFrame, Hello};

    let Some(s) = server().await else { return };
    let token = s.admin_token().await;
    let (id, dir) = enrolled(&s, &token, "first-release").await;
    // What the first release's agent sends.
    let hello = Hello {
        protocol_version: proxyfleet_proto::PROTOCOL_VERSION,
        agent_version: "0.0.9".into(),
        capabilities: caps::TCP | caps::UDP,
    };
    let (old, answer) = HandTunnel::hello(&s, dir.path(), hello).await;
    assert!(matches!(answer, ControlFrame::HelloAck(_)), "{answer:?}");
    let v = wait_for(&s, &token, &id, "online", |v| v["status"] == "online").await;
    assert_eq!(v["agent_version"], "0.0.9");
    assert_eq!(v["capabilities"], json!(["tcp", "udp"]));
    drop(old);

    // This release's agent announces everything it opens.
    let (_c, _agent) = spawn_agent(dir.path());
    let v = wait_for(&s, &token, &id, "this release online", |v| {
        v["agent_version"] == env!("CARGO_PKG_VERSION")
    })
    .await;
    assert_eq!(
        v["capabilities"],
        json!(["tcp", "udp", "dns_tcp", "echo"]),
        "{v}"
    );
}

/// Disabling an operator closes their devices' tunnels at once and keeps them out while it lasts, but the agents
/// keep retrying (a suspension is not a revocation), so enabling the operator brings the fleet back by itself.
/// Deleting an operator refuses their devices for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_or_deleting_an_operator_closes_their_devices_tunnels() {
    let Some(s) = server().await else { return };
    let admin = s.admin_token().await;
    let mut agents = Vec::new();
    for name in ["fleet_a", "fleet_b"] {
        let op = s
            .create_operator(name, "Fl33t-Operator-Phrase", Role::Operator)
            .await;
        let token = s.login(name, "Fl33t-Operator-Phrase").await;
        let (id, dir) = enrolled(&s, &token, "phone").await;
        let (_c, task) = spawn_agent(dir.path());
        wait_for(&s, &token, &id, "online", |v| v["status"] == "online").await;
        agents.push((op.id, id, task, dir, _c));
    }
    let (a_id, a_dev, a_task, a_dir, _ca) = agents.remove(0);
    let (b_id, _b_dev, b_task, _bd, _cb) = agents.remove(0);

    let live = s.running().state.registry.get(&a_dev).expect("online");
    let t = Instant::now();
    assert_eq!(
        s.post(
            &format!("/api/v1.0/operators/{a_id}/disable"),
            &admin,
            json!({})
        )
        .await
        .status(),
        200
    );
    // The tunnel itself closes at once (the agent is told why within the kick's 1 s grace) and stays closed while
    // the operator is disabled (whose own API sessions are gone: the registry is asked); the agent does not give up.
    tokio::time::timeout(Duration::from_secs(2), live.link.closed())
        .await
        .expect("the suspended device's tunnel closes within 2 s");
    let online = |s: &TestServer| s.running().state.registry.get(&a_dev).is_some();
    assert!(!online(&s), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!online(&s), "refused while the operator is disabled");
    assert!(!a_task.is_finished(), "the agent keeps retrying");
    // One started while the operator is disabled retries too.
    let (c2, again) = spawn_agent(a_dir.path());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !again.is_finished(),
        "a suspended device is not told it is revoked"
    );
    c2.cancel();
    let _ = again.await;
    assert_eq!(
        s.post(
            &format!("/api/v1.0/operators/{a_id}/enable"),
            &admin,
            json!({})
        )
        .await
        .status(),
        200
    );
    let back = Instant::now();
    while !online(&s) {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the device never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!a_task.is_finished());

    assert_eq!(
        s.delete(&format!("/api/v1.0/operators/{b_id}"), &admin)
            .await
            .status(),
        204
    );
    expect_refused(b_task, None).await;
}
