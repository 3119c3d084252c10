//! SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929), as pure functions over byte slices.
//!
//! Each `parse_*` returns `Ok(None)` while the message is incomplete, `Ok(Some((message, consumed)))` once it is
//! whole, and an error for bytes that can never become a valid message. No message is longer than
//! [`MAX_MESSAGE`], so a reader needs no more buffer than that. The caller does the I/O (and is the fuzz target's
//! subject: nothing here panics on any input).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::stream::{Host, MAX_DOMAIN};

pub const VERSION: u8 = 5;
/// Version byte of the RFC 1929 sub-negotiation.
pub const AUTH_VERSION: u8 = 1;
pub const METHOD_NONE: u8 = 0x00;
pub const METHOD_USERPASS: u8 = 0x02;
pub const METHOD_UNACCEPTABLE: u8 = 0xFF;
/// Longest message of the handshake (a full RFC 1929 request: 1 + 1 + 255 + 1 + 255).
pub const MAX_MESSAGE: usize = 513;

const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// Reply codes of RFC 1928 section 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowedByRuleset = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("no authentication methods offered")]
    NoMethods,
    #[error("unsupported username/password version {0}")]
    AuthVersion(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("invalid domain name")]
    Domain,
    #[error("invalid UDP datagram header")]
    UdpHeader,
}

impl Socks5Error {
    /// The reply code a request that failed this way gets.
    pub fn reply(&self) -> Reply {
        match self {
            Socks5Error::AddressType(_) => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        }
    }
}

pub type Parsed<T> = Result<Option<(T, usize)>, Socks5Error>;

/// The client's greeting: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub methods: Vec<u8>,
}

pub fn parse_greeting(buf: &[u8]) -> Parsed<Greeting> {
    let [ver, n, ..] = *buf else { return Ok(None) };
    if ver != VERSION {
        return Err(Socks5Error::Version(ver));
    }
    if n == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let end = 2 + usize::from(n);
    Ok(buf.get(2..end).map(|m| {
        (
            Greeting {
                methods: m.to_vec(),
            },
            end,
        )
    }))
}

/// RFC 1929 credentials, as raw bytes (the RFC does not say they are UTF-8).
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    pub username: Vec<u8>,
    pub password: Vec<u8>,
}

impl std::fmt::Debug for UserPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPass")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"[redacted]")
            .finish()
    }
}

pub fn parse_userpass(buf: &[u8]) -> Parsed<UserPass> {
    let [ver, ulen, ..] = *buf else {
        return Ok(None);
    };
    if ver != AUTH_VERSION {
        return Err(Socks5Error::AuthVersion(ver));
    }
    let u_end = 2 + usize::from(ulen);
    let (Some(username), Some(&plen)) = (buf.get(2..u_end), buf.get(u_end)) else {
        return Ok(None);
    };
    let p_end = u_end + 1 + usize::from(plen);
    Ok(buf.get(u_end + 1..p_end).map(|password| {
        (
            UserPass {
                username: username.to_vec(),
                password: password.to_vec(),
            },
            p_end,
        )
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
    Other(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub host: Host,
    pub port: u16,
}

/// A host name as a proxy accepts it: 1–255 bytes of letters, digits, `-`, `_` and `.` (clients send IDNs in
/// punycode). Anything else is refused before it reaches a resolver.
pub fn domain(bytes: &[u8]) -> Result<Host, Socks5Error> {
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_DOMAIN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(Socks5Error::Domain);
    }
    // Every byte is ASCII, so this cannot fail; map the impossible error rather than unwrap.
    let s = std::str::from_utf8(bytes).map_err(|_| Socks5Error::Domain)?;
    Ok(Host::Domain(s.to_ascii_lowercase()))
}

/// Address + port as SOCKS encodes them (`ATYP ADDR PORT`), starting at `buf[0]`.
fn parse_address(buf: &[u8]) -> Parsed<(Host, u16)> {
    let Some(&atyp) = buf.first() else {
        return Ok(None);
    };
    let (host, end) = match atyp {
        ATYP_V4 => {
            let Some(a) = buf.get(1..5) else {
                return Ok(None);
            };
            (Host::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])), 5)
        }
        ATYP_V6 => {
            let Some(a) = buf.get(1..17) else {
                return Ok(None);
            };
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            (Host::V6(Ipv6Addr::from(o)), 17)
        }
        ATYP_DOMAIN => {
            let Some(&len) = buf.get(1) else {
                return Ok(None);
            };
            let end = 2 + usize::from(len);
            let Some(d) = buf.get(2..end) else {
                return Ok(None);
            };
            (domain(d)?, end)
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let Some(p) = buf.get(end..end + 2) else {
        return Ok(None);
    };
    Ok(Some(((host, u16::from_be_bytes([p[0], p[1]])), end + 2)))
}

pub fn parse_request(buf: &[u8]) -> Parsed<Request> {
    let [ver, cmd, _rsv, ..] = *buf else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::Version(ver));
    }
    let command = match cmd {
        1 => Command::Connect,
        2 => Command::Bind,
        3 => Command::UdpAssociate,
        other => Command::Other(other),
    };
    Ok(parse_address(&buf[3..])?.map(|((host, port), used)| {
        (
            Request {
                command,
                host,
                port,
            },
            3 + used,
        )
    }))
}

