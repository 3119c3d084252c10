//! The agent's side of a tunnel, whichever transport carries it: QUIC, or TLS over TCP with yamux when UDP to
//! the server is blocked.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use proxyfleet_proto::enroll::TUNNEL_SERVER_NAME;
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

pub use proxyfleet_proto::end::{TunnelRead, TunnelWrite};

pub type BoxRead = Box<dyn TunnelRead>;
pub type BoxWrite = Box<dyn TunnelWrite>;

/// How long a QUIC handshake may take (a probe's, or one racing TCP) before it counts as failed.
pub const QUIC_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the TCP + TLS handshake may take.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(10);

pub enum Conn {
    Quic {
        conn: quinn::Connection,
        endpoint: quinn::Endpoint,
    },
    Tcp {
        control: tokio_yamux::Control,
        incoming: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<tokio_yamux::StreamHandle>>,
        done: CancellationToken,
        /// The device's address the connection was made from: when it goes, so does the tunnel.
        local: Option<std::net::IpAddr>,
    },
}

/// A yamux stream's halves, drained so that one stream never stalls the session, and telling a dead session from
/// an end ([`proxyfleet_proto::mux`]).
fn split(s: tokio_yamux::StreamHandle, session_done: &CancellationToken) -> (BoxRead, BoxWrite) {
    let (r, w) = proxyfleet_proto::mux::split(s, session_done.clone());
    (Box::new(r), Box::new(w))
}

/// The sending half of a QUIC stream, with the meaning a TCP socket's and a yamux stream's have: shut down, it
/// ends the stream (FIN); dropped without, it resets it (quinn alone would finish it, so a flow whose target reset
/// its connection would reach the customer as a complete answer).
pub struct QuicSend {
    inner: quinn::SendStream,
    finished: bool,
}

impl QuicSend {
    pub fn new(inner: quinn::SendStream) -> Self {
        QuicSend {
            inner,
            finished: false,
        }
    }
}

impl Drop for QuicSend {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.inner.reset(0u32.into());
        }
    }
}

impl TunnelWrite for QuicSend {
    fn refused(&self, code: u32) -> proxyfleet_proto::end::Refused {
        proxyfleet_proto::end::quic_refused(&self.inner, code)
    }
}

impl AsyncWrite for QuicSend {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(std::pin::Pin::new(&mut self.get_mut().inner), cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.get_mut().inner), cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.finished = true;
        AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut this.inner), cx)
    }
}

impl Conn {
    pub fn transport(&self) -> &'static str {
        match self {
            Conn::Quic { .. } => "quic",
            Conn::Tcp { .. } => "tcp",
        }
    }

    pub async fn open_bi(&self) -> anyhow::Result<(BoxRead, BoxWrite)> {
        match self {
            Conn::Quic { conn, .. } => {
                let (send, recv) = conn.open_bi().await?;
                Ok((Box::new(recv), Box::new(QuicSend::new(send))))
            }
            Conn::Tcp { control, done, .. } => {
                let stream = control
                    .clone()
                    .open_stream()
                    .await
                    .map_err(|e| anyhow::anyhow!("yamux: {e:?}"))?;
                Ok(split(stream, done))
            }
        }
    }

    pub async fn accept_bi(&self) -> anyhow::Result<(BoxRead, BoxWrite)> {
        match self {
            Conn::Quic { conn, .. } => {
                let (send, recv) = conn.accept_bi().await?;
                Ok((Box::new(recv), Box::new(QuicSend::new(send))))
            }
            Conn::Tcp { incoming, done, .. } => {
                let stream = incoming
                    .lock()
                    .await
                    .recv()
                    .await
                    .context("tunnel closed")?;
                Ok(split(stream, done))
            }
        }
    }

    /// Resolves when the tunnel is closed, with the reason.
    pub async fn closed(&self) -> anyhow::Error {
        match self {
            Conn::Quic { conn, .. } => conn.closed().await.into(),
            Conn::Tcp { done, .. } => {
                done.cancelled().await;
                anyhow::anyhow!("the TCP tunnel closed")
            }
        }
    }

    /// The server's close reason, when it gave one (QUIC only; over TCP it comes as a `Refused` frame).
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        match self {
            Conn::Quic { conn, .. } => conn.close_reason(),
            Conn::Tcp { .. } => None,
        }
    }

    pub async fn close(&self) {
        match self {
            Conn::Quic { conn, endpoint } => {
                conn.close(0u32.into(), b"agent stopping");
                endpoint.wait_idle().await;
            }
            Conn::Tcp { control, done, .. } => {
                let _ = tokio::time::timeout(Duration::from_secs(1), control.clone().close()).await;
                done.cancel();
            }
        }
    }

    /// The device's address a TCP tunnel was made from (a QUIC one sends from whichever the route picks).
    pub fn tcp_local_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Conn::Tcp { local, .. } => *local,
            Conn::Quic { .. } => None,
        }
    }

    /// Move a QUIC tunnel to a fresh UDP socket (the network changed); QUIC migrates the session. No-op on TCP.
    pub fn rebind(&self) -> anyhow::Result<()> {
        if let Conn::Quic { endpoint, .. } = self {
            let local = endpoint.local_addr()?;
            let fresh = std::net::UdpSocket::bind(std::net::SocketAddr::new(local.ip(), 0))?;
            proxyfleet_proto::net::enlarge_udp_buffers(&fresh);
            endpoint.rebind(fresh)?;
            tracing::info!(old = %local, new = %endpoint.local_addr()?, "moved the tunnel to a new socket");
        }
        Ok(())
    }
}

