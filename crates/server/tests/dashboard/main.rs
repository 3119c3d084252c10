//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver), against a real server
//! with a real agent, real proxy clients (curl) and a real webhook receiver; plus plain-HTTP checks of the CSRF
//! protection, cookies and escaping (`csrf.rs`). Screenshots go to `<target>/dashboard-screenshots/`.

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod browser;
mod devices;
mod http;
mod rig;

use browser::{click, click_confirmed, fill, shot, text, until, value};
use common::{TestServer, ADMIN_PASSWORD};
use fantoccini::{key::Key, Client, Locator};
use proxyfleet::store::Role;
use serde_json::json;

/// Log in through the form: a wrong password is refused in plain words next to the form, then the right one works.
async fn log_in(c: &Client, s: &TestServer) {
    c.goto(&s.url("/connections")).await.unwrap();
    let path = c.current_url().await.unwrap().path().to_owned();
    assert_eq!(path, "/login", "not logged in: sent to the login page");
    shot(c, "login").await;
    fill(c, "#username", "admin").await;
    fill(c, "#password", "Wrong-Passw0rd!").await;
    click(c, "form button[type=submit]").await;
    until(10, "the login error", || async {
        text(c, "#login-note").await == "Invalid username or password."
    })
    .await;
    fill(c, "#password", ADMIN_PASSWORD).await;
    click(c, "form button[type=submit]").await;
    until(10, "the connections page", || async {
        c.current_url().await.unwrap().path() == "/connections"
    })
    .await;
}

/// Set the webhook URL (a bad one is refused next to the field); the signing secret is shown once and returned.
async fn set_webhook(c: &Client, s: &TestServer, url: &str) -> String {
    c.goto(&s.url("/webhook")).await.unwrap();
    fill(c, "#wh-url", "not a url").await;
    click(c, "form[action=\"/webhook\"] button").await;
    until(10, "the URL error", || async {
        !text(c, "#wh-url-note").await.is_empty()
    })
    .await;
    fill(c, "#wh-url", url).await;
    click(c, "form[action=\"/webhook\"] button").await;
    until(10, "the signing secret", || async {
        c.find(Locator::Css("#wh-secret")).await.is_ok()
    })
    .await;
    let secret = value(c, "#wh-secret").await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    c.goto(&s.url("/webhook")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&secret),
        "the secret is shown once"
    );
    secret
}

/// The one-time credentials view: (username, password, HTTP proxy URL).
async fn one_time_credentials(c: &Client) -> (String, String, String) {
    until(10, "the one-time credentials", || async {
        c.find(Locator::Css("#once-password")).await.is_ok()
    })
    .await;
    let user = value(c, "#once-username").await;
    let password = value(c, "#once-password").await;
    let http = value(c, "#once-http").await;
    assert_eq!(password.len(), 24, "a generated password is shown");
    assert!(
        http.contains(&password),
        "the HTTP URL carries the credentials"
    );
    assert!(value(c, "#once-socks5").await.starts_with("socks5h://"));
    assert!(text(c, "#once-ovpn-off")
        .await
        .contains("OpenVPN door is off"));
    (user, password, http)
}

/// Create a connection with a 1 MB limit (a zero limit is refused next to the field): returns its id and
/// one-time credentials.
async fn create_connection(c: &Client, s: &TestServer, device: &str) -> (String, String, String) {
    c.goto(&s.url("/connections/new")).await.unwrap();
    fill(c, "#f-name", "customer-1").await;
    let picker = c.find(Locator::Css("#f-device")).await.unwrap();
    picker.select_by_value(device).await.unwrap();
    fill(c, "#f-limit", "0").await;
    let unit = c.find(Locator::Css("#f-unit")).await.unwrap();
    unit.select_by_value("MB").await.unwrap();
    click(c, "form.conn-form button[type=submit]").await;
    until(10, "the limit error", || async {
        text(c, "#f-limit-note").await.contains("more than zero")
    })
    .await;
    fill(c, "#f-limit", "1").await;
    click(c, "form.conn-form button[type=submit]").await;
    let (_, password, http) = one_time_credentials(c).await;
    shot(c, "connection-credentials").await;
    c.goto(&s.url("/connections")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&password),
        "the password is not shown again"
    );
    let card = c
        .find(Locator::Css("[data-live^=\"conn:\"]"))
        .await
        .unwrap();
    let id = card.attr("data-live").await.unwrap().unwrap();
    let id = id.trim_start_matches("conn:").to_owned();
    (id, password, http)
}

