//! UDP associations: after the `Ok` byte the flow stream carries [`UdpDatagram`] frames both ways. From the
//! server a frame names the destination; the agent resolves it on the device, checks it against the
//! [`TargetPolicy`] and sends the payload from its own UDP sockets. What those sockets receive goes back to the
//! server as frames naming the source.
//!
//! UDP may lose datagrams, so the association does too rather than queue without bound: a denied, unresolvable
//! or unsendable datagram is dropped, and so is one from a target when the queue to the server is full.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::{FrameCodec, Host, OpenResult, UdpDatagram, MAX_UDP_FRAME};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::conn::{BoxRead, BoxWrite};
use crate::policy::TargetPolicy;

/// An association that relays no datagram in either direction for this long ends.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Resolving one name must finish within this, or the datagram is dropped.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// A name that did not resolve is not asked again for this long (datagrams to it are dropped meanwhile).
const DNS_FAILURE_TTL: Duration = Duration::from_secs(10);
/// Names remembered per association; past this the oldest is forgotten.
const MAX_NAMES: usize = 256;
/// Datagrams from targets waiting to be written to the server; more are dropped. Bounds the queue to 2 MiB.
const DOWNLINK_QUEUE: usize = 32;
/// Datagrams read from one socket per wake-up, so that one busy socket cannot starve the rest of the loop.
const RECV_BATCH: usize = 64;
/// Largest UDP payload, in bytes.
const MAX_PAYLOAD: usize = 65_535;
/// Handing one datagram to the kernel must finish within this (it only waits when the send buffer is full).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Flushing and finishing the stream at the end may take this long.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type FrameReader = FramedRead<BoxRead, FrameCodec<UdpDatagram>>;
type FrameWriter = FramedWrite<BoxWrite, FrameCodec<UdpDatagram>>;

/// Relay one UDP association until the server closes the stream or it stays idle for [`IDLE_TIMEOUT`]. With
/// `resolver`, it is a DNS association: every datagram goes to that address (the device's own resolver, allowed
/// whatever the policy says of its address) and only its answers come back.
pub(crate) async fn serve_udp(
    recv: BoxRead,
    mut send: BoxWrite,
    policy: TargetPolicy,
    resolver: Option<SocketAddr>,
) -> anyhow::Result<()> {
    send.write_all(&[OpenResult::Ok as u8]).await?;
    send.flush().await?;
    let reader = FramedRead::new(recv, FrameCodec::new(MAX_UDP_FRAME));
    let mut writer = FramedWrite::new(send, FrameCodec::new(MAX_UDP_FRAME));
    let (tx, rx) = mpsc::channel(DOWNLINK_QUEUE);
    let outcome = tokio::select! {
        r = relay(reader, tx, policy, resolver) => r,
        r = write_down(&mut writer, rx) => r,
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.close()).await;
    outcome
}

/// Write queued datagrams to the server, a batch per flush. Returns only when the stream fails.
async fn write_down(
    writer: &mut FrameWriter,
    mut rx: mpsc::Receiver<UdpDatagram>,
) -> anyhow::Result<()> {
    while let Some(d) = rx.recv().await {
        writer.feed(d).await.context("writing a datagram frame")?;
        while let Ok(d) = rx.try_recv() {
            writer.feed(d).await.context("writing a datagram frame")?;
        }
        writer.flush().await.context("writing a datagram frame")?;
    }
    Ok(())
}

/// The association's sockets (each bound on first use) and resolved names.
struct Relay {
    policy: TargetPolicy,
    resolver: Option<SocketAddr>,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    names: NameCache,
}

