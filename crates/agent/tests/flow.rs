#![allow(clippy::unwrap_used)]
//! Flow streams end to end on the agent's side: `serve_flow` over an in-memory stream, with real TCP and UDP
//! targets on loopback, under both target policies.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proxyfleet_agent::{serve_flow, TargetPolicy};
use proxyfleet_proto::codec::frame;
use proxyfleet_proto::{
    FrameCodec, Host, OpenResult, StreamHeader, Target, UdpDatagram, MAX_UDP_FRAME,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Long enough for a datagram to cross loopback many times over; what has not arrived by then is not coming.
const QUIET: Duration = Duration::from_millis(300);
/// Anything that should happen at all happens within this.
const SOON: Duration = Duration::from_secs(5);

const DENY: TargetPolicy = TargetPolicy {
    allow_private: false,
    dns_server: None,
};
const ALLOW: TargetPolicy = TargetPolicy {
    allow_private: true,
    dns_server: None,
};

/// The server's end of a flow stream.
struct ServerEnd {
    read: ReadHalf<DuplexStream>,
    write: WriteHalf<DuplexStream>,
}

/// Run `serve_flow` on one end of an in-memory stream (small buffers, so backpressure shows) and send `target`.
async fn open(target: Target, policy: TargetPolicy) -> (ServerEnd, JoinHandle<anyhow::Result<()>>) {
    let (server, agent) = tokio::io::duplex(1024);
    let (ar, aw) = tokio::io::split(agent);
    let flow = tokio::spawn(serve_flow(Box::new(ar), Box::new(aw), policy));
    let (read, mut write) = tokio::io::split(server);
    write
        .write_all(&frame(&StreamHeader { target }))
        .await
        .unwrap();
    (ServerEnd { read, write }, flow)
}

async fn result_byte(end: &mut ServerEnd) -> OpenResult {
    let b = tokio::time::timeout(SOON, end.read.read_u8())
        .await
        .unwrap()
        .unwrap();
    OpenResult::try_from(b).unwrap()
}

fn tcp(host: Host, port: u16) -> Target {
    Target::Tcp { host, port }
}

#[tokio::test]
async fn tcp_to_loopback_is_refused_unless_private_targets_are_allowed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
    for host in [
        Host::V4(Ipv4Addr::LOCALHOST),
        Host::V6(mapped),
        Host::V6(Ipv6Addr::LOCALHOST),
        Host::Domain("localhost".into()),
        Host::Domain("127.0.0.1".into()),
    ] {
        let (mut end, flow) = open(tcp(host.clone(), port), DENY).await;
        assert_eq!(
            result_byte(&mut end).await,
            OpenResult::NotAllowed,
            "{host}"
        );
        tokio::time::timeout(SOON, flow)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert!(
        tokio::time::timeout(QUIET, listener.accept())
            .await
            .is_err(),
        "a refused flow must not connect"
    );

    let (mut end, flow) = open(tcp(Host::V4(Ipv4Addr::LOCALHOST), port), ALLOW).await;
    assert_eq!(result_byte(&mut end).await, OpenResult::Ok);
    let (mut conn, _) = tokio::time::timeout(SOON, listener.accept())
        .await
        .unwrap()
        .unwrap();
    end.write.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    conn.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    conn.write_all(b"pong").await.unwrap();
    end.read.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong");
    drop(conn);
    end.write.shutdown().await.unwrap();
    tokio::time::timeout(SOON, flow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn tcp_to_a_name_that_does_not_resolve_is_a_dns_failure() {
    let (mut end, _flow) = open(tcp(Host::Domain("no-such-host.invalid".into()), 80), DENY).await;
    assert_eq!(result_byte(&mut end).await, OpenResult::DnsFailure);
}

type Frames = (
    FramedRead<ReadHalf<DuplexStream>, FrameCodec<UdpDatagram>>,
    FramedWrite<WriteHalf<DuplexStream>, FrameCodec<UdpDatagram>>,
);

/// Open a UDP association and check the `Ok` byte; then both halves speak datagram frames.
async fn associate(policy: TargetPolicy) -> (Frames, JoinHandle<anyhow::Result<()>>) {
    associate_to(Target::Udp, policy).await
}

async fn associate_to(
    target: Target,
    policy: TargetPolicy,
) -> (Frames, JoinHandle<anyhow::Result<()>>) {
    let (mut end, flow) = open(target, policy).await;
    assert_eq!(result_byte(&mut end).await, OpenResult::Ok);
    let frames = (
        FramedRead::new(end.read, FrameCodec::new(MAX_UDP_FRAME)),
        FramedWrite::new(end.write, FrameCodec::new(MAX_UDP_FRAME)),
    );
    (frames, flow)
}

/// A UDP echo server; returns its address and a receiver of every datagram it saw.
async fn echo(
    bind: SocketAddr,
) -> Option<(SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>)> {
    let sock = UdpSocket::bind(bind).await.ok()?;
    let addr = sock.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = tx.send(buf[..n].to_vec());
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    Some((addr, rx))
}

fn datagram(host: Host, port: u16, payload: &[u8]) -> UdpDatagram {
    UdpDatagram {
        host,
        port,
        payload: payload.to_vec(),
    }
}

async fn next_frame(
    read: &mut FramedRead<ReadHalf<DuplexStream>, FrameCodec<UdpDatagram>>,
) -> UdpDatagram {
    tokio::time::timeout(SOON, read.next())
        .await
        .expect("a datagram back")
        .expect("the association is open")
        .unwrap()
}

#[tokio::test]
async fn udp_datagrams_reach_a_loopback_target_and_come_back_with_its_address() {
    let (echo_addr, mut seen) = echo("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = echo_addr.port();
    let ((mut read, mut write), flow) = associate(ALLOW).await;
    let back_from = Host::V4(Ipv4Addr::LOCALHOST);

    for payload in [&b"first"[..], &b"second, a little longer"[..]] {
        write
            .send(datagram(Host::V4(Ipv4Addr::LOCALHOST), port, payload))
            .await
            .unwrap();
        assert_eq!(
            next_frame(&mut read).await,
            datagram(back_from.clone(), port, payload)
        );
    }
    // A name resolved on the device, and an IPv4-mapped address, reach the same IPv4 target; the answer names it
    // by its plain IPv4 address.
    write
        .send(datagram(Host::Domain("127.0.0.1".into()), port, b"by name"))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut read).await,
        datagram(back_from.clone(), port, b"by name")
    );
    let mapped = Host::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    write.send(datagram(mapped, port, b"mapped")).await.unwrap();
    assert_eq!(
        next_frame(&mut read).await,
        datagram(back_from, port, b"mapped")
    );
    // An empty datagram is a datagram too.
    write
        .send(datagram(Host::V4(Ipv4Addr::LOCALHOST), port, b""))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut read).await.payload, b"");
    let mut count = 0;
    while seen.try_recv().is_ok() {
        count += 1;
    }
    assert_eq!(count, 5, "the echo server saw every datagram once");
    assert!(!flow.is_finished());
}

