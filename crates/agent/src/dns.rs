//! The device's own resolver, for DNS associations: the address a VPN customer's lookups are sent to, so that they
//! are answered by the device's network (its carrier's resolver, usually) and never by the server's.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Where the resolver configuration may be: Termux keeps it under `$PREFIX`, everything else in `/etc`.
fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(prefix) = std::env::var_os("PREFIX") {
        v.push(PathBuf::from(prefix).join("etc/resolv.conf"));
    }
    v.push(PathBuf::from("/etc/resolv.conf"));
    v
}

/// The first `nameserver` of a resolv.conf text, on port 53.
pub fn parse_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "nameserver" {
            return None;
        }
        // A scoped IPv6 address (`fe80::1%wlan0`) is not supported by `IpAddr`: skip it.
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

/// The device's resolver, read afresh for each association (the network may have changed since the last one).
pub fn system_resolver() -> Option<SocketAddr> {
    candidates().into_iter().find_map(|p| {
        std::fs::read_to_string(p)
            .ok()
            .as_deref()
            .and_then(parse_resolv_conf)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_usable_nameserver_wins() {
        let text = "# generated\nsearch lan\nnameserver fe80::1%wlan0\nnameserver 10.0.0.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            parse_resolv_conf(text),
            Some("10.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            parse_resolv_conf("nameserver 2001:db8::53"),
            Some("[2001:db8::53]:53".parse().unwrap())
        );
        assert_eq!(parse_resolv_conf("options edns0\n"), None);
        assert_eq!(
            parse_resolv_conf("nameserver\nnameserver not-an-ip\n"),
            None
        );
    }
}
