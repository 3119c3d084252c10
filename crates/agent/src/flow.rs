//! Flow streams: the server asks for a connection; the agent resolves the name on the device, connects from the
//! device's own network, answers one result byte, then copies bytes both ways.

use std::time::Duration;

use anyhow::Context;
use proxyfleet_proto::{Decode, Host, OpenResult, StreamHeader, Target, MAX_STREAM_HEADER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conn::{BoxRead, BoxWrite};

/// Every header read must finish within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a target (DNS + TCP) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve_flow(mut recv: BoxRead, mut send: BoxWrite) -> anyhow::Result<()> {
    let header = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv))
        .await
        .context("header timeout")??;
    let Target::Tcp { host, port } = header.target else {
        return answer(&mut send, OpenResult::NotAllowed).await;
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&host, port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(result)) => return answer(&mut send, result).await,
        Err(_) => return answer(&mut send, OpenResult::Timeout).await,
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
        send.shutdown().await
    };
    let _ = tokio::try_join!(up, down);
    Ok(())
}

async fn answer(send: &mut BoxWrite, result: OpenResult) -> anyhow::Result<()> {
    send.write_all(&[result as u8]).await?;
    send.shutdown().await?;
    Ok(())
}

async fn read_header(recv: &mut BoxRead) -> anyhow::Result<StreamHeader> {
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
