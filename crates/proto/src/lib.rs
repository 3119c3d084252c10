//! proxyfleet wire protocol, shared by server and agent. For now only the protocol version; frames, hello,
//! heartbeat and stream headers arrive with the tunnel.
#![forbid(unsafe_code)]

/// Version sent in the hello; a peer speaking another version is refused with a readable error.
pub const PROTOCOL_VERSION: u16 = 1;
