//! The relay: copies a customer flow to and from its tunnel stream, counting every byte against the connection's
//! meter before it is forwarded.
//!
//! What is counted: payload bytes forwarded in either direction — for a TCP flow, the bytes of the customer's
//! stream after the proxy handshake (SOCKS5 negotiation, the HTTP `CONNECT` exchange) and the bytes coming back;
//! for an absolute-form HTTP request, the request head as rewritten for the origin plus its body, and the response
//! with its head as rewritten for the client; for UDP,
//! datagram payloads without headers. Protocol overhead (TCP/IP, QUIC, TLS, SOCKS and tunnel framing) is not
//! counted. A chunk is counted when it is handed to the socket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use proxyfleet_proto::io::CopyBuf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::directory::{Dir, Directory, Entry};
use proxyfleet_proto::end::{Refused, TunnelRead, TunnelWrite};

/// After a flow is told to stop, how long a write of already-counted bytes may still take.
const WRITE_GRACE: Duration = Duration::from_secs(2);

/// An admitted flow: whose meter it charges, through which device, and what stops it.
pub struct Flow {
    pub entry: Arc<Entry>,
    pub device: Arc<str>,
    /// Cancelled when the flow must end, server shutdown included.
    pub stop: CancellationToken,
    pub counters: Counters,
    /// Its place among the connection's open flows, given back when the flow ends.
    pub _slot: FlowSlot,
}

/// One of a connection's open flows, counted against its most ([`super::ProxyContext::max_flows_per_connection`]):
/// without a most, one credential that keeps its sockets open could take every stream its device has.
pub struct FlowSlot(Arc<Entry>);

impl FlowSlot {
    /// A place for one more flow of `entry`, unless it has `max` open already.
    pub fn take(entry: &Arc<Entry>, max: usize) -> Option<FlowSlot> {
        entry
            .open_flows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| FlowSlot(entry.clone()))
    }
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.0.open_flows.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The flow's share of the server's metrics; the open-flows gauge goes down when the flow is dropped.
pub struct Counters {
    active: prometheus::IntGauge,
    up: prometheus::IntCounter,
    down: prometheus::IntCounter,
}

impl Counters {
    pub fn new(m: &crate::metrics::Metrics) -> Self {
        m.proxy_flows_active.inc();
        Counters {
            active: m.proxy_flows_active.clone(),
            up: m.proxy_bytes.with_label_values(&["up"]),
            down: m.proxy_bytes.with_label_values(&["down"]),
        }
    }

