//! Flow streams: the server asks for a connection; the agent resolves the name on the device, checks the target
//! against its [`TargetPolicy`], connects from the device's own network, answers one result byte, then copies
//! bytes both ways (TCP) or relays datagram frames (a UDP association, see [`crate::udp`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use futures_util::FutureExt;
use proxyfleet_proto::io::{copy, CopyError};
use proxyfleet_proto::{Decode, Host, OpenResult, StreamHeader, Target, MAX_STREAM_HEADER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conn::{BoxRead, BoxWrite};
use crate::policy::TargetPolicy;

/// After the server stopped reading a flow, how long its already-sent upload may take to reach the target.
const UP_GRACE: Duration = Duration::from_secs(2);
/// Every header read must finish within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a target (DNS + TCP) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the device's addresses that open flows were made from are checked.
const ADDRESS_CHECK: Duration = Duration::from_secs(2);

/// Serve one flow stream the server opened: read its header, then relay a TCP connection or a UDP association
/// until either side ends it. Targets the policy refuses are answered `NotAllowed` (TCP) or dropped (UDP).
pub async fn serve_flow(
    mut recv: BoxRead,
    mut send: BoxWrite,
    policy: TargetPolicy,
) -> anyhow::Result<()> {
    let header = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv))
        .await
        .context("header timeout")??;
    let resolver = || {
        let r = policy.dns_server.or_else(crate::dns::system_resolver);
        if r.is_none() {
            tracing::warn!("DNS was asked for, but the device has no resolver configured");
        }
        r
    };
    let connecting = match header.target {
        Target::Tcp { host, port } => {
            tokio::time::timeout(CONNECT_TIMEOUT, connect(&host, port, policy)).await
        }
        Target::Udp => return crate::udp::serve_udp(recv, send, policy, None).await,
        Target::Echo => return crate::ping::serve_echo(recv, send, policy).await,
        Target::Dns => match resolver() {
            Some(r) => return crate::udp::serve_udp(recv, send, policy, Some(r)).await,
            None => return answer(&mut send, OpenResult::Unreachable).await,
        },
        // The device's own resolver is reached whatever the target policy says, as for DNS over UDP: it is
        // typically a private address (the router, the carrier's).
        Target::DnsTcp => match resolver() {
            Some(r) => {
                tokio::time::timeout(CONNECT_TIMEOUT, async {
                    tokio::net::TcpStream::connect(r)
                        .await
                        .map_err(|e| OpenResult::from_io(&e))
                })
                .await
            }
            None => return answer(&mut send, OpenResult::Unreachable).await,
        },
    };
    let tcp = match connecting {
        Ok(Ok(s)) => s,
        Ok(Err(result)) => return answer(&mut send, result).await,
        Err(_) => return answer(&mut send, OpenResult::Timeout).await,
    };
    let _ = tcp.set_nodelay(true);
    let lease = tcp.local_addr().ok().map(|a| addresses::lease(a.ip()));
    send.write_all(&[OpenResult::Ok as u8]).await?;
    let (mut tr, mut tw) = tcp.into_split();
    let gone = async {
        match &lease {
            Some(l) => l.gone().await,
            None => std::future::pending().await,
        }
    };
    let (moved, ended) = tokio::select! {
        ended = relay(&mut recv, &mut send, &mut tr, &mut tw) => (false, ended),
        () = gone => (true, Ended::TunnelBroke),
    };
    if let Ended::TargetBroke { refused: true } = ended {
        // The server knows the target broke (the upload was refused with STOP_TARGET_BROKE): end the stream
        // after what the target sent, which a reset would throw away unread.
        let _ = tokio::time::timeout(UP_GRACE, send.shutdown()).await;
    }
    // The tunnel stream is done with; it does not wait for the target socket's close. Unfinished, it is reset.
    drop((recv, send));
    if moved {
        // The device's address changed (a phone on a new carrier address): what went through the old one can
        // neither arrive nor come back, so the flow ends now instead of hanging; the customer sees it reset (the
        // tunnel stream is dropped unfinished).
        tracing::debug!("a flow's address is gone from the device; flow ended");
        return Ok(());
    }
    // What was sent up must reach the target before the socket closes: closing it with the target's answer
    // unread would reset the connection and drop the upload's end (counted and paid for). The answer is left
    // unread: fetching it over the device's link would cost data nobody uses.
    if let Ok(tcp) = tr.reunite(tw) {
        match ended {
            Ended::Done => proxyfleet_proto::io::close_delivered(&tcp, UP_GRACE, false).await,
            // The customer's side failed (the tunnel is gone): the target is reset, not told the upload is complete.
            Ended::TunnelBroke => proxyfleet_proto::io::abort_delivered(&tcp, UP_GRACE).await,
            // Its connection is reset already.
            Ended::TargetBroke { .. } => {}
        }
    }
    Ok(())
}

