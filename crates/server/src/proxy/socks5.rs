//! The SOCKS5 door: RFC 1928 with RFC 1929 username/password, CONNECT and UDP ASSOCIATE.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::socks5::{self as s5, Command, Reply};
use proxyfleet_proto::{FrameCodec, Target, UdpDatagram, MAX_UDP_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::directory::{Dir, Entry};
use super::relay::{close_customer_halves, relay};
use super::{AuthFailure, Door, OpenFailure, ProxyContext};

const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Read until `parse` has a whole message; at most [`s5::MAX_MESSAGE`] bytes are ever buffered.
async fn read_msg<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: fn(&[u8]) -> s5::Parsed<T>,
) -> anyhow::Result<Result<T, s5::Socks5Error>> {
    loop {
        match parse(buf) {
            Ok(Some((msg, used))) => {
                buf.drain(..used);
                return Ok(Ok(msg));
            }
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        if buf.len() >= s5::MAX_MESSAGE {
            anyhow::bail!("SOCKS5 message too long");
        }
        let mut chunk = [0u8; 256];
        let room = (s5::MAX_MESSAGE - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            anyhow::bail!("client closed during the SOCKS5 handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the handshake settled.
struct Negotiated {
    entry: Arc<Entry>,
    request: s5::Request,
    /// Bytes the client sent past the request (it may pipeline data after CONNECT).
    rest: Vec<u8>,
}

async fn reply(stream: &mut TcpStream, code: Reply, bound: SocketAddr) -> std::io::Result<()> {
    stream.write_all(&s5::reply(code, bound)).await
}

/// Greeting, method choice, credentials, request. `None`: the client was answered and turned away.
async fn negotiate(
    ctx: &ProxyContext,
    stream: &mut TcpStream,
    peer: SocketAddr,
    door: &Door,
) -> anyhow::Result<Option<Negotiated>> {
    let mut buf = Vec::with_capacity(64);
    let greeting = match read_msg(stream, &mut buf, s5::parse_greeting).await? {
        Ok(g) => g,
        // A greeting offering no method is well-formed enough to answer: none of them is acceptable.
        Err(s5::Socks5Error::NoMethods) => {
            stream
                .write_all(&[s5::VERSION, s5::METHOD_UNACCEPTABLE])
                .await?;
            return Ok(None);
        }
        Err(e) => anyhow::bail!("bad SOCKS5 greeting: {e}"),
    };
    let client = peer.ip().to_canonical();
    let allowed = ctx.allow_listed(door, client);
    let entry = if let (Some(entry), true) = (&allowed, greeting.methods.contains(&s5::METHOD_NONE))
    {
        stream.write_all(&[s5::VERSION, s5::METHOD_NONE]).await?;
        entry.clone()
    } else if greeting.methods.contains(&s5::METHOD_USERPASS) {
        stream
            .write_all(&[s5::VERSION, s5::METHOD_USERPASS])
            .await?;
        let creds = match read_msg(stream, &mut buf, s5::parse_userpass).await? {
            Ok(c) => c,
            Err(e) => anyhow::bail!("bad SOCKS5 credentials message: {e}"),
        };
        let verdict = match (
            &allowed,
            std::str::from_utf8(&creds.username),
            std::str::from_utf8(&creds.password),
        ) {
            // Allow-listed on its own port: admitted whatever credentials it sends.
            (Some(entry), _, _) => Ok(entry.clone()),
            (None, Ok(u), Ok(p)) => ctx.authenticate(door, u, p, client).await,
            _ => Err(AuthFailure::Invalid),
        };
        match verdict {
            Ok(entry) => {
                stream.write_all(&[s5::AUTH_VERSION, 0]).await?;
                entry
            }
            Err(why) => {
                stream.write_all(&[s5::AUTH_VERSION, 1]).await?;
                tracing::debug!(%peer, ?why, "SOCKS5 authentication failed");
                return Ok(None);
            }
        }
    } else {
        stream
            .write_all(&[s5::VERSION, s5::METHOD_UNACCEPTABLE])
            .await?;
        return Ok(None);
    };
    let request = match read_msg(stream, &mut buf, s5::parse_request).await? {
        Ok(r) => r,
        Err(e) => {
            reply(stream, e.reply(), UNSPECIFIED).await?;
            return Ok(None);
        }
    };
    Ok(Some(Negotiated {
        entry,
        request,
        rest: buf,
    }))
}

pub async fn serve(
    ctx: &Arc<ProxyContext>,
    mut stream: TcpStream,
    peer: SocketAddr,
    door: &Door,
) -> anyhow::Result<()> {
    let Some(n) = ctx
        .handshake(negotiate(ctx, &mut stream, peer, door))
        .await
        .ok_or_else(|| {
            anyhow::anyhow!("SOCKS5 handshake timed out (or the server is stopping)")
        })??
    else {
        return Ok(());
    };
    match n.request.command {
        Command::Connect => {
            if n.request.port == 0 {
                return reply(&mut stream, Reply::GeneralFailure, UNSPECIFIED)
                    .await
                    .map_err(Into::into);
            }
            let target = Target::Tcp {
                host: n.request.host,
                port: n.request.port,
            };
            let (flow, dr, dw) = match ctx.open(&n.entry, target).await {
                Ok(f) => f,
                Err(e) => return refuse(&mut stream, &e).await,
            };
            reply(&mut stream, Reply::Succeeded, UNSPECIFIED).await?;
            let ended = relay(
                &ctx.dir,
                &flow,
                stream.into_split(),
                (dr, dw),
                &n.rest,
                ctx.relay_options(false),
            )
            .await;
            close_customer_halves(ended).await;
            Ok(())
        }
        Command::UdpAssociate => udp_associate(ctx, stream, peer, n).await,
        Command::Bind | Command::Other(_) => {
            reply(&mut stream, Reply::CommandNotSupported, UNSPECIFIED)
                .await
                .map_err(Into::into)
        }
    }
}

async fn refuse(stream: &mut TcpStream, e: &OpenFailure) -> anyhow::Result<()> {
    tracing::debug!(failure = ?e, "SOCKS5 request refused");
    reply(stream, e.socks(), UNSPECIFIED).await?;
    Ok(())
}

/// UDP ASSOCIATE: a UDP socket for the client, one tunnel stream to the device carrying datagram frames, for as
/// long as the client keeps its TCP connection open.
async fn udp_associate(
    ctx: &Arc<ProxyContext>,
    mut stream: TcpStream,
    peer: SocketAddr,
    n: Negotiated,
) -> anyhow::Result<()> {
    let client_ip = peer.ip().to_canonical();
    // The client may name the address it will send from; only the port is trusted to narrow it (the address must be
    // the TCP peer's anyway).
    let mut client_ep: Option<SocketAddr> = match n.request.port {
        0 => None,
        p => Some(SocketAddr::new(client_ip, p)),
    };
    let local_ip = stream.local_addr()?.ip();
    let sock = match UdpSocket::bind((local_ip, 0)).await {
        Ok(s) => s,
        Err(_) => {
            return reply(&mut stream, Reply::GeneralFailure, UNSPECIFIED)
                .await
                .map_err(Into::into)
        }
    };
    let (flow, dr, dw) = match ctx.open(&n.entry, Target::Udp).await {
        Ok(f) => f,
        Err(e) => return refuse(&mut stream, &e).await,
    };
    reply(&mut stream, Reply::Succeeded, sock.local_addr()?).await?;
    let mut from_dev = FramedRead::new(dr, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let mut to_dev = FramedWrite::new(dw, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let mut buf = vec![0u8; 65_536];
    let mut ctl = [0u8; 64];
    let now = || ctx.dir.clock().now_ms();
    loop {
        tokio::select! {
            _ = flow.stop.cancelled() => break,
            r = stream.read(&mut ctl) => match r {
                // The association lives as long as its TCP connection (RFC 1928 section 7).
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            r = sock.recv_from(&mut buf) => {
                let Ok((len, src)) = r else { continue };
                if src.ip().to_canonical() != client_ip || client_ep.is_some_and(|ep| ep.port() != src.port()) {
                    continue;
                }
                client_ep = Some(src);
                let Ok(pkt) = s5::parse_udp(&buf[..len]) else { continue };
                // Fragments are not supported: drop them (RFC 1928 allows it).
                if pkt.frag != 0 || pkt.port == 0 {
                    continue;
                }
                if !flow.charge_datagram(pkt.payload.len(), Dir::Up, now()) {
                    continue;
                }
                let d = UdpDatagram { host: pkt.host, port: pkt.port, payload: pkt.payload.to_vec() };
                // A tunnel that takes nothing (its window full, its session gone) must not hold a stopped
                // association, or the server's shutdown, for longer than a counted write may take.
                let sent = super::relay::within_grace(&flow.stop, to_dev.send(d)).await;
                if !matches!(sent, Some(Ok(()))) {
                    break;
                }
            }
            d = from_dev.next() => {
                let Some(Ok(d)) = d else { break };
                let Some(ep) = client_ep else { continue };
                if !flow.charge_datagram(d.payload.len(), Dir::Down, now()) {
                    continue;
                }
                let _ = sock.send_to(&s5::encode_udp(&d.host, d.port, &d.payload), ep).await;
            }
        }
    }
    Ok(())
}