    pub fn add(&self, d: Dir, n: usize) {
        match d {
            Dir::Up => self.up.inc_by(n as u64),
            Dir::Down => self.down.inc_by(n as u64),
        }
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Flow {
    /// Charge a datagram of `n` bytes whole ([`Entry::charge_whole`]) and count it in the metrics; false when it
    /// would pass the limit and must be dropped.
    pub fn charge_datagram(&self, n: usize, d: Dir, now_ms: i64) -> bool {
        if !self.entry.charge_whole(n, d, &self.device, now_ms) {
            return false;
        }
        self.counters.add(d, n);
        true
    }
}

/// Write bytes that were already counted. They are delivered even if the flow is stopped meanwhile (the customer
/// paid for them), but a peer that stopped reading cannot hold a stopped flow open for longer than the grace.
async fn write_counted<W: AsyncWrite + Unpin>(
    stop: &CancellationToken,
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<bool> {
    within_grace(stop, w.write_all(bytes))
        .await
        .map_or(Ok(false), |r| r.map(|()| true))
}

/// Run `step` (delivering something already counted) to its end, unless `stop` has been cancelled for longer
/// than [`WRITE_GRACE`]: then `None`.
pub(super) async fn within_grace<F: std::future::Future>(
    stop: &CancellationToken,
    step: F,
) -> Option<F::Output> {
    tokio::select! {
        r = step => Some(r),
        _ = async { stop.cancelled().await; tokio::time::sleep(WRITE_GRACE).await } => None,
    }
}

/// When a half-closed relay's open direction last read something: milliseconds since the relay started. Only
/// watched once one direction has ended, so that a flow moving data both ways reads no clock for it.
struct Activity {
    start: tokio::time::Instant,
    watching: AtomicBool,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        if !self.watching.load(Ordering::Relaxed) {
            return;
        }
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// How one direction of a relay ended, other than by failing to write.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// The source ended its stream normally.
    Eof,
    /// The cut-off, or `stop`.
    Stopped,
    /// Reading the source failed: a reset, or (for the tunnel side) the device's tunnel gone. Also the tunnel
    /// stream's end when the agent had refused the upload because the target broke ([`TunnelWrite::refused`] with [`proxyfleet_proto::STOP_TARGET_BROKE`]).
    SourceFailed,
}

/// Send `first` (bytes the front door already holds), then copy until EOF, an error, the cut-off or `stop`. A
/// chunk counted before the stop is still written (within the grace) before it returns. At EOF `w` is closed,
/// unless `keep_open` (its owner decides) or `broke` has resolved: then the end is a break.
#[allow(clippy::too_many_arguments)]
async fn pump<R, W>(
    dir: &Directory,
    flow: &Flow,
    stop: &CancellationToken,
    activity: &Activity,
    d: Dir,
    r: &mut R,
    w: &mut W,
    first: &[u8],
    keep_open: bool,
    broke: Option<&mut Refused>,
) -> std::io::Result<Pumped>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut w = w;
    if !first.is_empty() {
        let g = flow
            .entry
            .charge(first.len(), d, &flow.device, dir.clock().now_ms());
        flow.counters.add(d, g);
        if g > 0 && !write_counted(stop, &mut w, &first[..g]).await? {
            return Ok(Pumped::Stopped);
        }
        if g < first.len() {
            return Ok(Pumped::Stopped);
        }
    }
    // 8 KiB while the flow is idle or interactive, growing to 64 KiB while it moves bulk data.
    let mut buf = CopyBuf::default();
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(Pumped::Stopped),
            n = buf.read_from(r) => match n {
                Ok(n) => n,
                Err(_) => return Ok(Pumped::SourceFailed),
            },
        };
        if n == 0 {
            if broke.is_some_and(|b| b.now_or_never().is_some()) {
                return Ok(Pumped::SourceFailed);
            }
            if !keep_open {
                let _ = w.shutdown().await;
            }
            return Ok(Pumped::Eof);
        }
        activity.touch();
        let g = flow.entry.charge(n, d, &flow.device, dir.clock().now_ms());
        flow.counters.add(d, g);
        if g > 0 && !write_counted(stop, &mut w, &buf.data()[..g]).await? {
            return Ok(Pumped::Stopped);
        }
        if g < n || stop.is_cancelled() {
            return Ok(Pumped::Stopped);
        }
    }
}

/// How a relay ends besides both sides closing ([`super::ProxyContext::relay_options`]).
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// End the whole flow when the target's side ends (one forwarded HTTP request: the answer is complete), and
    /// leave the customer's connection open: the door closes it or reads the customer's next request from it.
    pub end_with_target: bool,
    /// Once one side has closed its direction, the flow ends when the other sends nothing for this long. Without
    /// it a client that closes (or half-closes) in front of a target that never does, or the reverse, holds a
    /// tunnel stream of the device for ever: enough of them and nobody else can open a flow through it.
    pub half_closed_timeout: Duration,
}

/// What a relay hands back: the customer's side, for [`close_customer`], and whether the device's side broke.
pub struct Relayed<CR, CW> {
    pub cr: CR,
    pub cw: CW,
    /// The flow was cut short: the tunnel stream failed instead of ending (the device went offline, or the
    /// target reset its connection), or the flow was stopped (cut-off, disabled, deleted, device changed or
    /// revoked, server stopping, the half-closed timeout before the target's side ended). The customer must not
    /// mistake what arrived for the whole answer, so the socket is reset instead of closed once what was written to
    /// it has arrived. Otherwise it is already half-closed (unless `end_with_target`: then the door decides what
    /// becomes of it).
    pub broken: bool,
}

