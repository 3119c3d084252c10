//! Customer front doors (HTTP proxy and SOCKS5), the proxy directory and the relay.
//!
//! Each door reduces a customer request to `(connection, target, byte pipe)`: it authenticates against the
//! [`Directory`], admits the flow (limit, enabled, device), opens a stream through the device's tunnel and hands
//! both ends to the [`relay`].

pub mod directory;
mod http;
pub mod relay;
mod socks5;
pub mod verified;

pub use directory::{AuthFailure, Directory, Refusal};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxyfleet_proto::{OpenResult, Target};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tunnel::link::{self, BoxRead, BoxWrite, FlowError};
use crate::tunnel::Registry;
use directory::Entry;
use relay::Flow;

/// Everything the doors share.
pub struct ProxyContext {
    pub dir: Arc<Directory>,
    /// A customer has this long to finish a door's handshake (SOCKS5 negotiation, HTTP request head).
    pub handshake_timeout: Duration,
    /// A flow one side has closed ends when the other side sends nothing for this long.
    pub half_closed_timeout: Duration,
    /// An HTTP proxy client's persistent connection closes when it sends no next request for this long.
    pub keep_alive_timeout: Duration,
    /// At most this many flows of one connection open at once.
    pub max_flows_per_connection: usize,
    pub metrics: crate::metrics::Metrics,
    pub registry: Arc<Registry>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl ProxyContext {
    /// How this server's relays end (a forwarded request's also with its answer: `end_with_target`).
    pub fn relay_options(&self, end_with_target: bool) -> relay::RelayOptions {
        relay::RelayOptions {
            end_with_target,
            half_closed_timeout: self.half_closed_timeout,
        }
    }

    /// One step of a customer's handshake: bounded by the handshake timeout and abandoned at shutdown (`None`
    /// either way). Once a flow relays, shutdown ends it through its stop token instead, so that bytes already
    /// counted are still delivered.
    pub async fn handshake<F: std::future::Future>(&self, step: F) -> Option<F::Output> {
        tokio::select! {
            r = tokio::time::timeout(self.handshake_timeout, step) => r.ok(),
            () = self.shutdown.cancelled() => None,
        }
    }
}

/// Which door a listener is.
#[derive(Debug, Clone)]
pub enum Door {
    /// The shared HTTP proxy port: the username picks the connection.
    Http,
    /// The shared SOCKS5 port.
    Socks5,
    /// A connection's own port: SOCKS5 or HTTP (told apart by the first byte); allow-listed clients need no
    /// credentials.
    Dedicated(String),
}

/// Why a flow could not be opened.
#[derive(Debug)]
pub enum OpenFailure {
    Refused(Refusal),
    DeviceOffline,
    /// The device's agent predates this kind of flow (it did not announce the capability): update the agent.
    Unsupported,
    Flow(FlowError),
    /// The server is stopping (a restart): try again in a moment.
    ShuttingDown,
    /// The connection already has as many flows open as it may.
    TooManyFlows,
}

impl OpenFailure {
    /// HTTP status and the short reason the customer sees.
    pub fn http(&self) -> (u16, &'static str) {
        match self {
            OpenFailure::Refused(r) => (403, r.reason()),
            OpenFailure::ShuttingDown => (503, "proxy restarting; try again"),
            OpenFailure::TooManyFlows => (429, "too many open flows on this connection"),
            OpenFailure::DeviceOffline | OpenFailure::Flow(FlowError::Offline) => {
                (502, "device offline")
            }
            OpenFailure::Unsupported => (502, "the device's agent is too old for this; update it"),
            OpenFailure::Flow(FlowError::Tunnel(_)) => (502, "tunnel to the device failed"),
            OpenFailure::Flow(FlowError::Timeout) => (504, "device did not answer in time"),
            OpenFailure::Flow(FlowError::Target(r)) => match r {
                OpenResult::Refused => (502, "target refused the connection"),
                OpenResult::Unreachable => (502, "target unreachable from the device"),
                OpenResult::DnsFailure => (502, "target host name did not resolve"),
                OpenResult::Timeout => (504, "target did not answer in time"),
                OpenResult::NotAllowed => (403, "target not allowed"),
                OpenResult::Ok | OpenResult::Failed => (502, "target connection failed"),
            },
        }
    }

