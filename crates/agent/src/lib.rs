//! proxyfleet-agent: enrolls a device with a pairing code, then keeps a QUIC tunnel to the server, sends
//! heartbeats with what the device knows about itself, and opens outbound connections on the server's request.
//! It needs no root and no inbound port.
#![forbid(unsafe_code)]

pub mod conn;
pub mod dns;
pub mod enroll;
pub mod flow;
pub mod metrics;
mod ping;
pub mod policy;
pub mod run;
pub mod state;
pub mod tls;
mod udp;

pub use enroll::enroll;
pub use flow::serve_flow;
pub use policy::TargetPolicy;
pub use run::{run, RunOptions};
