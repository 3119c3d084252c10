//! The device endpoint: enrollment and tunnels with mutual TLS, over QUIC (quinn, UDP) and, as a fallback for
//! networks that block UDP, TLS over TCP with a yamux stream multiplexer on the same port number.
//!
//! Both transports serve both ALPNs: `proxyfleet-enroll/1` (no client certificate; pairing code + CSR in, signed
//! certificate out) and `proxyfleet-tunnel/1` (the device's client certificate is required and looked up by its
//! SHA-256 fingerprint; revoked or unknown certificates are refused). Past the handshake everything goes through
//! the [`link::Link`] trait, so nothing else knows which transport a device uses.

pub mod link;
pub mod pairing;
mod quic;
pub mod registry;
mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::control::{ControlFrame, HeartbeatAck, HelloAck, Refusal, RefusalCode};
use proxyfleet_proto::enroll::{
    EnrollRequest, EnrollResponse, ALPN_ENROLL, ALPN_TUNNEL, MAX_ENROLL_FRAME,
};
use proxyfleet_proto::{codec::frame, FrameCodec, MAX_CONTROL_FRAME, PROTOCOL_VERSION};
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::pki::{fingerprint, hex, Pki};
use crate::store::Store;
use link::{BoxRead, BoxWrite, Link};
pub use registry::{LiveDevice, Registry};

/// A request for a device's control loop.
pub enum DeviceCommand {
    /// Run the device's IP rotation command; the outcome comes back on `reply`.
    RotateIp {
        reply: tokio::sync::oneshot::Sender<RotateOutcome>,
    },
}

#[derive(Debug, Clone)]
pub struct RotateOutcome {
    pub ok: bool,
    pub message: String,
}

/// Every handshake step (QUIC handshake, first stream, hello, enrollment request) must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes (QUIC application codes; over TCP the same reason travels as a `Refused` frame first).
pub mod close {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const UNKNOWN_DEVICE: u32 = 2;
    pub const REVOKED: u32 = 3;
    pub const REPLACED: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
    pub const VERSION: u32 = 6;
    /// The device's operator is disabled: the agent retries with its backoff (agents of earlier releases treat
    /// an unknown code the same way) and is back once the operator is enabled.
    pub const SUSPENDED: u32 = 7;
}

/// What the agent is told while its operator is disabled (as `RefusalCode::Shutdown`, "reconnect later", which every
/// agent release understands).
const SUSPENDED_WHY: &str =
    "the operator's account is disabled; retrying until it is enabled again";

#[derive(Clone)]
pub struct TunnelContext {
    /// Serve QUIC (UDP). Off only to exercise or force the TCP fallback.
    pub quic: bool,
    pub store: Store,
    pub pki: Arc<Pki>,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    pub heartbeat_interval: Duration,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// Bind the QUIC endpoint and serve it until `ctx.cancel`.
/// Bind the tunnel listeners (UDP for QUIC unless disabled, TCP for the fallback, same port number) and serve
/// them until `ctx.cancel`. Returns the bound address.
pub async fn start(addr: SocketAddr, ctx: TunnelContext) -> anyhow::Result<SocketAddr> {
    let tls = tls_config(&ctx.pki)?;
    if !ctx.quic {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the tunnel listener on TCP {addr}"))?;
        return tcp::start(tcp, tls, ctx);
    }
    let (udp, tcp) = bind_pair(addr).await?;
    let local = quic::start(udp, tls.clone(), ctx.clone())?;
    tcp::start(tcp, tls, ctx)?;
    Ok(local)
}

/// Bind UDP and TCP on the same port number. With port 0 the system picks a free UDP port whose TCP twin may be
/// taken; try a few picks before giving up.
async fn bind_pair(
    addr: SocketAddr,
) -> anyhow::Result<(std::net::UdpSocket, tokio::net::TcpListener)> {
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = std::net::UdpSocket::bind(addr)
            .with_context(|| format!("binding the tunnel listener on UDP {addr}"))?;
        let port = udp.local_addr()?.port();
        match tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("no attempt made"));
    Err(anyhow::Error::new(e).context(format!("binding the tunnel listener on TCP {addr}")))
}

/// The TLS configuration both transports share: TLS 1.3, the platform's server certificate, device certificates
/// verified against the platform CA (optional at this layer so enrollment can connect without one).
fn tls_config(pki: &Pki) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key())?;
    tls.alpn_protocols = vec![ALPN_TUNNEL.to_vec(), ALPN_ENROLL.to_vec()];
    Ok(Arc::new(tls))
}

