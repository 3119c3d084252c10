//! Which targets a customer may reach through this device: by default only public unicast addresses, so that
//! nobody can use the device to reach its own loopback, its LAN, or the carrier's internal network.

use std::net::IpAddr;

/// The agent's target policy, fixed for the life of a tunnel session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Also allow private, loopback, link-local and other non-public addresses (tests, lab setups).
    pub allow_private: bool,
    /// Where DNS associations go instead of the device's `resolv.conf` resolver.
    pub dns_server: Option<std::net::SocketAddr>,
}

impl TargetPolicy {
    /// Whether a flow may be opened to `ip`.
    pub fn permits(self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip)
    }
}

pub use proxyfleet_proto::net::is_public;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn policy_allows_private_only_when_asked() {
        let loopback: IpAddr = Ipv4Addr::LOCALHOST.into();
        let public_ip: IpAddr = Ipv4Addr::new(8, 8, 8, 8).into();
        assert!(!TargetPolicy::default().permits(loopback));
        assert!(TargetPolicy::default().permits(public_ip));
        let open = TargetPolicy {
            allow_private: true,
            ..TargetPolicy::default()
        };
        assert!(open.permits(loopback));
        assert!(open.permits(public_ip));
    }
}
