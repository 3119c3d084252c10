//! Address classification shared by the agent (which targets a customer may reach) and the server (where
//! webhooks may be sent): public unicast or not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is a public unicast address. IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`)
/// IPv6 addresses are judged by the IPv4 address they carry, since the kernel delivers them to it.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let [b0, b1, b2, _] = a.octets();
    let private = b0 == 0 // "this network"
        || b0 == 10
        || (b0 == 100 && (64..128).contains(&b1)) // carrier-grade NAT, 100.64/10
        || b0 == 127
        || (b0 == 169 && b1 == 254)
        || (b0 == 172 && (16..32).contains(&b1)) // 172.16/12
        || (b0 == 192 && b1 == 0 && (b2 == 0 || b2 == 2)) // IETF assignments, TEST-NET-1
        || (b0 == 192 && b1 == 168)
        || (b0 == 198 && (b1 == 18 || b1 == 19)) // benchmarking, 198.18/15
        || (b0 == 198 && b1 == 51 && b2 == 100) // TEST-NET-2
        || (b0 == 203 && b1 == 0 && b2 == 113) // TEST-NET-3
        || b0 >= 224; // multicast 224/4, reserved 240/4, broadcast
    !private
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    let v4 = |hi: u16, lo: u16| {
        let [hi, lo] = [hi.to_be_bytes(), lo.to_be_bytes()];
        Ipv4Addr::new(hi[0], hi[1], lo[0], lo[1])
    };
    // Forms that carry an IPv4 address a translator or relay on the way may deliver to: judged by that address.
    let embedded = if s[..5] == [0; 5] && (s[5] == 0 || s[5] == 0xffff) {
        // `::`, `::1`, IPv4-compatible and IPv4-mapped; the first two embed 0.0.0.0 and 0.0.0.1.
        Some(v4(s[6], s[7]))
    } else if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        // IPv4-translated (SIIT), ::ffff:0:0/96.
        Some(v4(s[6], s[7]))
    } else if s[..6] == [0x0064, 0xff9b, 0, 0, 0, 0] {
        // The well-known NAT64 prefix, 64:ff9b::/96: an IPv6-only carrier's NAT64 turns it into the IPv4 address.
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        // 6to4, 2002::/16: the relay's IPv4 address follows the prefix.
        Some(v4(s[1], s[2]))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return is_public_v4(v4);
    }
    let private = (s[0] & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (s[0] == 0x2001 && s[1] == 0) // Teredo, 2001::/32: tunnelled through an IPv4 relay
        || s[..4] == [0x0100, 0, 0, 0] // discard-only, 100::/64
        || (s[0] & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (s[0] & 0xff00) == 0xff00 // multicast, ff00::/8
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation, 2001:db8::/32
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001); // local-use NAT64, 64:ff9b:1::/48
    !private
}

/// Socket buffer size asked for on tunnel UDP sockets. The kernel caps it at `net.core.rmem_max` /
/// `net.core.wmem_max` (208 KiB by default on Linux; raise them for fast tunnels, see the README).
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Ask for large send and receive buffers on a tunnel's UDP socket: with the default 208 KiB, bursts of QUIC
/// packets overflow the receive queue and are dropped (then retransmitted), which caps throughput. Best effort.
pub fn enlarge_udp_buffers(sock: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
}

/// Tune glibc's allocator for relaying; both binaries call this first thing in `main`. With glibc's defaults the
/// heap's free top goes back to the kernel as soon as 128 KiB are free and large buffers come from fresh mappings,
/// so the buffers a busy flow allocates and frees by the tens of kilobytes were faulted in and zeroed again and
/// again (one QUIC flow ran 15–25 % slower). Fixed thresholds keep up to 32 MiB of freed memory per arena for
/// reuse. musl and other platforms keep their defaults.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's parameters and takes no pointers; a rejected value leaves the default in
    // place. Called before the binaries start any thread.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TOP_PAD, 4 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet, the FIN included (`SIOCOUTQ`); `None`