/// Connect over QUIC.
pub async fn connect_quic(server: &str, tls: rustls::ClientConfig) -> anyhow::Result<Conn> {
    let (endpoint, addr) = crate::tls::endpoint_for(server).await?;
    let config = crate::tls::quic_client(tls, proxyfleet_proto::TUNNEL_KEEP_ALIVE)?;
    let conn = tokio::time::timeout(
        QUIC_TIMEOUT,
        endpoint.connect_with(config, addr, TUNNEL_SERVER_NAME)?,
    )
    .await
    .context("QUIC handshake timed out (is UDP blocked?)")??;
    Ok(Conn::Quic { conn, endpoint })
}

/// Connect over TLS on TCP, multiplexing streams with yamux.
pub async fn connect_tcp(server: &str, tls: rustls::ClientConfig) -> anyhow::Result<Conn> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from(TUNNEL_SERVER_NAME)?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(server).await?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok().map(|a| a.ip().to_canonical());
        let socket = proxyfleet_proto::io::ReadAhead::new(tcp);
        let hearing = socket.hearing();
        Ok::<_, std::io::Error>((connector.connect(name, socket).await?, hearing, local))
    };
    let (tls, hearing, local) = tokio::time::timeout(TCP_TIMEOUT, handshake)
        .await
        .context("TCP/TLS handshake timed out")??;
    let mut session = tokio_yamux::Session::new_client(tls, proxyfleet_proto::yamux_config());
    let control = session.control();
    let (tx, incoming) = tokio::sync::mpsc::channel(1024);
    let done = CancellationToken::new();
    let driver_done = done.clone();
    // The session only moves bytes while polled: drive it for the tunnel's whole life.
    tokio::spawn(async move {
        // As on QUIC: a server not heard from (pings included) for the idle timeout is gone; reconnect.
        let silence = hearing.silent_for(proxyfleet_proto::TUNNEL_IDLE_TIMEOUT);
        tokio::pin!(silence);
        loop {
            tokio::select! {
                _ = driver_done.cancelled() => break,
                _ = &mut silence => {
                    tracing::warn!("heard nothing from the server for the idle timeout; reconnecting");
                    break;
                }
                next = session.next() => match next {
                    Some(Ok(stream)) => {
                        // Never stop driving the session for a slow consumer: that would freeze the whole tunnel.
                        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = tx.try_send(stream) {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        driver_done.cancel();
    });
    Ok(Conn::Tcp {
        control,
        incoming: tokio::sync::Mutex::new(incoming),
        done,
        local,
    })
}

/// How long a QUIC attempt runs alone before TLS over TCP joins the race (RFC 8305's connection attempt delay).
/// Where UDP works, QUIC's one-round-trip handshake wins even on a slow link, since TCP + TLS needs two round
/// trips after this; where UDP is silently dropped, the agent is up over TCP after this instead of after
/// [`QUIC_TIMEOUT`].
pub const QUIC_HEAD_START: Duration = Duration::from_millis(300);

/// Connect over QUIC, racing TLS over TCP from [`QUIC_HEAD_START`] on (at once if QUIC fails sooner); the first
/// transport up wins and the other attempt is dropped. A session that lands on TCP probes QUIC later and moves.
pub async fn connect(
    server: &str,
    tls: impl Fn() -> anyhow::Result<rustls::ClientConfig>,
) -> anyhow::Result<Conn> {
    let quic = connect_quic(server, tls()?);
    let tcp = connect_tcp(server, tls()?);
    tokio::pin!(quic, tcp);
    let head_start = tokio::time::sleep(QUIC_HEAD_START);
    tokio::pin!(head_start);
    let (mut quic_failed, mut tcp_failed, mut tcp_started) = (None, None, false);
    loop {
        tokio::select! {
            // QUIC wins a tie.
            biased;
            r = &mut quic, if quic_failed.is_none() => match r {
                Ok(c) => return Ok(c),
                Err(e) => {
                    quic_failed = Some(e);
                    tcp_started = true;
                }
            },
            () = &mut head_start, if !tcp_started => tcp_started = true,
            r = &mut tcp, if tcp_started && tcp_failed.is_none() => match r {
                Ok(c) => {
                    let quic = quic_failed.map_or_else(
                        || format!("no answer within {QUIC_HEAD_START:?}"),
                        |e| format!("{e:#}"),
                    );
                    tracing::info!(quic = %quic, "connected over TLS on TCP; QUIC will be probed again later");
                    return Ok(c);
                }
                Err(e) => tcp_failed = Some(e),
            },
        }
        if let (Some(quic), Some(tcp)) = (&quic_failed, &tcp_failed) {
            anyhow::bail!("QUIC: {quic:#}; TCP: {tcp:#}");
        }
    }
}