async fn relay(
    mut reader: FrameReader,
    tx: mpsc::Sender<UdpDatagram>,
    policy: TargetPolicy,
    resolver: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let mut relay = Relay {
        policy,
        resolver,
        v4: None,
        v6: None,
        names: NameCache::default(),
    };
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        let active = tokio::select! {
            frame = reader.next() => match frame {
                Some(Ok(d)) => {
                    relay.send_up(d).await;
                    true
                }
                Some(Err(e)) => return Err(e).context("reading a datagram frame"),
                // The server closed the stream: the customer ended the association.
                None => return Ok(()),
            },
            r = readable(relay.v4.as_ref()) => {
                r?;
                relay.v4.as_ref().is_some_and(|s| drain(s, &mut buf, policy, resolver, &tx))
            }
            r = readable(relay.v6.as_ref()) => {
                r?;
                relay.v6.as_ref().is_some_and(|s| drain(s, &mut buf, policy, resolver, &tx))
            }
            () = &mut idle => {
                tracing::debug!("UDP association idle; closing it");
                return Ok(());
            }
        };
        if active {
            idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
        }
    }
}

/// Resolves when `sock` may have a datagram to read; never when there is no socket yet.
async fn readable(sock: Option<&UdpSocket>) -> std::io::Result<()> {
    match sock {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

/// Read what `sock` has and queue it for the server. Returns whether any datagram from a permitted source came.
fn drain(
    sock: &UdpSocket,
    buf: &mut [u8],
    policy: TargetPolicy,
    resolver: Option<SocketAddr>,
    tx: &mpsc::Sender<UdpDatagram>,
) -> bool {
    let mut active = false;
    for _ in 0..RECV_BATCH {
        let (n, from) = match sock.try_recv_from(buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                // For example an ICMP error for an earlier send; the next datagram may be fine.
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let ip = from.ip().to_canonical();
        // A DNS association takes answers from its resolver only.
        if let Some(r) = resolver {
            if r.ip().to_canonical() != ip || r.port() != from.port() {
                continue;
            }
        // The socket is not connected, so anyone can send to it: keep the LAN out in this direction too.
        } else if !policy.permits(ip) {
            tracing::debug!(source = %ip, "dropped a datagram from a non-public source");
            continue;
        }
        active = true;
        let Some(payload) = buf.get(..n) else {
            continue;
        };
        let d = UdpDatagram {
            host: match ip {
                IpAddr::V4(a) => Host::V4(a),
                IpAddr::V6(a) => Host::V6(a),
            },
            port: from.port(),
            payload: payload.to_vec(),
        };
        match tx.try_send(d) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!("queue to the server is full; dropped a datagram");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
    active
}

impl Relay {
    /// Send one datagram from the server to its destination, or drop it (and say why in the debug log).
    async fn send_up(&mut self, d: UdpDatagram) {
        let UdpDatagram {
            host,
            port,
            payload,
        } = d;
        if let Some(to) = self.resolver {
            // A DNS association: the frame's address is the customer's idea of a resolver; the device's is used.
            match self.socket(to.ip()).await {
                Ok(sock) => {
                    let r = tokio::time::timeout(SEND_TIMEOUT, sock.send_to(&payload, to)).await;
                    tracing::trace!(%to, sent = ?r, "DNS query to the device's resolver");
                }
                Err(e) => tracing::debug!(error = %e, %to, "no UDP socket for the resolver"),
            }
            return;
        }
        if port == 0 {
            tracing::debug!(target_host = %host, "dropped a datagram to port 0");
            return;
        }
        let literal;
        let addrs: &[IpAddr] = match &host {
            Host::V4(a) => {
                literal = [IpAddr::V4(*a)];
                &literal
            }
            Host::V6(a) => {
                literal = [IpAddr::V6(*a)];
                &literal
            }
            Host::Domain(name) => match self.names.lookup(name).await {
                Some(a) => a,
                None => {
                    tracing::debug!(target_host = %host, "dropped a datagram to a name that does not resolve");
                    return;
                }
            },
        };
        let policy = self.policy;
        let Some(ip) = addrs
            .iter()
            .map(|ip| ip.to_canonical())
            .find(|ip| policy.permits(*ip))
        else {
            tracing::debug!(target_host = %host, "dropped a datagram to a non-public target");
            return;
        };
        let sock = match self.socket(ip).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, target_ip = %ip, "no UDP socket for this address family");
                return;
            }
        };
        let to = SocketAddr::new(ip, port);
        match tokio::time::timeout(SEND_TIMEOUT, sock.send_to(&payload, to)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, %to, "UDP send failed"),
            Err(_) => tracing::debug!(%to, "UDP send buffer full; dropped a datagram"),
        }
    }

    /// The socket for `ip`'s family, bound to an ephemeral port on first use.
    async fn socket(&mut self, ip: IpAddr) -> std::io::Result<&UdpSocket> {
        let (slot, any): (&mut Option<UdpSocket>, SocketAddr) = match ip {
            IpAddr::V4(_) => (&mut self.v4, (Ipv4Addr::UNSPECIFIED, 0).into()),
            IpAddr::V6(_) => (&mut self.v6, (Ipv6Addr::UNSPECIFIED, 0).into()),
        };
        if slot.is_none() {
            *slot = Some(UdpSocket::bind(any).await?);
        }
        slot.as_ref()
            .ok_or_else(|| std::io::Error::other("UDP socket missing"))
    }
}

