//! Arbitrary bytes through the stream-header, UDP-datagram and enrollment decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyfleet_proto::{Decode, Encode, EnrollRequest, EnrollResponse, StreamHeader, UdpDatagram};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = StreamHeader::decode_exact(data) {
        let mut out = bytes::BytesMut::new();
        h.encode(&mut out);
        assert_eq!(StreamHeader::decode_exact(&out).ok(), Some(h));
    }
    if let Ok(d) = UdpDatagram::decode_exact(data) {
        let mut out = bytes::BytesMut::new();
        d.encode(&mut out);
        assert_eq!(UdpDatagram::decode_exact(&out).ok(), Some(d));
    }
    let _ = EnrollRequest::decode_exact(data);
    let _ = EnrollResponse::decode_exact(data);
});
