//! Frames on a tunnel's control stream: the handshake, heartbeats and commands.
//!
//! Handshake: the agent sends [`Hello`]; the server answers [`HelloAck`] or [`Refusal`]. Then the agent sends a
//! [`Heartbeat`] every interval and the server answers [`HeartbeatAck`] with the address it sees.

use bytes::{BufMut, BytesMut};

use crate::wire::{put_opt, put_string, Decode, DecodeError, Encode, Reader, MAX_STRING};

/// Capability bits an agent announces in its hello.
pub mod caps {
    /// Opens TCP connections on request.
    pub const TCP: u32 = 1;
    /// Relays UDP associations.
    pub const UDP: u32 = 1 << 1;
    /// Has an IP rotation command configured.
    pub const ROTATE_IP: u32 = 1 << 2;
    /// Opens [`crate::Target::DnsTcp`] streams (agents from the release that added them on).
    pub const DNS_TCP: u32 = 1 << 3;
    /// Opens [`crate::Target::Echo`] streams (agents from the release that added them on).
    pub const ECHO: u32 = 1 << 4;

    /// What every agent of this release can do, whatever its configuration.
    pub const BASE: u32 = TCP | UDP | DNS_TCP | ECHO;

    /// Names of the bits set in `caps`, for the API and logs; unknown bits are left out.
    pub fn names(caps: u32) -> Vec<&'static str> {
        [
            (TCP, "tcp"),
            (UDP, "udp"),
            (ROTATE_IP, "rotate_ip"),
            (DNS_TCP, "dns_tcp"),
            (ECHO, "echo"),
        ]
        .into_iter()
        .filter(|(bit, _)| caps & bit != 0)
        .map(|(_, name)| name)
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    pub capabilities: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub protocol_version: u16,
    /// How often the agent must send a heartbeat, in seconds.
    pub heartbeat_interval_secs: u32,
    /// The device's public address as the server sees it.
    pub public_ip: String,
}

/// Why the server refused a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusalCode {
    VersionMismatch = 1,
    Revoked = 2,
    Replaced = 3,
    Internal = 4,
    /// The server is shutting down; reconnect later.
    Shutdown = 5,
}

impl TryFrom<u8> for RefusalCode {
    type Error = DecodeError;
    fn try_from(tag: u8) -> Result<Self, DecodeError> {
        Ok(match tag {
            1 => RefusalCode::VersionMismatch,
            2 => RefusalCode::Revoked,
            3 => RefusalCode::Replaced,
            4 => RefusalCode::Internal,
            5 => RefusalCode::Shutdown,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "refusal code",
                    tag,
                })
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    /// Human-readable, shown by the agent as is.
    pub message: String,
}

/// What a device knows about itself; every field is optional because many devices expose little.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMetrics {
    /// 0–100.
    pub battery_percent: Option<u8>,
    pub charging: Option<bool>,
    /// Signal quality 0–100 (ModemManager's `signal-quality`).
    pub signal_percent: Option<u8>,
    pub carrier: Option<String>,
    /// For example `lte`, `5gnr`, `umts`, `wifi`.
    pub network_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    pub metrics: DeviceMetrics,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub public_ip: String,
}

/// Every control-stream frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    Hello(Hello),
    HelloAck(HelloAck),
    Refused(Refusal),
    Heartbeat(Heartbeat),
    HeartbeatAck(HeartbeatAck),
    /// Server → agent: run the device's IP rotation command.
    RotateIp {
        request_id: u64,
    },
    /// Agent → server: the command's outcome.
    RotateIpResult {
        request_id: u64,
        ok: bool,
        message: String,
    },
}

const T_HELLO: u8 = 1;
const T_HELLO_ACK: u8 = 2;
const T_REFUSED: u8 = 3;
const T_HEARTBEAT: u8 = 4;
const T_HEARTBEAT_ACK: u8 = 5;
const T_ROTATE: u8 = 6;
const T_ROTATE_RESULT: u8 = 7;

/// Short strings (versions, carrier names, addresses), in bytes.
const MAX_SHORT: usize = 128;