/// Push traffic through the HTTP proxy with curl while the connections page is open: the bar moves and reaches
/// "exhausted" without a reload.
async fn exhaust(c: &Client, s: &TestServer, conn: &str, http_url: &str) {
    let meter = format!("[data-live=\"conn:{conn}\"]");
    let f = |name: &str| format!("{meter} [data-f={name}]");
    c.goto(&s.url("/connections")).await.unwrap();
    assert_eq!(text(c, &f("usage")).await, "0 B / 1 MB");
    c.execute("window.__noReload = 1", vec![]).await.unwrap();
    let url = format!("http://{}/", rig::http_target(3_000_000).await);
    let pusher = tokio::spawn({
        let (p, u) = (http_url.to_owned(), url.clone());
        async move { rig::curl_status(&p, &u).await }
    });
    until(20, "the bar to move", || async {
        let p = text(c, &f("pct")).await;
        !p.is_empty() && p != "0%" && p != "100%"
    })
    .await;
    until(20, "the exhausted state", || async {
        text(c, &f("state")).await == "Exhausted — limit reached"
    })
    .await;
    assert_eq!(text(c, &f("pct")).await, "100%");
    assert_eq!(text(c, &f("usage")).await, "1 MB / 1 MB");
    let kept = c.execute("return window.__noReload", vec![]).await.unwrap();
    assert_eq!(kept, json!(1), "updated without a reload");
    shot(c, "connections-exhausted").await;
    let _ = pusher.await;
    assert_eq!(
        rig::curl_status(http_url, &url).await,
        "403",
        "an exhausted connection refuses new flows"
    );
}

/// Reset usage (Escape closes the confirmation without doing anything), see the history chart, change the limit.
async fn reset_and_edit(c: &Client, s: &TestServer, conn: &str) {
    let meter = format!("[data-live=\"conn:{conn}\"]");
    let f = |name: &str| format!("{meter} [data-f={name}]");
    // The hourly history reaches the store with the next usage flush (every second here).
    until(10, "the usage chart", || async {
        c.goto(&s.url(&format!("/connections/{conn}")))
            .await
            .unwrap();
        c.find(Locator::Css("figure.chart rect")).await.is_ok()
    })
    .await;
    click(
        c,
        &format!("form[action=\"/connections/{conn}/reset\"] button"),
    )
    .await;
    let open = || async {
        c.execute("return document.getElementById('confirm').open", vec![])
            .await
            .unwrap()
    };
    until(5, "the dialog", || async { open().await == json!(true) }).await;
    c.active_element()
        .await
        .unwrap()
        .send_keys(&Key::Escape.to_string())
        .await
        .unwrap();
    until(5, "Escape to close the dialog", || async {
        open().await == json!(false)
    })
    .await;
    assert_eq!(
        text(c, &f("state")).await,
        "Exhausted — limit reached",
        "nothing was reset"
    );
    click_confirmed(c, &format!("/connections/{conn}/reset")).await;
    until(10, "the reset", || async {
        text(c, "#actions-note").await == "Usage reset to zero."
    })
    .await;
    assert_eq!(text(c, &f("state")).await, "Active");
    assert_eq!(text(c, &f("usage")).await, "0 B / 1 MB");
    fill(c, "#f-limit", "2").await;
    let unit = c.find(Locator::Css("#f-unit")).await.unwrap();
    unit.select_by_value("GB").await.unwrap();
    click(c, "form.conn-form button[type=submit]").await;
    until(10, "the saved form", || async {
        text(c, "#f-form-note").await == "Saved."
    })
    .await;
    assert_eq!(text(c, &f("usage")).await, "0 B / 2 GB");
    shot(c, "connection-detail").await;
}

