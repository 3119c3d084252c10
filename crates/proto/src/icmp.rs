//! ICMPv4 echo messages (RFC 792): the only ICMP the OpenVPN door relays through a device, so that a customer's
//! `ping` measures the device's path. Parsing checks the type, code, length and checksum; anything else is
//! refused, so a customer can never make a device send other ICMP.

use crate::wire::DecodeError;

/// Echo request (type 8) or echo reply (type 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    Request,
    Reply,
}

/// ICMP type of an echo request.
pub const ECHO_REQUEST: u8 = 8;
/// ICMP type of an echo reply.
pub const ECHO_REPLY: u8 = 0;

impl EchoKind {
    fn code(self) -> u8 {
        match self {
            EchoKind::Request => ECHO_REQUEST,
            EchoKind::Reply => ECHO_REPLY,
        }
    }
}

/// Header bytes before an echo message's data.
pub const ECHO_HEADER: usize = 8;
/// Largest echo message accepted, in bytes: what fits in one IPv4 packet of the VPN's 1500-byte MTU.
pub const MAX_ECHO: usize = 1500 - 20;

/// How long a device waits for an echo reply before it gives up (`ping` itself counts a reply after a second or
/// two as late).
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One echo request or reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    pub kind: EchoKind,
    pub id: u16,
    pub seq: u16,
    pub data: Vec<u8>,
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    // A u64 cannot overflow for any slice that fits in memory (2^48 pairs of at most 0xffff).
    let mut sum: u64 = 0;
    let mut pairs = bytes.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The fold above leaves at most 16 bits.
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

impl Echo {
    /// Parse an ICMP message that must be an echo of `kind` with a correct checksum.
    pub fn parse(msg: &[u8], kind: EchoKind) -> Result<Echo, DecodeError> {
        if msg.len() < ECHO_HEADER {
            return Err(DecodeError::Truncated);
        }
        if msg.len() > MAX_ECHO {
            return Err(DecodeError::TooLong {
                what: "ICMP echo",
                len: msg.len(),
                max: MAX_ECHO,
            });
        }
        if msg[0] != kind.code() || msg[1] != 0 {
            return Err(DecodeError::Invalid {
                what: "ICMP echo type",
            });
        }
        if checksum(msg) != 0 {
            return Err(DecodeError::Invalid {
                what: "ICMP checksum",
            });
        }
        Ok(Echo {
            kind,
            id: u16::from_be_bytes([msg[4], msg[5]]),
            seq: u16::from_be_bytes([msg[6], msg[7]]),
            data: msg[ECHO_HEADER..].to_vec(),
        })
    }

    /// The message on the wire, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(ECHO_HEADER + self.data.len());
        m.extend_from_slice(&[self.kind.code(), 0, 0, 0]);
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&self.data);
        let c = checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    /// The reply to this request: same identifier, sequence number and data.
    pub fn reply(&self) -> Echo {
        Echo {
            kind: EchoKind::Reply,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn checksum_matches_a_known_packet() {
        // An echo request as `ping` sends it (id 0x1234, seq 1, data "abcd"), checksum computed by hand.
        let m = Echo {
            kind: EchoKind::Request,
            id: 0x1234,
            seq: 1,
            data: b"abcd".to_vec(),
        }
        .to_bytes();
        // 0x0800 + 0x1234 + 0x0001 + 0x6162 + 0x6364 = 0xDEFB, and !0xDEFB = 0x2104.
        assert_eq!(&m[..4], &[8, 0, 0x21, 0x04]);
        assert_eq!(checksum(&m), 0);
        // Odd lengths pad the last byte with zero.
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn wrong_type_code_length_or_checksum_is_refused() {
        let good = Echo {
            kind: EchoKind::Request,
            id: 7,
            seq: 9,
            data: vec![1, 2, 3],
        }
        .to_bytes();
        assert!(Echo::parse(&good, EchoKind::Request).is_ok());
        assert!(Echo::parse(&good, EchoKind::Reply).is_err(), "type");
        let mut code = good.clone();
        code[1] = 1;
        assert!(Echo::parse(&code, EchoKind::Request).is_err(), "code");
        let mut sum = good.clone();
        sum[9] ^= 1;
        assert!(Echo::parse(&sum, EchoKind::Request).is_err(), "checksum");
        assert_eq!(
            Echo::parse(&good[..7], EchoKind::Request),
            Err(DecodeError::Truncated)
        );
        let big = Echo {
            kind: EchoKind::Request,
            id: 1,
            seq: 1,
            data: vec![0; MAX_ECHO],
        }
        .to_bytes();
        assert!(Echo::parse(&big, EchoKind::Request).is_err(), "too long");
    }

    proptest! {
        #[test]
        fn echoes_round_trip(id: u16, seq: u16, data in proptest::collection::vec(any::<u8>(), 0..MAX_ECHO - ECHO_HEADER), reply: bool) {
            let kind = if reply { EchoKind::Reply } else { EchoKind::Request };
            let e = Echo { kind, id, seq, data };
            let bytes = e.to_bytes();
            prop_assert_eq!(checksum(&bytes), 0);
            prop_assert_eq!(Echo::parse(&bytes, kind), Ok(e));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            for kind in [EchoKind::Request, EchoKind::Reply] {
                if let Ok(e) = Echo::parse(&bytes, kind) {
                    // Equal but for the checksum field (ones' complement has two zeros).
                    let again = e.to_bytes();
                    prop_assert_eq!((&again[..2], &again[4..]), (&bytes[..2], &bytes[4..]));
                }
            }
        }
    }
}