fn put_address(out: &mut Vec<u8>, host: &Host, port: u16) {
    match host {
        Host::V4(a) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.octets());
        }
        Host::V6(a) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.octets());
        }
        Host::Domain(d) => {
            let d = &d.as_bytes()[..d.len().min(MAX_DOMAIN)];
            out.push(ATYP_DOMAIN);
            out.push(u8::try_from(d.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(d);
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
}

/// A reply to a request, with the bound address (`0.0.0.0:0` when there is none to tell).
pub fn reply(code: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code as u8, 0];
    let host = match bound.ip().to_canonical() {
        std::net::IpAddr::V4(a) => Host::V4(a),
        std::net::IpAddr::V6(a) => Host::V6(a),
    };
    put_address(&mut out, &host, bound.port());
    out
}

/// A UDP datagram as SOCKS relays it: `RSV(2) FRAG ATYP ADDR PORT DATA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<'a> {
    pub frag: u8,
    pub host: Host,
    pub port: u16,
    pub payload: &'a [u8],
}

pub fn parse_udp(buf: &[u8]) -> Result<UdpPacket<'_>, Socks5Error> {
    let [0, 0, frag, ..] = *buf else {
        return Err(Socks5Error::UdpHeader);
    };
    match parse_address(&buf[3..])? {
        Some(((host, port), used)) => Ok(UdpPacket {
            frag,
            host,
            port,
            payload: &buf[3 + used..],
        }),
        None => Err(Socks5Error::UdpHeader),
    }
}

pub fn encode_udp(host: &Host, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 22);
    out.extend_from_slice(&[0, 0, 0]);
    put_address(&mut out, host, port);
    out.extend_from_slice(payload);
    out
}