impl Encode for ControlFrame {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            ControlFrame::Hello(h) => {
                out.put_u8(T_HELLO);
                // The version comes first so that any future hello layout can still be refused readably.
                out.put_u16(h.protocol_version);
                put_string(out, &h.agent_version, MAX_SHORT);
                out.put_u32(h.capabilities);
            }
            ControlFrame::HelloAck(a) => {
                out.put_u8(T_HELLO_ACK);
                out.put_u16(a.protocol_version);
                out.put_u32(a.heartbeat_interval_secs);
                put_string(out, &a.public_ip, MAX_SHORT);
            }
            ControlFrame::Refused(r) => {
                out.put_u8(T_REFUSED);
                out.put_u8(r.code as u8);
                put_string(out, &r.message, MAX_STRING);
            }
            ControlFrame::Heartbeat(h) => {
                out.put_u8(T_HEARTBEAT);
                out.put_u64(h.uptime_secs);
                let m = &h.metrics;
                put_opt(out, &m.battery_percent, |o, v| o.put_u8((*v).min(100)));
                put_opt(out, &m.charging, |o, v| o.put_u8(u8::from(*v)));
                put_opt(out, &m.signal_percent, |o, v| o.put_u8((*v).min(100)));
                put_opt(out, &m.carrier, |o, v| put_string(o, v, MAX_SHORT));
                put_opt(out, &m.network_type, |o, v| put_string(o, v, MAX_SHORT));
            }
            ControlFrame::HeartbeatAck(a) => {
                out.put_u8(T_HEARTBEAT_ACK);
                put_string(out, &a.public_ip, MAX_SHORT);
            }
            ControlFrame::RotateIp { request_id } => {
                out.put_u8(T_ROTATE);
                out.put_u64(*request_id);
            }
            ControlFrame::RotateIpResult {
                request_id,
                ok,
                message,
            } => {
                out.put_u8(T_ROTATE_RESULT);
                out.put_u64(*request_id);
                out.put_u8(u8::from(*ok));
                put_string(out, message, MAX_STRING);
            }
        }
    }
}

fn percent(r: &mut Reader<'_>, what: &'static str) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 100 {
        return Err(DecodeError::Invalid { what });
    }
    Ok(v)
}

impl Decode for ControlFrame {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            T_HELLO => ControlFrame::Hello(Hello {
                protocol_version: r.u16()?,
                agent_version: r.string("agent version", MAX_SHORT)?,
                capabilities: r.u32()?,
            }),
            T_HELLO_ACK => ControlFrame::HelloAck(HelloAck {
                protocol_version: r.u16()?,
                heartbeat_interval_secs: r.u32()?,
                public_ip: r.string("public ip", MAX_SHORT)?,
            }),
            T_REFUSED => ControlFrame::Refused(Refusal {
                code: RefusalCode::try_from(r.u8()?)?,
                message: r.string("refusal message", MAX_STRING)?,
            }),
            T_HEARTBEAT => ControlFrame::Heartbeat(Heartbeat {
                uptime_secs: r.u64()?,
                metrics: DeviceMetrics {
                    battery_percent: r.opt(|r| percent(r, "battery percent"))?,
                    charging: r.opt(Reader::bool)?,
                    signal_percent: r.opt(|r| percent(r, "signal percent"))?,
                    carrier: r.opt(|r| r.string("carrier", MAX_SHORT))?,
                    network_type: r.opt(|r| r.string("network type", MAX_SHORT))?,
                },
            }),
            T_HEARTBEAT_ACK => ControlFrame::HeartbeatAck(HeartbeatAck {
                public_ip: r.string("public ip", MAX_SHORT)?,
            }),
            T_ROTATE => ControlFrame::RotateIp {
                request_id: r.u64()?,
            },
            T_ROTATE_RESULT => ControlFrame::RotateIpResult {
                request_id: r.u64()?,
                ok: r.bool()?,
                message: r.string("rotation message", MAX_STRING)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "control frame",
                    tag,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::caps;
    use crate::{Host, Target};

    /// An agent of this release opens every target; one with only the first release's bits opens the old ones.
    #[test]
    fn this_release_announces_every_target_it_opens() {
        let targets = [
            Target::Tcp {
                host: Host::Domain("example.com".into()),
                port: 443,
            },
            Target::Udp,
            Target::Dns,
            Target::DnsTcp,
            Target::Echo,
        ];
        for t in &targets {
            assert!(t.supported_by(caps::BASE), "{t:?}");
        }
        let first_release = caps::TCP | caps::UDP;
        let by_old: Vec<Target> = targets
            .iter()
            .filter(|t| t.supported_by(first_release))
            .cloned()
            .collect();
        assert_eq!(by_old, targets[..3]);
        assert!(Target::Echo.supported_by(caps::ECHO) && !Target::Echo.supported_by(caps::DNS_TCP));
        assert!(
            Target::DnsTcp.supported_by(caps::DNS_TCP) && !Target::DnsTcp.supported_by(caps::ECHO)
        );
    }

    #[test]
    fn capability_names() {
        assert_eq!(
            caps::names(caps::BASE | caps::ROTATE_IP | 1 << 30),
            ["tcp", "udp", "rotate_ip", "dns_tcp", "echo"]
        );
        assert!(caps::names(0).is_empty());
    }
}
