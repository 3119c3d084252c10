//! The management-interface client: proxyfleet's side of `management-client-auth`. It answers every CONNECT and
//! REAUTH (bcrypt off the runtime, with the proxies' verified-credential cache), keeps the session table, kills a
//! session the moment its connection must stop (cut-off, disable, delete, device change or revocation, new
//! password, a newer login), and after reconnecting to the socket rebuilds its table from `status 3`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use proxyfleet_proto::openvpn_mgmt::{self as mgmt, ClientKind, Env, Event, Parser, MAX_LINE};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;

use super::sessions::{Session, Sessions};
use crate::proxy::directory::{AuthFailure, Entry, Refusal};
use crate::proxy::ProxyContext;

/// Commands waiting to be written to the socket.
const COMMAND_QUEUE: usize = 1024;
/// How often to try the socket while OpenVPN is (re)starting.
const RETRY: Duration = Duration::from_millis(200);

/// What the manager needs.
pub struct Manager {
    pub ctx: Arc<ProxyContext>,
    pub sessions: Arc<Sessions>,
    pub socket: PathBuf,
    pub netmask: Ipv4Addr,
    /// Whether the door routes clients' IPv6 into the tunnel (to refuse it there); off where the host has no IPv6.
    pub ipv6: bool,
    /// Cancelled by [`Manager::reconnect`] to drop the current socket connection (tests and operators' tooling).
    pub drop_socket: std::sync::Mutex<CancellationToken>,
    /// The live connection's command queue, for kills decided outside its loop.
    pub kills: std::sync::Mutex<Option<mpsc::Sender<String>>>,
}

impl Manager {
    /// Drop the management connection; the manager reconnects and resyncs at once.
    pub fn reconnect(&self) {
        if let Ok(t) = self.drop_socket.lock() {
            t.cancel();
        }
    }

    fn fresh_drop_token(&self) -> CancellationToken {
        let t = CancellationToken::new();
        if let Ok(mut g) = self.drop_socket.lock() {
            *g = t.clone();
        }
        t
    }
}

/// Keep a management connection until shutdown, reconnecting whenever it drops.
pub async fn run(m: Arc<Manager>) {
    let shutdown = m.ctx.shutdown.clone();
    loop {
        let stream = tokio::select! {
            s = UnixStream::connect(&m.socket) => s,
            _ = shutdown.cancelled() => return,
        };
        match stream {
            Ok(s) => {
                tracing::info!("connected to the OpenVPN management interface");
                let dropped = m.fresh_drop_token();
                if let Err(e) = session(&m, s, dropped).await {
                    tracing::warn!(error = %e, "OpenVPN management connection ended");
                }
            }
            Err(e) => tracing::trace!(error = %e, "OpenVPN management socket not ready"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    m: &Arc<Manager>,
    stream: UnixStream,
    dropped: CancellationToken,
) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE));
    let (tx, mut rx) = mpsc::channel::<String>(COMMAND_QUEUE);
    if let Ok(mut k) = m.kills.lock() {
        *k = Some(tx.clone());
    }
    let writer = async move {
        while let Some(cmd) = rx.recv().await {
            w.write_all(cmd.as_bytes()).await?;
        }
        anyhow::Ok(())
    };
    tokio::pin!(writer);
    // Sessions may have come and gone while nobody listened: ask (OpenVPN on hold answers after `hold release`).
    let _ = tx.send("status 3\n".to_owned()).await;
    let mut parser = Parser::new();
    let mut status: Option<Vec<String>> = Some(Vec::new());
    loop {
        let line = tokio::select! {
            l = lines.next() => l,
            r = &mut writer => return r,
            _ = dropped.cancelled() => return Ok(()),
            _ = m.ctx.shutdown.cancelled() => return Ok(()),
        };
        let line = match line {
            Some(Ok(l)) => l,
            Some(Err(e)) => {
                // An over-long line: the codec skips it; the connection carries on.
                tracing::warn!(error = %e, "unreadable OpenVPN management line");
                continue;
            }
            None => anyhow::bail!("OpenVPN closed the management socket"),
        };
        let event = match parser.feed(&line) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "malformed OpenVPN management line");
                continue;
            }
        };
        match event {
            Event::Hold => {
                let _ = tx.send("hold release\nstatus 3\n".to_owned()).await;
                status = Some(Vec::new());
            }
            Event::Data(l) => {
                if let Some(lines) = status.as_mut() {
                    lines.push(l);
                }
            }
            Event::End => {
                if let Some(lines) = status.take() {
                    resync(m, &lines, &tx).await;
                }
            }
            Event::Error(e) => {
                if e.contains("'status'") {
                    status = None;
                }
                tracing::debug!(reply = %e, "OpenVPN management command failed");
            }
            Event::Client {
                kind,
                cid,
                kid,
                env,
            } => client(m, kind, cid, kid, env, &tx),
            Event::Success(_)
            | Event::Info(_)
            | Event::Address { .. }
            | Event::Notification { .. } => {}
        }
    }
}

