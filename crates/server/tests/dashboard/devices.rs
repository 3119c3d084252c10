//! The devices part of the walk-through: add one and watch it come online with a real agent, rename it, rotate its
//! IP, revoke and delete it.

use fantoccini::{Client, Locator};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::browser::{click, click_confirmed, fill, shot, text, until, value};
use crate::common::TestServer;
use crate::rig;

/// Add a device in the browser, enroll a real agent with the code the page shows, and watch the device list
/// flip to online without a reload. Returns the device id, the agent's stop token and its state directory.
pub async fn add(c: &Client, s: &TestServer) -> (String, CancellationToken, tempfile::TempDir) {
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
    // The command shown is the one to run: this server's tunnel port and the code.
    let command = text(c, ".pairing pre").await;
    assert!(
        command.contains(&format!("--server {} --code {code} ", s.tunnel())),
        "{command}"
    );
    shot(c, "device-pairing").await;
    c.goto(&s.url("/devices")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&code),
        "the pairing code is shown once"
    );
    let row = c
        .find(Locator::Css("tr[data-live^=\"device:\"]"))
        .await
        .unwrap();
    let id = row.attr("data-live").await.unwrap().unwrap();
    let id = id.trim_start_matches("device:").to_owned();
    let cell = |f: &str| format!("tr[data-live=\"device:{id}\"] [data-f={f}]");
    assert_eq!(text(c, &cell("status")).await, "Waiting for enrollment");
    c.execute("window.__noReload = 1", vec![]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    proxyfleet_agent::enroll(&s.tunnel(), &code, dir.path())
        .await
        .unwrap();
    let agent = rig::spawn_agent(dir.path());
    until(20, "the device to show online", || async {
        text(c, &cell("status")).await == "Online"
    })
    .await;
    until(10, "the battery", || async {
        text(c, &cell("battery")).await == "80%, charging"
    })
    .await;
    assert_eq!(text(c, &cell("transport")).await, "QUIC");
    assert_eq!(text(c, &cell("ip")).await, "127.0.0.1");
    assert_ne!(text(c, &cell("heartbeat")).await, "—");
    let kept = c.execute("return window.__noReload", vec![]).await.unwrap();
    assert_eq!(kept, json!(1), "updated without a reload");
    shot(c, "devices").await;
    (id, agent, dir)
}

/// Rename the device and rotate its IP: the page shows the address before and after.
pub async fn manage(c: &Client, s: &TestServer, device: &str) {
    c.goto(&s.url(&format!("/devices/{device}"))).await.unwrap();
    fill(c, "#rename-name", "phone-A").await;
    click(
        c,
        &format!("form[action=\"/devices/{device}/rename\"] button"),
    )
    .await;
    until(10, "the new name", || async {
        text(c, "h1").await == "Device “phone-A”"
    })
    .await;
    click(
        c,
        &format!("form[action=\"/devices/{device}/rotate\"] button"),
    )
    .await;
    until(30, "the rotation result", || async {
        text(c, "#rotate-note").await
            == "IP before: 127.0.0.1, after: 127.0.0.1 — the address did not change."
    })
    .await;
    shot(c, "device-detail").await;
}

/// After the traffic the device's hourly chart has bars; revoke the device (its status says so), then delete it.
pub async fn remove(c: &Client, s: &TestServer, device: &str) {
    // The connection's traffic shows in the device's hourly chart.
    until(10, "the device's usage chart", || async {
        c.goto(&s.url(&format!("/devices/{device}"))).await.unwrap();
        c.find(Locator::Css("figure.chart rect")).await.is_ok()
    })
    .await;
    click_confirmed(c, &format!("/devices/{device}/revoke")).await;
    until(10, "the revoked state", || async {
        text(c, "[data-live] [data-f=status]").await == "Revoked"
    })
    .await;
    click_confirmed(c, &format!("/devices/{device}/delete")).await;
    until(10, "the device list", || async {
        c.current_url().await.unwrap().path() == "/devices"
    })
    .await;
    assert!(
        c.find(Locator::Css("tr[data-live]")).await.is_err(),
        "the device is gone"
    );
}
