//! proxyfleet wire protocol, shared by server and agent: the frames on a device tunnel's control stream and the
//! header that opens each per-flow stream. No I/O beyond `AsyncRead`/`AsyncWrite` adapters ([`io`]).
//!
//! Every frame is `u32` big-endian length + body. Lengths are checked against a maximum before anything is
//! allocated, and every decoder rejects truncated input, unknown tags, over-long strings and trailing bytes with a
//! [`DecodeError`] instead of panicking.
// Two unsafe calls in all of proxyfleet, each allowed in its function alone: `net::tune_allocator` (glibc
// `mallopt`) and `net::unacked_bytes` (the `SIOCOUTQ` ioctl).
#![deny(unsafe_code)]

pub mod base32;
pub mod chunked;
pub mod codec;
pub mod control;
pub mod end;
pub mod enroll;
pub mod file;
pub mod http_proxy;
pub mod icmp;
pub mod io;
pub mod mux;
pub mod net;
pub mod openvpn_mgmt;
pub mod socks5;
pub mod stream;
pub mod wire;

pub use codec::FrameCodec;
pub use control::{
    ControlFrame, DeviceMetrics, Heartbeat, HeartbeatAck, Hello, HelloAck, Refusal, RefusalCode,
};
pub use enroll::{EnrollRequest, EnrollResponse};
pub use stream::{Host, OpenResult, StreamHeader, Target, UdpDatagram};
pub use wire::{Decode, DecodeError, Encode};

/// Version sent in the hello; a peer speaking another version is refused with a readable error.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest control frame body, in bytes.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Largest stream header body, in bytes (a 255-byte domain name fits many times over).
pub const MAX_STREAM_HEADER: usize = 1024;
/// Largest UDP datagram frame body, in bytes (65 535 payload + address).
pub const MAX_UDP_FRAME: usize = 65_535 + 300;

/// Most bytes of one flow stream in flight over a device tunnel before the receiver must grant more: the QUIC
/// stream receive window, and the largest yamux stream window on the TLS-over-TCP fallback. yamux only grants more
/// once half of it is consumed, so its default (256 KiB) stalls a fast flow every 128 KiB; 2 MiB keeps one flow
/// streaming while bounding what a stalled reader can make the other side buffer.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// The code with which the agent refuses the rest of a flow's upload because its target broke (reset its
/// connection, or stopped taking the upload): the server then resets its customer after the answer ([`end`]).
pub const STOP_TARGET_BROKE: u32 = 0x7442;

/// The code with which the server refuses the rest of a flow's answer because it cut the flow short on its side
/// (the customer reset its connection, or the flow was stopped: cut-off, disabled, deleted, device changed or
/// revoked, server stopping): the agent then resets the target after the upload it was charged for ([`end`]).
pub const STOP_CUT_SHORT: u32 = 0x7443;

/// A QUIC tunnel that hears nothing from its peer for this long is closed, on both ends (QUIC's idle timeout; the
/// smaller of the two sides' applies). A device that lost power or coverage thus fails its customers' flows and
/// shows offline within 20 s, instead of leaving them hanging; shorter would tear down tunnels over a mobile
/// handover that QUIC would have ridden out.
pub const TUNNEL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// An idle agent sends a QUIC keep-alive this often: well inside [`TUNNEL_IDLE_TIMEOUT`] (a lost one is sent
/// again within a round trip or two), and often enough to hold a carrier's NAT mapping open.
pub const TUNNEL_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// The yamux settings both ends of the TLS-over-TCP fallback use: its defaults with [`STREAM_WINDOW`], and a ping
/// every [`TUNNEL_KEEP_ALIVE`] instead of 30 s, so that each end hears from a live peer at least that often; each
/// closes a tunnel silent for [`TUNNEL_IDLE_TIMEOUT`] itself ([`io::Hearing`]), well before yamux's own ping
/// timeout (30 s, checked at its ping ticks) would.
pub fn yamux_config() -> tokio_yamux::Config {
    tokio_yamux::Config {
        max_stream_window_size: STREAM_WINDOW,
        keepalive_interval: TUNNEL_KEEP_ALIVE,
        ..tokio_yamux::Config::default()
    }
}