/// A connection past its TLS handshake, from either transport.
pub(crate) struct Handshaken {
    pub link: Arc<dyn Link>,
    pub alpn: Option<Vec<u8>>,
    pub peer_cert: Option<CertificateDer<'static>>,
}

pub(crate) async fn serve_link(conn: Handshaken, ctx: TunnelContext) {
    let remote = conn.link.peer();
    let result = match conn.alpn.as_deref() {
        Some(ALPN_ENROLL) => enroll(&*conn.link, &ctx).await,
        Some(ALPN_TUNNEL) => tunnel(conn.link.clone(), conn.peer_cert, &ctx).await,
        _ => Err(anyhow::anyhow!("no known ALPN")),
    };
    if let Err(e) = result {
        if e.is::<ClosedBeforeStream>() {
            tracing::debug!(%remote, transport = conn.link.transport(), "{e}");
            return;
        }
        // Whose fault: the device's (bad frames, bad certificate) unless the store failed.
        tracing::debug!(%remote, transport = conn.link.transport(), error = %format!("{e:#}"), source = "device",
            "tunnel connection ended");
        conn.link.close(close::PROTOCOL_ERROR, b"protocol error");
    }
}

/// The agent hung up without opening a stream: what its QUIC probes do on success, and what the losing transport
/// of its connection race does. Not a device fault.
#[derive(Debug, thiserror::Error)]
#[error("connection closed before its first stream (an agent's QUIC probe, or the attempt that lost its race)")]
struct ClosedBeforeStream;

async fn accept_first_stream(link: &dyn Link) -> anyhow::Result<(BoxRead, BoxWrite)> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, link.accept_stream()).await {
        Err(_) => anyhow::bail!("no stream opened in time"),
        Ok(Ok(halves)) => Ok(halves),
        Ok(Err(_)) => Err(ClosedBeforeStream.into()),
    }
}

async fn enroll(link: &dyn Link, ctx: &TunnelContext) -> anyhow::Result<()> {
    let (recv, mut send) = accept_first_stream(link).await?;
    let mut reader = FramedRead::new(recv, FrameCodec::<EnrollRequest>::new(MAX_ENROLL_FRAME));
    let req = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
        .await?
        .context("stream ended before the enrollment request")??;
    let resp = answer_enrollment(&req, ctx).await?;
    send.write_all(&frame(&resp)).await?;
    send.shutdown().await?;
    // Let the agent read the answer and close; do not hold the connection longer than a handshake.
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, link.closed()).await;
    link.close(0, b"done");
    Ok(())
}

async fn answer_enrollment(
    req: &EnrollRequest,
    ctx: &TunnelContext,
) -> anyhow::Result<EnrollResponse> {
    let refuse = |m: &str| {
        Ok(EnrollResponse::Refused {
            message: m.to_owned(),
        })
    };
    if req.protocol_version != PROTOCOL_VERSION {
        return refuse(&format!(
            "this server speaks protocol version {PROTOCOL_VERSION}, the agent {}; install a matching agent",
            req.protocol_version
        ));
    }
    let now = ctx.clock.now_ms();
    let hash = pairing::secret_hash(&req.code);
    let Some(device) = ctx.store.device_by_pairing_code(&hash, now).await? else {
        return refuse(
            "pairing code is invalid, already used or expired; create a new one in the dashboard",
        );
    };
    let cert = match ctx.pki.issue_device_cert(&req.csr_der, &device.id) {
        Ok(c) => c,
        Err(_) => return refuse("the certificate signing request is invalid"),
    };
    if !ctx
        .store
        .complete_enrollment(&device.id, &hash, &hex(&fingerprint(&cert)), now)
        .await?
    {
        return refuse(
            "pairing code is invalid, already used or expired; create a new one in the dashboard",
        );
    }
    tracing::info!(device = %device.id, "device enrolled");
    Ok(EnrollResponse::Enrolled {
        device_id: device.id,
        cert_der: cert.to_vec(),
        ca_der: ctx.pki.ca_der.to_vec(),
    })
}

type ControlReader = FramedRead<BoxRead, FrameCodec<ControlFrame>>;
type ControlWriter = FramedWrite<BoxWrite, FrameCodec<ControlFrame>>;

