//! The forwarding engine: turns the customer packets that arrive on proxyfleet's tun into TCP streams and UDP
//! flows. Behind a trait so that another engine (nftables TPROXY into sockets, say) can replace the userspace
//! stack without the rest of the door noticing; the one here is `ipstack` over a tun device.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte pipe (TCP) or a datagram pipe (UDP: every read is one datagram, every write sends one).
pub trait Pipe: AsyncRead + AsyncWrite + Send + Unpin {
    /// The kernel socket under the pipe, when it is one (TCP handed over by TPROXY).
    fn tcp(&self) -> Option<&tokio::net::TcpStream>;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Pipe for T {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        (self as &dyn std::any::Any).downcast_ref()
    }
}

/// One customer flow the engine terminated: `src` is the customer's VPN address, `dst` where they wanted to go.
pub struct Terminated {
    pub kind: FlowKind,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub pipe: Box<dyn Pipe>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    Tcp,
    Udp,
    /// One ICMPv4 echo request (ports 0): the pipe's one read is the ICMP message, each write sends an ICMP message
    /// back from `dst` to `src`.
    Echo,
}

/// IANA protocol number of ICMP.
const ICMP: u8 = 1;

/// An echo request the stack handed over, as a [`Pipe`].
struct EchoPipe {
    request: Option<Vec<u8>>,
    packet: ipstack::IpStackUnknownTransport,
}

impl AsyncRead for EchoPipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(r) = self.request.take() {
            // Never more than MTU bytes; a smaller buffer gets what fits (the rest of a datagram is lost, as
            // with a short UDP read).
            let n = r.len().min(buf.remaining());
            buf.put_slice(&r[..n]);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for EchoPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.packet.send(buf.to_vec()).map(|()| buf.len()))
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A source of terminated customer flows.
pub trait Engine: Send {
    /// The next flow; `None` once the engine has stopped (its device is gone).
    fn accept(&mut self) -> Pin<Box<dyn Future<Output = Option<Terminated>> + Send + '_>>;
}

/// MTU of proxyfleet's tun, matching OpenVPN's default `tun-mtu`.
pub const MTU: u16 = 1500;
/// A UDP flow without a datagram in either direction for this long ends (DNS lookups end long before).
const UDP_IDLE: Duration = Duration::from_secs(60);
/// A TCP connection without a segment in either direction for this long is dropped (an idle SSH session lives
/// this long; the stack's own default, 60 s, would cut it after a minute).
const TCP_IDLE: Duration = Duration::from_secs(2 * 3600);
/// The stack does not scale windows, so 64 KiB is the most either side can have in flight; its default (16 KiB)
/// caps one flow at a quarter of that.
const TCP_WINDOW: u16 = u16::MAX;

/// The userspace TCP/IP stack over any packet device (a tun in production, an in-memory pipe in tests).
pub struct StackEngine {
    stack: ipstack::IpStack,
}

impl StackEngine {
    pub fn new<D>(device: D) -> StackEngine
    where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut tcp = ipstack::TcpConfig::default();
        tcp.timeout = TCP_IDLE;
        tcp.max_unacked_bytes = u32::from(TCP_WINDOW);
        tcp.read_buffer_size = usize::from(TCP_WINDOW);
        let mut cfg = ipstack::IpStackConfig::default();
        cfg.mtu_unchecked(MTU)
            .udp_timeout(UDP_IDLE)
            .with_tcp_config(tcp);
        StackEngine {
            stack: ipstack::IpStack::new(cfg, device),
        }
    }
}

