//! `proxyfleet-agent run`: hold the tunnel, send heartbeats, open connections on request; reconnect with capped
//! exponential backoff and jitter, reset after a stable period.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::control::{caps, ControlFrame, Heartbeat, Hello};
use proxyfleet_proto::enroll::TUNNEL_SERVER_NAME;
use proxyfleet_proto::{
    Decode, FrameCodec, Host, OpenResult, StreamHeader, Target, MAX_CONTROL_FRAME,
    MAX_STREAM_HEADER, PROTOCOL_VERSION,
};
use quinn::{ConnectionError, RecvStream, SendStream};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::state::StateDir;
use crate::tls;

/// Application close codes the server uses (see the server's `tunnel::close`).
const CLOSE_UNKNOWN: u32 = 2;
const CLOSE_REVOKED: u32 = 3;
const CLOSE_REPLACED: u32 = 4;
const CLOSE_VERSION: u32 = 6;

/// Every handshake step must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a target (DNS + TCP) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff bounds between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A session that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            power_supply_dir: PathBuf::from("/sys/class/power_supply"),
            rebind: None,
            rotate_command: None,
        }
    }
}

/// How a tunnel session ended.
#[derive(Debug)]
pub enum SessionEnd {
    Cancelled,
    /// The server will not take this device again; retrying is pointless.
    Refused(String),
    /// Anything else: reconnect.
    Lost(anyhow::Error),
}

/// Run until cancelled, or until the server refuses the device for good.
pub async fn run(
    state_dir: &Path,
    opts: RunOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut delay = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match try_run(state_dir, &opts, &cancel).await {
            SessionEnd::Cancelled => return Ok(()),
            SessionEnd::Refused(why) => anyhow::bail!("{why}"),
            SessionEnd::Lost(e) => {
                if started.elapsed() >= STABLE_AFTER {
                    delay = BACKOFF_MIN;
                }
                // Full jitter keeps a fleet that lost the server at once from reconnecting in lockstep.
                let wait = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "tunnel lost");
                delay = (delay * 2).min(BACKOFF_MAX);
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
            CLOSE_REPLACED => {
                Some("another agent with this device's identity connected; this one stops".into())
            }
            CLOSE_VERSION => Some(format!("the server refused this agent: {reason}")),
            _ => None,
        };
    }
    None
}

/// One tunnel session.
pub async fn try_run(
    state_dir: &Path,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> SessionEnd {
    match session(state_dir, opts, cancel).await {
        Ok(end) => end,
        Err(e) => match e.downcast_ref::<ConnectionError>().and_then(classify) {
            Some(why) => SessionEnd::Refused(why),
            None => SessionEnd::Lost(e),
        },
    }
}

async fn session(
    state_dir: &Path,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let dir = StateDir::new(state_dir);
    let state = dir.load()?;
    let ca = CertificateDer::from(dir.read(&dir.ca())?);
    let cert = CertificateDer::from(dir.read(&dir.cert())?);
    let key =
        PrivateKeyDer::from_pem_slice(&dir.read(&dir.key())?).context("reading the device key")?;
    let (endpoint, addr) = tls::endpoint_for(&state.server).await?;
    let config = tls::quic_client(tls::tunnel_tls(ca, cert, key)?, Duration::from_secs(10))?;
    let conn = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        endpoint.connect_with(config, addr, TUNNEL_SERVER_NAME)?,
    )
    .await
    .context("timed out connecting")??;
    let result = drive(&conn, &endpoint, &state, opts, cancel).await;
    // However the failure surfaced (a write, a read, the close itself), the server's close reason says why.
    match (result, conn.close_reason()) {
        (Err(_), Some(reason)) => Err(reason.into()),
        (result, _) => result,
    }
}

