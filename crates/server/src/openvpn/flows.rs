//! VPN flows through the relay: each TCP stream and UDP flow the engine terminated is matched to its connection by
//! the customer's VPN address, admitted like a proxy flow, and relayed through the connection's device with the same
//! meter and cut-off. DNS to the pushed address goes to the device's own resolver. ICMP echo requests are pinged
//! from the device, one tunnel stream each; the pushed DNS address answers them itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use proxyfleet_proto::icmp::{Echo, EchoKind, MAX_ECHO, REPLY_TIMEOUT};
use proxyfleet_proto::{FrameCodec, Host, Target, UdpDatagram, MAX_UDP_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::engine::{Engine, FlowKind, Terminated};
use super::sessions::Sessions;
use crate::proxy::directory::Dir;
use crate::proxy::relay;
use crate::proxy::ProxyContext;

/// Largest datagram read from a customer, in bytes.
const MAX_DATAGRAM: usize = 65_535;

/// Most echo requests of one customer address waiting for their reply at once; more are dropped (as a router
/// drops a flood), so that `ping -f` to an unreachable host cannot tie up the device's streams.
const ECHOES_IN_FLIGHT: usize = 16;

/// Echo requests in flight per customer address.
#[derive(Default)]
struct EchoSlots(std::sync::Mutex<std::collections::HashMap<Ipv4Addr, usize>>);

/// One taken slot, given back on drop.
struct EchoSlot {
    slots: Arc<EchoSlots>,
    src: Ipv4Addr,
}

impl EchoSlots {
    fn take(self: &Arc<Self>, src: Ipv4Addr) -> Option<EchoSlot> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(src).or_insert(0);
        if *n >= ECHOES_IN_FLIGHT {
            return None;
        }
        *n += 1;
        Some(EchoSlot {
            slots: self.clone(),
            src,
        })
    }
}

impl Drop for EchoSlot {
    fn drop(&mut self) {
        let mut m = self
            .slots
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.src);
            }
        }
    }
}

/// Serve the engine's flows until it stops or the server shuts down; `dns` is the pushed DNS address, and
/// `dns_is_own` says it lies inside the VPN subnet (so it exists only inside the door and answers pings itself;
/// a public address, if an operator pushed one, is pinged through the device like any other).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    sessions: Arc<Sessions>,
    dns: Ipv4Addr,
    dns_is_own: bool,
    mut engine: Box<dyn Engine>,
    stop: tokio_util::sync::CancellationToken,
) {
    let echoes = Arc::new(EchoSlots::default());
    loop {
        let t = tokio::select! {
            t = engine.accept() => match t {
                Some(t) => t,
                None => {
                    tracing::error!("the VPN packet engine stopped; VPN customers' packets are dropped");
                    return;
                }
            },
            _ = ctx.shutdown.cancelled() => return,
            // The engine (its tun and listener) is dropped: what the kernel has left is the blackhole.
            _ = stop.cancelled() => return,
        };
        tracing::trace!(kind = ?t.kind, src = %t.src, dst = %t.dst, "VPN flow");
        // IPv4 only (IPv6 is blocked on the clients); a source without a session belongs to nobody.
        let IpAddr::V4(src) = t.src.ip() else {
            continue;
        };
        let Some(entry) = sessions.by_ip(src) else {
            tracing::debug!(%src, "VPN packet from an address without a session; dropped");
            continue;
        };
        let slot = match t.kind {
            FlowKind::Echo => match echoes.take(src) {
                Some(slot) => Some(slot),
                None => continue,
            },
            _ => None,
        };
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(async move {
            match t.kind {
                FlowKind::Tcp => tcp(&ctx2, entry, t, dns).await,
                FlowKind::Udp => udp(&ctx2, entry, t, dns).await,
                FlowKind::Echo => echo(&ctx2, entry, t, dns_is_own.then_some(dns)).await,
            }
            drop(slot);
        });
    }
}

fn host_of(a: SocketAddr) -> Host {
    match a.ip() {
        IpAddr::V4(v4) => Host::V4(v4),
        IpAddr::V6(v6) => Host::V6(v6),
    }
}

async fn tcp(
    ctx: &ProxyContext,
    entry: Arc<crate::proxy::directory::Entry>,
    t: Terminated,
    dns: Ipv4Addr,
) {
    // DNS over TCP to the pushed address goes to the device's resolver, like DNS over UDP.
    let target = if t.dst == SocketAddr::new(IpAddr::V4(dns), 53) {
        Target::DnsTcp
    } else {
        Target::Tcp {
            host: host_of(t.dst),
            port: t.dst.port(),
        }
    };
    let (flow, dr, dw) = match ctx.open(&entry, target).await {
        Ok(f) => f,
        Err(e) => {
            // The customer's stack sees the connection close (the userspace stack had accepted it already).
            tracing::debug!(src = %t.src, dst = %t.dst, failure = ?e, "VPN TCP flow refused");
            return;
        }
    };
    let ended = relay::relay(
        &ctx.dir,
        &flow,
        tokio::io::split(t.pipe),
        (dr, dw),
        &[],
        ctx.relay_options(false),
    )
    .await;
    let pipe = ended.cr.unsplit(ended.cw);
    // Through the box to the pipe inside (the box is a `Pipe` too, one that is no socket).
    if let Some(s) = (*pipe).tcp() {
        relay::close_customer(s, ended.broken).await;
    }
}

