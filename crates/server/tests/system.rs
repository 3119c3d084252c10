//! Health, readiness, metrics, the OpenAPI document and client-address handling.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, Opts, TestServer, ADMIN_PASSWORD};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let Some(s) = TestServer::start(Opts::new(Db::Sqlite)).await else {
        return;
    };
    let h: Value = s.json("/healthz").await;
    assert_eq!(h["status"], "ok");
    let r = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["store"].as_str(), v["redis"].as_str()),
        (Some("ok"), Some("disabled"))
    );

    // With the store closed, readiness fails while liveness holds.
    s.store().close().await;
    let r = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["store"], "unreachable");
    assert_eq!(
        s.http.get(s.url("/healthz")).send().await.unwrap().status(),
        200
    );

    let m = s.text("/metrics").await;
    assert!(
        m.contains(
            "proxyfleet_http_requests_total{method=\"GET\",route=\"/readyz\",status=\"503\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains(
        "proxyfleet_http_request_duration_seconds_bucket{method=\"GET\",route=\"/healthz\""
    ));
    assert!(m.contains("proxyfleet_redis_up 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_every_endpoint() {
    let Some(s) = TestServer::start(Opts::new(Db::Sqlite)).await else {
        return;
    };
    let doc: Value = s.json("/api/v1.0/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/api/v1.0/auth/login", "post"),
        ("/api/v1.0/auth/logout", "post"),
        ("/api/v1.0/auth/change-password", "post"),
        ("/api/v1.0/auth/sessions", "get"),
        ("/api/v1.0/auth/sessions/{id}", "delete"),
        ("/api/v1.0/operators", "get"),
        ("/api/v1.0/operators", "post"),
        ("/api/v1.0/operators/{id}", "delete"),
        ("/api/v1.0/operators/{id}/disable", "post"),
        ("/api/v1.0/operators/{id}/enable", "post"),
        ("/api/v1.0/setup", "post"),
        ("/api/v1.0/invitations/accept", "post"),
        ("/api/v1.0/devices", "get"),
        ("/api/v1.0/devices", "post"),
        ("/api/v1.0/devices/{id}", "get"),
        ("/api/v1.0/devices/{id}", "patch"),
        ("/api/v1.0/devices/{id}", "delete"),
        ("/api/v1.0/devices/{id}/revoke", "post"),
        ("/api/v1.0/devices/{id}/rotate", "post"),
        ("/api/v1.0/devices/{id}/usage", "get"),
        ("/api/v1.0/connections", "get"),
        ("/api/v1.0/connections", "post"),
        ("/api/v1.0/connections/{id}", "get"),
        ("/api/v1.0/connections/{id}", "patch"),
        ("/api/v1.0/connections/{id}", "delete"),
        ("/api/v1.0/connections/{id}/regenerate-password", "post"),
        ("/api/v1.0/connections/{id}/profile.ovpn", "get"),
        ("/api/v1.0/connections/{id}/reset-usage", "post"),
        ("/api/v1.0/connections/{id}/usage", "get"),
        ("/api/v1.0/settings/webhook", "get"),
        ("/api/v1.0/settings/webhook", "put"),
        ("/api/v1.0/settings/webhook/rotate-secret", "post"),
        ("/api/v1.0/settings/webhook/test", "post"),
        ("/api/v1.0/webhook-deliveries", "get"),
        ("/api/v1.0/webhook-deliveries/{event_id}/resend", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the spec"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        expected.len(),
        "an endpoint is in the spec but not in this test: {:?}",
        paths.keys()
    );
    // Every documented path is really routed (no 404 from the fallback).
    for (path, method) in expected {
        let url = s.url(&path.replace("{id}", "x"));
        let r = s
            .http
            .request(method.parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        assert_ne!(
            r.status(),
            404,
            "{method} {path} is documented but not routed"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_honoured_only_from_trusted_proxies() {
    for (trusted, want_ip) in [
        (None, "127.0.0.1"),
        (Some(vec!["127.0.0.0/8".parse().unwrap()]), "203.0.113.7"),
    ] {
        let mut opts = Opts::new(Db::Sqlite);
        opts.raw.trusted_proxies = trusted;
        let Some(s) = TestServer::start(opts).await else {
            return;
        };
        s.create_operator("admin", ADMIN_PASSWORD, proxyfleet::store::Role::Admin)
            .await;
        let r = s
            .http
            .post(s.url("/api/v1.0/auth/login"))
            .header("x-forwarded-for", "203.0.113.7")
            .json(&serde_json::json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await
            .unwrap();
        let token = r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let v: Value = s
            .get("/api/v1.0/auth/sessions", &token)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["sessions"][0]["ip"], want_ip);

        // Spoofed addresses from an untrusted client all count against its real address.
        for i in 0..20 {
            let _ = s
                .http
                .post(s.url("/api/v1.0/auth/login"))
                .header("x-forwarded-for", format!("198.51.100.{i}"))
                .json(&serde_json::json!({"username": format!("nobody{i}"), "password": "Wrong-Passw0rd!"}))
                .send()
                .await
                .unwrap();
        }
        let r = s.try_login("someone_else", "Wrong-Passw0rd!").await;
        let locked = r.status() == 429;
        assert_eq!(
            locked,
            want_ip == "127.0.0.1",
            "the per-IP limit follows the real client address"
        );
    }
}
