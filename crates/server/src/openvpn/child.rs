//! The `openvpn` child: its server configuration (written by proxyfleet, never edited by hand) and the supervisor
//! that runs it, restarts it with backoff when it dies, and stops it at shutdown.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use crate::config::OpenVpnSettings;

/// Name of the tun device OpenVPN serves customers on (created by proxyfleet, persistent while it runs).
pub const VPN_DEV: &str = "pfvpn0";
/// First restart delay; doubles up to [`MAX_BACKOFF`], back to this after [`STABLE`] of running.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE: Duration = Duration::from_secs(60);
/// After SIGTERM, how long OpenVPN gets to tell clients (explicit-exit-notify) before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Paths of the door's runtime files.
pub struct Paths {
    pub config: PathBuf,
    pub mgmt: PathBuf,
    pub pid: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            config: dir.join("server.conf"),
            mgmt: dir.join("mgmt.sock"),
            pid: dir.join("openvpn.pid"),
        }
    }
}

/// The server's address in the clients' IPv6 subnet (unique local, /64). Clients never carry IPv6 through the
/// door: the subnet exists so that `redirect-gateway ipv6` routes the client's IPv6 into the tunnel, where
/// `block-ipv6` answers it "no route" on the client itself. Without it a dual-stack client's IPv6 left through
/// its own network, around the VPN. Should a client send IPv6 anyway, the door's nftables rules drop it (they
/// cover both families).
pub const SERVER_IPV6: &str = "fd70:7066:7670::1";

/// A customer's IPv6 address: its IPv4 address in the low 32 bits of the subnet, so it is as unique as that.
pub fn client_ipv6(v4: std::net::Ipv4Addr) -> String {
    let o = v4.octets();
    let v6 = std::net::Ipv6Addr::new(
        0xfd70,
        0x7066,
        0x7670,
        0,
        0,
        0,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    );
    format!("{v6}/64")
}

/// The OpenVPN server configuration.
pub fn server_config(s: &OpenVpnSettings, keys: &Keys, paths: &Paths, ipv6: bool) -> String {
    let net = s.subnet.network();
    let mask = s.subnet.netmask();
    let ka = s.keepalive.as_secs();
    let proto = if s.proto == "tcp" {
        "tcp-server"
    } else {
        "udp"
    };
    let mut c = format!(
        "# Written by proxyfleet at every start; changes are overwritten.\n\
         local {ip}\n\
         port {port}\n\
         proto {proto}\n\
         dev {VPN_DEV}\n\
         dev-type tun\n\
         topology subnet\n\
         server {net} {mask} nopool\n\
         verify-client-cert none\n\
         username-as-common-name\n\
         duplicate-cn\n\
         management {mgmt} unix\n\
         management-client-auth\n\
         management-hold\n\
         writepid {pid}\n\
         ca {ca}\n\
         cert {cert}\n\
         key {key}\n\
         dh none\n\
         tls-crypt {tc}\n\
         tls-version-min 1.2\n\
         data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\n\
         {v6}\
         push \"block-ipv6\"\n\
         push \"dhcp-option DNS {dns}\"\n\
         keepalive {ka} {restart}\n\
         hand-window 30\n\
         txqueuelen 1000\n\
         verb 3\n\
         suppress-timestamps\n",
        ip = s.listen.ip(),
        port = s.listen.port(),
        mgmt = paths.mgmt.display(),
        pid = paths.pid.display(),
        ca = keys.ca_path().display(),
        cert = keys.cert_path().display(),
        key = keys.key_path().display(),
        tc = keys.tls_crypt_path().display(),
        dns = s.dns,
        restart = ka * 3,
        v6 = if ipv6 {
            format!("ifconfig-ipv6 {SERVER_IPV6}/64 {SERVER_IPV6}\npush \"redirect-gateway def1 ipv6\"\n")
        } else {
            "push \"redirect-gateway def1\"\n".to_owned()
        },
    );
    if s.proto == "udp" {
        c.push_str("explicit-exit-notify 1\n");
    }
    c
}

/// Whether the `openvpn` program can be run, and its version line.
pub async fn probe(binary: &Path) -> Result<String, String> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").to_owned();
    if first.starts_with("OpenVPN ") {
        Ok(first)
    } else {
        Err(format!("{} does not look like OpenVPN", binary.display()))
    }
}

/// Kill an `openvpn` a previous run of proxyfleet left behind (it holds the port and the management socket).
pub async fn kill_stale(pid_file: &Path) {
    let Ok(text) = tokio::fs::read_to_string(pid_file).await else {
        return;
    };
    let pid = text.trim();
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return;
    }
    let comm = tokio::fs::read_to_string(format!("/proc/{pid}/comm"))
        .await
        .unwrap_or_default();
    if comm.trim() == "openvpn" {
        tracing::warn!(pid, "stopping an openvpn left over from an earlier run");
        signal(pid, "KILL").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = tokio::fs::remove_file(pid_file).await;
}

async fn signal(pid: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

fn spawn(binary: &Path, config: &Path) -> std::io::Result<Child> {
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // OpenVPN's own log goes to ours (it never logs passwords: they go to the management interface only).
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_log(BufReader::new(out)));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_log(BufReader::new(err)));
    }
    Ok(child)
}

async fn forward_log<R: tokio::io::AsyncRead + Unpin>(r: BufReader<R>) {
    let mut lines = r.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(target: "openvpn", "{line}");
    }
}

/// Run OpenVPN until `cancel`, restarting it with backoff whenever it exits. `pid` is updated with the child's
/// process id (0 while none runs) so that tests and the status page can see restarts.
pub async fn supervise(
    binary: PathBuf,
    config: PathBuf,
    cancel: CancellationToken,
    pid: tokio::sync::watch::Sender<u32>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let mut child = match spawn(&binary, &config) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot start openvpn; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let id = child.id().unwrap_or(0);
        pid.send_replace(id);
        tracing::info!(pid = id, "openvpn started");
        let status = tokio::select! {
            s = child.wait() => s,
            _ = cancel.cancelled() => {
                stop(&mut child).await;
                pid.send_replace(0);
                return;
            }
        };
        pid.send_replace(0);
        if started.elapsed() >= STABLE {
            backoff = MIN_BACKOFF;
        }
        tracing::error!(status = ?status.ok(), "openvpn exited; restarting in {backoff:?}");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// SIGTERM (OpenVPN tells its clients it is going), then SIGKILL after the grace.
async fn stop(child: &mut Child) {
    if let Some(id) = child.id() {
        signal(&id.to_string(), "TERM").await;
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            tracing::info!("openvpn stopped");
            return;
        }
    }
    let _ = child.kill().await;
    tracing::warn!("openvpn did not stop in time; killed");
}