#[tokio::test]
async fn udp_over_ipv6_loopback() {
    let Some((echo_addr, _seen)) = echo("[::1]:0".parse().unwrap()).await else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    let ((mut read, mut write), _flow) = associate(ALLOW).await;
    write
        .send(datagram(
            Host::V6(Ipv6Addr::LOCALHOST),
            echo_addr.port(),
            b"six",
        ))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut read).await,
        datagram(Host::V6(Ipv6Addr::LOCALHOST), echo_addr.port(), b"six")
    );
}

#[tokio::test]
async fn udp_to_non_public_targets_is_dropped_and_the_association_stays_open() {
    let (echo_addr, mut seen) = echo("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = echo_addr.port();
    let ((mut read, mut write), flow) = associate(DENY).await;
    for host in [
        Host::V4(Ipv4Addr::LOCALHOST),
        Host::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        Host::V6(Ipv6Addr::LOCALHOST),
        Host::Domain("127.0.0.1".into()),
        Host::Domain("localhost".into()),
    ] {
        write
            .send(datagram(host, port, b"let me in"))
            .await
            .unwrap();
    }
    assert!(
        tokio::time::timeout(QUIET, seen.recv()).await.is_err(),
        "no datagram may reach a loopback target"
    );
    assert!(
        tokio::time::timeout(QUIET, read.next()).await.is_err(),
        "nothing comes back, and the stream is not closed"
    );
    assert!(!flow.is_finished(), "the association is still open");
}

#[tokio::test]
async fn udp_association_ends_when_the_server_closes_the_stream() {
    let (echo_addr, _seen) = echo("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let ((mut read, mut write), flow) = associate(ALLOW).await;
    write
        .send(datagram(
            Host::V4(Ipv4Addr::LOCALHOST),
            echo_addr.port(),
            b"hi",
        ))
        .await
        .unwrap();
    next_frame(&mut read).await;
    write.close().await.unwrap();
    tokio::time::timeout(SOON, flow)
        .await
        .expect("serve_flow returns once the server closed its side")
        .unwrap()
        .unwrap();
    assert!(
        tokio::time::timeout(SOON, read.next())
            .await
            .unwrap()
            .is_none(),
        "the agent closes its side too"
    );
}

#[tokio::test]
async fn udp_association_ends_on_a_malformed_frame() {
    let ((_read, write), flow) = associate(ALLOW).await;
    let mut raw = write.into_inner();
    // A frame claiming 16 MiB, far beyond any datagram.
    raw.write_all(&[0x01, 0x00, 0x00, 0x00]).await.unwrap();
    let outcome = tokio::time::timeout(SOON, flow).await.unwrap().unwrap();
    assert!(outcome.is_err());
}

/// No real sockets here (only denied datagrams, which never open one), so paused time is safe.
#[tokio::test(start_paused = true)]
async fn udp_association_ends_after_five_idle_minutes() {
    let ((_read, mut write), mut flow) = associate(DENY).await;
    let minute = Duration::from_secs(60);
    tokio::time::sleep(4 * minute).await;
    assert!(!flow.is_finished(), "four idle minutes are not enough");
    // A datagram, even one the policy drops, restarts the clock.
    write
        .send(datagram(Host::V4(Ipv4Addr::LOCALHOST), 9, b"x"))
        .await
        .unwrap();
    tokio::time::sleep(4 * minute).await;
    assert!(!flow.is_finished(), "the datagram kept it alive");
    let ended = tokio::time::timeout(minute + Duration::from_secs(1), &mut flow).await;
    ended
        .expect("ends five minutes after the last datagram")
        .unwrap()
        .unwrap();
}

/// A DNS association sends every datagram to the device's resolver, whatever address the frame names and even
/// though the policy refuses private addresses, and answers come back from it.
#[tokio::test]
async fn dns_association_goes_to_the_device_resolver() {
    let (resolver, mut seen) = echo("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let policy = TargetPolicy {
        dns_server: Some(resolver),
        ..DENY
    };
    let ((mut read, mut write), _flow) = associate_to(Target::Dns, policy).await;
    write
        .send(datagram(
            Host::V4(Ipv4Addr::new(10, 77, 0, 2)),
            53,
            b"query",
        ))
        .await
        .unwrap();
    let back = next_frame(&mut read).await;
    assert_eq!(back.payload, b"query");
    assert_eq!(
        (back.host, back.port),
        (Host::V4(Ipv4Addr::LOCALHOST), resolver.port())
    );
    assert_eq!(seen.recv().await.unwrap(), b"query");
    // The same policy refuses that address for an ordinary UDP association.
    let ((mut read, mut write), _flow) = associate(DENY).await;
    write
        .send(datagram(
            Host::V4(Ipv4Addr::LOCALHOST),
            resolver.port(),
            b"leak",
        ))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(QUIET, read.next()).await.is_err(),
        "no answer"
    );
    assert!(seen.try_recv().is_err(), "nothing reached the resolver");
}

/// DNS over TCP connects to the device's resolver, though the policy refuses private addresses, and carries the
/// bytes both ways; without a resolver it is answered `Unreachable`.
#[tokio::test]
async fn dns_over_tcp_goes_to_the_device_resolver() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resolver = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut q = [0u8; 7];
        s.read_exact(&mut q).await.unwrap();
        s.write_all(b"\x00\x06answer").await.unwrap();
        q
    });
    let policy = TargetPolicy {
        dns_server: Some(resolver),
        ..DENY
    };
    let (mut end, _flow) = open(Target::DnsTcp, policy).await;
    assert_eq!(result_byte(&mut end).await, OpenResult::Ok);
    end.write.write_all(b"\x00\x05query").await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(SOON, end.read.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x00\x06answer");
    assert_eq!(&server.await.unwrap(), b"\x00\x05query");
    // The same address as an ordinary TCP target is refused by that policy.
    let (mut end, _flow) = open(tcp(Host::V4(Ipv4Addr::LOCALHOST), resolver.port()), policy).await;
    assert_eq!(result_byte(&mut end).await, OpenResult::NotAllowed);
    // A resolver that does not listen: the refusal is reported, not hidden.
    let (mut end, _flow) = open(Target::DnsTcp, policy).await;
    assert_eq!(result_byte(&mut end).await, OpenResult::Refused);
}