/// Names resolved during one association, so that a stream of datagrams to one name costs one lookup.
#[derive(Default)]
struct NameCache {
    entries: HashMap<String, Resolution>,
    /// Keys of `entries`, oldest first.
    order: VecDeque<String>,
}

enum Resolution {
    Addrs(Vec<IpAddr>),
    /// Did not resolve; ask again after this.
    Failed(Instant),
}

impl NameCache {
    /// The addresses `name` resolves to on the device; `None` if it does not resolve.
    async fn lookup(&mut self, name: &str) -> Option<&[IpAddr]> {
        let key = name.to_ascii_lowercase();
        let fresh = match self.entries.get(&key) {
            Some(Resolution::Addrs(_)) => true,
            Some(Resolution::Failed(retry)) => Instant::now() < *retry,
            None => false,
        };
        if !fresh {
            let entry =
                match tokio::time::timeout(DNS_TIMEOUT, crate::flow::resolve_name(name)).await {
                    Ok(Ok(a)) if !a.is_empty() => Resolution::Addrs(a),
                    _ => Resolution::Failed(Instant::now() + DNS_FAILURE_TTL),
                };
            self.insert(key.clone(), entry);
        }
        match self.entries.get(&key) {
            Some(Resolution::Addrs(a)) => Some(a),
            _ => None,
        }
    }

    fn insert(&mut self, key: String, entry: Resolution) {
        if !self.entries.contains_key(&key) {
            if self.order.len() >= MAX_NAMES {
                if let Some(oldest) = self.order.pop_front() {
                    self.entries.remove(&oldest);
                }
            }
            self.order.push_back(key.clone());
        }
        self.entries.insert(key, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn name_cache_stays_bounded_and_forgets_the_oldest() {
        let mut cache = NameCache::default();
        for i in 0..MAX_NAMES + 10 {
            cache.insert(format!("n{i}.example"), Resolution::Addrs(Vec::new()));
        }
        assert_eq!(cache.entries.len(), MAX_NAMES);
        assert_eq!(cache.order.len(), MAX_NAMES);
        assert!(!cache.entries.contains_key("n0.example"));
        assert!(!cache.entries.contains_key("n9.example"));
        assert!(cache.entries.contains_key("n10.example"));
        assert!(cache
            .entries
            .contains_key(&format!("n{}.example", MAX_NAMES + 9)));
        // Replacing an entry does not count twice.
        cache.insert("n10.example".into(), Resolution::Addrs(Vec::new()));
        assert_eq!(cache.order.len(), MAX_NAMES);
    }

    #[tokio::test]
    async fn name_cache_answers_from_memory() {
        let mut cache = NameCache::default();
        let ip: IpAddr = Ipv4Addr::new(192, 0, 2, 7).into();
        // Not a resolvable name: only the cache can answer it.
        cache.insert("cached.invalid".into(), Resolution::Addrs(vec![ip]));
        assert_eq!(cache.lookup("Cached.INVALID").await, Some(&[ip][..]));
    }
}
