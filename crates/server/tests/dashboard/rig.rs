//! What the dashboard tests drive besides the browser: the server's settings, a slow HTTP target, curl as the
//! proxy client, a webhook receiver and a real agent.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::{Db, Opts};

/// A server with the tunnel, both proxy doors, a 1 s usage flush and webhooks allowed to loopback.
pub fn opts() -> Opts {
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

/// An HTTP server answering every request with `len` bytes.
pub async fn http_target(len: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if crate::common::read_request_head(&mut s).await.is_none() {
                    return;
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
pub async fn curl_status(proxy: &str, url: &str) -> String {
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

/// One request a receiver got: the event's type, the headers and the body.
pub struct Delivery {
    pub kind: String,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

/// What a receiver got, in order.
pub type Events = std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>;

/// A webhook receiver on loopback that keeps every request.
pub async fn receiver() -> (Events, SocketAddr) {
    let got: Events = Events::default();
    let g = got.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
        let g = g.clone();
        async move {
            let v: Value = serde_json::from_str(&body).unwrap();
            let kind = v["type"].as_str().unwrap().to_owned();
            g.lock().unwrap().push(Delivery {
                kind,
                headers,
                body,
            });
            "ok"
        }
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (got, addr)
}

/// Run a real agent from `dir`, with a battery at 80 % and charging (a fake sysfs) and a rotation command that
/// succeeds without changing anything.
pub fn spawn_agent(dir: &std::path::Path) -> CancellationToken {
    let battery = dir.join("power/BAT0");
    std::fs::create_dir_all(&battery).unwrap();
    for (file, content) in [
        ("type", "Battery\n"),
        ("capacity", "80\n"),
        ("status", "Charging\n"),
    ] {
        std::fs::write(battery.join(file), content).unwrap();
    }
    let opts = proxyfleet_agent::RunOptions {
        power_supply_dir: dir.join("power"),
        rotate_command: Some("echo rotated".into()),
        ..crate::common::agent_options(dir)
    };
    crate::common::spawn_agent_opts(dir, opts).0
}
