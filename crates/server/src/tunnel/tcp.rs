//! The fallback transport for networks that block UDP: TLS over TCP, with streams multiplexed by yamux.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use proxyfleet_proto::io::ReadAhead;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::link::TcpLink;
use super::{serve_link, Handshaken, TunnelContext, HANDSHAKE_TIMEOUT};

/// Most agent-opened streams waiting to be accepted per tunnel; more means a misbehaving agent.
const INCOMING_BACKLOG: usize = 64;

pub(super) fn start(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: TunnelContext,
) -> anyhow::Result<SocketAddr> {
    let local = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tracker = ctx.tracker.clone();
    tracker.spawn(accept_loop(listener, acceptor, ctx));
    Ok(local)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: TunnelContext,
) {
    let mut backoff = std::time::Duration::from_millis(10);
    // Same bound as QUIC: past it, new connections are dropped at once and the agent retries later.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(super::quic::MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = std::time::Duration::from_millis(10);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning or dying.
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, ctx2) = (acceptor.clone(), ctx.clone());
        ctx.tracker.spawn(async move {
            let socket = ReadAhead::new(tcp);
            let hearing = socket.hearing();
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await;
            drop(permit);
            let tls = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let (_, conn) = tls.get_ref();
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let peer_cert = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            let mut session = tokio_yamux::Session::new_server(tls, proxyfleet_proto::yamux_config());
            let control = session.control();
            let (tx, rx) = tokio::sync::mpsc::channel(INCOMING_BACKLOG);
            let done = CancellationToken::new();
            let driver_done = done.clone();
            let cancel = ctx2.cancel.clone();
            // The session only moves bytes while polled: this task drives it for the tunnel's whole life.
            ctx2.tracker.spawn(async move {
                // Both ends ping every 10 s, so a live agent is heard from at least that often, however busy
                // the link; silence as long as QUIC's idle timeout means the device is gone, as on QUIC.
                let silence = hearing.silent_for(proxyfleet_proto::TUNNEL_IDLE_TIMEOUT);
                tokio::pin!(silence);
                loop {
                    tokio::select! {
                        _ = driver_done.cancelled() => break,
                        _ = cancel.cancelled() => break,
                        _ = &mut silence => {
                            tracing::info!(%peer, "heard nothing from the agent for the idle timeout; closing its tunnel");
                            break;
                        }
                        next = session.next() => match next {
                            Some(Ok(stream)) => {
                                if tx.try_send(stream).is_err() {
                                    tracing::info!(%peer, "agent opened too many streams; closing its tunnel");
                                    break;
                                }
                            }
                            _ => break,
                        },
                    }
                }
                driver_done.cancel();
            });
            let link = TcpLink {
                control,
                incoming: tokio::sync::Mutex::new(rx),
                done,
                peer,
            };
            serve_link(Handshaken { link: Arc::new(link), alpn, peer_cert }, ctx2).await;
        });
    }
}