impl Engine for StackEngine {
    fn accept(&mut self) -> Pin<Box<dyn Future<Output = Option<Terminated>> + Send + '_>> {
        Box::pin(async move {
            loop {
                let s = self.stack.accept().await.ok()?;
                match s {
                    ipstack::IpStackStream::Tcp(t) => {
                        return Some(Terminated {
                            kind: FlowKind::Tcp,
                            src: t.local_addr(),
                            dst: t.peer_addr(),
                            pipe: Box::new(t),
                        })
                    }
                    ipstack::IpStackStream::Udp(u) => {
                        return Some(Terminated {
                            kind: FlowKind::Udp,
                            src: u.local_addr(),
                            dst: u.peer_addr(),
                            pipe: Box::new(u),
                        })
                    }
                    // ICMPv4 echo requests are relayed (see `flows`); other ICMP and other protocols are dropped.
                    ipstack::IpStackStream::UnknownTransport(u)
                        if u.ip_protocol().0 == ICMP
                            && u.payload().first()
                                == Some(&proxyfleet_proto::icmp::ECHO_REQUEST) =>
                    {
                        return Some(Terminated {
                            kind: FlowKind::Echo,
                            src: SocketAddr::new(u.src_addr(), 0),
                            dst: SocketAddr::new(u.dst_addr(), 0),
                            pipe: Box::new(EchoPipe {
                                request: Some(u.payload().to_vec()),
                                packet: u,
                            }),
                        });
                    }
                    ipstack::IpStackStream::UnknownTransport(_)
                    | ipstack::IpStackStream::UnknownNetwork(_) => {}
                }
            }
        })
    }
}

/// TCP by the kernel (nftables TPROXY hands customers' connections to one transparent listener, so the kernel's
/// TCP, with window scaling and GRO, terminates them) and everything else by the userspace stack. The accepted
/// socket's local address is where the customer wanted to go; its peer, the customer's VPN address.
pub struct TproxyEngine {
    listener: tokio::net::TcpListener,
    stack: StackEngine,
}

impl TproxyEngine {
    pub fn new(listener: tokio::net::TcpListener, stack: StackEngine) -> TproxyEngine {
        TproxyEngine { listener, stack }
    }
}

/// A listener on 127.0.0.1 (port chosen by the kernel) with `IP_TRANSPARENT`, for nftables TPROXY.
pub fn transparent_listener() -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_ip_transparent_v4(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)).into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(std::net::TcpListener::from(s))
}

