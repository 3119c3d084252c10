//! One process per database serves the data plane (decision 79): a second one is refused at startup on every
//! backend, an API-only server beside it is not (but refuses changes the data plane would miss), and on
//! PostgreSQL and MariaDB a server whose lock session is lost takes the lock again, or stops when another process
//! has taken it meanwhile or when it cannot confirm the lock for its lease.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Db, Opts, TestDb, TestServer};
use proxyfleet::config::{RawConfig, Secret, ServeConfig};
use proxyfleet::server::{RunningServer, ServeOptions};
use proxyfleet::store::{LockTiming, Store, StoreError};
use sqlx::{AnyConnection, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server with only a SOCKS5 door, on the database of `url` when given.
fn doors(db: Db, url: Option<&str>) -> Opts {
    let mut o = Opts::new(db);
    o.raw.socks5_listen = Some("127.0.0.1:0".parse().unwrap());
    o.raw.database_url = url.map(|u| Secret::new(u.to_owned()));
    o
}

/// Start a server of its own data directory on `url`, with or without a SOCKS5 door.
async fn start_on(
    url: &str,
    with_doors: bool,
) -> anyhow::Result<(RunningServer, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawConfig {
        data_dir: Some(dir.path().to_owned()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database_url: Some(Secret::new(url.to_owned())),
        socks5_listen: with_doors.then(|| "127.0.0.1:0".parse().unwrap()),
        shutdown_timeout_secs: Some(5),
        ..RawConfig::default()
    };
    let running =
        proxyfleet::server::start(ServeConfig::resolve(raw).unwrap(), ServeOptions::default())
            .await?;
    Ok((running, dir))
}

async fn a_second_data_plane_is_refused_until_the_first_stops(db: Db) {
    let Some(mut first) = TestServer::start(doors(db, None)).await else {
        return;
    };
    let url = first.db.url.clone();
    let err = start_on(&url, true)
        .await
        .err()
        .expect("a second data plane is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("another proxyfleet server already serves devices and proxy doors"),
        "{msg}"
    );
    // The library says the same to whoever asks for the lock.
    let other = Store::connect(&url, 1).await.unwrap();
    assert!(matches!(
        other.lock_data_plane().await.err(),
        Some(StoreError::DataPlaneLocked { .. })
    ));

    let (api, _dir) = start_on(&url, false)
        .await
        .expect("an API-only server starts beside it");
    api.shutdown().await;
    // The first still serves: its SOCKS5 door answers a greeting.
    let socks = first.running().socks5_addr.unwrap();
    let mut c = tokio::net::TcpStream::connect(socks).await.unwrap();
    c.write_all(&[5, 1, 2]).await.unwrap();
    let mut reply = [0u8; 2];
    c.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 2]);

    // A stopped server frees the lock before it returns, so its successor may start at once.
    first.running.take().unwrap().shutdown().await;
    let (next, _dir) = start_on(&url, true).await.expect("the next one serves");
    next.shutdown().await;
    let lock = other
        .lock_data_plane()
        .await
        .expect("free once every server has stopped");
    lock.release().await;
    other.close().await;
}

on_all_databases!(a_second_data_plane_is_refused_until_the_first_stops);

/// End session `id` from outside, as a database restart or an administrator would.
async fn end_session(admin: &mut AnyConnection, db: Db, id: i64) {
    let sql = match db {
        Db::Postgres => format!("SELECT pg_terminate_backend({id})"),
        _ => format!("KILL {id}"),
    };
    sqlx::query(&sql).execute(admin).await.unwrap();
}