fn client(
    m: &Arc<Manager>,
    kind: ClientKind,
    cid: u64,
    kid: Option<u64>,
    env: Env,
    tx: &mpsc::Sender<String>,
) {
    match (kind, kid) {
        (ClientKind::Connect | ClientKind::Reauth, Some(kid)) => {
            let (m, tx) = (m.clone(), tx.clone());
            // bcrypt may take a while: answer off the reading loop, so other clients are not kept waiting.
            m.ctx.tracker.clone().spawn(async move {
                let cmd = authorize(&m, kind, cid, kid, &env).await;
                let _ = tx.send(cmd).await;
            });
        }
        (ClientKind::Established, _) => {
            if let Some(s) = m.sessions.get(cid) {
                tracing::info!(connection = %s.entry.id, cid, ip = %s.ip, "VPN session established");
            }
        }
        (ClientKind::Disconnect, _) => {
            if let Some(s) = m.sessions.remove(cid) {
                tracing::info!(connection = %s.entry.id, cid, "VPN session ended");
            }
        }
        _ => {}
    }
}

/// Why a login is denied, as the customer reads it (`AUTH_FAILED,<reason>`).
fn deny_reason(r: Refusal) -> &'static str {
    match r {
        // A deleted connection's username is simply unknown now.
        Refusal::Deleted => "invalid credentials",
        r => r.reason(),
    }
}

/// Decide a CONNECT or REAUTH and return the command that answers it.
async fn authorize(m: &Arc<Manager>, kind: ClientKind, cid: u64, kid: u64, env: &Env) -> String {
    let username = env.get("username").unwrap_or("");
    let password = env.get("password").unwrap_or("");
    let client: IpAddr = env
        .get("untrusted_ip")
        .and_then(|s| s.parse().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    match admit(m, username, password, client).await {
        Ok((entry, ip)) => {
            if kind == ClientKind::Reauth && m.sessions.get(cid).is_some() {
                return mgmt::client_auth_nt(cid, kid);
            }
            let ended = CancellationToken::new();
            let s = Session {
                cid,
                entry: entry.clone(),
                ip,
                ended: ended.clone(),
            };
            // The older session is told to stop (HALT: its client exits instead of reconnecting and fighting the
            // newer one) in the same write that admits the newer. OpenVPN runs with `duplicate-cn` so that it does
            // not drop the older instance itself first, silently, before the HALT has gone out.
            let mut cmd = String::new();
            if let Some(old) = m.sessions.insert(s) {
                tracing::info!(connection = %entry.id, old = old.cid, new = cid, "a newer VPN login replaces a session");
                cmd.push_str(&mgmt::client_kill(old.cid));
            }
            watch(m, &entry, cid, ended);
            tracing::info!(connection = %entry.id, cid, %ip, "VPN login accepted");
            cmd.push_str(&mgmt::client_auth(cid, kid, &client_config(m, ip)));
            cmd
        }
        Err(reason) => {
            if kind == ClientKind::Reauth {
                m.sessions.remove(cid);
            }
            // The username the client sent (not a secret; it names the connection being tried), bounded and
            // quoted so that it cannot forge log lines.
            let user: String = username.chars().take(64).collect();
            tracing::info!(cid, username = ?user, reason, "VPN login denied");
            mgmt::client_deny(cid, kid, reason)
        }
    }
}

async fn admit(
    m: &Manager,
    username: &str,
    password: &str,
    client: IpAddr,
) -> Result<(Arc<Entry>, Ipv4Addr), &'static str> {
    let entry = match m.ctx.dir.authenticate(username, password, client).await {
        Ok(e) => e,
        Err(AuthFailure::Invalid) => return Err("invalid credentials"),
        Err(AuthFailure::Limited(_)) => return Err("too many failed logins; try again later"),
        Err(AuthFailure::Unavailable) => return Err("server busy; try again"),
    };
    let adm = entry.admit().map_err(deny_reason)?;
    if !device_online(m, &entry, &adm.device_id) {
        return Err("device offline");
    }
    match m.sessions.address(&entry.id).await {
        Ok(Some(ip)) => Ok((entry, ip)),
        Ok(None) => Err("no VPN address left on this server"),
        Err(e) => {
            tracing::error!(error = %e, "cannot assign a VPN address");
            Err("server busy; try again")
        }
    }
}

