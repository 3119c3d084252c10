//! Operator auth through the real HTTP API, on each database.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{error_of, Db, Opts, TestServer, ADMIN_PASSWORD};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use proxyfleet::store::Role;
use serde_json::{json, Value};

async fn server(db: Db) -> Option<TestServer> {
    TestServer::start(Opts::new(db)).await
}

async fn sessions_of(s: &TestServer, token: &str) -> Value {
    let r = s.get("/api/v1.0/auth/sessions", token).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn setup_creates_the_first_admin_once(db: Db) {
    let Some(s) = server(db).await else { return };
    let token = s
        .running
        .as_ref()
        .unwrap()
        .setup_token
        .clone()
        .expect("no operator yet: a setup token");
    let url = s.url("/api/v1.0/setup");
    let post = |body: Value| s.http.post(&url).json(&body).send();

    let r = post(json!({"token": "wrong", "username": "boss", "password": ADMIN_PASSWORD}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(json!({"token": token.expose(), "username": "boss", "password": "Password1!"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(error_of(r).await.contains("too common"));
    let r = post(json!({"token": token.expose(), "username": "boss", "password": ADMIN_PASSWORD}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let jwt = v["token"].as_str().unwrap();
    let me = sessions_of(&s, jwt).await;
    assert_eq!(me["sessions"][0]["username"], "boss");
    // The admin can manage operators.
    assert_eq!(s.get("/api/v1.0/operators", jwt).await.status(), 200);
    // The token is spent.
    let r = post(json!({"token": token.expose(), "username": "boss2", "password": ADMIN_PASSWORD}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The setup page is served.
    let page = s.text("/setup").await;
    assert!(page.contains("Create the first operator"));
}

async fn login_lists_sessions_without_secrets(db: Db) {
    let Some(s) = server(db).await else { return };
    let token = s.admin_token().await;
    let second = s.login("ADMIN", ADMIN_PASSWORD).await; // usernames are case-insensitive
    let r = s.get("/api/v1.0/auth/sessions", &token).await;
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["active_count"], 2);
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.iter().filter(|x| x["current"] == true).count(), 1);
    for x in sessions {
        assert_eq!(x["username"], "admin");
        assert_eq!(x["ip"], "127.0.0.1");
        assert_eq!(x["user_agent"], "proxyfleet-tests/1");
        assert!(x["created_at"].as_str().unwrap().ends_with('Z'));
        assert!(x.get("jti").is_none() && x.get("token").is_none());
    }
    // Neither token nor the token id appears anywhere in the listing.
    for t in [&token, &second] {
        let payload = t.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        let jti = claims["jti"].as_str().unwrap();
        assert!(
            !text.contains(jti) && !text.contains(t.as_str()),
            "listing leaks a token or jti"
        );
        // The token's shape: HS256 with the required claims, 24 h lifetime.
        assert_eq!(claims["iss"], "proxyfleet");
        assert_eq!(claims["aud"], "proxyfleet-api");
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            24 * 3600
        );
    }
}

fn forge(secret: &[u8], alg: Algorithm, claims: &Value) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

async fn bad_tokens_are_refused(db: Db) {
    let Some(s) = server(db).await else { return };
    let token = s.admin_token().await;
    let secret = std::fs::read_to_string(s.data_dir.path().join("jwt_secret")).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    // Sanity: a token forged with the real secret and the real claims is accepted, so the refusals below are
    // about the one thing each one changes.
    assert_eq!(
        s.get(
            "/api/v1.0/auth/sessions",
            &forge(secret.as_bytes(), Algorithm::HS256, &claims)
        )
        .await
        .status(),
        200
    );

    let mut expired = claims.clone();
    expired["exp"] = json!(claims["iat"].as_i64().unwrap() - 60);
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    let mut sig = parts[2].to_owned();
    let last = if sig.ends_with('A') { 'B' } else { 'A' };
    sig.pop();
    sig.push(last);
    let tampered_sig = format!("{}.{}.{}", parts[0], parts[1], sig);
    let mut other_sub = claims.clone();
    other_sub["sub"] = json!("someone-else");
    let tampered_payload = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(other_sub.to_string()),
        parts[2]
    );

    let cases = [
        ("alg none", none),
        ("HS512", forge(secret.as_bytes(), Algorithm::HS512, &claims)),
        ("tampered signature", tampered_sig),
        ("tampered payload", tampered_payload),
        (
            "expired",
            forge(secret.as_bytes(), Algorithm::HS256, &expired),
        ),
        (
            "wrong audience",
            forge(secret.as_bytes(), Algorithm::HS256, &wrong_aud),
        ),
        (
            "no exp",
            forge(secret.as_bytes(), Algorithm::HS256, &no_exp),
        ),
        ("other secret", forge(&[1u8; 32], Algorithm::HS256, &claims)),
        (
            "forged sub",
            forge(secret.as_bytes(), Algorithm::HS256, &other_sub),
        ),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, bad) in cases {
        let r = s.get("/api/v1.0/auth/sessions", &bad).await;
        assert_eq!(r.status(), 401, "{what} must be refused");
        assert_eq!(error_of(r).await, "authentication required");
    }
    // A token in the query string is ignored.
    let r = s
        .http
        .get(s.url(&format!(
            "/api/v1.0/auth/sessions?token={token}&access_token={token}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // So is one without the Bearer scheme.
    let r = s
        .http
        .get(s.url("/api/v1.0/auth/sessions"))
        .header("authorization", token.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

async fn logout_kills_the_token(db: Db) {
    let Some(s) = server(db).await else { return };
    let token = s.admin_token().await;
    let other = s.login("admin", ADMIN_PASSWORD).await;
    let r = s.post("/api/v1.0/auth/logout", &token, json!({})).await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.get("/api/v1.0/auth/sessions", &token).await.status(),
        401,
        "reuse after logout"
    );
    assert_eq!(
        s.post("/api/v1.0/auth/logout", &token, json!({}))
            .await
            .status(),
        401
    );
    // Only that session ended.
    assert_eq!(sessions_of(&s, &other).await["active_count"], 1);
}

async fn change_password_rules_and_revocation(db: Db) {
    let Some(s) = server(db).await else { return };
    let token = s.admin_token().await;
    let other = s.login("admin", ADMIN_PASSWORD).await;
    let change = |cur: &str, new: &str| {
        s.post(
            "/api/v1.0/auth/change-password",
            &token,
            json!({"current_password": cur, "new_password": new}),
        )
    };

    let r = change("Wrong-Passw0rd!", "N3w-Sturdy-Passphrase").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_of(r).await, "current password is incorrect");
    let r = change(ADMIN_PASSWORD, ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 422);
    assert!(error_of(r).await.contains("differ"));
    for (pw, rule) in [
        ("short1!", "at least 8"),
        ("nouppercase1!", "uppercase"),
        ("NoDigits-Here", "digit"),
        ("Welcome1!", "common"),
        ("Xadmin-99!x", "username"),
    ] {
        let r = change(ADMIN_PASSWORD, pw).await;
        assert_eq!(r.status(), 422, "{pw}");
        let msg = error_of(r).await;
        assert!(
            msg.contains(rule),
            "{pw}: {msg:?} should name rule {rule:?}"
        );
    }
    // 72 bytes: bcrypt's own limit counts a terminating NUL, so this is refused by the rules, not a 500.
    let long = format!("Aa1!{}", "x".repeat(68));
    let r = change(ADMIN_PASSWORD, &long).await;
    assert_eq!(r.status(), 422);
    assert!(error_of(r).await.contains("71 bytes"));

    let r = change(ADMIN_PASSWORD, "N3w-Sturdy-Passphrase").await;
    assert_eq!(r.status(), 200);
    let fresh = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.get("/api/v1.0/auth/sessions", &other).await.status(),
        401,
        "other sessions end"
    );
    assert_eq!(
        s.get("/api/v1.0/auth/sessions", &token).await.status(),
        401,
        "the old token ends too"
    );
    assert_eq!(sessions_of(&s, &fresh).await["active_count"], 1);
    assert_eq!(s.try_login("admin", ADMIN_PASSWORD).await.status(), 401);
    s.login("admin", "N3w-Sturdy-Passphrase").await;
}

async fn idle_timeout_slides_within_the_absolute_limit(db: Db) {
    let Some(s) = server(db).await else { return };
    let token = s.admin_token().await;
    let minutes = |m: u64| Duration::from_secs(m * 60);
    // Activity every 59 minutes keeps the session alive…
    for _ in 0..3 {
        s.clock.advance(minutes(59));
        assert_eq!(s.get("/api/v1.0/auth/sessions", &token).await.status(), 200);
    }
    // …61 idle minutes end it, and it stays ended.
    s.clock.advance(minutes(61));
    assert_eq!(s.get("/api/v1.0/auth/sessions", &token).await.status(), 401);
    s.clock.advance(minutes(1));
    assert_eq!(s.get("/api/v1.0/auth/sessions", &token).await.status(), 401);

    // The 24 h limit is absolute: activity does not extend it.
    let token = s.login("admin", ADMIN_PASSWORD).await;
    for _ in 0..25 {
        s.clock.advance(minutes(59));
        let _ = s.get("/api/v1.0/auth/sessions", &token).await;
    }
    assert_eq!(
        s.get("/api/v1.0/auth/sessions", &token).await.status(),
        401,
        "past 24 h of activity"
    );
}

async fn lockout_after_repeated_failures(db: Db) {
    let Some(s) = server(db).await else { return };
    s.admin_token().await;
    for _ in 0..5 {
        assert_eq!(s.try_login("admin", "Wrong-Passw0rd!").await.status(), 401);
    }
    let r = s.try_login("admin", "Wrong-Passw0rd!").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (25..=30).contains(&retry),
        "first lockout is about 30 s, got {retry}"
    );
    assert!(error_of(r).await.contains("too many attempts"));
    // Locked means locked: the right password is refused too, and costs no bcrypt.
    let t = Instant::now();
    assert_eq!(s.try_login("admin", ADMIN_PASSWORD).await.status(), 429);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "a locked attempt is refused before hashing"
    );
    // Unknown usernames lock the same way (no hint that an account exists).
    for _ in 0..5 {
        assert_eq!(s.try_login("ghost", "Wrong-Passw0rd!").await.status(), 401);
    }
    assert_eq!(s.try_login("ghost", "Wrong-Passw0rd!").await.status(), 429);
    let metrics = s.text("/metrics").await;
    assert!(
        metrics.contains("proxyfleet_login_failures_total{reason=\"locked_out\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("proxyfleet_login_failures_total{reason=\"unknown_user\"} 5"));
}

async fn parallel_guesses_get_no_more_than_the_allowance(db: Db) {
    let Some(s) = server(db).await else { return };
    s.admin_token().await;
    let burst = common::parallel_wrong_logins(&s, "admin", 30).await;
    assert_eq!(
        burst.get(&401).copied().unwrap_or(0),
        5,
        "only the allowance is verified: {burst:?}"
    );
    assert_eq!(burst.get(&429).copied().unwrap_or(0), 25, "{burst:?}");
    let r = s.try_login("admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 429, "and then the account is locked");
}

async fn unknown_user_and_wrong_password_look_the_same(db: Db) {
    let Some(s) = server(db).await else { return };
    s.admin_token().await;
    let t = Instant::now();
    let unknown = s.try_login("nobody_here", "Wrong-Passw0rd!").await;
    let unknown_took = t.elapsed();
    let wrong = s.try_login("admin", "Wrong-Passw0rd!").await;
    let malformed_name = s.try_login("no such user!", "Wrong-Passw0rd!").await;
    assert_eq!(unknown.status(), 401);
    assert_eq!(wrong.status(), 401);
    assert_eq!(malformed_name.status(), 401);
    let (a, b, c) = (
        unknown.text().await.unwrap(),
        wrong.text().await.unwrap(),
        malformed_name.text().await.unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a, r#"{"error":"invalid username or password"}"#);
    // An unknown user still pays for a bcrypt verification (cost 12 cannot finish this fast).
    assert!(
        unknown_took > Duration::from_millis(50),
        "unknown user answered in {unknown_took:?}: no dummy verify?"
    );
}

async fn bodies_are_bounded_and_errors_are_json(db: Db) {
    let Some(s) = server(db).await else { return };
    let url = s.url("/api/v1.0/auth/login");
    let big = vec![b'a'; 10 * 1024 * 1024];
    let r = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_of(r).await, "request body is too large");

    let cases: [(&str, &str, u16, &str); 5] = [
        (
            "application/json",
            "{\"username\": ",
            400,
            "malformed JSON body",
        ),
        ("application/json", "{\"username\": \"a\"}", 400, "password"),
        (
            "application/json",
            "{\"username\": 5, \"password\": \"x\"}",
            400,
            "invalid type",
        ),
        (
            "application/json",
            "{\"username\":\"a\",\"password\":\"b\",\"admin\":true}",
            400,
            "unknown field",
        ),
        ("text/plain", "{}", 415, "application/json"),
    ];
    for (ct, body, status, needle) in cases {
        let r = s
            .http
            .post(&url)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let msg = error_of(r).await;
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(
            !msg.contains("src/") && !msg.contains("sqlx"),
            "no internals: {msg}"
        );
    }
    let r = s.http.get(s.url("/no/such/thing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_of(r).await, "not found");
    let r = s
        .http
        .get(s.url("/api/v1.0/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_of(r).await, "method not allowed");
    let token = s.admin_token().await;
    let r = s.delete("/api/v1.0/auth/sessions/%FF", &token).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await, "invalid path parameter");
}

async fn operators_cannot_see_or_revoke_each_other(db: Db) {
    let Some(s) = server(db).await else { return };
    let admin = s.admin_token().await;
    s.create_operator("bob_ops", "B0b-Strong-Phrase", Role::Operator)
        .await;
    let bob = s.login("bob_ops", "B0b-Strong-Phrase").await;
    let admin_view = sessions_of(&s, &admin).await;
    let bob_view = sessions_of(&s, &bob).await;
    assert_eq!(admin_view["active_count"], 1);
    assert_eq!(bob_view["active_count"], 1);
    assert_eq!(bob_view["sessions"][0]["username"], "bob_ops");
    let admin_session = admin_view["sessions"][0]["id"].as_str().unwrap();
    let bob_session = bob_view["sessions"][0]["id"].as_str().unwrap();
    // Not even an admin can revoke another operator's session; the answer is the same as for a made-up id.
    let r = s
        .delete(&format!("/api/v1.0/auth/sessions/{bob_session}"), &admin)
        .await;
    assert_eq!(r.status(), 404);
    let r2 = s
        .delete(
            "/api/v1.0/auth/sessions/00000000-0000-0000-0000-000000000000",
            &admin,
        )
        .await;
    assert_eq!(r2.status(), 404);
    assert_eq!(error_of(r).await, error_of(r2).await);
    assert_eq!(
        s.delete(&format!("/api/v1.0/auth/sessions/{admin_session}"), &bob)
            .await
            .status(),
        404
    );
    assert_eq!(sessions_of(&s, &bob).await["active_count"], 1);
    // Revoking one's own other session works.
    let bob2 = s.login("bob_ops", "B0b-Strong-Phrase").await;
    let r = s
        .delete(&format!("/api/v1.0/auth/sessions/{bob_session}"), &bob2)
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(s.get("/api/v1.0/auth/sessions", &bob).await.status(), 401);
}

async fn admins_manage_operators(db: Db) {
    let Some(s) = server(db).await else { return };
    let admin = s.admin_token().await;
    // An admin cannot choose another operator's password…
    let r = s
        .post(
            "/api/v1.0/operators",
            &admin,
            json!({"username": "carol_1", "password": "Admin-Kn0ws-It"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    // …they get a one-time invitation instead.
    let r = s
        .post(
            "/api/v1.0/operators",
            &admin,
            json!({"username": "Carol_1"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let carol: Value = r.json().await.unwrap();
    assert_eq!(carol["username"], "carol_1");
    assert_eq!(carol["role"], "operator");
    let invite = carol["invite_token"].as_str().unwrap().to_owned();
    assert!(carol["invite_url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/setup#invite.{invite}")));
    let id = carol["id"].as_str().unwrap().to_owned();
    let r = s
        .post(
            "/api/v1.0/operators",
            &admin,
            json!({"username": "carol_1"}),
        )
        .await;
    assert_eq!(r.status(), 409);
    let r = s
        .post("/api/v1.0/operators", &admin, json!({"username": "x y"}))
        .await;
    assert_eq!(r.status(), 422);
    assert!(error_of(r).await.contains("letters, digits and underscore"));
    // Before accepting, no password works.
    assert_eq!(s.try_login("carol_1", "!invited").await.status(), 401);
    let accept = |token: &str, pw: &str| {
        s.http
            .post(s.url("/api/v1.0/invitations/accept"))
            .json(&json!({"token": token, "password": pw}))
            .send()
    };
    let r = accept(&invite, "Welcome1!").await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(error_of(r).await.contains("common"));
    assert_eq!(
        accept("made-up", "C4rol-Strong-Phrase")
            .await
            .unwrap()
            .status(),
        403
    );
    let r = accept(&invite, "C4rol-Strong-Phrase").await.unwrap();
    assert_eq!(r.status(), 200, "accepting logs in");
    assert_eq!(
        accept(&invite, "C4rol-Other-Phrase")
            .await
            .unwrap()
            .status(),
        403,
        "one use"
    );

    let carol_token = s.login("carol_1", "C4rol-Strong-Phrase").await;
    let r = s.get("/api/v1.0/operators", &carol_token).await;
    assert_eq!(r.status(), 403, "operators are not admins");
    let listing = s
        .get("/api/v1.0/operators", &admin)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains("carol_1") && !listing.contains("$2b$"),
        "no hashes in listings"
    );

    // Disabling ends their sessions at once and blocks login.
    assert_eq!(
        s.post(
            &format!("/api/v1.0/operators/{id}/disable"),
            &admin,
            json!({})
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        s.get("/api/v1.0/auth/sessions", &carol_token)
            .await
            .status(),
        401
    );
    assert_eq!(
        s.try_login("carol_1", "C4rol-Strong-Phrase").await.status(),
        401
    );
    assert_eq!(
        s.post(
            &format!("/api/v1.0/operators/{id}/enable"),
            &admin,
            json!({})
        )
        .await
        .status(),
        200
    );
    let carol_token = s.login("carol_1", "C4rol-Strong-Phrase").await;
    // Deleting ends them too.
    assert_eq!(
        s.delete(&format!("/api/v1.0/operators/{id}"), &admin)
            .await
            .status(),
        204
    );
    assert_eq!(
        s.get("/api/v1.0/auth/sessions", &carol_token)
            .await
            .status(),
        401
    );
    assert_eq!(
        s.delete(&format!("/api/v1.0/operators/{id}"), &admin)
            .await
            .status(),
        404
    );
    // An admin cannot lock themselves out.
    let me = sessions_of(&s, &admin).await;
    let _ = me;
    let ops: Value = s
        .get("/api/v1.0/operators", &admin)
        .await
        .json()
        .await
        .unwrap();
    let my_id = ops[0]["id"].as_str().unwrap();
    assert_eq!(
        s.delete(&format!("/api/v1.0/operators/{my_id}"), &admin)
            .await
            .status(),
        422
    );
    assert_eq!(
        s.post(
            &format!("/api/v1.0/operators/{my_id}/disable"),
            &admin,
            json!({})
        )
        .await
        .status(),
        422
    );
}

on_all_databases!(
    setup_creates_the_first_admin_once,
    login_lists_sessions_without_secrets,
    bad_tokens_are_refused,
    logout_kills_the_token,
    change_password_rules_and_revocation,
    idle_timeout_slides_within_the_absolute_limit,
    lockout_after_repeated_failures,
    parallel_guesses_get_no_more_than_the_allowance,
    unknown_user_and_wrong_password_look_the_same,
    bodies_are_bounded_and_errors_are_json,
    operators_cannot_see_or_revoke_each_other,
    admins_manage_operators,
);