impl Engine for TproxyEngine {
    fn accept(&mut self) -> Pin<Box<dyn Future<Output = Option<Terminated>> + Send + '_>> {
        Box::pin(async move {
            loop {
                tokio::select! {
                    r = self.listener.accept() => match r {
                        Ok((stream, peer)) => {
                            let Ok(dst) = stream.local_addr() else { continue };
                            let _ = stream.set_nodelay(true);
                            return Some(Terminated { kind: FlowKind::Tcp, src: peer, dst, pipe: Box::new(stream) });
                        }
                        Err(e) => {
                            // Out of descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "VPN TCP accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    t = self.stack.accept() => return t,
                }
            }
        })
    }
}

/// Create proxyfleet's tun device, without an address (it only ever sees routed packets); `net::attach_stack`
/// brings it up.
pub fn open_tun(name: &str) -> Result<tun::AsyncDevice, tun::Error> {
    let mut c = tun::Configuration::default();
    c.tun_name(name).mtu(MTU).up();
    // CAP_NET_ADMIN is what it takes, not uid 0 (the systemd unit grants the capability to a service user); with
    // this off the crate leaves the link settings to us.
    c.platform_config(|p| {
        p.ensure_root_privileges(false);
    });
    tun::create_as_async(&c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_boxed_pipe_knows_whether_a_socket_is_under_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let tcp: Box<dyn Pipe> = Box::new(s);
        assert!((*tcp).tcp().is_some());
        let memory: Box<dyn Pipe> = Box::new(tokio::io::duplex(64).0);
        assert!((*memory).tcp().is_none());
    }

    fn udp_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    async fn next_flow(engine: &mut StackEngine) -> Terminated {
        tokio::time::timeout(Duration::from_secs(5), engine.accept())
            .await
            .unwrap()
            .unwrap()
    }

    /// The next packet the engine writes to the device, in a buffer, and its length.
    async fn next_packet(outside: &mut tokio::io::DuplexStream) -> (Vec<u8>, usize) {
        let mut pkt = vec![0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(5), outside.read(&mut pkt))
            .await
            .unwrap()
            .unwrap();
        (pkt, n)
    }

    /// Packets fed in memory come out as a flow with the customer's address, and answers go back as packets.
    #[tokio::test]
    async fn udp_packet_becomes_a_flow_and_the_answer_a_packet() {
        let (mut outside, device) = tokio::io::duplex(64 * 1024);
        let mut engine = StackEngine::new(device);
        outside
            .write_all(&udp_packet(
                [10, 77, 0, 16],
                40000,
                [10, 77, 0, 2],
                53,
                b"query",
            ))
            .await
            .unwrap();
        let mut flow = next_flow(&mut engine).await;
        assert_eq!(flow.kind, FlowKind::Udp);
        assert_eq!(flow.src, "10.77.0.16:40000".parse().unwrap());
        assert_eq!(flow.dst, "10.77.0.2:53".parse().unwrap());
        let mut buf = [0u8; 64];
        let n = flow.pipe.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"query");
        flow.pipe.write_all(b"answer").await.unwrap();
        let (pkt, n) = next_packet(&mut outside).await;
        let parsed = etherparse::SlicedPacket::from_ip(&pkt[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header().source(), [10, 77, 0, 2]);
        assert_eq!(ip.header().destination(), [10, 77, 0, 16]);
        let Some(etherparse::TransportSlice::Udp(udp)) = parsed.transport else {
            panic!("not UDP")
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (53, 40000));
        assert_eq!(udp.payload(), b"answer");
    }

    /// An ICMP echo request comes out as an echo flow whose one read is the message; a write goes back as an ICMP
    /// packet from the pinged address. Other ICMP (a timestamp request here) is dropped.
    #[tokio::test]
    async fn echo_request_becomes_an_echo_flow_and_the_reply_a_packet() {
        use proxyfleet_proto::icmp::{Echo, EchoKind};
        let (mut outside, device) = tokio::io::duplex(64 * 1024);
        let mut engine = StackEngine::new(device);
        let req = Echo {
            kind: EchoKind::Request,
            id: 42,
            seq: 1,
            data: b"ping".to_vec(),
        };
        let icmp_packet = |msg: &[u8]| {
            let mut ip = etherparse::Ipv4Header::new(
                u16::try_from(msg.len()).unwrap(),
                64,
                etherparse::IpNumber::ICMP,
                [10, 77, 0, 16],
                [192, 0, 2, 7],
            )
            .unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            let mut p = ip.to_bytes().to_vec();
            p.extend_from_slice(msg);
            p
        };
        let mut timestamp = req.to_bytes();
        timestamp[0] = 13;
        outside.write_all(&icmp_packet(&timestamp)).await.unwrap();
        // The in-memory device has no packet boundaries: let the stack read the first packet alone.
        tokio::time::sleep(Duration::from_millis(200)).await;
        outside
            .write_all(&icmp_packet(&req.to_bytes()))
            .await
            .unwrap();
        let mut flow = next_flow(&mut engine).await;
        assert_eq!(flow.kind, FlowKind::Echo);
        assert_eq!(flow.src, "10.77.0.16:0".parse().unwrap());
        assert_eq!(flow.dst, "192.0.2.7:0".parse().unwrap());
        let mut buf = [0u8; 1500];
        let n = flow.pipe.read(&mut buf).await.unwrap();
        assert_eq!(Echo::parse(&buf[..n], EchoKind::Request).unwrap(), req);
        assert_eq!(
            flow.pipe.read(&mut buf).await.unwrap(),
            0,
            "one message only"
        );
        flow.pipe.write_all(&req.reply().to_bytes()).await.unwrap();
        let (pkt, n) = next_packet(&mut outside).await;
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&pkt[..n]).unwrap();
        assert_eq!(ip.protocol, etherparse::IpNumber::ICMP);
        assert_eq!(
            (ip.source, ip.destination),
            ([192, 0, 2, 7], [10, 77, 0, 16])
        );
        assert_eq!(Echo::parse(rest, EchoKind::Reply).unwrap(), req.reply());
    }
}
