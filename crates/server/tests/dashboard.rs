//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver), against a real server
//! with a real agent, real proxy clients (curl) and a real webhook receiver. Plus plain-HTTP checks of the CSRF
//! protection and of escaping. Screenshots go to `<target>/dashboard-screenshots/`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, Opts, TestServer, ADMIN_PASSWORD};
use fantoccini::{Client, Locator};
use proxyfleet::store::Role;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

fn opts() -> Opts {
    let mut opts = Opts::new(Db::Sqlite);
    opts.raw.tunnel_listen = Some("127.0.0.1:0".parse().unwrap());
    opts.raw.tunnel_heartbeat_secs = Some(1);
    opts.raw.http_proxy_listen = Some("127.0.0.1:0".parse().unwrap());
    opts.raw.socks5_listen = Some("127.0.0.1:0".parse().unwrap());
    opts.raw.proxy_public_host = Some("127.0.0.1".into());
    opts.raw.usage_flush_secs = Some(1);
    // The test's webhook receiver listens on loopback.
    opts.raw.webhook_allow_private = Some(true);
    opts
}

fn screenshot_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start chromedriver and a headless Chromium session, or `None` (skipped) when they are not installed.
async fn browser() -> Option<(Driver, Client)> {
    for bin in [CHROMEDRIVER, CHROMIUM] {
        if !std::path::Path::new(bin).exists() {
            common::skip(&format!("{bin} not found (scripts/install-test-deps.sh installs chromium and chromium-driver)"));
            return None;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _profile: profile,
    };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": CHROMIUM, "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1024,900",
            format!("--user-data-dir={}", driver._profile.path().display()),
        ]}),
    );
    // fantoccini's TLS stack (unused on loopback HTTP) needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fantoccini::ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(c) => return Some((driver, c)),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "chromedriver never accepted a session: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Poll until `check` is true (or fail with `what` after `secs`).
