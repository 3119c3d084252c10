//! Length-prefixed framing for `tokio_util::codec`: `u32` big-endian body length, then the body.
//!
//! The length is checked against the codec's maximum before any buffer is reserved, and partial frames stay in
//! the `FramedRead` buffer, so reads are cancel-safe inside `select!`.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::wire::{Decode, DecodeError, Encode};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("tunnel I/O failed")]
    Io(#[from] std::io::Error),
}

/// Frames of `T`, at most `max` body bytes each.
pub struct FrameCodec<T> {
    max: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    pub fn new(max: usize) -> Self {
        FrameCodec {
            max,
            _t: PhantomData,
        }
    }
}

impl<T: Decode> Decoder for FrameCodec<T> {
    type Item = T;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, CodecError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max {
            return Err(DecodeError::FrameTooLarge { len, max: self.max }.into());
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len);
        Ok(Some(T::decode_exact(&body)?))
    }
}

impl<T: Encode> Encoder<T> for FrameCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        item.encode(dst);
        let len = dst.len() - start - 4;
        if len > self.max {
            dst.truncate(start);
            return Err(DecodeError::FrameTooLarge { len, max: self.max }.into());
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Encode one value as a complete frame (length prefix included).
pub fn frame<T: Encode>(item: &T) -> BytesMut {
    let mut out = BytesMut::with_capacity(64);
    out.put_u32(0);
    item.encode(&mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::*;
    use crate::stream::*;
    use proptest::prelude::*;

    fn host() -> impl Strategy<Value = Host> {
        prop_oneof![
            "[a-z0-9.-]{1,255}".prop_map(Host::Domain),
            any::<[u8; 4]>().prop_map(|b| Host::V4(b.into())),
            any::<[u8; 16]>().prop_map(|b| Host::V6(b.into())),
        ]
    }

    fn short() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    fn control() -> impl Strategy<Value = ControlFrame> {
        let metrics = (
            proptest::option::of(0u8..=100),
            proptest::option::of(any::<bool>()),
            proptest::option::of(0u8..=100),
            proptest::option::of(short()),
            proptest::option::of(short()),
        )
            .prop_map(|(b, c, s, carrier, net)| DeviceMetrics {
                battery_percent: b,
                charging: c,
                signal_percent: s,
                carrier,
                network_type: net,
            });
        prop_oneof![
            (any::<u16>(), short(), any::<u32>()).prop_map(|(v, a, c)| ControlFrame::Hello(
                Hello {
                    protocol_version: v,
                    agent_version: a,
                    capabilities: c
                }
            )),
            (any::<u16>(), any::<u32>(), short()).prop_map(|(v, i, ip)| ControlFrame::HelloAck(
                HelloAck {
                    protocol_version: v,
                    heartbeat_interval_secs: i,
                    public_ip: ip
                }
            )),
            (1u8..=5, short()).prop_map(|(c, m)| ControlFrame::Refused(Refusal {
                code: RefusalCode::try_from(c).unwrap(),
                message: m
            })),
            (any::<u64>(), metrics).prop_map(|(u, m)| ControlFrame::Heartbeat(Heartbeat {
                uptime_secs: u,
                metrics: m
            })),
            short().prop_map(|ip| ControlFrame::HeartbeatAck(HeartbeatAck { public_ip: ip })),
            any::<u64>().prop_map(|id| ControlFrame::RotateIp { request_id: id }),
            (any::<u64>(), any::<bool>(), short()).prop_map(|(id, ok, m)| {
                ControlFrame::RotateIpResult {
                    request_id: id,
                    ok,
                    message: m,
                }
            }),
        ]
    }

    fn header() -> impl Strategy<Value = StreamHeader> {
        prop_oneof![
            (host(), 1u16..).prop_map(|(host, port)| StreamHeader {
                target: Target::Tcp { host, port }
            }),
            Just(StreamHeader {
                target: Target::Udp
            }),
            Just(StreamHeader {
                target: Target::Dns
            }),
            Just(StreamHeader {
                target: Target::DnsTcp
            }),
            Just(StreamHeader {
                target: Target::Echo
            }),
        ]
    }

    /// Feed `bytes` to a decoder in chunks of `chunk`, collecting every frame.
    fn decode_chunked<T: Decode>(
        bytes: &[u8],
        chunk: usize,
        max: usize,
    ) -> Result<Vec<T>, CodecError> {
        let mut codec = FrameCodec::<T>::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(v) = codec.decode(&mut buf)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn control_frames_round_trip_in_any_chunking(frames in proptest::collection::vec(control(), 1..8), chunk in 1usize..64) {
            let mut wire = BytesMut::new();
            let mut enc = FrameCodec::<ControlFrame>::new(crate::MAX_CONTROL_FRAME);
            for f in &frames {
                enc.encode(f.clone(), &mut wire).unwrap();
            }
            let back: Vec<ControlFrame> = decode_chunked(&wire, chunk, crate::MAX_CONTROL_FRAME).unwrap();
            prop_assert_eq!(back, frames);
        }

        #[test]
        fn stream_headers_round_trip(h in header()) {
            let wire = frame(&h);
            let back: Vec<StreamHeader> = decode_chunked(&wire, 3, crate::MAX_STREAM_HEADER).unwrap();
            prop_assert_eq!(back, vec![h]);
        }

        #[test]
        fn udp_datagrams_round_trip(host in host(), port in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let d = UdpDatagram { host, port, payload };
            let back: Vec<UdpDatagram> = decode_chunked(&frame(&d), 7, crate::MAX_UDP_FRAME).unwrap();
            prop_assert_eq!(back, vec![d]);
        }

        #[test]
        fn enroll_messages_round_trip(code in "[A-Z2-7]{0,40}", csr in proptest::collection::vec(any::<u8>(), 0..2000), id in "[a-f0-9-]{36}") {
            let req = crate::enroll::EnrollRequest { protocol_version: 1, code, csr_der: csr.clone() };
            prop_assert_eq!(decode_chunked::<crate::enroll::EnrollRequest>(&frame(&req), 5, crate::enroll::MAX_ENROLL_FRAME).unwrap(), vec![req]);
            let resp = crate::enroll::EnrollResponse::Enrolled { device_id: id, cert_der: csr.clone(), ca_der: csr };
            prop_assert_eq!(decode_chunked::<crate::enroll::EnrollResponse>(&frame(&resp), 5, crate::enroll::MAX_ENROLL_FRAME).unwrap(), vec![resp]);
        }

        /// Arbitrary bytes never panic any decoder; they decode or fail with an error.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..32) {
            let _ = decode_chunked::<ControlFrame>(&bytes, chunk, crate::MAX_CONTROL_FRAME);
            let _ = decode_chunked::<StreamHeader>(&bytes, chunk, crate::MAX_STREAM_HEADER);
            let _ = decode_chunked::<UdpDatagram>(&bytes, chunk, crate::MAX_UDP_FRAME);
            let _ = decode_chunked::<crate::enroll::EnrollRequest>(&bytes, chunk, crate::enroll::MAX_ENROLL_FRAME);
            let _ = decode_chunked::<crate::enroll::EnrollResponse>(&bytes, chunk, crate::enroll::MAX_ENROLL_FRAME);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut codec = FrameCodec::<ControlFrame>::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let cap = buf.capacity();
        match codec.decode(&mut buf) {
            Err(CodecError::Decode(DecodeError::FrameTooLarge { len, max })) => {
                assert_eq!((len, max), (u32::MAX as usize, 1024))
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(
            buf.capacity(),
            cap,
            "nothing reserved for the claimed length"
        );
    }

    #[test]
    fn malformed_frames_have_readable_errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[9], "unknown control frame tag 9"),
            (&[1, 0], "frame is truncated"),
            (
                &[5, 0xff, 0xff],
                "public ip is 65535 bytes, more than the 128 allowed",
            ),
            (&[7, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0], "unknown bool tag 2"),
            (
                &[6, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                "1 unexpected bytes after the frame",
            ),
            (
                &[4, 0, 0, 0, 0, 0, 0, 0, 1, 1, 101, 0, 0, 0, 0],
                "invalid battery percent",
            ),
            (&[5, 0, 2, 0xc3, 0x28], "public ip is not valid UTF-8"),
        ];
        for (body, want) in cases {
            let err = ControlFrame::decode_exact(body).unwrap_err();
            assert_eq!(err.to_string(), *want, "{body:?}");
        }
        let err = StreamHeader::decode_exact(&[1, 4, 127, 0, 0, 1, 0, 0]).unwrap_err();
        assert_eq!(err.to_string(), "invalid port 0");
        let err = StreamHeader::decode_exact(&[1, 1, 0, 0, 0, 80]).unwrap_err();
        assert_eq!(err.to_string(), "invalid empty domain");
    }

    #[test]
    fn encoders_never_emit_what_decoders_refuse() {
        let long = "é".repeat(600); // 1200 bytes, cut on a character boundary
        let f = ControlFrame::Heartbeat(Heartbeat {
            uptime_secs: 1,
            metrics: DeviceMetrics {
                battery_percent: Some(250),
                carrier: Some(long.clone()),
                ..Default::default()
            },
        });
        let wire = frame(&f);
        let back = ControlFrame::decode_exact(&wire[4..]).unwrap();
        let ControlFrame::Heartbeat(h) = back else {
            panic!("kind changed")
        };
        assert_eq!(h.metrics.battery_percent, Some(100));
        assert!(h.metrics.carrier.unwrap().len() <= 128);
        let hdr = StreamHeader {
            target: Target::Tcp {
                host: Host::Domain(long),
                port: 443,
            },
        };
        assert!(StreamHeader::decode_exact(&frame(&hdr)[4..]).is_ok());
    }
}
