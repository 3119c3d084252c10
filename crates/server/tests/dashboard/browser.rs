//! Headless Chromium over WebDriver: chromedriver on a free port, a fresh profile, and the few page helpers the
//! dashboard tests use (poll with a deadline, read, fill, click, confirm, screenshot).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::json;

use crate::common;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

pub fn screenshot_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running chromedriver (and its browser profile), stopped on drop.
pub struct Driver {
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
pub async fn start() -> Option<(Driver, Client)> {
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // chromedriver speaks plain HTTP on loopback: no TLS stack needed.
        let http = hyper_util::client::legacy::connect::HttpConnector::new();
        match fantoccini::ClientBuilder::new(http)
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
pub async fn until<F, Fut>(secs: u64, what: &str, mut check: F)
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

pub async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

pub async fn value(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

pub async fn fill(c: &Client, css: &str, v: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(v).await.unwrap();
}

pub async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Click a confirmation button (`form[action=…] button`), then "Confirm" in the dialog.
pub async fn click_confirmed(c: &Client, action: &str) {
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

pub async fn shot(c: &Client, name: &str) {
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    println!("screenshot: {}", path.display());
}