async fn until<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn value(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

async fn fill(c: &Client, css: &str, v: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(v).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Click a confirmation button (`form[action=…] button`), then "Confirm" in the dialog.
async fn click_confirmed(c: &Client, action: &str) {
    click(c, &format!("form[action=\"{action}\"] button")).await;
    until(5, "the confirmation dialog", || async {
        c.execute("return document.getElementById('confirm').open", vec![])
            .await
            .unwrap()
            == json!(true)
    })
    .await;
    click(c, "#confirm-yes").await;
}

async fn shot(c: &Client, name: &str) {
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    println!("screenshot: {}", path.display());
}

/// An HTTP server answering every request with `len` bytes.
async fn http_target(len: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                // Slowly (about 300 kB/s) so that the page sees the bar move before the cut-off.
                for chunk in vec![b'x'; len].chunks(32 * 1024) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    addr
}

/// curl through `proxy` to `url`: the HTTP status (000 when none came).
async fn curl_status(proxy: &str, url: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
            "-x",
            proxy,
            url,
        ])
        .output()
        .await
        .expect("curl runs (scripts/install-test-deps.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A webhook receiver on loopback that keeps each event's type.
async fn receiver() -> (std::sync::Arc<std::sync::Mutex<Vec<String>>>, SocketAddr) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().fallback(move |body: String| {
        let g = g.clone();
        async move {
            let v: Value = serde_json::from_str(&body).unwrap();
            g.lock()
                .unwrap()
                .push(v["type"].as_str().unwrap().to_owned());
            "ok"
        }
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (got, addr)
}

fn spawn_agent(dir: &std::path::Path) -> CancellationToken {
    let cancel = CancellationToken::new();
    let opts = proxyfleet_agent::RunOptions {
        power_supply_dir: dir.join("none"),
        allow_private_targets: true,
        ..Default::default()
    };
    let (c, d) = (cancel.clone(), dir.to_owned());
    tokio::spawn(async move { proxyfleet_agent::run(&d, opts, c).await });
    cancel
}

/// Log in through the form: a wrong password is refused in plain words next to the form, then the right one works.
async fn log_in(c: &Client, s: &TestServer) {
    c.goto(&s.url("/connections")).await.unwrap();
    assert!(
        c.current_url().await.unwrap().path().ends_with("/login"),
        "not logged in: sent to the login page"
    );
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

/// Add a device in the browser, enroll a real agent with the code the page shows, and watch the device list
/// flip to online without a reload. Returns the device id and the agent's state directory.
async fn add_device(c: &Client, s: &TestServer) -> (String, CancellationToken, tempfile::TempDir) {
    c.goto(&s.url("/devices")).await.unwrap();
    fill(c, "#add-name", "phone-1").await;
    click(c, "form[action=\"/devices\"] button").await;
    until(10, "the pairing code", || async {
        c.find(Locator::Css("#pairing-code")).await.is_ok()
    })
    .await;
    let code = value(c, "#pairing-code").await;
    assert!(
        c.find(Locator::Css(".qr svg")).await.is_ok(),
        "the QR code is shown"
    );
    shot(c, "device-pairing").await;
    c.goto(&s.url("/devices")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&code),
        "the pairing code is shown only once"
    );
    let row = c
        .find(Locator::Css("tr[data-live^=\"device:\"]"))
        .await
        .unwrap();
    let id = row
        .attr("data-live")
        .await
        .unwrap()
        .unwrap()
        .trim_start_matches("device:")
        .to_owned();
    let status = format!("tr[data-live=\"device:{id}\"] [data-f=status]");
    assert_eq!(text(c, &status).await, "Waiting for enrollment");
    c.execute("window.__noReload = 1", vec![]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    proxyfleet_agent::enroll(&s.tunnel(), &code, dir.path())
        .await
        .unwrap();
    let agent = spawn_agent(dir.path());
    until(20, "the device to show online", || async {
        text(c, &status).await == "Online"
    })
    .await;
    assert_eq!(
        c.execute("return window.__noReload", vec![]).await.unwrap(),
        json!(1),
        "updated without reload"
    );
    let transport = text(
        c,
        &format!("tr[data-live=\"device:{id}\"] [data-f=transport]"),
    )
    .await;
    assert_eq!(transport, "QUIC");
    shot(c, "devices").await;
    (id, agent, dir)
}

/// The one-time credentials view: (username, password, HTTP proxy URL).
async fn one_time_credentials(c: &Client) -> (String, String, String) {
    until(10, "the one-time credentials", || async {
        c.find(Locator::Css("#once-password")).await.is_ok()
    })
    .await;
    let creds = (
        value(c, "#once-username").await,
        value(c, "#once-password").await,
        value(c, "#once-http").await,
    );
    assert_eq!(creds.1.len(), 24, "a generated password is shown");
    assert!(
        creds.2.contains(&creds.1),
        "the HTTP URL carries the credentials"
    );
    assert!(c.find(Locator::Css("#once-socks5")).await.is_ok());
    assert!(text(c, "#once-ovpn-off")
        .await
        .contains("OpenVPN door is off"));
    creds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_the_fleet_from_the_browser() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    s.create_operator("admin", ADMIN_PASSWORD, Role::Admin)
        .await;
    let Some((_driver, c)) = browser().await else {
        return;
    };
    log_in(&c, &s).await;
    let (device, agent, _state) = add_device(&c, &s).await;

    // A connection with a 1 MB limit: the password is shown once.
    c.goto(&s.url("/connections/new")).await.unwrap();
    fill(&c, "#f-name", "customer-1").await;
    c.find(Locator::Css("#f-device"))
        .await
        .unwrap()
        .select_by_value(&device)
        .await
        .unwrap();
    fill(&c, "#f-limit", "0").await;
    c.find(Locator::Css("#f-unit"))
        .await
        .unwrap()
        .select_by_value("MB")
        .await
        .unwrap();
    click(&c, "form.conn-form button[type=submit]").await;
    until(10, "the limit error", || async {
        text(&c, "#f-limit-note").await.contains("more than zero")
    })
    .await;
    fill(&c, "#f-limit", "1").await;
    click(&c, "form.conn-form button[type=submit]").await;
    let (user, password, http_url) = one_time_credentials(&c).await;
    shot(&c, "connection-credentials").await;

    // Away from the page, the password is gone.
    c.goto(&s.url("/connections")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&password),
        "the password is not shown again"
    );
    let card = c
        .find(Locator::Css("[data-live^=\"conn:\"]"))
        .await
        .unwrap();
    let conn = card
        .attr("data-live")
        .await
        .unwrap()
        .unwrap()
        .trim_start_matches("conn:")
        .to_owned();
    let meter = format!("[data-live=\"conn:{conn}\"]");
    assert_eq!(
        text(&c, &format!("{meter} [data-f=usage]")).await,
        "0 B / 1 MB"
    );

    // Traffic through the HTTP proxy: the bar moves and reaches "exhausted" live.
    c.execute("window.__noReload = 1", vec![]).await.unwrap();
    let target = http_target(3_000_000).await;
    let url = format!("http://{target}/");
    let pusher = tokio::spawn({
        let (p, u) = (http_url.clone(), url.clone());
        async move { curl_status(&p, &u).await }
    });
    let pct = format!("{meter} [data-f=pct]");
    until(20, "the bar to move", || async {
        let p = text(&c, &pct).await;
        !p.is_empty() && p != "0%" && p != "100%"
    })
    .await;
    until(20, "the exhausted state", || async {
        text(&c, &format!("{meter} [data-f=state]")).await == "Exhausted — limit reached"
    })
    .await;
    assert_eq!(text(&c, &pct).await, "100%");
    assert_eq!(
        text(&c, &format!("{meter} [data-f=usage]")).await,
        "1 MB / 1 MB"
    );
    assert_eq!(
        c.execute("return window.__noReload", vec![]).await.unwrap(),
        json!(1),
        "updated without reload"
    );
    shot(&c, "connections-exhausted").await;
    let _ = pusher.await;
    assert_eq!(
        curl_status(&http_url, &url).await,
        "403",
        "an exhausted connection refuses new flows"
    );

    // Reset usage, after confirming.
    c.goto(&s.url(&format!("/connections/{conn}")))
        .await
        .unwrap();
    click_confirmed(&c, &format!("/connections/{conn}/reset")).await;
    until(10, "the reset", || async {
        text(&c, "#actions-note").await == "Usage reset to zero."
    })
    .await;
    assert_eq!(text(&c, &format!("{meter} [data-f=state]")).await, "Active");
    assert_eq!(
        text(&c, &format!("{meter} [data-f=usage]")).await,
        "0 B / 1 MB"
    );
    shot(&c, "connection-detail").await;

    // Regenerate the password: the new one is shown once, the old one is refused.
    click_confirmed(&c, &format!("/connections/{conn}/regenerate")).await;
    let (user2, password2, http_url2) = one_time_credentials(&c).await;
    assert_eq!(user2, user);
    assert_ne!(password2, password);
    let small = format!("http://{}/", http_target(1000).await);
    assert_eq!(
        curl_status(&http_url, &small).await,
        "407",
        "the old password is refused"
    );
    assert_eq!(
        curl_status(&http_url2, &small).await,
        "200",
        "the new password works"
    );
    c.goto(&s.url(&format!("/connections/{conn}")))
        .await
        .unwrap();
    let page = c.source().await.unwrap();
    assert!(
        !page.contains(&password2) && !page.contains(&password),
        "no password after navigating away"
    );

    webhook(&c, &s).await;
    account(&c, &s).await;
    measure(&c, &s).await;
    agent.cancel();
    c.close().await.unwrap();
}

/// Set the webhook URL to a local receiver and "Send Test": the page shows its status and latency.
async fn webhook(c: &Client, s: &TestServer) {
    let (got, addr) = receiver().await;
    c.goto(&s.url("/webhook")).await.unwrap();
    fill(c, "#wh-url", "not a url").await;
    click(c, "form[action=\"/webhook\"] button").await;
    until(10, "the URL error", || async {
        !text(c, "#wh-url-note").await.is_empty()
    })
    .await;
    fill(c, "#wh-url", &format!("http://{addr}/hook")).await;
    click(c, "form[action=\"/webhook\"] button").await;
    until(10, "the signing secret", || async {
        c.find(Locator::Css("#wh-secret")).await.is_ok()
    })
    .await;
    let secret = value(c, "#wh-secret").await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    click(c, "form[action=\"/webhook/test\"] button").await;
    until(10, "the test result", || async {
        text(c, "#wh-test-note")
            .await
            .starts_with("Receiver answered HTTP 200 in")
    })
    .await;
    assert_eq!(got.lock().unwrap().as_slice(), ["device.test"]);
    assert!(
        !c.source().await.unwrap().contains(&secret),
        "the secret is shown once"
    );
    shot(c, "webhook").await;
}

/// The account page lists this browser's session.
async fn account(c: &Client, s: &TestServer) {
    c.goto(&s.url("/account")).await.unwrap();
    let rows = c.find_all(Locator::Css("tr[data-session]")).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(text(c, "td.ua").await.contains("HeadlessChrome"));
    shot(c, "account").await;
    c.set_window_size(768, 900).await.unwrap();
    c.goto(&s.url("/connections")).await.unwrap();
    let overflow = c
        .execute(
            "return document.documentElement.scrollWidth > window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(overflow, json!(false), "no horizontal scrolling at 768 px");
    shot(c, "connections-768px").await;
}

/// Page weight of the connections page and time to first render on loopback, printed for the report.
async fn measure(c: &Client, s: &TestServer) {
    c.set_window_size(1024, 900).await.unwrap();
    c.goto(&s.url("/connections")).await.unwrap();
    let t = c
        .execute(
            "const n = performance.getEntriesByType('navigation')[0];
             const p = performance.getEntriesByName('first-contentful-paint')[0];
             return {ttfb: n.responseStart - n.startTime, dom: n.domContentLoadedEventEnd - n.startTime,
                     fcp: p ? p.startTime : null, html: n.transferSize, body: n.decodedBodySize};",
            vec![],
        )
        .await
        .unwrap();
    let html = c.source().await.unwrap().len();
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
    println!(
        "connections page: HTML {html} B + CSS {css} B + JS {js} B = {} B; timing {t}",
        html + css + js
    );
    assert!(html + css + js < 100_000, "the page stays small");
}

/// The page's CSRF token, from its `<meta name="csrf-token">`.
fn csrf_of(page: &str) -> String {
    let i = page.find("name=\"csrf-token\" content=\"").unwrap() + 27;
    page[i..i + page[i..].find('"').unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_need_the_csrf_token_and_operator_text_is_escaped() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = format!("pf_session={token}");

    // Not logged in: pages send to the login form.
    let r = http.get(s.url("/connections")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");

    let r = s
        .post(
            "/api/v1.0/devices",
            &token,
            json!({"name": "<script>alert(1)</script>"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let device = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let page = http
        .get(s.url("/devices"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let page = page.text().await.unwrap();
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "operator text is escaped"
    );
    assert!(!page.contains("<script>alert"));
    let csrf = csrf_of(&page);

    let form =
        |extra: &str| format!("name=c1&device_id={device}&limit=1&unit=GB&enabled=on{extra}");
    let post = |body: String| {
        http.post(s.url("/connections"))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    for (what, body) in [
        ("no token", form("")),
        ("a wrong token", form("&_csrf=forged")),
        ("an empty token", form("&_csrf=")),
    ] {
        let r = post(body).await.unwrap();
        assert_eq!(r.status(), 403, "a form post with {what} is refused");
    }
    // Another session's token does not work either.
    let other = csrf_of(
        &http
            .get(s.url("/devices"))
            .header(
                "cookie",
                format!("pf_session={}", s.login("admin", ADMIN_PASSWORD).await),
            )
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_ne!(other, csrf);
    assert_eq!(
        post(form(&format!("&_csrf={other}")))
            .await
            .unwrap()
            .status(),
        403
    );
    let list: Value = s
        .get("/api/v1.0/connections", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list, json!([]), "nothing was created");

    // Logout without the token does not end the session.
    let r = http
        .post(s.url("/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(s.get("/api/v1.0/connections", &token).await.status(), 200);

    // With the token (form field or header) it goes through.
    let r = post(form(&format!("&_csrf={csrf}"))).await.unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.text().await.unwrap().contains("id=\"once-password\""));
    let r = http
        .post(s.url("/logout"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        s.get("/api/v1.0/connections", &token).await.status(),
        401,
        "logout ended the session"
    );

    // The login form has its own token, bound to a cookie set with the form.
    let r = http
        .post(s.url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username=admin&password={ADMIN_PASSWORD}&_csrf=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http.get(s.url("/login")).send().await.unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && !set.contains("Secure"),
        "{set}"
    );
    let nonce = set
        .trim_start_matches("pf_login=")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = http
        .post(s.url("/login"))
        .header("cookie", format!("pf_login={nonce}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "username=admin&password={ADMIN_PASSWORD}&_csrf={nonce}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert!(set.iter().any(|c| c.starts_with("pf_session=")
        && c.contains("HttpOnly")
        && c.contains("SameSite=Strict")));
}