/// An echo stream pings from the device and returns the reply with the request's identifier, sequence and data;
/// a target the policy refuses, or a message that is not an echo request, gets no reply and the stream ends.
#[tokio::test]
async fn echo_pings_from_the_device_within_the_policy() {
    use proxyfleet_proto::icmp::{Echo, EchoKind};
    let req = Echo {
        kind: EchoKind::Request,
        id: 0xbeef,
        seq: 3,
        data: b"proxyfleet ping".to_vec(),
    };
    let ask = |policy: TargetPolicy, payload: Vec<u8>| async move {
        let ((mut read, mut write), flow) = associate_to(Target::Echo, policy).await;
        write
            .send(datagram(Host::V4(Ipv4Addr::LOCALHOST), 0, &payload))
            .await
            .unwrap();
        let back = tokio::time::timeout(SOON + SOON, read.next())
            .await
            .unwrap();
        let _ = tokio::time::timeout(SOON, flow)
            .await
            .expect("the stream ends");
        back.map(|f| f.unwrap())
    };
    // Root can always open a raw ICMP socket; anyone else needs net.ipv4.ping_group_range.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        println!("SKIPPED: ping sockets need root or net.ipv4.ping_group_range here");
        return;
    }
    let back = ask(ALLOW, req.to_bytes()).await.expect("a reply");
    assert_eq!(back.host, Host::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(
        Echo::parse(&back.payload, EchoKind::Reply).unwrap(),
        req.reply()
    );
    assert!(ask(DENY, req.to_bytes()).await.is_none(), "policy");
    let mut bad = req.to_bytes();
    bad[0] = 13; // a timestamp request
    assert!(ask(ALLOW, bad).await.is_none(), "only echo requests");
}