/// The per-client lines of an admitted login: its IPv4 address and, when the door routes IPv6, its IPv6 one.
fn client_config(m: &Manager, ip: Ipv4Addr) -> Vec<String> {
    let mut lines = vec![format!("ifconfig-push {ip} {}", m.netmask)];
    if m.ipv6 {
        lines.push(format!(
            "ifconfig-ipv6-push {} {}",
            super::child::client_ipv6(ip),
            super::child::SERVER_IPV6
        ));
    }
    lines
}

/// Whether the connection's device is connected now (and still the operator's).
fn device_online(m: &Manager, entry: &Entry, device_id: &str) -> bool {
    m.ctx
        .registry
        .get(device_id)
        .is_some_and(|l| l.operator_id == entry.operator_id)
}

impl Manager {
    /// Queue a `client-kill` on whatever connection is current (the socket may have been replaced meanwhile).
    fn kill_later(self: &Arc<Self>, cid: u64) {
        let m = self.clone();
        self.ctx
            .tracker
            .spawn(async move { m.kill(cid, false).await });
    }

    /// End a session: HALT (the client exits), or with `again` RESTART (it logs in anew).
    async fn kill(&self, cid: u64, again: bool) {
        // OpenVPN takes one management client at a time: the kill goes through the live connection's queue.
        let tx = self.kills.lock().ok().and_then(|g| g.clone());
        if let Some(tx) = tx {
            let cmd = if again {
                mgmt::client_restart(cid)
            } else {
                mgmt::client_kill(cid)
            };
            let _ = tx.send(cmd).await;
        }
    }
}

/// End the session when its connection must stop or its password changes.
fn watch(m: &Arc<Manager>, entry: &Arc<Entry>, cid: u64, ended: CancellationToken) {
    let stop = match entry.admit() {
        Ok(a) => a.stop,
        Err(_) => {
            m.sessions.remove(cid);
            m.kill_later(cid);
            return;
        }
    };
    let credential = entry.credential_token();
    let (m, entry) = (m.clone(), entry.clone());
    let shutdown = m.ctx.shutdown.clone();
    m.ctx.tracker.clone().spawn(async move {
        let stopped = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ended.cancelled() => return,
            _ = stop.cancelled() => true,
            _ = credential.cancelled() => false,
        };
        // Flows stopped, but a login now would be admitted: the connection moved to another device, which is
        // online. The client is told to log in again (and lands there) rather than to quit. A cut-off, a
        // disable, a new password or a device that is gone halts it: logging in again could only fail.
        let again = stopped
            && entry
                .admit()
                .is_ok_and(|a| device_online(&m, &entry, &a.device_id));
        if let Some(s) = m.sessions.remove(cid) {
            tracing::info!(connection = %s.entry.id, cid, again, "VPN session killed: the connection stopped");
        }
        m.kill(cid, again).await;
    });
}

/// Rebuild the session table from `status 3` after (re)connecting: clients OpenVPN still has are kept if their
/// connection may still be used, and killed otherwise; sessions OpenVPN no longer has are forgotten.
async fn resync(m: &Arc<Manager>, lines: &[String], tx: &mpsc::Sender<String>) {
    let listed: Vec<mgmt::StatusClient> = lines
        .iter()
        .filter_map(|l| mgmt::status_client(l))
        .collect();
    for s in m.sessions.all() {
        if !listed.iter().any(|c| c.cid == s.cid) {
            m.sessions.remove(s.cid);
        }
    }
    for c in listed {
        if m.sessions.get(c.cid).is_some() {
            continue;
        }
        let entry = m.ctx.dir.by_username(&c.common_name);
        let ip: Option<Ipv4Addr> = c.virtual_address.parse().ok();
        match (entry, ip) {
            (Some(entry), Some(ip)) if entry.admit().is_ok() => {
                let ended = CancellationToken::new();
                m.sessions.insert(Session {
                    cid: c.cid,
                    entry: entry.clone(),
                    ip,
                    ended: ended.clone(),
                });
                watch(m, &entry, c.cid, ended);
                tracing::info!(connection = %entry.id, cid = c.cid, "VPN session taken over after reconnecting");
            }
            _ => {
                let _ = tx.send(mgmt::client_kill(c.cid)).await;
            }
        }
    }
}