/// where the platform cannot tell, or on an error.
#[allow(unsafe_code)]
pub fn unacked_bytes(s: &impl std::os::fd::AsRawFd) -> Option<u32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a socket descriptor writes one int through the pointer, which points
        // at a live local; a descriptor that is not a TCP socket makes it fail with an error, not write.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
        (r == 0).then(|| u32::try_from(n).ok()).flatten()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = s;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        match s.parse::<IpAddr>() {
            Ok(ip) => is_public(ip),
            Err(e) => panic!("bad address {s}: {e}"),
        }
    }

    /// Each non-public range by its first and last address, and the public neighbours just outside it.
    #[test]
    fn ipv4_ranges_and_their_edges() {
        let private = [
            "0.0.0.0",
            "0.255.255.255",
            "10.0.0.0",
            "10.255.255.255",
            "100.64.0.0",
            "100.127.255.255",
            "127.0.0.0",
            "127.0.0.1",
            "127.255.255.255",
            "169.254.0.0",
            "169.254.255.255",
            "172.16.0.0",
            "172.31.255.255",
            "192.0.0.0",
            "192.0.0.255",
            "192.0.2.0",
            "192.0.2.255",
            "192.168.0.0",
            "192.168.255.255",
            "198.18.0.0",
            "198.19.255.255",
            "198.51.100.0",
            "198.51.100.255",
            "203.0.113.0",
            "203.0.113.255",
            "224.0.0.0",
            "239.255.255.255",
            "240.0.0.0",
            "255.255.255.254",
            "255.255.255.255",
        ];
        for a in private {
            assert!(!public(a), "{a} must not be public");
        }
        let public_ = [
            "1.0.0.0",
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
        ];
        for a in public_ {
            assert!(public(a), "{a} must be public");
        }
    }

    #[test]
    fn ipv6_ranges_and_their_edges() {
        let private = [
            "::",
            "::1",
            "fc00::",
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fd12:3456::1",
            "fe80::",
            "fe80::1",
            "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "ff00::",
            "ff02::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db8::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "64:ff9b:1::",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
        ];
        for a in private {
            assert!(!public(a), "{a} must not be public");
        }
        let public_ = [
            "2606:4700::1",
            "2001:4860:4860::8888",
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db9::",
            "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fe00::",
            "fec0::",
            "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "64:ff9b::8.8.8.8",
            "64:ff9b:2::",
            "64:ff9b:0:ffff:ffff:ffff:ffff:ffff",
        ];
        for a in public_ {
            assert!(public(a), "{a} must be public");
        }
    }

    #[test]
    fn ipv6_with_an_embedded_ipv4_is_judged_by_it() {
        for a in [
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.1.1",
            "::ffff:100.64.0.0",
            "::ffff:0.0.0.0",
            "::ffff:255.255.255.255",
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.1.1",
            // SIIT, NAT64 and 6to4 forms of private addresses (a translator on the way would reach them).
            "::ffff:0:127.0.0.1",
            "::ffff:0:10.1.2.3",
            "64:ff9b::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::192.168.0.1",
            "64:ff9b::",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:c0a8:101:ffff:ffff:ffff:ffff:ffff",
            // Teredo and discard-only.
            "2001::1",
            "2001:0:ffff:ffff:ffff:ffff:ffff:ffff",
            "100::1",
        ] {
            assert!(!public(a), "{a} must not be public");
        }
        for a in [
            "::ffff:8.8.8.8",
            "::ffff:100.63.255.255",
            "::ffff:172.32.0.0",
            "::8.8.8.8",
            "::ffff:0:8.8.8.8",
            "64:ff9b::1.1.1.1",
            "2002:808:808::1",
            "2001:1::1",
            "100:0:0:1::1",
        ] {
            assert!(public(a), "{a} must be public");
        }
    }
}