/// Tell the agent why, on the control stream (the only channel TCP has), give it a moment to hang up, then
/// close the link.
async fn refuse(
    link: &dyn Link,
    writer: &mut ControlWriter,
    code: RefusalCode,
    close_code: u32,
    message: &'static str,
) {
    let frame = ControlFrame::Refused(Refusal {
        code,
        message: message.to_owned(),
    });
    let told = tokio::time::timeout(Duration::from_secs(1), async {
        writer.send(frame).await?;
        writer.get_mut().shutdown().await?;
        Ok::<(), proxyfleet_proto::codec::CodecError>(())
    })
    .await;
    if matches!(told, Ok(Ok(()))) {
        let _ = tokio::time::timeout(Duration::from_millis(500), link.closed()).await;
    }
    link.close(close_code, message.as_bytes());
}

async fn tunnel(
    link: Arc<dyn Link>,
    cert: Option<CertificateDer<'static>>,
    ctx: &TunnelContext,
) -> anyhow::Result<()> {
    let (recv, send) = accept_first_stream(&*link).await?;
    let mut reader = FramedRead::new(recv, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    let mut writer = FramedWrite::new(send, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    let fp = cert.as_ref().map(|c| hex(&fingerprint(c)));
    let device = match standing(&ctx.store, fp.as_deref()).await? {
        Standing::Valid(d) => d,
        Standing::Suspended => {
            refuse(
                &*link,
                &mut writer,
                RefusalCode::Shutdown,
                close::SUSPENDED,
                SUSPENDED_WHY,
            )
            .await;
            return Ok(());
        }
        Standing::Revoked => {
            refuse(
                &*link,
                &mut writer,
                RefusalCode::Revoked,
                close::REVOKED,
                "device revoked or unknown",
            )
            .await;
            return Ok(());
        }
    };
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await? {
        Some(Ok(ControlFrame::Hello(h))) => h,
        Some(Ok(_)) => anyhow::bail!("expected a hello"),
        Some(Err(e)) => return Err(e.into()),
        None => return Ok(()), // a probe: the agent checks that this transport works, then leaves
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        refuse(&*link, &mut writer, RefusalCode::VersionMismatch, close::VERSION,
            "this server speaks another protocol version; install the agent that matches the server").await;
        return Ok(());
    }
    let public_ip = link.peer().ip().to_canonical().to_string();
    let session = ctx.registry.new_session_id();
    let kick = ctx.cancel.child_token();
    let ended = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (commands, mut command_rx) = tokio::sync::mpsc::channel(8);
    ctx.registry.register(
        &device.id,
        LiveDevice {
            session,
            operator_id: device.operator_id.clone(),
            link: link.clone(),
            agent_version: hello.agent_version.clone(),
            capabilities: hello.capabilities,
            connected_since: ctx.clock.now_ms(),
            last_heartbeat: None,
            public_ip: public_ip.clone(),
            metrics: Default::default(),
            kick: kick.clone(),
            ended: ended.clone(),
            commands,
        },
    );
    // A revoke or delete that ran between the certificate check and this registration found nothing to kick;
    // look again now that the session is visible to it.
    match standing(&ctx.store, fp.as_deref()).await? {
        Standing::Valid(_) => {}
        Standing::Suspended => {
            ctx.registry.suspend(&device.id);
        }
        Standing::Revoked => {
            ctx.registry.kick(&device.id);
        }
    }
    tracing::info!(device = %device.id, %public_ip, transport = link.transport(), agent = %hello.agent_version, "device online");
    writer
        .send(ControlFrame::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_secs: u32::try_from(ctx.heartbeat_interval.as_secs()).unwrap_or(30),
            public_ip,
        }))
        .await?;
    let mut io = ControlIo {
        reader: &mut reader,
        writer: &mut writer,
        commands: &mut command_rx,
    };
    let result = control_loop(&*link, ctx, &device.id, session, (&kick, &ended), &mut io).await;
    if result.is_ok() {
        // However it ended (the agent hung up its control stream, or was told why it must go), the session is
        // over: the tunnel goes with it, not when the agent gets round to closing it.
        link.close(0, b"session ended");
    }
    if ctx.registry.unregister(&device.id, session) {
        tracing::info!(device = %device.id, "device offline");
    } else {
        // A reconnect replaced this session first: the device is online through the new one.
        tracing::debug!(device = %device.id, "a replaced device session ended");
    }
    result
}