/// Relay a customer flow through its tunnel stream until both directions end, either fails, or the flow is
/// stopped. `first_up` is customer data the front door already read past its handshake.
pub async fn relay<CR, CW, DR, DW>(
    dir: &Directory,
    flow: &Flow,
    (mut cr, mut cw): (CR, CW),
    (mut dr, mut dw): (DR, DW),
    first_up: &[u8],
    opts: RelayOptions,
) -> Relayed<CR, CW>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    DR: TunnelRead,
    DW: TunnelWrite,
{
    let mut broken = false;
    // The customer's side failed (a reset): the target must not take the upload for complete.
    let mut customer_failed = false;
    let mut broke = dw.refused(proxyfleet_proto::STOP_TARGET_BROKE);
    {
        // Stopped with the connection's flows, or by this relay when one direction ends it. Either way each
        // direction finishes writing the chunk it already counted, so what was charged is what was forwarded.
        let stop = flow.stop.child_token();
        let activity = Activity {
            start: tokio::time::Instant::now(),
            watching: AtomicBool::new(false),
            last_ms: AtomicU64::new(0),
        };
        let up = pump(
            dir,
            flow,
            &stop,
            &activity,
            Dir::Up,
            &mut cr,
            &mut dw,
            first_up,
            false,
            None,
        );
        let down = pump(
            dir,
            flow,
            &stop,
            &activity,
            Dir::Down,
            &mut dr,
            &mut cw,
            &[],
            opts.end_with_target,
            // Also for one forwarded request: an answer without a length ends with the stream, and must not look
            // whole when the site broke.
            Some(&mut broke),
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        // Set once one direction has ended cleanly: when the other must have moved something again.
        let mut idle_by: Option<tokio::time::Instant> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    // The upload's only error is a failed write to the tunnel stream: the device's side broke.
                    broken |= r.is_err();
                    customer_failed = matches!(r, Ok(Pumped::SourceFailed));
                    // A stop or the customer's failure ends the flow; a clean EOF leaves the other direction running
                    // (half-close), and so does a failed write: the target may have answered before it stopped
                    // taking the upload (a 413 to a large POST), and the answer is still coming. (A tunnel that
                    // is gone fails the download too.)
                    if matches!(r, Ok(Pumped::Stopped | Pumped::SourceFailed)) { stop.cancel(); }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    broken |= matches!(r, Ok(Pumped::SourceFailed));
                    if !matches!(r, Ok(Pumped::Eof)) || opts.end_with_target { stop.cancel(); }
                }
                () = tokio::time::sleep_until(idle_by.unwrap_or(far)), if idle_by.is_some() => {
                    let by = activity.last() + opts.half_closed_timeout;
                    if by <= tokio::time::Instant::now() {
                        stop.cancel();
                        idle_by = None;
                        // The target's side had not ended: what the customer got is not all there was.
                        broken |= !down_done;
                    } else {
                        idle_by = Some(by);
                    }
                    continue;
                }
            }
            if (up_done != down_done) && idle_by.is_none() && !stop.is_cancelled() {
                // Reads before this moment do not count: the timeout runs from the half-close at the earliest.
                activity.watching.store(true, Ordering::Relaxed);
                idle_by = Some(tokio::time::Instant::now() + opts.half_closed_timeout);
            }
        }
    }
    // Stopped from outside (the cut-off, disabling, deleting, a device change or revocation, the server stopping):
    // the flow was cut short, and the customer must be able to tell, as when its device's side broke. An answer
    // whose end is its connection's close (a body without length, a raw stream) would otherwise look whole.
    broken |= flow.stop.is_cancelled();
    if customer_failed || flow.stop.is_cancelled() {
        // Cut short on this side: the target must not take what it got of the upload for all of it. Refuse the
        // rest of the answer, then end the upload after everything charged (the agent resets the target at that
        // end); where the refusal cannot be carried (yamux) the stream is dropped unfinished, a reset that arrives
        // after its data. Over QUIC a stream whose answer had already ended gets a plain FIN (nothing to refuse).
        if dr.refuse(proxyfleet_proto::STOP_CUT_SHORT) {
            let _ = tokio::time::timeout(Duration::from_millis(200), dw.shutdown()).await;
        }
    } else if !broken {
        // Tell the customer the flow is over (FIN) before the sockets are dropped, and the device too: a yamux
        // stream dropped unfinished is reset, and the agent would reset the target as if the flow had broken.
        if !opts.end_with_target {
            let _ = tokio::time::timeout(Duration::from_millis(200), cw.shutdown()).await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), dw.shutdown()).await;
    }
    Relayed { cr, cw, broken }
}

/// End a customer's socket after a relay once what was written to it has arrived (within [`WRITE_GRACE`]). A
/// flow that ended closes, reading and dropping what the customer still sends: closing with its input unread
/// would reset the connection and lose the end of what the customer was charged for
/// ([`proxyfleet_proto::io::close_delivered`]). A `broken` one is reset ([`proxyfleet_proto::io::abort_delivered`]),
/// so that the customer's program reports a failure instead of a short answer.
pub async fn close_customer(s: &tokio::net::TcpStream, broken: bool) {
    if broken {
        proxyfleet_proto::io::abort_delivered(s, WRITE_GRACE).await;
    } else {
        proxyfleet_proto::io::close_delivered(s, WRITE_GRACE, true).await;
    }
}

/// [`close_customer`] for a customer socket the relay had as two halves.
pub async fn close_customer_halves(
    ended: Relayed<tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf>,
) {
    if let Ok(s) = ended.cr.reunite(ended.cw) {
        close_customer(&s, ended.broken).await;
    }
}
