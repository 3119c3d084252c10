//! `proxyfleet-agent`: the device side. A skeleton until the tunnel issue lands; it only reports its version and
//! the wire protocol version it speaks.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "proxyfleet-agent",
    version,
    about = "proxyfleet device agent (enrollment and tunnel come next)"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!(
        "proxyfleet-agent {} (wire protocol {}); enrollment and tunnel are not implemented yet",
        env!("CARGO_PKG_VERSION"),
        proxyfleet_proto::PROTOCOL_VERSION
    );
}
