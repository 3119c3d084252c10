//! Sessions and limits with Redis: the fast path, and what happens when Redis freezes, dies and comes back.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Db, Opts, RedisServer, TestServer, ADMIN_PASSWORD};
use serde_json::{json, Value};

async fn wait_for_redis(s: &TestServer, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = s.json("/readyz").await;
        if v["redis"] == if up { "up" } else { "down" } {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis never became {}",
            if up { "up" } else { "down" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(s: &TestServer, token: &str) -> u16 {
    s.get("/api/v1.0/auth/sessions", token)
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_survives_a_frozen_and_a_restarted_redis() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let mut opts = Opts::new(Db::Sqlite);
    opts.redis = Some(redis.url());
    let Some(s) = TestServer::start(opts).await else {
        return;
    };
    wait_for_redis(&s, true).await;

    let a = s.admin_token().await;
    let b = s.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(status(&s, &a).await, 200);
    assert_eq!(status(&s, &b).await, 200);
    let cached = redis.keys(&format!("{}sess:*", s.redis_prefix)).await;
    assert_eq!(
        cached.len(),
        2,
        "both sessions are cached in Redis: {cached:?}"
    );

    // Freeze Redis: commands hang, which must cost at most a short timeout, never a hung request.
    redis.pause();
    let t = Instant::now();
    let r = s.post("/api/v1.0/auth/logout", &a, json!({})).await;
    assert_eq!(
        r.status(),
        204,
        "logout works through SQL while Redis hangs"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "logout took {:?}",
        t.elapsed()
    );
    wait_for_redis(&s, false).await;
    assert_eq!(status(&s, &a).await, 401, "revoked while Redis is down");
    assert_eq!(
        status(&s, &b).await,
        200,
        "other sessions validate through SQL"
    );
    let c = s.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(status(&s, &c).await, 200, "login works without Redis");

    // Thaw: Redis still holds the stale cache entry for `a`. It must not bring the session back.
    redis.resume();
    wait_for_redis(&s, true).await;
    assert_eq!(
        status(&s, &a).await,
        401,
        "a revoked token stays revoked after Redis returns"
    );
    assert_eq!(status(&s, &b).await, 200);
    assert_eq!(status(&s, &c).await, 200);

    // Kill Redis outright and start a new one on the same port: used again without a server restart.
    redis.stop();
    assert_eq!(status(&s, &b).await, 200);
    wait_for_redis(&s, false).await;
    assert_eq!(
        s.post("/api/v1.0/auth/logout", &b, json!({}))
            .await
            .status(),
        204
    );
    redis.restart();
    wait_for_redis(&s, true).await;
    assert_eq!(status(&s, &b).await, 401);
    assert_eq!(status(&s, &c).await, 200);
    let cached = redis.keys(&format!("{}sess:*", s.redis_prefix)).await;
    assert_eq!(
        cached.len(),
        1,
        "the live session is cached in the new Redis: {cached:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_are_shared_through_redis() {
    let Some(url) = common::shared_redis().await else {
        return;
    };
    // Two servers on one database and one Redis prefix: failures on one lock the account on the other.
    let Some(db) = common::TestDb::create(Db::Postgres).await else {
        return;
    };
    let prefix = format!("pftest:{}:", uuid::Uuid::new_v4().simple());
    let mk = || {
        let mut o = Opts::new(Db::Sqlite);
        o.redis = Some(url.clone());
        o.raw.database_url = Some(proxyfleet::config::Secret::new(db.url.clone()));
        o.raw.redis_prefix = Some(prefix.clone());
        // Nodes of one deployment share the signing secret (a generated one is per data directory).
        o.raw.jwt_secret = Some(proxyfleet::config::Secret::new("k".repeat(40)));
        o
    };
    let Some(one) = TestServer::start(mk()).await else {
        return;
    };
    let Some(two) = TestServer::start(mk()).await else {
        return;
    };
    one.admin_token().await;
    for _ in 0..5 {
        assert_eq!(
            one.try_login("admin", "Wrong-Passw0rd!").await.status(),
            401
        );
    }
    let r = two.try_login("admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 429, "the other node sees the lockout");
    assert!(r.headers().contains_key("retry-after"));

    // A session revoked on one node is dead on the other at once, through the shared cache and tombstones.
    one.create_operator(
        "second_op",
        "S3cond-Op-Phrase",
        proxyfleet::store::Role::Operator,
    )
    .await;
    let token = two.login("second_op", "S3cond-Op-Phrase").await;
    assert_eq!(
        one.get("/api/v1.0/auth/sessions", &token).await.status(),
        200
    );
    assert_eq!(
        two.post("/api/v1.0/auth/logout", &token, json!({}))
            .await
            .status(),
        204
    );
    assert_eq!(
        one.get("/api/v1.0/auth/sessions", &token).await.status(),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_password_change_on_the_redis_path() {
    let Some(url) = common::shared_redis().await else {
        return;
    };
    let mut opts = Opts::new(Db::Sqlite);
    opts.redis = Some(url);
    let Some(s) = TestServer::start(opts).await else {
        return;
    };
    let token = s.admin_token().await;
    let other = s.login("admin", ADMIN_PASSWORD).await;
    for _ in 0..3 {
        s.clock.advance(Duration::from_secs(59 * 60));
        assert_eq!(
            status(&s, &token).await,
            200,
            "activity slides the idle timeout"
        );
    }
    assert_eq!(status(&s, &other).await, 401, "the idle session ended");
    let v: Value = s
        .get("/api/v1.0/auth/sessions", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["active_count"], 1);
    s.clock.advance(Duration::from_secs(61 * 60));
    assert_eq!(status(&s, &token).await, 401);

    let a = s.login("admin", ADMIN_PASSWORD).await;
    let b = s.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(status(&s, &b).await, 200);
    let r = s
        .post(
            "/api/v1.0/auth/change-password",
            &a,
            json!({"current_password": ADMIN_PASSWORD, "new_password": "An0ther-Long-Phrase"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&s, &a).await, 401);
    assert_eq!(
        status(&s, &b).await,
        401,
        "a cached session of the same operator ends too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_parallel_guesses_gets_no_more_than_the_allowance_through_redis() {
    let Some(url) = common::shared_redis().await else {
        return;
    };
    let mut opts = Opts::new(Db::Sqlite);
    opts.redis = Some(url);
    let Some(s) = TestServer::start(opts).await else {
        return;
    };
    s.create_operator("admin", ADMIN_PASSWORD, proxyfleet::store::Role::Admin)
        .await;
    let burst = common::parallel_wrong_logins(&s, "admin", 30).await;
    assert_eq!(
        burst.get(&401).copied().unwrap_or(0),
        5,
        "exactly the allowance is verified: {burst:?}"
    );
    assert_eq!(burst.get(&429).copied().unwrap_or(0), 25, "{burst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_without_redis_reaches_other_nodes_within_30_seconds() {
    let Some(mut dead) = RedisServer::start() else {
        return;
    };
    let Some(shared) = common::shared_redis().await else {
        return;
    };
    let Some(db) = common::TestDb::create(Db::Sqlite).await else {
        return;
    };
    let node = |redis: String| {
        let mut o = Opts::new(Db::Sqlite);
        o.redis = Some(redis);
        o.raw.database_url = Some(proxyfleet::config::Secret::new(db.url.clone()));
        o.raw.jwt_secret = Some(proxyfleet::config::Secret::new("k".repeat(40)));
        o
    };
    let Some(one) = TestServer::start(node(shared)).await else {
        return;
    };
    // Node two's Redis is gone: it works on SQL alone and cannot tombstone anything.
    let dead_url = dead.url();
    dead.stop();
    let Some(two) = TestServer::start(node(dead_url)).await else {
        return;
    };
    one.create_operator("admin", ADMIN_PASSWORD, proxyfleet::store::Role::Admin)
        .await;
    let token = one.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(status(&one, &token).await, 200, "cached on node one");
    assert_eq!(
        two.post("/api/v1.0/auth/logout", &token, json!({}))
            .await
            .status(),
        204
    );
    assert_eq!(status(&two, &token).await, 401);
    // Node one trusts its cache for at most 30 s, then asks SQL again.
    one.clock.advance(Duration::from_secs(31));
    assert_eq!(
        status(&one, &token).await,
        401,
        "revocation seen after the re-check interval"
    );
}
