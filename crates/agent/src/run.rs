//! `proxyfleet-agent run`: hold the tunnel (QUIC, or TLS over TCP when UDP is blocked), send heartbeats, open
//! connections on request; reconnect with capped exponential backoff and jitter, reset after a stable period.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::control::{caps, ControlFrame, Heartbeat, Hello, RefusalCode};
use proxyfleet_proto::{FrameCodec, MAX_CONTROL_FRAME, PROTOCOL_VERSION};
use quinn::ConnectionError;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::conn::{self, Conn};
use crate::policy::TargetPolicy;
use crate::state::StateDir;
use crate::tls;

/// Application close codes the server uses (see the server's `tunnel::close`).
const CLOSE_UNKNOWN: u32 = 2;
const CLOSE_REVOKED: u32 = 3;
const CLOSE_REPLACED: u32 = 4;
const CLOSE_VERSION: u32 = 6;

/// Every handshake step must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff bounds between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A session that was up this long resets the backoff: it worked, so the next attempt is not a retry of a
/// failure. Shorter sessions (a server that takes the device and drops it at once) keep doubling it.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The wait before the next connection attempt, before jitter.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_MIN)
    }
}

impl Backoff {
    /// Start over if a session was up for [`STABLE_AFTER`] (also when it ended without a wait: moved elsewhere).
    pub fn settled(&mut self, up: Option<Duration>) {
        if up.is_some_and(|u| u >= STABLE_AFTER) {
            self.0 = BACKOFF_MIN;
        }
    }

    /// The wait after an attempt whose tunnel was up for `up` (`None`: it never came up), and the next one doubled.
    pub fn after(&mut self, up: Option<Duration>) -> Duration {
        self.settled(up);
        let wait = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where battery information lives (`/sys/class/power_supply`).
    pub power_supply_dir: PathBuf,
    /// Notified when the device's network changed (SIGHUP in the binary): the agent moves its UDP socket to a
    /// fresh one and QUIC migrates the tunnel, open flows included, to the new address.
    pub rebind: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Shell command that rotates the device's public IP (for example a modem reconnect through `mmcli`), run
    /// when the operator asks. Its last line of output is reported back.
    pub rotate_command: Option<String>,
    /// While on the TCP fallback, how often to check whether QUIC works again (then the agent moves to it).
    pub quic_retry: Duration,
    /// Let flows reach loopback, private, link-local and other non-public addresses (the device's own LAN).
    /// Off by default: customers get the public internet only.
    pub allow_private_targets: bool,
    /// The resolver that answers VPN customers' DNS lookups; `None`: the device's own (`resolv.conf`).
    pub dns_server: Option<std::net::SocketAddr>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            power_supply_dir: PathBuf::from("/sys/class/power_supply"),
            rebind: None,
            rotate_command: None,
            quic_retry: Duration::from_secs(300),
            allow_private_targets: false,
            dns_server: None,
        }
    }
}