    /// The SOCKS5 reply code (RFC 1928 section 6).
    pub fn socks(&self) -> proxyfleet_proto::socks5::Reply {
        use proxyfleet_proto::socks5::Reply;
        match self {
            OpenFailure::Refused(_) => Reply::NotAllowedByRuleset,
            OpenFailure::ShuttingDown | OpenFailure::TooManyFlows => Reply::GeneralFailure,
            OpenFailure::DeviceOffline
            | OpenFailure::Flow(FlowError::Offline | FlowError::Tunnel(_)) => {
                Reply::NetworkUnreachable
            }
            OpenFailure::Unsupported => Reply::CommandNotSupported,
            OpenFailure::Flow(FlowError::Timeout) => Reply::TtlExpired,
            OpenFailure::Flow(FlowError::Target(r)) => match r {
                OpenResult::Refused => Reply::ConnectionRefused,
                OpenResult::Unreachable | OpenResult::DnsFailure => Reply::HostUnreachable,
                OpenResult::Timeout => Reply::TtlExpired,
                OpenResult::NotAllowed => Reply::NotAllowedByRuleset,
                OpenResult::Ok | OpenResult::Failed => Reply::GeneralFailure,
            },
        }
    }
}

impl ProxyContext {
    /// Admit a flow of `entry` and open its stream through the device.
    pub async fn open(
        &self,
        entry: &Arc<Entry>,
        target: Target,
    ) -> Result<(Flow, BoxRead, BoxWrite), OpenFailure> {
        let opened = self.open_inner(entry, target).await;
        let outcome = match &opened {
            Ok(_) => "opened",
            Err(OpenFailure::Refused(_)) => "refused",
            Err(
                OpenFailure::DeviceOffline
                | OpenFailure::Flow(FlowError::Offline | FlowError::Tunnel(_)),
            ) => "device_offline",
            // The device is registered but did not answer: a dying link, not the target's failure.
            Err(OpenFailure::Flow(FlowError::Timeout)) => "device_timeout",
            Err(OpenFailure::Unsupported) => "unsupported",
            Err(OpenFailure::ShuttingDown) => "shutting_down",
            Err(OpenFailure::TooManyFlows) => "too_many_flows",
            // The device's policy refused the target (a private address): the customer's doing, not a failure.
            Err(OpenFailure::Flow(FlowError::Target(OpenResult::NotAllowed))) => "not_allowed",
            Err(OpenFailure::Flow(_)) => "target_failed",
        };
        self.metrics.proxy_flows.with_label_values(&[outcome]).inc();
        opened
    }

    async fn open_inner(
        &self,
        entry: &Arc<Entry>,
        target: Target,
    ) -> Result<(Flow, BoxRead, BoxWrite), OpenFailure> {
        let adm = entry.admit().map_err(OpenFailure::Refused)?;
        let slot = relay::FlowSlot::take(entry, self.max_flows_per_connection)
            .ok_or(OpenFailure::TooManyFlows)?;
        let live = self
            .registry
            .get(&adm.device_id)
            .filter(|l| l.operator_id == entry.operator_id)
            .ok_or(OpenFailure::DeviceOffline)?;
        // An older agent would drop a stream it does not know, and the flow would look like a dead device.
        if !target.supported_by(live.capabilities) {
            return Err(OpenFailure::Unsupported);
        }
        let opened = tokio::select! {
            res = link::open_flow(&*live.link, target) => res.map_err(OpenFailure::Flow),
            _ = adm.stop.cancelled() => Err(OpenFailure::Refused(entry.admit().err().unwrap_or(Refusal::Disabled))),
        };
        let (r, w) = match opened {
            // At shutdown the flows are stopped and the tunnels close: whichever came first, this is a restart,
            // not a refusal of the connection or a device failure.
            Err(_) if self.shutdown.is_cancelled() => return Err(OpenFailure::ShuttingDown),
            other => other?,
        };
        Ok((
            Flow {
                entry: entry.clone(),
                device: adm.device_id,
                stop: adm.stop,
                counters: relay::Counters::new(&self.metrics),
                _slot: slot,
            },
            r,
            w,
        ))
    }

    /// Credentials from a shared or dedicated door. On a dedicated port only that connection's username counts.
    async fn authenticate(
        &self,
        door: &Door,
        username: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Arc<Entry>, AuthFailure> {
        let verdict = match self.dir.authenticate(username, password, client).await {
            Ok(entry) => match door {
                Door::Dedicated(id) if *id != entry.id => Err(AuthFailure::Invalid),
                _ => Ok(entry),
            },
            Err(e) => Err(e),
        };
        if verdict.is_err() {
            self.metrics
                .proxy_flows
                .with_label_values(&["auth_failed"])
                .inc();
        }
        verdict
    }

    /// On a dedicated port, the connection when `client` is on its allow-list (no credentials needed).
    fn allow_listed(&self, door: &Door, client: IpAddr) -> Option<Arc<Entry>> {
        match door {
            Door::Dedicated(id) => self.dir.get(id).filter(|e| e.allows(client)),
            _ => None,
        }
    }
}

/// Accept customers on `listener` until shutdown (or until `stop`, for a dedicated port that was removed).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    door: Door,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = ctx.shutdown.cancelled() => return,
            _ = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (ctx2, door) = (ctx.clone(), door.clone());
        // At shutdown a client still in its handshake is dropped at once (`ProxyContext::handshake`); relaying
        // flows end through their stop token, after writing what they counted.
        ctx.tracker
            .spawn(handle(ctx2, stream, peer, door, stop.clone()));
    }
}