async fn udp(
    ctx: &ProxyContext,
    entry: Arc<crate::proxy::directory::Entry>,
    mut t: Terminated,
    dns: Ipv4Addr,
) {
    let is_dns = t.dst == SocketAddr::new(IpAddr::V4(dns), 53);
    let target = if is_dns { Target::Dns } else { Target::Udp };
    let (flow, dr, dw) = match ctx.open(&entry, target).await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(src = %t.src, dst = %t.dst, failure = ?e, "VPN UDP flow refused");
            return;
        }
    };
    tracing::trace!(src = %t.src, dst = %t.dst, is_dns, "VPN UDP flow open");
    let mut from_dev = FramedRead::new(dr, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let mut to_dev = FramedWrite::new(dw, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let now = || ctx.dir.clock().now_ms();
    let dst_host = host_of(t.dst);
    loop {
        tokio::select! {
            _ = flow.stop.cancelled() => break,
            r = t.pipe.read(&mut buf) => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                if !flow.charge_datagram(n, Dir::Up, now()) {
                    continue;
                }
                let d = UdpDatagram { host: dst_host.clone(), port: t.dst.port(), payload: buf[..n].to_vec() };
                if to_dev.send(d).await.is_err() {
                    break;
                }
            }
            d = from_dev.next() => {
                let Some(Ok(d)) = d else { break };
                // This flow is one address pair: only answers from its destination belong to it (a DNS
                // association's answers all come from the device's resolver and belong to it).
                if !is_dns && (d.host != dst_host || d.port != t.dst.port()) {
                    continue;
                }
                if !flow.charge_datagram(d.payload.len(), Dir::Down, now()) {
                    continue;
                }
                if t.pipe.write_all(&d.payload).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to_dev.close().await;
}

/// One ICMP echo request: answered at once when it is for `own_dns`, the pushed DNS address when that exists only
/// inside the door (the gateway's pings are answered by the kernel, see `net`), otherwise pinged from the device
/// through a stream of its own. Request and reply are charged whole, like UDP datagrams; a reply that does not
/// match the request (address, identifier, sequence) is dropped.
async fn echo(
    ctx: &ProxyContext,
    entry: Arc<crate::proxy::directory::Entry>,
    mut t: Terminated,
    own_dns: Option<Ipv4Addr>,
) {
    let mut msg = vec![0u8; MAX_ECHO];
    let n = match t.pipe.read(&mut msg).await {
        Ok(n) if n > 0 => n,
        _ => return,
    };
    let msg = &msg[..n];
    let (Ok(req), IpAddr::V4(dst)) = (Echo::parse(msg, EchoKind::Request), t.dst.ip()) else {
        return;
    };
    if own_dns == Some(dst) {
        let _ = t.pipe.write_all(&req.reply().to_bytes()).await;
        return;
    }
    let (flow, dr, dw) = match ctx.open(&entry, Target::Echo).await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(src = %t.src, %dst, failure = ?e, "VPN echo refused");
            return;
        }
    };
    let now = || ctx.dir.clock().now_ms();
    if !flow.charge_datagram(n, Dir::Up, now()) {
        return;
    }
    let mut from_dev = FramedRead::new(dr, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let mut to_dev = FramedWrite::new(dw, FrameCodec::<UdpDatagram>::new(MAX_UDP_FRAME));
    let host = Host::V4(dst);
    let request = UdpDatagram {
        host: host.clone(),
        port: 0,
        payload: msg.to_vec(),
    };
    // The device gives up after REPLY_TIMEOUT; a little more covers the tunnel, a stalled one included.
    let exchange = async {
        to_dev.send(request).await.ok()?;
        from_dev.next().await?.ok()
    };
    let reply = tokio::select! {
        _ = flow.stop.cancelled() => return,
        r = tokio::time::timeout(REPLY_TIMEOUT + std::time::Duration::from_secs(2), exchange) => r,
    };
    let Ok(Some(d)) = reply else {
        return;
    };
    let matches = Echo::parse(&d.payload, EchoKind::Reply)
        .is_ok_and(|r| r.id == req.id && r.seq == req.seq && d.host == host);
    if !matches || !flow.charge_datagram(d.payload.len(), Dir::Down, now()) {
        return;
    }
    let _ = t.pipe.write_all(&d.payload).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_slots_cap_each_address_and_come_back_on_drop() {
        let slots = Arc::new(EchoSlots::default());
        let (a, b) = (Ipv4Addr::new(10, 77, 0, 16), Ipv4Addr::new(10, 77, 0, 17));
        let mut held: Vec<EchoSlot> = (0..ECHOES_IN_FLIGHT)
            .map(|_| slots.take(a).expect("under the cap"))
            .collect();
        assert!(slots.take(a).is_none(), "the cap holds");
        assert!(
            slots.take(b).is_some(),
            "per address: another customer is not affected"
        );
        held.pop();
        assert!(slots.take(a).is_some(), "a finished echo frees its slot");
        drop(held);
        assert!(
            slots.0.lock().unwrap().is_empty(),
            "no entry is left for addresses with nothing in flight"
        );
    }
}
