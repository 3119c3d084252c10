//! The QUIC transport: a quinn endpoint on UDP.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;

use super::link::QuicLink;
use super::{close, serve_link, Handshaken, TunnelContext, HANDSHAKE_TIMEOUT};

pub(super) fn start(
    socket: std::net::UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    ctx: TunnelContext,
) -> anyhow::Result<SocketAddr> {
    proxyfleet_proto::net::enlarge_udp_buffers(&socket);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(proxyfleet_proto::TUNNEL_IDLE_TIMEOUT.try_into()?));
    // The agent opens one stream (the control stream); flows are opened by the server. Bounding what a peer may
    // open and how much it may make us buffer keeps a hostile or broken client from pinning memory.
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.stream_receive_window(proxyfleet_proto::STREAM_WINDOW.into());
    transport.receive_window((16u32 * 1024 * 1024).into());
    config.transport_config(Arc::new(transport));
    // Stateless resets are signed with a key that survives a restart, and connection IDs are made (and
    // recognised) with one: after a crash the new process takes a device's next packet for the old connection as
    // one of its own IDs and answers it with a reset the device accepts, so the device reconnects at once instead
    // of after the idle timeout. (quinn's defaults are random per process: the packet was dropped as a stranger's.)
    let reset_key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &ctx.pki.derived_secret("QUIC stateless reset"),
    );
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let cid_secret = ctx.pki.derived_secret("QUIC connection IDs");
    let cid_key = u64::from_le_bytes(cid_secret[..8].try_into().unwrap_or_default());
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the QUIC endpoint")?;
    let local = endpoint.local_addr()?;
    let tracker = ctx.tracker.clone();
    tracker.spawn(accept_loop(endpoint, ctx));
    Ok(local)
}

/// Most QUIC handshakes in flight at once. Past it new connections are refused at once (the agent backs off and
/// retries) instead of all timing out together when a whole fleet reconnects after a server restart.
pub(super) const MAX_HANDSHAKES: usize = 512;

async fn accept_loop(endpoint: Endpoint, ctx: TunnelContext) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(async move {
            let remote = incoming.remote_address();
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
            drop(permit);
            match handshake {
                Ok(Ok(conn)) => serve_link(handshaken(conn), ctx2).await,
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
                Err(_) => tracing::debug!(%remote, "QUIC handshake timed out"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"server shutting down");
    endpoint.wait_idle().await;
}

fn handshaken(conn: Connection) -> Handshaken {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let peer_cert = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned());
    Handshaken {
        link: Arc::new(QuicLink(conn)),
        alpn,
        peer_cert,
    }
}
