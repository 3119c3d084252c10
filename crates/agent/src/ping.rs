//! ICMP echo from the device, for the OpenVPN door: one stream per echo request. The device pings with an
//! unprivileged ping socket (`SOCK_DGRAM`/`IPPROTO_ICMP`, allowed when the agent's group is inside
//! `net.ipv4.ping_group_range`, as on Android and systemd systems) or, failing that, a raw ICMP socket (root or
//! CAP_NET_RAW). Targets go through the same [`TargetPolicy`] as TCP and UDP.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::icmp::{Echo, EchoKind, REPLY_TIMEOUT};
use proxyfleet_proto::{FrameCodec, Host, OpenResult, UdpDatagram, MAX_UDP_FRAME};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::conn::{BoxRead, BoxWrite};
use crate::policy::TargetPolicy;

/// How long the server has to send the request after the stream opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An ICMP socket: a ping socket, where the kernel picks the identifier (and matches replies to it) and hands
/// over ICMP messages alone, or a raw one (`raw`), where every ICMP packet the host receives arrives, IPv4 header
/// first, and replies are matched by hand.
struct Pinger {
    sock: UdpSocket,
    raw: bool,
}

impl Pinger {
    fn open() -> std::io::Result<Pinger> {
        let (s, raw) = match Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)) {
            Ok(s) => (s, false),
            Err(e) if e.kind() == ErrorKind::PermissionDenied => (
                Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
                true,
            ),
            Err(e) => return Err(e),
        };
        s.set_nonblocking(true)?;
        Ok(Pinger {
            sock: UdpSocket::from_std(std::net::UdpSocket::from(s))?,
            raw,
        })
    }

    /// Send `req` to `to` and wait for its reply (the reply's data; identifier and sequence are the request's).
    async fn echo(&self, to: Ipv4Addr, req: &Echo) -> std::io::Result<Option<Vec<u8>>> {
        let dst = SocketAddr::new(IpAddr::V4(to), 0);
        // A raw socket sends our identifier as is: a random one keeps replies to other programs apart.
        let id = if self.raw { rand::random() } else { req.id };
        let out = Echo { id, ..req.clone() };
        self.sock.send_to(&out.to_bytes(), dst).await?;
        let mut buf = vec![0u8; 65_535];
        let wait = async {
            loop {
                let (n, from) = self.sock.recv_from(&mut buf).await?;
                if from.ip() != dst.ip() {
                    continue;
                }
                if let Some(data) = reply_to(self.raw, &buf[..n], id, req.seq) {
                    return Ok::<_, std::io::Error>(data);
                }
            }
        };
        match tokio::time::timeout(REPLY_TIMEOUT, wait).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// The data of the reply to our echo (`id`, `seq`) in what one ICMP socket read gave, or `None` for anything else.
/// A raw socket's reads start with the IPv4 header, and every ICMP packet of the host arrives there, so the
/// identifier must be ours; a ping socket's reads are the ICMP message alone, and the kernel has matched the
/// identifier (it chose it) already.
fn reply_to(raw: bool, read: &[u8], id: u16, seq: u16) -> Option<Vec<u8>> {
    let msg = if raw {
        let ihl = usize::from(read.first()? & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        read.get(ihl..)?
    } else {
        read
    };
    let reply = Echo::parse(msg, EchoKind::Reply).ok()?;
    ((!raw || reply.id == id) && reply.seq == seq).then_some(reply.data)
}

/// Logged once per process: every echo would otherwise log the same warning.
static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Serve one echo stream: answer `Ok` once an ICMP socket is open (`Failed` when the device permits none), read
/// the request, ping, send the reply back if one came in time, end the stream.
pub(crate) async fn serve_echo(
    recv: BoxRead,
    mut send: BoxWrite,
    policy: TargetPolicy,
) -> anyhow::Result<()> {
    let pinger = match Pinger::open() {
        Ok(p) => p,
        Err(e) => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot ping from this device (customers' pings go unanswered): \
                    allow the agent's group in net.ipv4.ping_group_range, or give it CAP_NET_RAW");
            }
            return crate::flow::answer(&mut send, OpenResult::Failed).await;
        }
    };
    send.write_all(&[OpenResult::Ok as u8]).await?;
    send.flush().await?;
    let mut reader = FramedRead::new(recv, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let mut writer = FramedWrite::new(send, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let Ok(Some(frame)) = tokio::time::timeout(REQUEST_TIMEOUT, reader.next()).await else {
        return Ok(());
    };
    let d = frame?;
    let Host::V4(to) = d.host else {
        anyhow::bail!("ICMP echo to a non-IPv4 host");
    };
    let req = Echo::parse(&d.payload, EchoKind::Request)?;
    if !policy.permits(IpAddr::V4(to)) {
        tracing::debug!(%to, "refused an ICMP echo to a non-public target");
        return Ok(());
    }
    if let Some(data) = pinger.echo(to, &req).await? {
        let reply = Echo {
            data,
            ..req.reply()
        };
        writer
            .send(UdpDatagram {
                host: Host::V4(to),
                port: 0,
                payload: reply.to_bytes(),
            })
            .await?;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: u16, seq: u16) -> Vec<u8> {
        Echo {
            kind: EchoKind::Reply,
            id,
            seq,
            data: b"data".to_vec(),
        }
        .to_bytes()
    }

    /// A 24-byte IPv4 header (one 4-byte option), as a raw socket hands it over before the message.
    fn with_header(msg: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x46, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1, 1, 1, 1, 0,
        ];
        p.extend_from_slice(msg);
        p
    }

    #[test]
    fn raw_reads_skip_the_header_and_must_carry_our_identifier() {
        assert_eq!(
            reply_to(true, &with_header(&reply(7, 1)), 7, 1),
            Some(b"data".to_vec())
        );
        assert_eq!(
            reply_to(true, &with_header(&reply(8, 1)), 7, 1),
            None,
            "another program's"
        );
        assert_eq!(
            reply_to(true, &with_header(&reply(7, 2)), 7, 1),
            None,
            "another sequence"
        );
        assert_eq!(
            reply_to(true, &reply(7, 1), 7, 1),
            None,
            "no header: not a reply"
        );
        assert_eq!(reply_to(true, &[], 7, 1), None);
        assert_eq!(
            reply_to(true, &[0x4f, 0, 0], 7, 1),
            None,
            "header longer than the read"
        );
    }

    #[test]
    fn ping_socket_reads_are_the_message_and_the_kernel_chose_the_identifier() {
        assert_eq!(
            reply_to(false, &reply(4242, 1), 7, 1),
            Some(b"data".to_vec())
        );
        assert_eq!(reply_to(false, &reply(4242, 2), 7, 1), None);
        assert_eq!(reply_to(false, &with_header(&reply(7, 1)), 7, 1), None);
        let mut request = reply(7, 1);
        request[0] = 8;
        assert_eq!(
            reply_to(false, &request, 7, 1),
            None,
            "a request is not a reply"
        );
    }
}