/// Where a device certificate stands now.
enum Standing {
    Valid(crate::store::DeviceRow),
    /// Its operator is disabled: refused, but told to retry.
    Suspended,
    /// Revoked, deleted, or never enrolled: refused for good.
    Revoked,
}

/// Look the certificate (its SHA-256 fingerprint, hex) up. An operator enabled between the lookups makes the
/// device valid again rather than revoked: a revoked agent stops for good, so doubt never reads as revoked.
async fn standing(store: &Store, fp: Option<&str>) -> anyhow::Result<Standing> {
    let Some(fp) = fp else {
        return Ok(Standing::Revoked);
    };
    if let Some(d) = store.device_by_fingerprint(fp).await? {
        return Ok(Standing::Valid(d));
    }
    if store.device_suspended(fp).await? {
        return Ok(Standing::Suspended);
    }
    Ok(match store.device_by_fingerprint(fp).await? {
        Some(d) => Standing::Valid(d),
        None => Standing::Revoked,
    })
}

/// Longest a control-stream write may wait on the agent (one that stops reading is cut off).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn send(writer: &mut ControlWriter, frame: ControlFrame) -> anyhow::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, writer.send(frame))
        .await
        .context("agent stopped reading its control stream")??;
    Ok(())
}

struct ControlIo<'a> {
    reader: &'a mut ControlReader,
    writer: &'a mut ControlWriter,
    commands: &'a mut tokio::sync::mpsc::Receiver<DeviceCommand>,
}

async fn control_loop(
    link: &dyn Link,
    ctx: &TunnelContext,
    device_id: &str,
    session: u64,
    (kick, ended): (&CancellationToken, &std::sync::atomic::AtomicU32),
    io: &mut ControlIo<'_>,
) -> anyhow::Result<()> {
    let mut pending: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<RotateOutcome>> =
        Default::default();
    let mut next_request = 0u64;
    loop {
        let next = tokio::select! {
            // Frames the agent sent before it hung up are read before its hang-up is noticed (the result of a
            // rotation over TCP arrives just before the agent makes its tunnel again).
            biased;
            _ = kick.cancelled() => {
                // The registry recorded why before it cancelled; anything else (the server's own shutdown) is
                // "reconnect later", never a revocation by default.
                let (code, close_code, why) = match ended.load(std::sync::atomic::Ordering::SeqCst) {
                    close::REVOKED => (RefusalCode::Revoked, close::REVOKED, "device revoked"),
                    close::REPLACED => (RefusalCode::Replaced, close::REPLACED, "replaced by a newer session"),
                    close::SUSPENDED => (RefusalCode::Shutdown, close::SUSPENDED, SUSPENDED_WHY),
                    _ => (RefusalCode::Shutdown, close::SHUTDOWN, "server shutting down"),
                };
                refuse(link, io.writer, code, close_code, why).await;
                return Ok(());
            }
            f = io.reader.next() => f,
            Some(cmd) = io.commands.recv() => {
                let DeviceCommand::RotateIp { reply } = cmd;
                next_request += 1;
                pending.retain(|_, r| !r.is_closed());
                pending.insert(next_request, reply);
                send(io.writer, ControlFrame::RotateIp { request_id: next_request }).await?;
                continue;
            }
            _ = link.closed() => return Ok(()),
        };
        match next {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(ControlFrame::Heartbeat(hb))) => {
                let ip = link.peer().ip().to_canonical().to_string();
                ctx.registry
                    .heartbeat(device_id, session, ctx.clock.now_ms(), hb.metrics, &ip);
                send(
                    io.writer,
                    ControlFrame::HeartbeatAck(HeartbeatAck { public_ip: ip }),
                )
                .await?;
            }
            Some(Ok(ControlFrame::RotateIpResult {
                request_id,
                ok,
                message,
            })) => {
                if let Some(reply) = pending.remove(&request_id) {
                    let _ = reply.send(RotateOutcome { ok, message });
                }
            }
            Some(Ok(other)) => anyhow::bail!("unexpected frame from agent: {other:?}"),
        }
    }
}

/// Every `interval`: write the devices seen since the last flush to the store in one transaction.
pub async fn flush_seen(
    store: Store,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let seen = registry.take_seen(clock.now_ms());
        if let Err(e) = store.record_seen(&seen).await {
            tracing::warn!(error = ?e, devices = seen.len(), "persisting last-seen times failed");
        }
        if stop {
            break;
        }
    }
}