/// The server refuses this device or agent for good (revoked, deleted, replaced, wrong version): the binary exits
/// with status 3, which its systemd unit does not restart.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// How a tunnel session ended.
#[derive(Debug)]
pub enum SessionEnd {
    Cancelled,
    /// The server will not take this device again; retrying is pointless.
    Refused(String),
    /// QUIC works again after a TCP fallback: reconnect at once.
    UpgradeToQuic,
    /// A TCP tunnel's path is gone (the device lost the address it was made from, or rotated its public IP):
    /// reconnect at once, from the device's network as it is now.
    Moved(&'static str),
    /// Anything else: reconnect after a backoff.
    Lost(anyhow::Error),
}

/// Run until cancelled, or until the server refuses the device for good.
pub async fn run(
    state_dir: &Path,
    opts: RunOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    if opts.allow_private_targets {
        tracing::warn!(
            "private targets allowed: customers can reach this device's loopback and LAN"
        );
    }
    let mut backoff = Backoff::default();
    loop {
        let mut up: Option<Instant> = None;
        let end = try_run(state_dir, &opts, &cancel, &mut up).await;
        let lasted = up.map(|since| since.elapsed());
        match end {
            SessionEnd::Cancelled => return Ok(()),
            SessionEnd::Refused(why) => return Err(Refused(why).into()),
            SessionEnd::UpgradeToQuic => {
                backoff.settled(lasted);
                tracing::info!("UDP to the server works again; moving the tunnel to QUIC");
            }
            SessionEnd::Moved(why) => {
                // At once: customers should not wait out a backoff before their device is back (if UDP is still
                // blocked, TCP joins the race after `QUIC_HEAD_START`).
                tracing::info!("{why}; making the TCP tunnel again");
                backoff.settled(lasted);
            }
            SessionEnd::Lost(e) => {
                // Jitter keeps a fleet that lost the server at once from reconnecting in lockstep.
                let wait = backoff
                    .after(lasted)
                    .mul_f64(0.5 + rand::random::<f64>() * 0.5);
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "tunnel lost");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

fn classify(e: &ConnectionError) -> Option<String> {
    if let ConnectionError::ApplicationClosed(close) = e {
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        let code = u32::try_from(close.error_code.into_inner()).unwrap_or(0);
        return match code {
            CLOSE_UNKNOWN | CLOSE_REVOKED => {
                Some(format!("the server refused this device: {reason}"))
            }
            CLOSE_REPLACED => Some(replaced()),
            CLOSE_VERSION => Some(format!("the server refused this agent: {reason}")),
            _ => None,
        };
    }
    None
}

fn replaced() -> String {
    "another agent with this device's identity connected; this one stops".to_owned()
}

/// One tunnel session.
async fn try_run(
    state_dir: &Path,
    opts: &RunOptions,
    cancel: &CancellationToken,
    up: &mut Option<Instant>,
) -> SessionEnd {
    match session(state_dir, opts, cancel, up).await {
        Ok(end) => end,
        Err(e) => match e.downcast_ref::<ConnectionError>().and_then(classify) {
            Some(why) => SessionEnd::Refused(why),
            None => SessionEnd::Lost(e),
        },
    }
}

struct Identity {
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Identity {
    fn tls(&self) -> anyhow::Result<rustls::ClientConfig> {
        let key = PrivateKeyDer::from_pem_slice(&self.key).context("reading the device key")?;
        tls::tunnel_tls(self.ca.clone(), self.cert.clone(), key)
    }
}

/// One session forced onto the TCP transport (what a UDP outage leads to); for tests of the move back to QUIC.
pub async fn try_run_on_tcp(
    state_dir: &Path,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> SessionEnd {
    let run = async {
        let (state, id) = load(state_dir)?;
        let conn = conn::connect_tcp(&state.server, id.tls()?).await?;
        drive(conn, &id, &state, opts, cancel, &mut None).await
    };
    match run.await {
        Ok(end) => end,
        Err(e) => SessionEnd::Lost(e),
    }
}

fn load(state_dir: &Path) -> anyhow::Result<(crate::state::AgentState, Identity)> {
    let dir = StateDir::new(state_dir);
    let state = dir.load()?;
    let id = Identity {
        ca: CertificateDer::from(dir.read(&dir.ca())?),
        cert: CertificateDer::from(dir.read(&dir.cert())?),
        key: dir.read(&dir.key())?,
    };
    Ok((state, id))
}

async fn session(
    state_dir: &Path,
    opts: &RunOptions,
    cancel: &CancellationToken,
    up: &mut Option<Instant>,
) -> anyhow::Result<SessionEnd> {
    let (state, id) = load(state_dir)?;
    let conn = conn::connect(&state.server, || id.tls()).await?;
    drive(conn, &id, &state, opts, cancel, up).await
}

async fn drive(
    conn: Conn,
    id: &Identity,
    state: &crate::state::AgentState,
    opts: &RunOptions,
    cancel: &CancellationToken,
    up: &mut Option<Instant>,
) -> anyhow::Result<SessionEnd> {
    let result = drive_inner(&conn, id, state, opts, cancel, up).await;
    // However the failure surfaced (a write, a read, the close itself), the server's close reason says why.
    let result = match (result, conn.close_reason()) {
        (Err(_), Some(reason)) => Err(reason.into()),
        (result, _) => result,
    };
    // Hang up properly whatever happened (the server waits for it after a refusal).
    conn.close().await;
    result
}

async fn drive_inner(
    conn: &Conn,
    id: &Identity,
    state: &crate::state::AgentState,
    opts: &RunOptions,
    cancel: &CancellationToken,
    up: &mut Option<Instant>,
) -> anyhow::Result<SessionEnd> {
    let (recv, send) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(send, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    let mut reader = FramedRead::new(recv, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    writer
        .send(ControlFrame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: if opts.rotate_command.is_some() {
                caps::BASE | caps::ROTATE_IP
            } else {
                caps::BASE
            },
        }))
        .await?;
    let ack = tokio::select! {
        f = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()) => f.context("timed out waiting for the hello answer")?,
        e = conn.closed() => return Err(e),
    };
    let interval = match ack {
        Some(Ok(ControlFrame::HelloAck(a))) => {
            Duration::from_secs(u64::from(a.heartbeat_interval_secs.max(1)))
        }
        Some(Ok(ControlFrame::Refused(r))) => return Ok(refused(r.code, &r.message)),
        Some(Ok(other)) => anyhow::bail!("unexpected answer to hello: {other:?}"),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(conn.closed().await),
    };
    tracing::info!(device = %state.device_id, server = %state.server, transport = conn.transport(), "tunnel up");
    let started = Instant::now();
    let on_tcp = matches!(conn, Conn::Tcp { .. });
    *up = Some(started);
    let mut tick = tokio::time::interval(interval);
    // While on TCP, QUIC is probed soon (a session that landed here because the server was restarting, not because
    // UDP is blocked, moves back within seconds), then less and less often, down to once per `quic_retry`.
    let mut probes = 0;
    let quic_check = tokio::time::sleep(probe_delay(probes, opts.quic_retry));
    tokio::pin!(quic_check);
    // A probe runs beside the loop: its handshake may take the whole QUIC timeout, and heartbeats and new flows
    // must not wait for it.
    let mut probe: Option<AbortOnDropHandle<anyhow::Result<Conn>>> = None;
    // Streams the server opened that are still being served (flows, UDP associations, pings).
    let open_flows = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rebind = opts.rebind.clone();
    let policy = TargetPolicy {
        allow_private: opts.allow_private_targets,
        dns_server: opts.dns_server,
    };
    let (rotated_tx, mut rotated_rx) = tokio::sync::mpsc::channel::<(u64, bool, String)>(4);
    let mut rotating = false;
    // A TCP tunnel lives on the address it was made from (QUIC migrates instead).
    let address = conn.tcp_local_ip().map(crate::flow::addresses::lease);
    loop {
        let network_changed = async {
            match &rebind {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        let address_gone = async {
            match &address {
                Some(lease) => lease.gone().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = network_changed => {
                conn.rebind()?;
                if let Some(ip) = conn.tcp_local_ip() {
                    if !crate::flow::addresses::have(ip) {
                        return Ok(SessionEnd::Moved(LOST_ADDRESS));
                    }
                    tracing::info!(address = %ip, "network changed; the TCP tunnel's address is still this device's, keeping it");
                }
            }
            _ = address_gone => return Ok(SessionEnd::Moved(LOST_ADDRESS)),
            _ = &mut quic_check, if on_tcp && probe.is_none() => {
                let (server, tls) = (state.server.clone(), id.tls()?);
                probe = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    conn::connect_quic(&server, tls).await
                })));
            }
            probed = async { probe.as_mut().expect("guarded by is_some").await }, if probe.is_some() => {
                probe = None;
                // Only a completed QUIC handshake moves the tunnel; a failed probe leaves the TCP session alone.
                if let Ok(Ok(quic)) = probed {
                    if open_flows.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                        quic.close().await;
                        conn.close().await;
                        return Ok(SessionEnd::UpgradeToQuic);
                    }
                    // Moving would end the customers' open flows: wait for a moment without any, asking again
                    // soon (QUIC works) rather than after a longer wait.
                    tokio::spawn(async move { quic.close().await });
                    probes = 0;
                    quic_check.as_mut().reset(tokio::time::Instant::now() + probe_delay(probes, opts.quic_retry));
                    continue;
                }
                probes += 1;
                quic_check.as_mut().reset(tokio::time::Instant::now() + probe_delay(probes, opts.quic_retry));
            }
            Some((request_id, ok, message)) = rotated_rx.recv() => {
                rotating = false;
                if ok {
                    // The public address has (probably) changed: continue from a fresh socket so that the server
                    // sees the new path at once.
                    conn.rebind()?;
                }
                let sent = writer.send(ControlFrame::RotateIpResult { request_id, ok, message }).await;
                if ok && on_tcp {
                    // A TCP connection cannot move: its carrier's NAT mapping went with the old address. The
                    // new tunnel comes from the new one, and the server reads the new address from it. Ending
                    // the control stream first lets the server read the result (if the old path still carries
                    // it) and close the tunnel itself.
                    // The old path is often dead already: a failed write changes nothing here.
                    if sent.is_ok() {
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            let _ = writer.close().await;
                            conn.closed().await
                        })
                        .await;
                    }
                    return Ok(SessionEnd::Moved("the device rotated its IP"));
                }
                sent?;
            }
            _ = cancel.cancelled() => {
                conn.close().await;
                return Ok(SessionEnd::Cancelled);
            }
            e = conn.closed() => return Err(e),
            _ = tick.tick() => {
                let metrics = crate::metrics::collect(&opts.power_supply_dir).await;
                writer.send(ControlFrame::Heartbeat(Heartbeat { uptime_secs: started.elapsed().as_secs(), metrics })).await?;
            }
            f = reader.next() => match f {
                Some(Ok(ControlFrame::HeartbeatAck(_))) => {}
                Some(Ok(ControlFrame::Refused(r))) => return Ok(refused(r.code, &r.message)),
                Some(Ok(ControlFrame::RotateIp { request_id })) => match opts.rotate_command.clone() {
                    Some(_) if rotating => {
                        writer.send(ControlFrame::RotateIpResult {
                            request_id,
                            ok: false,
                            message: "a rotation is already running on this device".into(),
                        }).await?;
                    }
                    None => {
                        writer.send(ControlFrame::RotateIpResult {
                            request_id,
                            ok: false,
                            message: "no IP rotation command is configured on this device".into(),
                        }).await?;
                    }
                    Some(cmd) => {
                        // Run it beside the loop so heartbeats and flows carry on meanwhile.
                        rotating = true;
                        let tx = rotated_tx.clone();
                        tokio::spawn(async move {
                            let (ok, message) = run_rotation(&cmd).await;
                            let _ = tx.send((request_id, ok, message)).await;
                        });
                    }
                },
                Some(Ok(other)) => anyhow::bail!("unexpected frame from server: {other:?}"),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(conn.closed().await),
            },
            s = conn.accept_bi() => {
                let (recv, send) = s?;
                let open = FlowCount::new(&open_flows);
                tokio::spawn(async move {
                    let _open = open;
                    if let Err(e) = crate::flow::serve_flow(recv, send, policy).await {
                        tracing::debug!(error = %format!("{e:#}"), "flow ended with an error");
                    }
                });
            }
        }
    }
}

/// One stream being served, counted while it lives.
struct FlowCount(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl FlowCount {
    fn new(n: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        FlowCount(n.clone())
    }
}

impl Drop for FlowCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

const LOST_ADDRESS: &str = "the device no longer has the address the tunnel was made from";

/// The first QUIC probe of a session on the TCP fallback waits this long; each failed one doubles the wait.
const FIRST_QUIC_PROBE: Duration = Duration::from_secs(15);

/// How long after `failed` failed probes the next QUIC probe runs: [`FIRST_QUIC_PROBE`] doubled per failure,
/// at most `most` (the agent's `quic_retry`).
pub fn probe_delay(failed: u32, most: Duration) -> Duration {
    FIRST_QUIC_PROBE
        .saturating_mul(1u32.checked_shl(failed).unwrap_or(u32::MAX))
        .min(most)
}

/// What a `Refused` frame from the server means for this agent.
fn refused(code: RefusalCode, message: &str) -> SessionEnd {
    match code {
        RefusalCode::Revoked => {
            SessionEnd::Refused(format!("the server refused this device: {message}"))
        }
        RefusalCode::VersionMismatch => {
            SessionEnd::Refused(format!("the server refused this agent: {message}"))
        }
        RefusalCode::Replaced => SessionEnd::Refused(replaced()),
        RefusalCode::Shutdown | RefusalCode::Internal => {
            SessionEnd::Lost(anyhow::anyhow!("server: {message}"))
        }
    }
}

/// Longest a rotation command may run.
const ROTATE_TIMEOUT: Duration = Duration::from_secs(150);

/// Run the rotation command with `sh -c`; success is exit status 0; the message is its last line of output.
pub async fn run_rotation(cmd: &str) -> (bool, String) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(ROTATE_TIMEOUT, child).await {
        Err(_) => (
            false,
            format!(
                "rotation command timed out after {} s",
                ROTATE_TIMEOUT.as_secs()
            ),
        ),
        Ok(Err(e)) => (false, format!("rotation command could not start: {e}")),
        Ok(Ok(out)) => {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let last = text
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>();
            let message = match (out.status.success(), last.is_empty()) {
                (true, true) => "rotation command succeeded".to_owned(),
                (false, true) => format!("rotation command failed ({})", out.status),
                (_, false) => last,
            };
            (out.status.success(), message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attempts that fail double the wait up to a minute; a session that was up 10 s starts it over; one that
    /// dropped sooner counts as a failure (a server that takes the device and drops it at once is not hammered).
    #[test]
    fn the_backoff_doubles_on_failures_and_starts_over_after_a_working_session() {
        let mut b = Backoff::default();
        let s = |d: Duration| d.as_secs_f64();
        let failed: Vec<f64> = (0..9).map(|_| s(b.after(None))).collect();
        assert_eq!(failed, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]);
        assert_eq!(
            s(b.after(Some(Duration::from_secs(30)))),
            0.5,
            "a 30 s session worked"
        );
        assert_eq!(
            s(b.after(Some(Duration::from_secs(3)))),
            1.0,
            "a 3 s one did not"
        );
        assert_eq!(s(b.after(None)), 2.0);
        assert_eq!(s(b.after(Some(STABLE_AFTER))), 0.5);
    }

    #[test]
    fn quic_is_probed_soon_then_less_often_down_to_the_configured_interval() {
        let most = Duration::from_secs(300);
        let waits: Vec<u64> = (0..8).map(|n| probe_delay(n, most).as_secs()).collect();
        assert_eq!(waits, [15, 30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(probe_delay(u32::MAX, most), most, "no overflow");
        assert_eq!(
            probe_delay(0, Duration::from_millis(300)),
            Duration::from_millis(300),
            "a shorter interval applies from the first probe"
        );
    }
}
