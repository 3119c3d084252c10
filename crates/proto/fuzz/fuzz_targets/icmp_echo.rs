//! Arbitrary bytes as an ICMP echo request and reply: refused or parsed, never a panic; what parses re-encodes to
//! the same message (but for the checksum field, whose ones' complement zero has two forms).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyfleet_proto::icmp::{Echo, EchoKind};

fuzz_target!(|data: &[u8]| {
    for kind in [EchoKind::Request, EchoKind::Reply] {
        if let Ok(e) = Echo::parse(data, kind) {
            let again = e.to_bytes();
            assert_eq!((&again[..2], &again[4..]), (&data[..2], &data[4..]));
            assert_eq!(Echo::parse(&again, kind).ok(), Some(e));
        }
    }
});
