//! The device endpoint: enrollment and tunnels over QUIC (quinn) with mutual TLS.
//!
//! One UDP port serves both ALPNs: `proxyfleet-enroll/1` (no client certificate; pairing code + CSR in, signed
//! certificate out) and `proxyfleet-tunnel/1` (the device's client certificate is required and looked up by its
//! SHA-256 fingerprint; revoked or unknown certificates are refused).

pub mod link;
pub mod pairing;
pub mod registry;

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
use quinn::{Connection, Endpoint};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::pki::{fingerprint, hex, Pki};
use crate::store::Store;
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

/// QUIC application close codes, so the agent can tell why it was closed.
pub mod close {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const UNKNOWN_DEVICE: u32 = 2;
    pub const REVOKED: u32 = 3;
    pub const REPLACED: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
    pub const VERSION: u32 = 6;
}

#[derive(Clone)]
pub struct TunnelContext {
    pub store: Store,
    pub pki: Arc<Pki>,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    pub heartbeat_interval: Duration,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// Bind the QUIC endpoint and serve it until `ctx.cancel`.
pub fn start(addr: SocketAddr, ctx: TunnelContext) -> anyhow::Result<SocketAddr> {
    let endpoint = Endpoint::server(server_config(&ctx.pki)?, addr)
        .with_context(|| format!("binding the tunnel listener on UDP {addr}"))?;
    let local = endpoint.local_addr()?;
    let tracker = ctx.tracker.clone();
    tracker.spawn(accept_loop(endpoint, ctx));
    Ok(local)
}

fn server_config(pki: &Pki) -> anyhow::Result<quinn::ServerConfig> {
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
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn accept_loop(endpoint: Endpoint, ctx: TunnelContext) {
    loop {
        let incoming = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => serve_connection(conn, ctx2).await,
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "tunnel handshake failed"),
                Err(_) => tracing::debug!(%remote, "tunnel handshake timed out"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"server shutting down");
    endpoint.wait_idle().await;
}

fn alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn serve_connection(conn: Connection, ctx: TunnelContext) {
    let remote = conn.remote_address();
    let result = match alpn(&conn).as_deref() {
        Some(ALPN_ENROLL) => enroll(&conn, &ctx).await,
        Some(ALPN_TUNNEL) => tunnel(&conn, &ctx).await,
        _ => Err(anyhow::anyhow!("no known ALPN")),
    };
    if let Err(e) = result {
        // Whose fault: the device's (bad frames, bad certificate) unless the store failed.
        tracing::info!(%remote, error = %format!("{e:#}"), source = "device", "tunnel connection ended");
        conn.close(close::PROTOCOL_ERROR.into(), b"protocol error");
    }
}

async fn enroll(conn: &Connection, ctx: &TunnelContext) -> anyhow::Result<()> {
    let (mut send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await??;
    let mut reader = FramedRead::new(recv, FrameCodec::<EnrollRequest>::new(MAX_ENROLL_FRAME));
    let req = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
        .await?
        .context("stream ended before the enrollment request")??;
    let resp = answer_enrollment(&req, ctx).await?;
    send.write_all(&frame(&resp)).await?;
    send.finish()?;
    // Let the agent read the answer and close; do not hold the connection longer than a handshake.
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.closed()).await;
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

async fn tunnel(conn: &Connection, ctx: &TunnelContext) -> anyhow::Result<()> {
    let certs = conn.peer_identity().and_then(|id| {
        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let Some(cert) = certs.as_ref().and_then(|c| c.first()) else {
        conn.close(
            close::UNKNOWN_DEVICE.into(),
            b"a device certificate is required",
        );
        return Ok(());
    };
    let Some(device) = ctx
        .store
        .device_by_fingerprint(&hex(&fingerprint(cert)))
        .await?
    else {
        conn.close(close::REVOKED.into(), b"device revoked or unknown");
        return Ok(());
    };
    let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await??;
    let mut reader = FramedRead::new(recv, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    let mut writer = FramedWrite::new(send, FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME));
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await? {
        Some(Ok(ControlFrame::Hello(h))) => h,
        Some(Ok(_)) => anyhow::bail!("expected a hello"),
        Some(Err(e)) => return Err(e.into()),
        None => anyhow::bail!("control stream ended before the hello"),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let message = format!(
            "this server speaks protocol version {PROTOCOL_VERSION}, the agent {}; install a matching agent",
            hello.protocol_version
        );
        writer
            .send(ControlFrame::Refused(Refusal {
                code: RefusalCode::VersionMismatch,
                message,
            }))
            .await?;
        let _ = writer.get_mut().finish();
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.close(close::VERSION.into(), b"protocol version mismatch");
        return Ok(());
    }
    let public_ip = conn.remote_address().ip().to_canonical().to_string();
    let session = ctx.registry.new_session_id();
    let kick = ctx.cancel.child_token();
    let (commands, mut command_rx) = tokio::sync::mpsc::channel(8);
    ctx.registry.register(
        &device.id,
        LiveDevice {
            session,
            operator_id: device.operator_id.clone(),
            link: Arc::new(link::QuicLink(conn.clone())),
            agent_version: hello.agent_version.clone(),
            connected_since: ctx.clock.now_ms(),
            last_heartbeat: None,
            public_ip: public_ip.clone(),
            metrics: Default::default(),
            kick: kick.clone(),
            commands,
        },
    );
    tracing::info!(device = %device.id, %public_ip, agent = %hello.agent_version, "device online");
    writer
        .send(ControlFrame::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_secs: u32::try_from(ctx.heartbeat_interval.as_secs()).unwrap_or(30),
            public_ip: public_ip.clone(),
        }))
        .await?;
    let mut io = ControlIo {
        reader: &mut reader,
        writer: &mut writer,
        commands: &mut command_rx,
    };
    let result = control_loop(conn, ctx, &device.id, session, &kick, &mut io).await;
    ctx.registry.unregister(&device.id, session);
    tracing::info!(device = %device.id, "device offline");
    result
}

type ControlReader = FramedRead<quinn::RecvStream, FrameCodec<ControlFrame>>;
type ControlWriter = FramedWrite<quinn::SendStream, FrameCodec<ControlFrame>>;

struct ControlIo<'a> {
    reader: &'a mut ControlReader,
    writer: &'a mut ControlWriter,
    commands: &'a mut tokio::sync::mpsc::Receiver<DeviceCommand>,
}

async fn control_loop(
    conn: &Connection,
    ctx: &TunnelContext,
    device_id: &str,
    session: u64,
    kick: &CancellationToken,
    io: &mut ControlIo<'_>,
) -> anyhow::Result<()> {
    let mut pending: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<RotateOutcome>> =
        Default::default();
    let mut next_request = 0u64;
    loop {
        let next = tokio::select! {
            _ = kick.cancelled() => {
                close_kicked(conn, ctx, device_id, session);
                return Ok(());
            }
            _ = conn.closed() => return Ok(()),
            Some(cmd) = io.commands.recv() => {
                let DeviceCommand::RotateIp { reply } = cmd;
                next_request += 1;
                pending.retain(|_, r| !r.is_closed());
                pending.insert(next_request, reply);
                io.writer.send(ControlFrame::RotateIp { request_id: next_request }).await?;
                continue;
            }
            f = io.reader.next() => f,
        };
        match next {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(ControlFrame::Heartbeat(hb))) => {
                let ip = conn.remote_address().ip().to_canonical().to_string();
                ctx.registry
                    .heartbeat(device_id, session, ctx.clock.now_ms(), hb.metrics, &ip);
                io.writer
                    .send(ControlFrame::HeartbeatAck(HeartbeatAck { public_ip: ip }))
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

fn close_kicked(conn: &Connection, ctx: &TunnelContext, device_id: &str, session: u64) {
    let (code, why): (u32, &[u8]) = if ctx.cancel.is_cancelled() {
        (close::SHUTDOWN, b"server shutting down")
    } else if ctx
        .registry
        .get(device_id)
        .is_some_and(|l| l.session != session)
    {
        (close::REPLACED, b"replaced by a newer session")
    } else {
        (close::REVOKED, b"device revoked")
    };
    conn.close(code.into(), why);
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