/// Regenerate the password: the new one is shown once and works, the old one is refused, and neither is on any
/// page afterwards.
async fn regenerate(c: &Client, s: &TestServer, conn: &str, old: (&str, &str)) {
    click_confirmed(c, &format!("/connections/{conn}/regenerate")).await;
    let (_, password, http_url) = one_time_credentials(c).await;
    assert_ne!(password, old.0);
    let small = format!("http://{}/", rig::http_target(1000).await);
    assert_eq!(
        rig::curl_status(old.1, &small).await,
        "407",
        "the old password is refused"
    );
    assert_eq!(
        rig::curl_status(&http_url, &small).await,
        "200",
        "the new password works"
    );
    for path in [format!("/connections/{conn}"), "/connections".to_owned()] {
        c.goto(&s.url(&path)).await.unwrap();
        let page = c.source().await.unwrap();
        assert!(
            !page.contains(&password) && !page.contains(old.0),
            "no password on {path}"
        );
    }
}

/// Run one step of the walk-through and print how long it took.
async fn timed<T>(step: &str, f: impl std::future::Future<Output = T>) -> T {
    let t = std::time::Instant::now();
    let out = f.await;
    println!("step {step}: {:.1} s", t.elapsed().as_secs_f64());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_the_fleet_from_the_browser() {
    let Some(s) = TestServer::start(rig::opts()).await else {
        return;
    };
    s.create_operator("admin", ADMIN_PASSWORD, Role::Admin)
        .await;
    let Some((_driver, c)) = browser::start().await else {
        return;
    };
    let (events, receiver) = rig::receiver().await;
    timed("log_in", log_in(&c, &s)).await;
    let hook = format!("http://{receiver}/hook");
    let secret = timed("set_webhook", set_webhook(&c, &s, &hook)).await;
    let (device, agent, _state) = timed("add_device", devices::add(&c, &s)).await;
    timed("manage_device", devices::manage(&c, &s, &device)).await;
    let (conn, password, http_url) =
        timed("create_connection", create_connection(&c, &s, &device)).await;
    timed("exhaust", exhaust(&c, &s, &conn, &http_url)).await;
    timed("reset_and_edit", reset_and_edit(&c, &s, &conn)).await;
    timed(
        "regenerate",
        regenerate(&c, &s, &conn, (&password, &http_url)),
    )
    .await;
    timed(
        "webhook_deliveries",
        webhook_deliveries(&c, &s, &events, &secret),
    )
    .await;
    timed("account", account(&c, &s)).await;
    timed("measure", measure(&c, &s)).await;
    timed("remove_device", devices::remove(&c, &s, &device)).await;
    agent.cancel();
    c.close().await.unwrap();
}

/// Whether `secret` signed a delivery (checked by the Standard Webhooks crate).
fn signed_with(secret: &str, d: &rig::Delivery) -> bool {
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    wh.verify(d.body.as_bytes(), &d.headers).is_ok()
}

/// The quota events were signed with the secret the page showed; "Rotate secret" shows a new one that signs
/// "Send Test" (whose status and latency the page shows); the delivery log has the events and "Resend" delivers
/// one again.
async fn webhook_deliveries(c: &Client, s: &TestServer, events: &rig::Events, secret: &str) {
    let count = |kind: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.kind == kind)
            .count()
    };
    let last = |kind: &str, key: &str| {
        let got = events.lock().unwrap();
        signed_with(key, got.iter().rev().find(|d| d.kind == kind).unwrap())
    };
    until(15, "the exhausted event", || async {
        count("connection.exhausted") == 1
    })
    .await;
    assert!(
        last("connection.exhausted", secret),
        "signed with the secret shown"
    );
    c.goto(&s.url("/webhook")).await.unwrap();
    click_confirmed(c, "/webhook/rotate").await;
    until(10, "the new secret", || async {
        c.find(Locator::Css("#wh-secret")).await.is_ok()
    })
    .await;
    let rotated = value(c, "#wh-secret").await;
    assert_ne!(rotated, secret);
    click(c, "form[action=\"/webhook/test\"] button").await;
    until(10, "the test result", || async {
        text(c, "#wh-test-note")
            .await
            .starts_with("Receiver answered HTTP 200 in")
    })
    .await;
    assert_eq!(count("device.test"), 1);
    assert!(last("device.test", &rotated), "signed with the new secret");
    assert!(
        !last("device.test", secret),
        "the old secret no longer signs"
    );
    let row = "//tr[td/code[text()='connection.exhausted']]";
    // The attempt's own result, and the event's state after its attempts.
    let cell = |n: u32| {
        let xpath = format!("{row}/td[{n}]");
        async move {
            c.find(Locator::XPath(&xpath))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(cell(3).await, "accepted\nevent delivered");
    c.find(Locator::XPath(&format!("{row}//button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(10, "the resend note", || async {
        text(c, "#wh-deliveries-note")
            .await
            .starts_with("Queued for delivery again")
    })
    .await;
    until(15, "the event to arrive again", || async {
        count("connection.exhausted") == 2
    })
    .await;
    shot(c, "webhook").await;
}

/// The account page lists the sessions; revoking one ends it. The layout holds at 768 px.
async fn account(c: &Client, s: &TestServer) {
    let other = s.login("admin", ADMIN_PASSWORD).await;
    c.goto(&s.url("/account")).await.unwrap();
    let rows = c.find_all(Locator::Css("tr[data-session]")).await.unwrap();
    assert_eq!(rows.len(), 2);
    let api_row = "//tr[td[text()='proxyfleet-tests/1']]";
    let id = c
        .find(Locator::XPath(api_row))
        .await
        .unwrap()
        .attr("data-session")
        .await
        .unwrap()
        .unwrap();
    assert!(
        c.source().await.unwrap().contains("HeadlessChrome"),
        "the browser's session is listed"
    );
    click_confirmed(c, &format!("/account/sessions/{id}/revoke")).await;
    until(10, "the revoked session to go", || async {
        c.find_all(Locator::Css("tr[data-session]"))
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    assert_eq!(
        s.get("/api/v1.0/devices", &other).await.status(),
        401,
        "the revoked session ended"
    );
    shot(c, "account").await;
    c.set_window_size(768, 900).await.unwrap();
    for path in ["/connections", "/devices", "/webhook", "/account"] {
        c.goto(&s.url(path)).await.unwrap();
        // Neither the page nor a table inside it needs sideways scrolling.
        let wide = "return document.documentElement.scrollWidth > window.innerWidth
            || [...document.querySelectorAll('.scroll')].some(e => e.scrollWidth > e.clientWidth)";
        assert_eq!(
            c.execute(wide, vec![]).await.unwrap(),
            json!(false),
            "no sideways scrolling on {path} at 768 px"
        );
        shot(c, &format!("{}-768px", &path[1..])).await;
    }
    c.set_window_size(1024, 900).await.unwrap();
}

/// Page weight of the connections page and time to first render on loopback, printed for the report.
async fn measure(c: &Client, s: &TestServer) {
    c.goto(&s.url("/connections")).await.unwrap();
    // The paint entry is recorded shortly after the load.
    until(5, "the first paint", || async {
        let painted = "return performance.getEntriesByName('first-contentful-paint').length > 0";
        c.execute(painted, vec![]).await.unwrap() == json!(true)
    })
    .await;
    let t = c
        .execute(
            "const n = performance.getEntriesByType('navigation')[0];
             const p = performance.getEntriesByName('first-contentful-paint')[0];
             return {ttfb_ms: n.responseStart - n.startTime, dom_ready_ms: n.domContentLoadedEventEnd - n.startTime,
                     first_paint_ms: p ? p.startTime : null, html_bytes: n.decodedBodySize};",
            vec![],
        )
        .await
        .unwrap();
    let get = |p: &str| s.http.get(s.url(p)).send();
    let js = get("/dashboard/app.js")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    let css = get("/dashboard/app.css")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    // The tab icon the pages link is served (no 404 for a missing favicon on every page).
    let icon = get("/dashboard/icon.svg").await.unwrap();
    assert_eq!(icon.status(), 200);
    assert_eq!(icon.headers()["content-type"], "image/svg+xml");
    assert!(icon.text().await.unwrap().starts_with("<svg"));
    let html = usize::try_from(t["html_bytes"].as_u64().unwrap()).unwrap();
    println!(
        "connections page: HTML {html} B + CSS {css} B + JS {js} B = {} B; {t}",
        html + css + js
    );
    assert!(html + css + js < 100_000, "the page stays small");
}