/// The device's own addresses that open flows (and a tunnel over TCP) were made from, checked together by one task
/// every [`ADDRESS_CHECK`] (an address can be bound to exactly when the device has it), however many use them.
pub(crate) mod addresses {
    use std::collections::HashMap;
    use std::net::{IpAddr, SocketAddr};
    use std::sync::{Mutex, OnceLock};

    use tokio_util::sync::CancellationToken;

    #[derive(Default)]
    struct Watched {
        /// Per address: how many flows use it, and the token they end by when it goes (cancelled only together
        /// with the entry's removal, under the lock).
        open: HashMap<IpAddr, (usize, CancellationToken)>,
        /// The checking task, started by the first lease (and again if its runtime went away).
        task: Option<tokio::task::JoinHandle<()>>,
    }

    fn watched() -> &'static Mutex<Watched> {
        static W: OnceLock<Mutex<Watched>> = OnceLock::new();
        W.get_or_init(Mutex::default)
    }

    fn lock() -> std::sync::MutexGuard<'static, Watched> {
        watched()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A flow's hold on the address its target connection was made from.
    pub struct Lease {
        ip: IpAddr,
        gone: CancellationToken,
    }

    impl Lease {
        /// Returns once the device no longer has the address.
        pub async fn gone(&self) {
            self.gone.cancelled().await;
        }
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            let mut w = lock();
            // A cancelled lease's entry is gone already; one for the same address now is another watch's.
            if self.gone.is_cancelled() {
                return;
            }
            if let Some((n, _)) = w.open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    w.open.remove(&self.ip);
                }
            }
        }
    }

    pub fn lease(ip: IpAddr) -> Lease {
        let mut w = lock();
        let (n, token) = w.open.entry(ip).or_default();
        *n += 1;
        let gone = token.clone();
        if w.task.as_ref().is_none_or(|t| t.is_finished()) {
            w.task = Some(tokio::spawn(check()));
        }
        Lease { ip, gone }
    }

    /// Whether the device still has `ip` (any other failure to bind counts as having it).
    pub fn have(ip: IpAddr) -> bool {
        !matches!(
            std::net::UdpSocket::bind(SocketAddr::new(ip, 0)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable
        )
    }

    async fn check() {
        loop {
            tokio::time::sleep(super::ADDRESS_CHECK).await;
            let ips: Vec<IpAddr> = lock().open.keys().copied().collect();
            for ip in ips {
                if !have(ip) {
                    let mut w = lock();
                    if let Some((_, token)) = w.open.remove(&ip) {
                        token.cancel();
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::time::Duration;

        /// Flows from an address the device does not have end; flows from one it has go on; the watch forgets an
        /// address once no flow uses it.
        #[tokio::test(start_paused = true)]
        async fn flows_end_when_their_address_goes_and_only_then() {
            let kept: IpAddr = "127.0.0.1".parse().unwrap();
            // TEST-NET-1: no machine has it.
            let lost: IpAddr = "192.0.2.123".parse().unwrap();
            let (a, b, c) = (lease(kept), lease(kept), lease(lost));
            assert_eq!(lock().open.get(&kept).map(|e| e.0), Some(2));
            tokio::time::timeout(Duration::from_secs(10), c.gone())
                .await
                .expect("a flow from a missing address goes on");
            assert!(!lock().open.contains_key(&lost));
            assert!(
                tokio::time::timeout(Duration::from_secs(10), a.gone())
                    .await
                    .is_err(),
                "a flow from a present address was ended"
            );
            drop(a);
            assert_eq!(lock().open.get(&kept).map(|e| e.0), Some(1));
            drop((b, c));
            assert!(!lock().open.contains_key(&kept));
        }
    }
}

/// How a TCP flow's relay ended, and so how its tunnel stream and its target's connection end.
enum Ended {
    /// Both directions ended (the answer's end was passed on with a FIN), or the server stopped taking the answer:
    /// the target's connection is closed once the upload has arrived.
    Done,
    /// The server's side failed (the tunnel is gone, or the server reset the stream): the target is reset.
    TunnelBroke,
    /// The target broke — it reset its connection, or stopped taking the upload — after what it sent had been
    /// forwarded. `refused`: the server was told by the upload's refusal ([`proxyfleet_proto::end::TunnelRead::refuse`])
    /// and the stream ends with a FIN; otherwise it is reset (on yamux that arrives after its data).
    TargetBroke { refused: bool },
}

/// How the upload direction ended.
enum Up {
    /// The customer's side ended (half-close); the target was told.
    Ended,
    /// Reading the tunnel stream failed.
    TunnelFailed,
    /// The target stopped taking the upload; `refused` says whether the server was told.
    TargetStopped { refused: bool },
}

/// Copy a flow both ways until both directions end, the answer's fails (the server stopped taking it), the
/// customer's side fails, or the target breaks (after what it sent has been forwarded).
async fn relay(
    recv: &mut BoxRead,
    send: &mut BoxWrite,
    tr: &mut tokio::net::tcp::OwnedReadHalf,
    tw: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Ended {
    // Set when the target stopped taking the upload and the server could not be told (yamux).
    let stopped_untold = std::sync::atomic::AtomicBool::new(false);
    // The server cut the flow short on its side (its customer reset, the cut-off, …): the upload's end is a break.
    let mut cut_short = send.refused(proxyfleet_proto::STOP_CUT_SHORT);
    let ended = {
        // 8 KiB per direction while the flow is idle or interactive, growing to 64 KiB (fewer, larger writes into
        // the tunnel and the socket) while it moves bulk data.
        let up = async {
            let copied = match copy(&mut *recv, tw).await {
                // The server refused the answer before this end: not the upload's end, a break.
                Ok(_) if cut_short.as_mut().now_or_never().is_some() => return Up::TunnelFailed,
                Ok(_) => tw.shutdown().await.map_err(CopyError::Write),
                Err(e) => Err(e),
            };
            match copied {
                Ok(()) => Up::Ended,
                Err(CopyError::Read(_)) => Up::TunnelFailed,
                // A site that answers before reading the upload (a 413 to a large POST) and resets: stop the
                // upload at once (it costs the device's data for nothing), and hear the answer out.
                Err(CopyError::Write(_)) => {
                    let refused = recv.refuse(proxyfleet_proto::STOP_TARGET_BROKE);
                    stopped_untold.store(!refused, std::sync::atomic::Ordering::Relaxed);
                    Up::TargetStopped { refused }
                }
            }
        };
        let down = async {
            copy(tr, send).await?;
            // The target's end after it stopped taking the upload is a break even when it reads as an end (the
            // write saw the reset first): where the server could not be told, only a reset of the stream says so.
            if stopped_untold.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(CopyError::Read(std::io::ErrorKind::ConnectionReset.into()));
            }
            send.shutdown().await.map_err(CopyError::Write)
        };
        tokio::pin!(up, down);
        tokio::select! {
            u = &mut up => match u {
                // The customer's side ended cleanly (half-close): the answer may still be coming.
                Up::Ended => match down.await {
                    Err(CopyError::Read(_)) => Ended::TargetBroke { refused: false },
                    Ok(()) | Err(CopyError::Write(_)) => Ended::Done,
                },
                Up::TunnelFailed => Ended::TunnelBroke,
                Up::TargetStopped { refused } => match down.await {
                    // The server stopped taking the answer as well (or the tunnel went).
                    Err(CopyError::Write(_)) if !refused => Ended::TunnelBroke,
                    _ => Ended::TargetBroke { refused },
                },
            },
            r = &mut down => match r {
                Ok(()) => match up.await {
                    Up::Ended => Ended::Done,
                    Up::TunnelFailed => Ended::TunnelBroke,
                    // The answer went out whole; the target then refused the rest of the upload.
                    Up::TargetStopped { .. } => Ended::TargetBroke { refused: false },
                },
                // The target reset its connection: the server is told below, before the stream's FIN.
                Err(CopyError::Read(_)) => Ended::TargetBroke { refused: false },
                Err(CopyError::Write(_)) => {
                    // The server stopped taking the answer (the flow was cut short or closed). What it already sent
                    // up was counted: deliver it to the target, within a grace, before the flow ends.
                    match tokio::time::timeout(UP_GRACE, up).await {
                        Ok(Up::TunnelFailed) => Ended::TunnelBroke,
                        _ => Ended::Done,
                    }
                }
            },
        }
    };
    match ended {
        Ended::TargetBroke { refused: false } => Ended::TargetBroke {
            refused: recv.refuse(proxyfleet_proto::STOP_TARGET_BROKE),
        },
        e => e,
    }
}

/// Answer `result` (not `Ok`) and end the stream.
pub(crate) async fn answer(send: &mut BoxWrite, result: OpenResult) -> anyhow::Result<()> {
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

/// What the device's resolver answers for `name`.
pub(crate) async fn resolve_name(name: &str) -> std::io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((name, 0))
        .await?
        .map(|a| a.ip())
        .collect())
}

/// Resolve on the device (so DNS answers match its network), keep the addresses the policy permits, connect.
async fn connect(
    host: &Host,
    port: u16,
    policy: TargetPolicy,
) -> Result<tokio::net::TcpStream, OpenResult> {
    let resolved = match host {
        Host::V4(a) => vec![IpAddr::V4(*a)],
        Host::V6(a) => vec![IpAddr::V6(*a)],
        Host::Domain(d) => match resolve_name(d).await {
            Ok(a) if !a.is_empty() => a,
            _ => return Err(OpenResult::DnsFailure),
        },
    };
    let permitted: Vec<IpAddr> = resolved
        .iter()
        .copied()
        .filter(|ip| policy.permits(*ip))
        .collect();
    if permitted.is_empty() {
        tracing::debug!(target_host = %host, addrs = ?resolved, "refused a TCP flow to a non-public target");
        return Err(OpenResult::NotAllowed);
    }
    connect_any(interleave(permitted), port).await
}

/// Between starting connection attempts to a target's next address while the earlier ones are still pending
/// (RFC 8305's "Connection Attempt Delay", its recommended 250 ms).
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The addresses in the order to try them: the two families alternating, starting with the resolver's first
/// (RFC 8305 §4), so that a family broken on the device's network (IPv6 on some carriers) costs one attempt delay.
fn interleave(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    let first_v6 = addrs.first().is_some_and(IpAddr::is_ipv6);
    let (first, other): (Vec<IpAddr>, Vec<IpAddr>) =
        addrs.into_iter().partition(|ip| ip.is_ipv6() == first_v6);
    let (mut first, mut other) = (first.into_iter(), other.into_iter());
    let mut out = Vec::with_capacity(first.len() + other.len());
    loop {
        match (first.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Connect to the first of `addrs` that answers: one attempt starts every [`ATTEMPT_DELAY`] (or as soon as the
/// previous one fails) while earlier ones go on, and the first connection made wins (RFC 8305 §5). A host whose
/// first address silently drops connections is then reached through its next one, instead of the flow waiting out
/// the whole connect timeout on the first.
async fn connect_any(addrs: Vec<IpAddr>, port: u16) -> Result<tokio::net::TcpStream, OpenResult> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut waiting = addrs.into_iter();
    let mut attempts = FuturesUnordered::new();
    // The first attempt starts at once: a timer, even of zero, waits for the timer wheel's next millisecond, and
    // every flow pays it (session 12's benchmark: new-flow latency 0.7 ms became 1.9 ms).
    attempts.extend(waiting.next().map(|ip| dial(ip, port)));
    let mut last = OpenResult::Unreachable;
    let next = tokio::time::sleep(ATTEMPT_DELAY);
    tokio::pin!(next);
    loop {
        tokio::select! {
            biased;
            Some(r) = attempts.next() => match r {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // The next address at once.
                    last = OpenResult::from_io(&e);
                    attempts.extend(waiting.next().map(|ip| dial(ip, port)));
                    next.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
                }
            },
            () = &mut next, if waiting.len() > 0 => {
                attempts.extend(waiting.next().map(|ip| dial(ip, port)));
                next.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
            }
        }
        if attempts.is_empty() && waiting.len() == 0 {
            return Err(last);
        }
    }
}

/// One connection attempt of [`connect_any`].
async fn dial(ip: IpAddr, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::connect(SocketAddr::new(ip.to_canonical(), port)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn address_families_alternate_from_the_resolvers_first() {
        assert_eq!(
            interleave(ips(&["::1", "::2", "::3", "10.0.0.1", "10.0.0.2"])),
            ips(&["::1", "10.0.0.1", "::2", "10.0.0.2", "::3"])
        );
        assert_eq!(
            interleave(ips(&["10.0.0.1", "::1", "10.0.0.2"])),
            ips(&["10.0.0.1", "::1", "10.0.0.2"])
        );
        assert_eq!(interleave(ips(&["::1"])), ips(&["::1"]));
        assert_eq!(interleave(Vec::new()), Vec::<IpAddr>::new());
    }

    /// A host whose first address silently drops connections (here: a listener whose accept queue is full, so the
    /// kernel drops the SYNs) is reached through its next address after one attempt delay, not after the connect
    /// timeout; with every address refusing, the answer says so.
    #[tokio::test]
    async fn a_silent_first_address_costs_one_attempt_delay() {
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = good.local_addr().unwrap().port();
        let silent = tokio::net::TcpSocket::new_v4().unwrap();
        silent
            .bind(SocketAddr::from(([127, 0, 0, 2], port)))
            .unwrap();
        let silent = silent.listen(0).unwrap();
        // Fill its accept queue: the next SYN is dropped.
        let _queued = tokio::net::TcpStream::connect(silent.local_addr().unwrap())
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let s = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect_any(ips(&["127.0.0.2", "127.0.0.1"]), port),
        )
        .await
        .expect("the second address was never tried")
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), good.local_addr().unwrap());
        assert!(t.elapsed() >= ATTEMPT_DELAY, "{:?}", t.elapsed());

        let closed = good.local_addr().unwrap();
        drop(good);
        assert_eq!(
            connect_any(ips(&["127.0.0.1", "127.0.0.3"]), closed.port())
                .await
                .err(),
            Some(OpenResult::Refused)
        );
    }
}
