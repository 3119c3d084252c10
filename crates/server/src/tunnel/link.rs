//! The one interface the rest of the server sees of a device tunnel, whatever carries it: QUIC streams or
//! yamux streams inside TLS over TCP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use proxyfleet_proto::codec::frame;
use proxyfleet_proto::{Host, OpenResult, StreamHeader, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub type BoxRead = Box<dyn TunnelRead>;
pub use proxyfleet_proto::end::{TunnelRead, TunnelWrite};
pub type BoxWrite = Box<dyn TunnelWrite>;
pub type StreamFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(BoxRead, BoxWrite), FlowError>> + Send + 'a>>;
pub type ClosedFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// How long the device may take to connect to a target and answer.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("device is offline")]
    Offline,
    #[error("tunnel to the device failed")]
    Tunnel(#[source] std::io::Error),
    #[error("device did not answer in time")]
    Timeout,
    /// The device tried and the target failed (refused, unreachable, DNS, …).
    #[error("target failed: {0:?}")]
    Target(OpenResult),
}

fn tunnel_err(e: impl std::error::Error + Send + Sync + 'static) -> FlowError {
    FlowError::Tunnel(std::io::Error::other(e))
}

/// A device tunnel, as the rest of the server sees it.
pub trait Link: Send + Sync {
    /// `quic` or `tcp`.
    fn transport(&self) -> &'static str;
    /// Open a stream to the agent.
    fn open_stream(&self) -> StreamFuture<'_>;
    /// The next stream the agent opened.
    fn accept_stream(&self) -> StreamFuture<'_>;
    /// Close the tunnel; `code` reaches the agent where the transport can carry it (QUIC).
    fn close(&self, code: u32, reason: &'static [u8]);
    /// Resolves once the tunnel is closed, by either side.
    fn closed(&self) -> ClosedFuture<'_>;
    /// The device's current address as this server sees it (it changes when a QUIC device migrates).
    fn peer(&self) -> SocketAddr;
}

pub struct QuicLink(pub quinn::Connection);

impl Link for QuicLink {
    fn transport(&self) -> &'static str {
        "quic"
    }

    fn open_stream(&self) -> StreamFuture<'_> {
        Box::pin(async move {
            let (send, recv) = self.0.open_bi().await.map_err(tunnel_err)?;
            Ok((Box::new(recv) as BoxRead, Box::new(send) as BoxWrite))
        })
    }

    fn accept_stream(&self) -> StreamFuture<'_> {
        Box::pin(async move {
            let (send, recv) = self.0.accept_bi().await.map_err(tunnel_err)?;
            Ok((Box::new(recv) as BoxRead, Box::new(send) as BoxWrite))
        })
    }

    fn close(&self, code: u32, reason: &'static [u8]) {
        self.0.close(code.into(), reason);
    }

    fn closed(&self) -> ClosedFuture<'_> {
        Box::pin(async move {
            self.0.closed().await;
        })
    }

    fn peer(&self) -> SocketAddr {
        self.0.remote_address()
    }
}

/// A yamux session over TLS over TCP. The session itself is driven by a task (see `tunnel::tcp`), which hands
/// over the agent's streams through `incoming` and ends when `done` is cancelled or the connection drops.
pub struct TcpLink {
    pub control: tokio_yamux::Control,
    pub incoming: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<tokio_yamux::StreamHandle>>,
    pub done: CancellationToken,
    pub peer: SocketAddr,
}

impl TcpLink {
    /// A stream's halves, drained and telling a dead session from an end ([`proxyfleet_proto::mux`]).
    fn halves(&self, stream: tokio_yamux::StreamHandle) -> (BoxRead, BoxWrite) {
        let (r, w) = proxyfleet_proto::mux::split(stream, self.done.clone());
        (Box::new(r), Box::new(w))
    }
}

impl Link for TcpLink {
    fn transport(&self) -> &'static str {
        "tcp"
    }

    fn open_stream(&self) -> StreamFuture<'_> {
        Box::pin(async move {
            let mut control = self.control.clone();
            let stream = control
                .open_stream()
                .await
                .map_err(|e| FlowError::Tunnel(std::io::Error::other(format!("{e:?}"))))?;
            Ok(self.halves(stream))
        })
    }

    fn accept_stream(&self) -> StreamFuture<'_> {
        Box::pin(async move {
            let mut incoming = self.incoming.lock().await;
            let stream = tokio::select! {
                s = incoming.recv() => s,
                _ = self.done.cancelled() => None,
            };
            let stream =
                stream.ok_or_else(|| FlowError::Tunnel(std::io::Error::other("tunnel closed")))?;
            Ok(self.halves(stream))
        })
    }

    fn close(&self, _code: u32, _reason: &'static [u8]) {
        // yamux carries no close code (the reason went out as a `Refused` frame); let it flush and say goodbye,
        // but never wait on a dead peer for long.
        let (mut control, done) = (self.control.clone(), self.done.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), control.close()).await;
            done.cancel();
        });
    }

    fn closed(&self) -> ClosedFuture<'_> {
        Box::pin(self.done.cancelled())
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// Open a TCP connection from the device to `host:port`: the agent resolves and dials from its own network.
pub async fn open_tcp(
    link: &dyn Link,
    host: Host,
    port: u16,
) -> Result<(BoxRead, BoxWrite), FlowError> {
    open_flow(link, Target::Tcp { host, port }).await
}

/// Open a flow stream for `target` and wait for the agent's answer.
pub async fn open_flow(link: &dyn Link, target: Target) -> Result<(BoxRead, BoxWrite), FlowError> {
    let header = frame(&StreamHeader { target });
    let answer = async {
        let (mut read, mut write) = link
            .open_stream()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        write.write_all(&header).await?;
        write.flush().await?;
        let code = read.read_u8().await?;
        Ok::<_, std::io::Error>((code, read, write))
    };
    // The whole open, stream credit included, is bounded: a saturated tunnel answers "timeout", never hangs.
    let (code, read, write) = tokio::time::timeout(OPEN_TIMEOUT, answer)
        .await
        .map_err(|_| FlowError::Timeout)?
        .map_err(FlowError::Tunnel)?;
    match OpenResult::try_from(code) {
        Ok(OpenResult::Ok) => Ok((read, write)),
        Ok(other) => Err(FlowError::Target(other)),
        Err(_) => Err(FlowError::Tunnel(std::io::Error::other(
            "invalid open result from the agent",
        ))),
    }
}