/// Wait until a session other than `not` holds the lock.
async fn wait_for_holder(store: &Store, not: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(id) = store
            .data_plane_session()
            .await
            .unwrap()
            .filter(|id| *id != not)
        {
            return id;
        }
        assert!(Instant::now() < deadline, "nobody took the lock again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait (bounded) for a server to stop by itself, shutdown included, and return why it did.
async fn stops_on_its_own(running: RunningServer) -> String {
    let stopped = tokio::time::timeout(Duration::from_secs(40), running.wait())
        .await
        .expect("the server stops on its own, and its shutdown finishes");
    format!(
        "{:#}",
        stopped.expect_err("stopping on its own is an error")
    )
}

/// Quick checks, so that a lost session is noticed within a second or two.
fn quick() -> LockTiming {
    LockTiming {
        check_every: Duration::from_millis(300),
        check_timeout: Duration::from_secs(1),
        lease: Duration::from_secs(4),
    }
}

async fn a_server_whose_lock_session_is_lost_takes_it_again_or_stops(db: Db) {
    let mut o = doors(db, None);
    o.lock_timing = quick();
    let Some(mut s) = TestServer::start(o).await else {
        return;
    };
    let url = s.db.url.clone();
    let mut admin = AnyConnection::connect(&url).await.unwrap();
    let other = Store::connect(&url, 1).await.unwrap();
    let held = other
        .data_plane_session()
        .await
        .unwrap()
        .expect("the server holds the lock");

    // The session is gone and nobody else wants the lock: the server takes it again and goes on serving.
    end_session(&mut admin, db, held).await;
    wait_for_holder(&other, held).await;
    assert!(!s.running().cancel_token().is_cancelled());

    // The session is gone and another process takes the lock before the server notices: the server stops, and
    // says why.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ended = None;
    let taken = loop {
        // (Should the server take it again first, its new session is ended too.)
        if let Some(id) = other
            .data_plane_session()
            .await
            .unwrap()
            .filter(|id| Some(*id) != ended)
        {
            end_session(&mut admin, db, id).await;
            ended = Some(id);
        }
        match other.lock_data_plane().await {
            Ok(lock) => break lock,
            Err(StoreError::DataPlaneLocked { .. }) => {}
            Err(e) => panic!("{e:#}"),
        }
        assert!(Instant::now() < deadline, "the ended session kept the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let msg = stops_on_its_own(s.running.take().unwrap()).await;
    assert!(msg.contains("another process has taken the lock"), "{msg}");
    taken.release().await;
    other.close().await;
}

/// A TCP relay between a server and its database that can cut the lock's connection off the way a network fault
/// does (both ends stay open, nothing passes), and refuse new connections, as an unreachable database would.
#[derive(Default)]
struct Relay {
    /// Connections so far, numbered from 1.
    opened: AtomicU64,
    /// Connections up to this number that took the lock pass nothing any more.
    frozen_upto: AtomicU64,
    /// Close new connections at once.
    refuse_new: AtomicBool,
}

impl Relay {
    /// Start relaying to the database of `url`; returns the relay and `url` pointing through it.
    async fn start(url: &str, db: Db) -> (Arc<Relay>, String) {
        let mut u = url::Url::parse(url).unwrap();
        let upstream = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap());
        let relay = Arc::new(Relay::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        u.set_port(Some(listener.local_addr().unwrap().port()))
            .unwrap();
        // In the clear, so that the relay can tell which connection takes the lock.
        u.set_query(Some(match db {
            Db::Postgres => "sslmode=disable",
            _ => "ssl-mode=disabled",
        }));
        let r = relay.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if r.refuse_new.load(Ordering::SeqCst) {
                    continue;
                }
                let (r, upstream) = (r.clone(), upstream.clone());
                let number = r.opened.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        r.pass(number, client, server).await;
                    }
                });
            }
        });
        (relay, u.to_string())
    }

    /// Silence every connection that has taken the lock so far.
    fn freeze_lock_sessions(&self) {
        self.frozen_upto
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    async fn pass(&self, number: u64, mut client: TcpStream, mut server: TcpStream) {
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut takes_lock = false;
        loop {
            if takes_lock && number <= self.frozen_upto.load(Ordering::SeqCst) {
                // Both sockets stay open and silent until the test ends.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            tokio::select! {
                n = client.read(&mut up) => {
                    let Ok(n @ 1..) = n else { return };
                    let text = String::from_utf8_lossy(&up[..n]);
                    if text.contains("pg_try_advisory_lock") || text.contains("GET_LOCK") {
                        takes_lock = true;
                    }
                    if server.write_all(&up[..n]).await.is_err() { return }
                }
                n = server.read(&mut down) => {
                    let Ok(n @ 1..) = n else { return };
                    if client.write_all(&down[..n]).await.is_err() { return }
                }
                // Look at the switch now and then, also on an idle connection.
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// A server started on the database of `tdb` through a relay, with quick lock checks.
async fn start_through_relay(
    tdb: &TestDb,
    db: Db,
) -> (Arc<Relay>, RunningServer, tempfile::TempDir) {
    let (relay, url) = Relay::start(&tdb.url, db).await;
    let dir = tempfile::tempdir().unwrap();
    let raw = RawConfig {
        data_dir: Some(dir.path().to_owned()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        database_url: Some(Secret::new(url)),
        socks5_listen: Some("127.0.0.1:0".parse().unwrap()),
        shutdown_timeout_secs: Some(5),
        ..RawConfig::default()
    };
    let opts = ServeOptions {
        lock_timing: quick(),
        ..ServeOptions::default()
    };
    let running = proxyfleet::server::start(ServeConfig::resolve(raw).unwrap(), opts)
        .await
        .unwrap();
    (relay, running, dir)
}

/// The lock's connection goes silent in the network, so the database still keeps the old session and its lock:
/// the server ends that session of its own, takes the lock again and goes on serving. With the database
/// unreachable as well, it stops once the lease is over, and its shutdown does not hang.
async fn a_server_cut_off_from_its_lock_session(db: Db) {
    let Some(tdb) = TestDb::create(db).await else {
        return;
    };
    let (relay, running, _dir) = start_through_relay(&tdb, db).await;
    let watcher = Store::connect(&tdb.url, 1).await.unwrap();
    let first = watcher.data_plane_session().await.unwrap().expect("held");
    relay.freeze_lock_sessions();
    let again = wait_for_holder(&watcher, first).await;
    tokio::time::sleep(quick().lease + Duration::from_secs(1)).await;
    assert!(
        !running.cancel_token().is_cancelled(),
        "a server alone on its database stopped over its own old session"
    );

    // Now no new connection reaches the database and the lock's session goes silent again: the lock cannot be
    // confirmed, and the server stops.
    relay.refuse_new.store(true, Ordering::SeqCst);
    relay.freeze_lock_sessions();
    let began = Instant::now();
    let msg = stops_on_its_own(running).await;
    assert!(msg.contains("could not be confirmed"), "{msg}");
    assert!(
        began.elapsed() >= quick().lease - quick().check_every - quick().check_timeout,
        "stopped before the lease was over: {:?}",
        began.elapsed()
    );
    assert_eq!(watcher.data_plane_session().await.unwrap(), Some(again));
    watcher.close().await;
}

/// Tests named `postgres` and `mysql` in a module named after the test function: the database servers, whose
/// lock is a session's.
macro_rules! on_database_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { super::$name(Db::Postgres).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() { super::$name(Db::MySql).await }
        }
    )*};
}

on_database_servers!(
    a_server_whose_lock_session_is_lost_takes_it_again_or_stops,
    a_server_cut_off_from_its_lock_session,
);

/// An API-only server beside the data plane serves reads and sessions, but refuses changes that only the data
/// plane can apply (a disabled connection would keep working there until it restarts); with nobody serving the
/// data plane, it makes them.
async fn an_api_only_server_refuses_changes_the_data_plane_would_miss(db: Db) {
    let shared = |mut o: Opts| {
        // Servers of one deployment share the signing secret.
        o.raw.jwt_secret = Some(Secret::new("s".repeat(40)));
        o
    };
    let Some(mut plane) = TestServer::start(shared(doors(db, None))).await else {
        return;
    };
    let token = plane.admin_token().await;
    let r = plane
        .post(
            "/api/v1.0/devices",
            &token,
            serde_json::json!({"name": "phone"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let device = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let new_connection = serde_json::json!({"name": "c", "device_id": device});
    let r = plane
        .post("/api/v1.0/connections", &token, new_connection.clone())
        .await;
    assert_eq!(r.status(), 201);
    let conn = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut o = Opts::new(db);
    o.raw.database_url = Some(Secret::new(plane.db.url.clone()));
    let Some(api) = TestServer::start(shared(o)).await else {
        return;
    };
    let conn_path = format!("/api/v1.0/connections/{conn}");
    let disable = serde_json::json!({"enabled": false});
    assert_eq!(
        api.get(&conn_path, &token).await.status(),
        200,
        "reads pass"
    );
    // Usage as the data-plane server's flush writes it: the API-only server reads it from the store, not from a
    // directory of its own loaded at its start.
    let r = plane
        .patch(
            &conn_path,
            &token,
            serde_json::json!({"bandwidth_limit_bytes": 400}),
        )
        .await;
    assert_eq!(r.status(), 200);
    plane
        .store()
        .flush_usage(&[(conn.clone(), 500)], &[])
        .await
        .unwrap();
    let got: serde_json::Value = api.get(&conn_path, &token).await.json().await.unwrap();
    assert_eq!(
        (&got["used_bytes"], &got["state"], &got["remaining_bytes"]),
        (
            &serde_json::json!(500),
            &serde_json::json!("exhausted"),
            &serde_json::json!(0)
        ),
        "{got}"
    );
    let refused = [
        api.patch(&conn_path, &token, disable.clone()).await,
        api.post("/api/v1.0/connections", &token, new_connection.clone())
            .await,
        api.post(
            &format!("{conn_path}/reset-usage"),
            &token,
            serde_json::json!({}),
        )
        .await,
        api.delete(&format!("/api/v1.0/devices/{device}"), &token)
            .await,
        api.post(
            "/api/v1.0/operators",
            &token,
            serde_json::json!({"username": "bob", "role": "operator"}),
        )
        .await,
    ];
    for r in refused {
        assert_eq!(r.status(), 409);
        assert_eq!(common::error_of(r).await, proxyfleet::api::ELSEWHERE);
    }
    // Only an operator learns how the servers are laid out.
    let r = api
        .http
        .patch(api.url(&conn_path))
        .json(&disable)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The refused changes changed nothing.
    let got: serde_json::Value = plane.get(&conn_path, &token).await.json().await.unwrap();
    assert_eq!(got["enabled"], true);
    assert_eq!(
        plane
            .get("/api/v1.0/connections", &token)
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap()
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // With the data-plane server stopped, nobody would miss a change.
    plane.running.take().unwrap().shutdown().await;
    let r = api.patch(&conn_path, &token, disable).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["enabled"],
        false
    );
}

on_all_databases!(an_api_only_server_refuses_changes_the_data_plane_would_miss);

/// A start that fails after taking the lock (here the API's port is taken) leaves nothing behind: the lock is
/// free and the proxy door it had opened is closed again, so no data plane runs without the lock.
async fn a_failed_start_leaves_no_door_open_and_the_lock_free(db: Db) {
    let Some(tdb) = TestDb::create(db).await else {
        return;
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let door = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = RawConfig {
        data_dir: Some(dir.path().to_owned()),
        listen: Some(taken.local_addr().unwrap()),
        database_url: Some(Secret::new(tdb.url.clone())),
        socks5_listen: Some(door),
        shutdown_timeout_secs: Some(5),
        ..RawConfig::default()
    };
    let err =
        proxyfleet::server::start(ServeConfig::resolve(raw).unwrap(), ServeOptions::default())
            .await
            .err()
            .expect("the API's port is taken");
    assert!(
        format!("{err:#}").contains("binding the API listener"),
        "{err:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(door).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the SOCKS5 door of a failed start still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (On a database server the lock goes with the dropped session, once the server has seen it go.)
    let store = Store::connect(&tdb.url, 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lock = loop {
        match store.lock_data_plane().await {
            Ok(lock) => break lock,
            Err(StoreError::DataPlaneLocked { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("a failed start frees the lock: {e:#}"),
        }
    };
    lock.release().await;
    store.close().await;
}

on_all_databases!(a_failed_start_leaves_no_door_open_and_the_lock_free);
