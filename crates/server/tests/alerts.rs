//! Offline alerting and webhooks: the detector's rules on a real store with an injected clock (all three
//! databases), deliveries against a real local receiver in real time, and a real agent going away and coming back.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Db, Opts, TestDb, TestServer};
use proxyfleet::clock::{Clock, ManualClock};
use proxyfleet::monitor::{Detector, Rules, ScanReport};
use proxyfleet::store::{NewDevice, NewEvent, NewOperator, Role, Store};
use serde_json::{json, Value};

// ---- the detector on a real store ---------------------------------------------------------------------------

struct Fleet {
    store: Store,
    clock: ManualClock,
    operator: String,
    device: String,
    _db: TestDb,
}

impl Fleet {
    async fn new(db: Db) -> Option<Fleet> {
        let tdb = TestDb::create(db).await?;
        let store = Store::connect(&tdb.url, 4).await.unwrap();
        let clock = ManualClock::default();
        let now = clock.now_ms();
        let op = store
            .create_operator(NewOperator {
                username: "alerts",
                password_hash: "x",
                role: Role::Operator,
                now,
            })
            .await
            .unwrap();
        store
            .put_webhook_endpoint(
                &op.id,
                Some("https://hooks.example.com/x"),
                Some("sealed"),
                now,
            )
            .await
            .unwrap();
        let d = store
            .create_device(NewDevice {
                operator_id: &op.id,
                name: "pixel",
                description: "",
                pairing_code_hash: "p",
                pairing_expires_at: now,
                now,
            })
            .await
            .unwrap();
        let f = Fleet {
            store,
            clock,
            operator: op.id,
            device: d.id,
            _db: tdb,
        };
        f.heartbeat().await;
        Some(f)
    }

    fn detector(&self) -> Detector {
        Detector::new(
            self.store.clone(),
            Arc::new(self.clock.clone()),
            Rules::default(),
            None,
        )
    }

    async fn heartbeat(&self) {
        let now = self.clock.now_ms();
        self.store
            .record_seen(&[(self.device.clone(), now, "198.51.100.1".into())])
            .await
            .unwrap();
    }

