//! The header that opens each per-flow stream, its typed result, and UDP datagram frames.
//!
//! The server opens a stream, writes one [`StreamHeader`] frame; the agent answers one [`OpenResult`] byte and,
//! on `Ok`, the stream carries the flow's raw bytes (TCP) or [`UdpDatagram`] frames (UDP association).

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, BytesMut};

use crate::wire::{put_string, Decode, DecodeError, Encode, Reader};

/// Longest domain name, in bytes (RFC 1035).
pub const MAX_DOMAIN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Resolved on the device, so DNS answers match the device's network.
    Domain(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

const H_DOMAIN: u8 = 1;
const H_V4: u8 = 4;
const H_V6: u8 = 6;

fn put_host(out: &mut BytesMut, h: &Host) {
    match h {
        Host::Domain(d) => {
            out.put_u8(H_DOMAIN);
            put_string(out, d, MAX_DOMAIN);
        }
        Host::V4(a) => {
            out.put_u8(H_V4);
            out.put_slice(&a.octets());
        }
        Host::V6(a) => {
            out.put_u8(H_V6);
            out.put_slice(&a.octets());
        }
    }
}

fn host(r: &mut Reader<'_>) -> Result<Host, DecodeError> {
    Ok(match r.u8()? {
        H_DOMAIN => {
            let d = r.string("domain", MAX_DOMAIN)?;
            if d.is_empty() {
                return Err(DecodeError::Invalid {
                    what: "empty domain",
                });
            }
            Host::Domain(d)
        }
        H_V4 => {
            let b = r.take(4)?;
            Host::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        H_V6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(r.take(16)?);
            Host::V6(Ipv6Addr::from(a))
        }
        tag => return Err(DecodeError::UnknownTag { what: "host", tag }),
    })
}

/// What a flow stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP connection from the device to `host:port`.
    Tcp { host: Host, port: u16 },
    /// A UDP association: the stream then carries [`UdpDatagram`] frames both ways.
    Udp,
    /// A DNS association: like [`Target::Udp`], but the agent sends every datagram to the device's own resolver
    /// (whatever address the frame names) and labels answers with it. Serves the VPN's pushed DNS address, so a
    /// customer's lookups are answered by the device's network.
    Dns,
    /// DNS over TCP: a TCP connection from the device to its own resolver (whatever address the customer asked),
    /// then raw bytes like [`Target::Tcp`]. Serves TCP to the VPN's pushed DNS address (truncated answers, large
    /// records).
    DnsTcp,
    /// An ICMPv4 echo: the server sends one [`UdpDatagram`] (port 0) holding an echo request for its host; the
    /// agent pings from the device and answers with one datagram holding the reply (same identifier and sequence
    /// number), or ends the stream when none came in time.
    Echo,
}

impl Target {
    /// Whether an agent that announced `capabilities` ([`crate::control::caps`]) opens this target. Targets added
    /// after the first release need their bit: an older agent does not know them and would drop the stream.
    pub fn supported_by(&self, capabilities: u32) -> bool {
        use crate::control::caps;
        let needs = match self {
            Target::Tcp { .. } | Target::Udp | Target::Dns => return true,
            Target::DnsTcp => caps::DNS_TCP,
            Target::Echo => caps::ECHO,
        };
        capabilities & needs != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub target: Target,
}

const S_TCP: u8 = 1;
const S_UDP: u8 = 2;
const S_DNS: u8 = 3;
const S_DNS_TCP: u8 = 4;
const S_ECHO: u8 = 5;

impl Encode for StreamHeader {
    fn encode(&self, out: &mut BytesMut) {
        match &self.target {
            Target::Tcp { host, port } => {
                out.put_u8(S_TCP);
                put_host(out, host);
                out.put_u16(*port);
            }
            Target::Udp => out.put_u8(S_UDP),
            Target::Dns => out.put_u8(S_DNS),
            Target::DnsTcp => out.put_u8(S_DNS_TCP),
            Target::Echo => out.put_u8(S_ECHO),
        }
    }
}

impl Decode for StreamHeader {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let target = match r.u8()? {
            S_TCP => {
                let host = host(r)?;
                let port = r.u16()?;
                if port == 0 {
                    return Err(DecodeError::Invalid { what: "port 0" });
                }
                Target::Tcp { host, port }
            }
            S_UDP => Target::Udp,
            S_DNS => Target::Dns,
            S_DNS_TCP => Target::DnsTcp,
            S_ECHO => Target::Echo,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "stream target",
                    tag,
                })
            }
        };
        Ok(StreamHeader { target })
    }
}

/// The agent's answer to a [`StreamHeader`], one byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpenResult {
    Ok = 0,
    /// The target actively refused (TCP RST).
    Refused = 1,
    /// No route to the target network or host.
    Unreachable = 2,
    /// The host name did not resolve on the device.
    DnsFailure = 3,
    /// The target did not answer in time.
    Timeout = 4,
    /// The agent will not open this target (policy).
    NotAllowed = 5,
    /// Anything else on the device.
    Failed = 6,
}

impl TryFrom<u8> for OpenResult {
    type Error = DecodeError;
    fn try_from(tag: u8) -> Result<Self, DecodeError> {
        Ok(match tag {
            0 => OpenResult::Ok,
            1 => OpenResult::Refused,
            2 => OpenResult::Unreachable,
            3 => OpenResult::DnsFailure,
            4 => OpenResult::Timeout,
            5 => OpenResult::NotAllowed,
            6 => OpenResult::Failed,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "open result",
                    tag,
                })
            }
        })
    }
}

impl OpenResult {
    /// Classify an error from connecting to a target.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => OpenResult::Refused,
            K::TimedOut => OpenResult::Timeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                OpenResult::Unreachable
            }
            _ => OpenResult::Failed,
        }
    }
}

/// One UDP datagram inside an association stream, with its remote address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    pub host: Host,
    pub port: u16,
    pub payload: Vec<u8>,
}

impl Encode for UdpDatagram {
    fn encode(&self, out: &mut BytesMut) {
        put_host(out, &self.host);
        out.put_u16(self.port);
        out.put_slice(&self.payload);
    }
}

impl Decode for UdpDatagram {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let host = host(r)?;
        let port = r.u16()?;
        let payload = r.rest().to_vec();
        if payload.len() > 65_535 {
            return Err(DecodeError::TooLong {
                what: "udp payload",
                len: payload.len(),
                max: 65_535,
            });
        }
        Ok(UdpDatagram {
            host,
            port,
            payload,
        })
    }
}
