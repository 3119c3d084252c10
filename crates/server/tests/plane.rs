//! One process per database serves the data plane (decision 79): a second one is refused at startup on every
//! backend, an API-only server beside it is not, and on PostgreSQL and MariaDB a server whose lock session is
//! lost takes the lock again, or stops when another process has taken it meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Db, Opts, TestServer};
use proxyfleet::config::{RawConfig, Secret, ServeConfig};
use proxyfleet::server::{RunningServer, ServeOptions};
use proxyfleet::store::{Store, StoreError};
use sqlx::{AnyConnection, Connection};

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// The session holding the lock, as the database server sees it.
async fn holder(admin: &mut AnyConnection, db: Db) -> Option<i64> {
    let sql = match db {
        Db::Postgres => {
            "SELECT CAST(pid AS BIGINT) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        }
        _ => {
            "SELECT CAST(IS_USED_LOCK(CONCAT('proxyfleet data plane ', MD5(DATABASE()))) AS SIGNED)"
        }
    };
    sqlx::query_scalar::<_, Option<i64>>(sql)
        .fetch_optional(admin)
        .await
        .unwrap()
        .flatten()
}

/// End session `id` from outside, as a database restart or a broken connection would.
async fn end_session(admin: &mut AnyConnection, db: Db, id: i64) {
    let sql = match db {
        Db::Postgres => format!("SELECT pg_terminate_backend({id})"),
        _ => format!("KILL {id}"),
    };
    sqlx::query(&sql).execute(admin).await.unwrap();
}

async fn wait_for_holder(admin: &mut AnyConnection, db: Db, not: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(id) = holder(admin, db).await.filter(|id| *id != not) {
            return id;
        }
        assert!(Instant::now() < deadline, "nobody took the lock again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_server_whose_lock_session_is_lost_takes_it_again_or_stops(db: Db) {
    let Some(mut s) = TestServer::start(doors(db, None)).await else {
        return;
    };
    let url = s.db.url.clone();
    let mut admin = AnyConnection::connect(&url).await.unwrap();
    let held = holder(&mut admin, db)
        .await
        .expect("the server holds the lock");

    // The session is gone and nobody else wants the lock: the server takes it again and goes on serving.
    end_session(&mut admin, db, held).await;
    wait_for_holder(&mut admin, db, held).await;
    assert!(!s.running().cancel_token().is_cancelled());

    // The session is gone and another process takes the lock before the server notices: the server stops, and
    // says why.
    let other = Store::connect(&url, 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ended = None;
    let taken = loop {
        // (Should the server take it again first, its new session is ended too.)
        if let Some(id) = holder(&mut admin, db).await.filter(|id| Some(*id) != ended) {
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
    let running = s.running.take().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("the server stops once another process holds the lock");
    let msg = format!(
        "{:#}",
        stopped.expect_err("stopping on its own is an error")
    );
    assert!(msg.contains("another process has taken the lock"), "{msg}");
    taken.release().await;
    other.close().await;
}

mod a_server_whose_lock_session_is_lost {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        a_server_whose_lock_session_is_lost_takes_it_again_or_stops(Db::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        a_server_whose_lock_session_is_lost_takes_it_again_or_stops(Db::MySql).await
    }
}

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
