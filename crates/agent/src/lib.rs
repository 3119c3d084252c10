//! proxyfleet-agent: enrolls a device with a pairing code, then keeps a QUIC tunnel to the server, sends
//! heartbeats with what the device knows about itself, and opens outbound connections on the server's request.
//! It needs no root and no inbound port.
#![forbid(unsafe_code)]

pub mod conn;
pub mod enroll;
mod flow;
pub mod metrics;
pub mod run;
pub mod state;
pub mod tls;

pub use enroll::enroll;
pub use run::{run, RunOptions};
