//! The one interface the rest of the server sees of a device tunnel, whatever carries it: open a flow stream.
//! QUIC is the only transport so far; the TLS-over-TCP fallback will implement the same trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use proxyfleet_proto::codec::frame;
use proxyfleet_proto::{Host, OpenResult, StreamHeader, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
type OpenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(BoxRead, BoxWrite), FlowError>> + Send + 'a>>;

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

/// A device tunnel, as the relay sees it.
pub trait Link: Send + Sync {
    /// `quic` or `tcp`.
    fn transport(&self) -> &'static str;
    /// Open a raw stream to the agent.
    fn open_stream(&self) -> OpenFuture<'_>;
    /// The device's current address as this server sees it (it changes when the device migrates).
    fn peer(&self) -> std::net::SocketAddr;
}

pub struct QuicLink(pub quinn::Connection);

impl Link for QuicLink {
    fn transport(&self) -> &'static str {
        "quic"
    }

    fn peer(&self) -> std::net::SocketAddr {
        self.0.remote_address()
    }

    fn open_stream(&self) -> OpenFuture<'_> {
        Box::pin(async move {
            let (send, recv) = self
                .0
                .open_bi()
                .await
                .map_err(|e| FlowError::Tunnel(std::io::Error::other(e)))?;
            Ok((Box::new(recv) as BoxRead, Box::new(send) as BoxWrite))
        })
    }
}

/// Open a TCP connection from the device to `host:port`: the agent resolves and dials from its own network.
pub async fn open_tcp(
    link: &dyn Link,
    host: Host,
    port: u16,
) -> Result<(BoxRead, BoxWrite), FlowError> {
    let (mut read, mut write) = link.open_stream().await?;
    let header = frame(&StreamHeader {
        target: Target::Tcp { host, port },
    });
    let answer = async {
        write.write_all(&header).await?;
        write.flush().await?;
        read.read_u8().await
    };
    let code = tokio::time::timeout(OPEN_TIMEOUT, answer)
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