    fn advance_ms(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    /// Event types in the outbox, oldest first.
    async fn events(&self) -> Vec<Value> {
        let mut rows = self
            .store
            .webhook_events(&self.operator, 1000)
            .await
            .unwrap();
        rows.reverse();
        rows.iter()
            .map(|e| serde_json::from_str(&e.payload).unwrap())
            .collect()
    }

    async fn types(&self) -> Vec<String> {
        self.events()
            .await
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn detector_rules(db: Db) {
    let Some(f) = Fleet::new(db).await else {
        return;
    };
    let d = f.detector();
    // Heartbeats every 60 s keep a device online, however long.
    for _ in 0..20 {
        f.advance_ms(60_000);
        f.heartbeat().await;
        assert_eq!(d.scan().await.unwrap(), ScanReport::default());
    }
    // Offline at exactly 120 s of silence, not a millisecond before.
    f.advance_ms(119_999);
    assert_eq!(d.scan().await.unwrap(), ScanReport::default());
    f.advance_ms(1);
    assert_eq!(d.scan().await.unwrap().offline_alerts, 1);
    assert_eq!(d.scan().await.unwrap(), ScanReport::default(), "no repeat");
    // Heard from again 80 s later (inside the cooldown): recovery at once, same incident, with the downtime.
    f.advance_ms(80_000);
    f.heartbeat().await;
    assert_eq!(d.scan().await.unwrap().recovered, 1);
    let ev = f.events().await;
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1]["type"], "device.recovered");
    assert_eq!(ev[1]["data"]["incident_id"], ev[0]["data"]["incident_id"]);
    assert_eq!(ev[1]["data"]["downtime_seconds"], 200);
    assert_eq!(
        (
            ev[0]["data"]["sequence"].as_i64(),
            ev[1]["data"]["sequence"].as_i64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(ev[0]["data"]["device"]["name"], "pixel");
    // Silent again: offline at +120 s falls inside the 5-minute cooldown (alert was at 120 s, now 320 s): suppressed.
    f.advance_ms(120_000);
    assert_eq!(d.scan().await.unwrap().suppressed, 1);
    // Still offline when the cooldown ends at 420 s: one deferred alert with the count.
    f.advance_ms(99_999);
    assert_eq!(d.scan().await.unwrap(), ScanReport::default());
    f.advance_ms(1);
    assert_eq!(d.scan().await.unwrap().deferred, 1);
    let ev = f.events().await;
    assert_eq!(ev.len(), 3);
    assert_eq!(
        (
            ev[2]["type"].as_str(),
            ev[2]["data"]["suppressed_count"].as_i64()
        ),
        (Some("device.offline"), Some(1))
    );
    // Back, then a suppressed offline that recovers before the cooldown ends: nothing more is sent.
    f.advance_ms(10_000);
    f.heartbeat().await;
    assert_eq!(d.scan().await.unwrap().recovered, 1);
    f.advance_ms(120_000);
    assert_eq!(d.scan().await.unwrap().suppressed, 1);
    f.advance_ms(10_000);
    f.heartbeat().await;
    assert_eq!(d.scan().await.unwrap().recovered, 1);
    f.advance_ms(300_000);
    f.heartbeat().await;
    d.scan().await.unwrap();
    assert_eq!(f.types().await.len(), 4, "{:?}", f.types().await);

    // A restart: a device that was online gets the startup grace; one alerted before is not alerted again.
    f.advance_ms(10_000);
    let restarted = f.detector();
    f.advance_ms(119_999);
    assert_eq!(
        restarted.scan().await.unwrap(),
        ScanReport::default(),
        "grace after startup"
    );
    f.advance_ms(1);
    assert_eq!(
        restarted.scan().await.unwrap().offline_alerts,
        1,
        "died while the server was down: still alerted"
    );
    let again = f.detector();
    f.advance_ms(600_000);
    assert_eq!(
        again.scan().await.unwrap(),
        ScanReport::default(),
        "already alerted: not again"
    );
}

async fn flapping_and_two_detectors(db: Db) {
    let Some(f) = Fleet::new(db).await else {
        return;
    };
    // Two detectors on one database: each transition is made, and each event sent, once.
    let (a, b) = (f.detector(), f.detector());
    f.advance_ms(120_000);
    // (Both scan at once, then both again: on MySQL a lock conflict may make both skip a round, never both win.)
    for _ in 0..2 {
        let (ra, rb) = tokio::join!(a.scan(), b.scan());
        assert!(ra.unwrap().offline_alerts + rb.unwrap().offline_alerts <= 1);
    }
    assert_eq!(f.types().await, vec!["device.offline"]);
    f.heartbeat().await;
    for _ in 0..2 {
        let (ra, rb) = tokio::join!(a.scan(), b.scan());
        assert!(ra.unwrap().recovered + rb.unwrap().recovered <= 1);
    }
    assert_eq!(f.types().await, vec!["device.offline", "device.recovered"]);

    // An hour of flapping (silent 125 s, one heartbeat, repeat), scanned every 5 s: at most 12 offline alerts.
    let before = f.types().await.len();
    let start = f.clock.now_ms();
    let mut last_beat = start;
    while f.clock.now_ms() - start < 3_600_000 {
        f.advance_ms(5_000);
        if f.clock.now_ms() - last_beat >= 125_000 {
            f.heartbeat().await;
            last_beat = f.clock.now_ms();
        }
        a.scan().await.unwrap();
    }
    let types = f.types().await[before..].to_vec();
    let offline = types.iter().filter(|t| *t == "device.offline").count();
    assert!(
        (6..=12).contains(&offline),
        "{offline} offline alerts in an hour: {types:?}"
    );
    let recovered = types.iter().filter(|t| *t == "device.recovered").count();
    assert!(recovered <= offline, "a recovery only follows an alert");
}

on_all_databases!(detector_rules, flapping_and_two_detectors);

// ---- deliveries against a real receiver ---------------------------------------------------------------------

#[derive(Clone, Default)]
struct Receiver {
    /// Answers to give, in order (status, delay); afterwards 200.
    script: Arc<Mutex<VecDeque<(u16, Duration)>>>,
    got: Arc<Mutex<Vec<(axum::http::HeaderMap, String, String)>>>,
}

impl Receiver {
    async fn start(script: &[(u16, u64)]) -> (Receiver, SocketAddr) {
        let r = Receiver::default();
        r.script
            .lock()
            .unwrap()
            .extend(script.iter().map(|(s, d)| (*s, Duration::from_millis(*d))));
        let r2 = r.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let r = r2.clone();
                async move {
                    r.got
                        .lock()
                        .unwrap()
                        .push((headers, uri.path().to_owned(), body));
                    let (status, delay) = r
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((200, Duration::ZERO));
                    tokio::time::sleep(delay).await;
                    let mut resp = axum::response::Response::new(axum::body::Body::from(
                        "thanks from the receiver",
                    ));
                    *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                    if status == 302 {
                        resp.headers_mut()
                            .insert("location", "/elsewhere".parse().unwrap());
                    }
                    resp
                }
            },
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (r, addr)
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    async fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "receiver got {} of {n} requests",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn verify(secret: &str, headers: &axum::http::HeaderMap, body: &str) {
    // The spec's own crate checks our signature (and that the timestamp is recent).
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    wh.verify(body.as_bytes(), headers)
        .expect("valid Standard Webhooks signature");
}

async fn server_with_receiver(opts: impl FnOnce(&mut Opts)) -> Option<(TestServer, String)> {
    let mut o = Opts::new(Db::Sqlite);
    o.raw.webhook_allow_private = Some(true);
    opts(&mut o);
    let s = TestServer::start(o).await?;
    let token = s.admin_token().await;
    Some((s, token))
}

async fn put_url(s: &TestServer, token: &str, url: &str) -> Value {
    let r = s
        .http
        .put(s.url("/api/v1.0/settings/webhook"))
        .bearer_auth(token)
        .json(&json!({ "url": url }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn operator_id(s: &TestServer, token: &str) -> String {
    let ops: Value = s
        .get("/api/v1.0/operators", token)
        .await
        .json()
        .await
        .unwrap();
    ops[0]["id"].as_str().unwrap().to_owned()
}

async fn enqueue(s: &TestServer, operator: &str, kind: &str) -> String {
    let id = proxyfleet::webhooks::new_event_id();
    let payload =
        json!({"type": kind, "id": id, "timestamp": "2026-11-23T00:00:00.000Z", "data": {}})
            .to_string();
    let e = NewEvent {
        id: id.clone(),
        operator_id: operator.to_owned(),
        event_type: kind.to_owned(),
        payload,
    };
    assert!(s.store().enqueue_event(&e, s.clock.now_ms()).await.unwrap());
    s.running().state.webhooks.wake.notify_one();
    id
}

async fn deliveries(s: &TestServer, token: &str) -> Vec<Value> {
    s.get("/api/v1.0/webhook-deliveries", token)
        .await
        .json()
        .await
        .unwrap()
}

/// The delivery log once it holds `n` attempts. An attempt is logged only after the server has read
/// its clock for the retry time (and, for 410, disabled the endpoint), so waiting for the log — not a
/// fixed sleep, which a loaded CI machine can outlast — is what makes advancing the clock safe.
async fn logged(s: &TestServer, token: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = deliveries(s, token).await;
        if log.len() >= n {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the log holds {} of {n} attempts: {log:?}",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_keep_the_id_and_signature_and_the_log_shows_every_attempt() {
    let (rx, addr) = Receiver::start(&[(500, 0), (500, 0), (200, 0)]).await;
    let Some((s, token)) = server_with_receiver(|_| {}).await else {
        return;
    };
    let v = put_url(&s, &token, &format!("http://{addr}/hooks")).await;
    let secret = v["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let shown: Value = s
        .get("/api/v1.0/settings/webhook", &token)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        shown.get("secret").is_none() && shown["enabled"] == true,
        "{shown}"
    );
    // The secret is not stored in the clear.
    let stored = s
        .store()
        .webhook_endpoint(&operator_id(&s, &token).await)
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.secret_enc.contains(&secret[6..]));

    let op = operator_id(&s, &token).await;
    let id = enqueue(&s, &op, "device.offline").await;
    rx.wait_for(1).await;
    // The retry waits about 5 s (±20 %) on the server's clock; move it once the attempt is logged.
    logged(&s, &token, 1).await;
    s.clock.advance(Duration::from_secs(7));
    rx.wait_for(2).await;
    logged(&s, &token, 2).await;
    s.clock.advance(Duration::from_secs(40));
    rx.wait_for(3).await;
    let log = logged(&s, &token, 3).await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    for (h, path, body) in &got {
        assert_eq!(h["webhook-id"], id.as_str(), "same id on every attempt");
        assert_eq!(path, "/hooks");
        verify(&secret, h, body);
    }
    let codes: Vec<i64> = log
        .iter()
        .map(|d| d["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, vec![200, 500, 500], "newest first");
    assert_eq!(log[0]["event_status"], "delivered");
    assert_eq!(log[0]["response"], "thanks from the receiver");
    // Manual resend: one more attempt, same id.
    let r = s
        .post(
            &format!("/api/v1.0/webhook-deliveries/{id}/resend"),
            &token,
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 202);
    rx.wait_for(4).await;
    assert_eq!(rx.got.lock().unwrap()[3].0["webhook-id"], id.as_str());
    let r = s
        .post(
            "/api/v1.0/webhook-deliveries/msg_nope/resend",
            &token,
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 404);

    // Rotation: a new secret, shown once, signs from now on.
    let r = s
        .post(
            "/api/v1.0/settings/webhook/rotate-secret",
            &token,
            json!({}),
        )
        .await;
    let new_secret = r.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_secret, secret);
    // Send Test: one attempt, answered with the receiver's status and latency; rate-limited.
    let r = s
        .post("/api/v1.0/settings/webhook/test", &token, json!({}))
        .await;
    let t: Value = r.json().await.unwrap();
    assert_eq!(
        (t["ok"].as_bool(), t["status_code"].as_i64()),
        (Some(true), Some(200)),
        "{t}"
    );
    assert!(t["latency_ms"].as_i64().unwrap() >= 0);
    let (h, _, body) = rx.got.lock().unwrap().last().unwrap().clone();
    verify(&new_secret, &h, &body);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["type"],
        "device.test"
    );
    let r = s
        .post("/api/v1.0/settings/webhook/test", &token, json!({}))
        .await;
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_gone_disables_and_slow_receivers_time_out() {
    let (rx, addr) = Receiver::start(&[(302, 0), (410, 0), (200, 12_000)]).await;
    let Some((s, token)) = server_with_receiver(|_| {}).await else {
        return;
    };
    put_url(&s, &token, &format!("http://{addr}/hooks")).await;
    let op = operator_id(&s, &token).await;
    enqueue(&s, &op, "device.offline").await;
    rx.wait_for(1).await;
    logged(&s, &token, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), 1, "the redirect was not followed");
    s.clock.advance(Duration::from_secs(7));
    rx.wait_for(2).await;
    let log = logged(&s, &token, 2).await;
    let v: Value = s
        .get("/api/v1.0/settings/webhook", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["enabled"], false, "410 Gone disables the endpoint: {v}");
    assert!(v["disabled_reason"].as_str().unwrap().contains("410"));
    assert_eq!(
        (
            log[0]["status_code"].as_i64(),
            log[0]["event_status"].as_str()
        ),
        (Some(410), Some("failed"))
    );
    assert_eq!(log[1]["status_code"], 302);
    // Saving the URL again enables it; a receiver that takes 12 s is cut off at 10 s.
    put_url(&s, &token, &format!("http://{addr}/hooks")).await;
    let started = Instant::now();
    let t: Value = s
        .post("/api/v1.0/settings/webhook/test", &token, json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(t["ok"], false);
    assert!(t["error"].as_str().unwrap().contains("timed out"), "{t}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(12),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed() {
    let Some(s) = TestServer::start(Opts::new(Db::Sqlite)).await else {
        return;
    };
    let token = s.admin_token().await;
    for url in [
        "http://127.0.0.1:9/x",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/",
    ] {
        let r = s
            .http
            .put(s.url("/api/v1.0/settings/webhook"))
            .bearer_auth(&token)
            .json(&json!({ "url": url }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{url}");
        assert!(common::error_of(r).await.contains("private"), "{url}");
    }
    // A name that resolves to loopback is refused when the connection is made (DNS rebinding included).
    let (rx, addr) = Receiver::start(&[]).await;
    let sender = proxyfleet::webhooks::Sender::new(false).unwrap();
    let a = sender
        .send(
            &format!("http://localhost:{}/x", addr.port()),
            "whsec_AAAA",
            "msg_1",
            1,
            "{}",
        )
        .await;
    assert!(
        a.error.as_deref().unwrap_or("").contains("private"),
        "{a:?}"
    );
    assert_eq!(rx.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_going_away_and_coming_back_is_reported() {
    let (rx, addr) = Receiver::start(&[]).await;
    let Some((s, token)) = server_with_receiver(|o| {
        o.raw.tunnel_listen = Some("127.0.0.1:0".parse().unwrap());
        o.raw.tunnel_heartbeat_secs = Some(1);
        o.raw.offline_after_secs = Some(30);
        o.raw.monitor_scan_secs = Some(1);
    })
    .await
    else {
        return;
    };
    let v = put_url(&s, &token, &format!("http://{addr}/hooks")).await;
    let secret = v["secret"].as_str().unwrap().to_owned();
    let (device_id, dir) = common::enrolled_device(&s, &token, "field-phone").await;
    let run = |dir: &std::path::Path| common::spawn_agent_opts(dir, common::agent_options(dir)).0;
    let agent = run(dir.path());
    let path = format!("/api/v1.0/devices/{device_id}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v: Value = s.get(&path, &token).await.json().await.unwrap();
        if v["status"] == "online" {
            break;
        }
        assert!(Instant::now() < deadline, "never online: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A dropped tunnel alone is no alert: the agent stops; nothing until 30 s of (server-clock) silence.
    agent.cancel();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.count(), 0);
    s.clock.advance(Duration::from_secs(31));
    rx.wait_for(1).await;
    let (h, _, body) = rx.got.lock().unwrap()[0].clone();
    verify(&secret, &h, &body);
    let off: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(off["type"], "device.offline");
    assert_eq!(off["data"]["device"]["name"], "field-phone");
    assert_eq!(off["data"]["threshold_seconds"], 30);
    // It comes back: the recovery goes out at once (well before the next scan would matter).
    let _agent = run(dir.path());
    rx.wait_for(2).await;
    let (_, _, body) = rx.got.lock().unwrap()[1].clone();
    let rec: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rec["type"], "device.recovered");
    assert_eq!(rec["data"]["incident_id"], off["data"]["incident_id"]);
    assert!(rec["data"]["downtime_seconds"].as_i64().unwrap() >= 31);
}