async fn handle(
    ctx: Arc<ProxyContext>,
    stream: TcpStream,
    peer: SocketAddr,
    door: Door,
    stop: CancellationToken,
) {
    let result = match door {
        Door::Http => http::serve(&ctx, stream, peer, &door, &stop).await,
        Door::Socks5 => socks5::serve(&ctx, stream, peer, &door).await,
        Door::Dedicated(_) => {
            let mut first = [0u8; 1];
            match ctx.handshake(stream.peek(&mut first)).await {
                Some(Ok(1)) if first[0] == proxyfleet_proto::socks5::VERSION => {
                    socks5::serve(&ctx, stream, peer, &door).await
                }
                Some(Ok(1)) => http::serve(&ctx, stream, peer, &door, &stop).await,
                _ => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "proxy client dropped");
    }
}

/// Listeners of connections' own ports.
pub struct Dedicated {
    pub ip: IpAddr,
    pub range: Option<RangeInclusive<u16>>,
    running: Mutex<HashMap<String, (u16, CancellationToken)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("dedicated ports are not enabled on this server (set proxy_dedicated_ports)")]
    Disabled,
    #[error("port must be between {0} and {1}")]
    OutOfRange(u16, u16),
    #[error("port {0} is already in use")]
    InUse(u16),
}

impl Dedicated {
    pub fn new(ip: IpAddr, range: Option<RangeInclusive<u16>>) -> Self {
        Dedicated {
            ip,
            range,
            running: Mutex::default(),
        }
    }

    /// Bind `port` for connection `id` (before the setting is saved, so a busy port is an error, not a surprise).
    /// A port the connection already listens on is returned as `None` (nothing to do).
    pub async fn reserve(&self, id: &str, port: u16) -> Result<Option<TcpListener>, PortError> {
        let range = self.range.clone().ok_or(PortError::Disabled)?;
        if !range.contains(&port) {
            return Err(PortError::OutOfRange(*range.start(), *range.end()));
        }
        if let Ok(m) = self.running.lock() {
            match m.iter().find(|(_, (p, _))| *p == port) {
                Some((owner, _)) if owner == id => return Ok(None),
                Some(_) => return Err(PortError::InUse(port)),
                None => {}
            }
        }
        TcpListener::bind((self.ip, port))
            .await
            .map(Some)
            .map_err(|_| PortError::InUse(port))
    }

    /// Serve connection `id` on `listener`, replacing its previous port if it had one.
    pub fn start(&self, ctx: &Arc<ProxyContext>, id: &str, listener: TcpListener) {
        let Ok(port) = listener.local_addr().map(|a| a.port()) else {
            return;
        };
        let stop = CancellationToken::new();
        if let Ok(mut m) = self.running.lock() {
            if let Some((_, old)) = m.insert(id.to_owned(), (port, stop.clone())) {
                old.cancel();
            }
        }
        tracing::info!(connection = %id, port, "dedicated proxy port listening");
        ctx.tracker.spawn(serve(
            ctx.clone(),
            listener,
            Door::Dedicated(id.to_owned()),
            stop,
        ));
    }

    /// Stop serving connection `id`'s port, if it has one.
    pub fn stop(&self, id: &str) {
        if let Some((_, stop)) = self.running.lock().ok().and_then(|mut m| m.remove(id)) {
            stop.cancel();
        }
    }

    /// At startup: listen on every connection's port. A port that cannot be bound is logged, not fatal.
    pub async fn start_all(&self, ctx: &Arc<ProxyContext>) {
        for e in ctx.dir.dedicated() {
            let Some(port) = e.dedicated_port() else {
                continue;
            };
            match self.reserve(&e.id, port).await {
                Ok(Some(l)) => self.start(ctx, &e.id, l),
                Ok(None) => {}
                Err(err) => {
                    tracing::error!(connection = %e.id, port, error = %err, "cannot listen on dedicated port")
                }
            }
        }
    }
}