async fn drive(
    conn: &quinn::Connection,
    endpoint: &quinn::Endpoint,
    state: &crate::state::AgentState,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(send, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    let mut reader = FramedRead::new(recv, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    writer
        .send(ControlFrame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: if opts.rotate_command.is_some() {
                caps::TCP | caps::ROTATE_IP
            } else {
                caps::TCP
            },
        }))
        .await?;
    let ack = tokio::select! {
        f = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()) => f.context("timed out waiting for the hello answer")?,
        e = conn.closed() => return Err(e.into()),
    };
    let interval = match ack {
        Some(Ok(ControlFrame::HelloAck(a))) => {
            Duration::from_secs(u64::from(a.heartbeat_interval_secs.max(1)))
        }
        Some(Ok(ControlFrame::Refused(r))) => {
            return Ok(SessionEnd::Refused(format!(
                "the server refused this agent: {}",
                r.message
            )))
        }
        Some(Ok(other)) => anyhow::bail!("unexpected answer to hello: {other:?}"),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(conn.closed().await.into()),
    };
    tracing::info!(device = %state.device_id, server = %state.server, "tunnel up (quic)");
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    let rebind = opts.rebind.clone();
    let (rotated_tx, mut rotated_rx) = tokio::sync::mpsc::channel::<(u64, bool, String)>(4);
    loop {
        let network_changed = async {
            match &rebind {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = network_changed => move_socket(endpoint)?,
            Some((request_id, ok, message)) = rotated_rx.recv() => {
                if ok {
                    // The public address has (probably) changed: continue from a fresh socket so that the server
                    // sees the new path at once.
                    move_socket(endpoint)?;
                }
                writer.send(ControlFrame::RotateIpResult { request_id, ok, message }).await?;
            }
            _ = cancel.cancelled() => {
                conn.close(0u32.into(), b"agent stopping");
                endpoint.wait_idle().await;
                return Ok(SessionEnd::Cancelled);
            }
            e = conn.closed() => return Err(e.into()),
            _ = tick.tick() => {
                let metrics = crate::metrics::collect(&opts.power_supply_dir).await;
                writer.send(ControlFrame::Heartbeat(Heartbeat { uptime_secs: started.elapsed().as_secs(), metrics })).await?;
            }
            f = reader.next() => match f {
                Some(Ok(ControlFrame::HeartbeatAck(_))) => {}
                Some(Ok(ControlFrame::RotateIp { request_id })) => match opts.rotate_command.clone() {
                    None => {
                        writer.send(ControlFrame::RotateIpResult {
                            request_id,
                            ok: false,
                            message: "no IP rotation command is configured on this device".into(),
                        }).await?;
                    }
                    Some(cmd) => {
                        // Run it beside the loop so heartbeats and flows carry on meanwhile.
                        let tx = rotated_tx.clone();
                        tokio::spawn(async move {
                            let (ok, message) = run_rotation(&cmd).await;
                            let _ = tx.send((request_id, ok, message)).await;
                        });
                    }
                },
                Some(Ok(other)) => anyhow::bail!("unexpected frame from server: {other:?}"),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(conn.closed().await.into()),
            },
            s = conn.accept_bi() => {
                let (send, recv) = s?;
                tokio::spawn(async move {
                    if let Err(e) = serve_flow(send, recv).await {
                        tracing::debug!(error = %format!("{e:#}"), "flow ended with an error");
                    }
                });
            }
        }
    }
}

fn move_socket(endpoint: &quinn::Endpoint) -> anyhow::Result<()> {
    let local = endpoint.local_addr()?;
    let fresh = std::net::UdpSocket::bind(std::net::SocketAddr::new(local.ip(), 0))?;
    endpoint.rebind(fresh)?;
    tracing::info!(old = %local, new = %endpoint.local_addr()?, "moved the tunnel to a new socket");
    Ok(())
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

/// A flow stream: read the header, connect from this device's network, answer, then copy bytes both ways.
async fn serve_flow(mut send: SendStream, mut recv: RecvStream) -> anyhow::Result<()> {
    let header = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_header(&mut recv))
        .await
        .context("header timeout")??;
    let Target::Tcp { host, port } = header.target else {
        send.write_all(&[OpenResult::NotAllowed as u8]).await?;
        send.finish()?;
        return Ok(());
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&host, port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(result)) => {
            send.write_all(&[result as u8]).await?;
            send.finish()?;
            return Ok(());
        }
        Err(_) => {
            send.write_all(&[OpenResult::Timeout as u8]).await?;
            send.finish()?;
            return Ok(());
        }
    };
    let _ = tcp.set_nodelay(true);
    send.write_all(&[OpenResult::Ok as u8]).await?;
    let (mut tr, mut tw) = tcp.into_split();
    let up = async {
        tokio::io::copy(&mut recv, &mut tw).await?;
        tw.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut tr, &mut send).await?;
        send.finish().map_err(std::io::Error::other)
    };
    let _ = tokio::try_join!(up, down);
    Ok(())
}

async fn read_header(recv: &mut RecvStream) -> anyhow::Result<StreamHeader> {
    let len = recv.read_u32().await? as usize;
    if len > MAX_STREAM_HEADER {
        anyhow::bail!("stream header of {len} bytes is too large");
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(StreamHeader::decode_exact(&body)?)
}

/// Resolve on the device (so DNS answers match its network) and connect.
async fn connect(host: &Host, port: u16) -> Result<tokio::net::TcpStream, OpenResult> {
    let addrs: Vec<std::net::SocketAddr> = match host {
        Host::V4(a) => vec![(*a, port).into()],
        Host::V6(a) => vec![(*a, port).into()],
        Host::Domain(d) => match tokio::net::lookup_host((d.as_str(), port)).await {
            Ok(a) => a.collect(),
            Err(_) => return Err(OpenResult::DnsFailure),
        },
    };
    if addrs.is_empty() {
        return Err(OpenResult::DnsFailure);
    }
    let mut last = OpenResult::Unreachable;
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = OpenResult::from_io(&e),
        }
    }
    Err(last)
}