/// Encode a request the way a client does (for tests and the benchmark client).
pub fn encode_request(command: u8, host: &Host, port: u16) -> Vec<u8> {
    let mut out = vec![VERSION, command, 0];
    put_address(&mut out, host, port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_is_parsed_once_complete() {
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(
            parse_greeting(&[5, 2, 0, 2, 9]),
            Ok(Some((
                Greeting {
                    methods: vec![0, 2]
                },
                4
            )))
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(Socks5Error::NoMethods));
    }

    #[test]
    fn userpass_is_parsed_once_complete() {
        let msg = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        for cut in 0..msg.len() {
            assert_eq!(parse_userpass(&msg[..cut]), Ok(None), "prefix of {cut}");
        }
        let (up, used) = parse_userpass(&msg).unwrap().unwrap();
        assert_eq!(
            (up.username.as_slice(), up.password.as_slice(), used),
            (&b"bob"[..], &b"pw"[..], 8)
        );
        assert_eq!(parse_userpass(&[2, 0, 0]), Err(Socks5Error::AuthVersion(2)));
        assert!(
            !format!("{up:?}").contains("pw\""),
            "password never in Debug"
        );
    }

    #[test]
    fn requests_for_every_address_type() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 1, 0, 80];
        let (r, used) = parse_request(&v4).unwrap().unwrap();
        assert_eq!(
            (r.command, r.host, r.port, used),
            (
                Command::Connect,
                Host::V4(Ipv4Addr::new(10, 0, 0, 1)),
                80,
                10
            )
        );
        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[1, 187]);
        let (r, _) = parse_request(&v6).unwrap().unwrap();
        assert_eq!(
            (r.command, r.host, r.port),
            (Command::UdpAssociate, Host::V6(Ipv6Addr::LOCALHOST), 443)
        );
        let d = encode_request(1, &Host::Domain("Example.COM".into()), 8080);
        let (r, used) = parse_request(&d).unwrap().unwrap();
        assert_eq!(
            (r.host, r.port, used),
            (Host::Domain("example.com".into()), 8080, d.len())
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0]),
            Err(Socks5Error::AddressType(9))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(Socks5Error::Domain)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80]),
            Err(Socks5Error::Domain)
        );
        assert_eq!(
            parse_request(&[5, 9, 0, 1, 1, 2, 3, 4, 0, 1])
                .unwrap()
                .unwrap()
                .0
                .command,
            Command::Other(9)
        );
        assert_eq!(
            Socks5Error::AddressType(9).reply(),
            Reply::AddressTypeNotSupported
        );
    }

    #[test]
    fn udp_headers_round_trip_and_reject_garbage() {
        let pkt = encode_udp(&Host::V4(Ipv4Addr::new(1, 2, 3, 4)), 53, b"query");
        let p = parse_udp(&pkt).unwrap();
        assert_eq!(
            (p.frag, p.host, p.port, p.payload),
            (0, Host::V4(Ipv4Addr::new(1, 2, 3, 4)), 53, &b"query"[..])
        );
        assert_eq!(
            parse_udp(&[0, 1, 0, 1, 1, 2, 3, 4, 0, 53]),
            Err(Socks5Error::UdpHeader)
        );
        assert_eq!(parse_udp(&[0, 0, 0, 1, 1, 2]), Err(Socks5Error::UdpHeader));
        assert_eq!(parse_udp(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 53]).unwrap().frag, 1);
    }

    #[test]
    fn replies_carry_the_bound_address() {
        assert_eq!(
            reply(Reply::Succeeded, "127.0.0.1:1080".parse().unwrap()),
            vec![5, 0, 0, 1, 127, 0, 0, 1, 4, 56]
        );
        assert_eq!(
            reply(
                Reply::NotAllowedByRuleset,
                "[::ffff:1.2.3.4]:0".parse().unwrap()
            )[..4],
            [5, 2, 0, 1]
        );
    }

    proptest! {
        #[test]
        fn no_input_panics_and_complete_means_consistent(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            for parsed in [parse_greeting(&buf).map(|o| o.map(|(_, n)| n)),
                           parse_userpass(&buf).map(|o| o.map(|(_, n)| n)),
                           parse_request(&buf).map(|o| o.map(|(_, n)| n))] {
                if let Ok(Some(n)) = parsed {
                    prop_assert!(n <= buf.len() && n <= MAX_MESSAGE);
                }
            }
            let _ = parse_udp(&buf);
        }

        #[test]
        fn requests_round_trip(a in any::<[u8; 4]>(), port in any::<u16>(), cmd in 1u8..4) {
            let host = Host::V4(Ipv4Addr::from(a));
            let enc = encode_request(cmd, &host, port);
            let (r, used) = parse_request(&enc).unwrap().unwrap();
            prop_assert_eq!((r.host, r.port, used), (host, port, enc.len()));
        }
    }
}
