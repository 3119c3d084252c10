//! Arbitrary bytes through the SOCKS5 and HTTP proxy request parsers that face customers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyfleet_proto::{http_proxy, socks5};

fuzz_target!(|data: &[u8]| {
    for n in [
        socks5::parse_greeting(data).map(|o| o.map(|(_, n)| n)),
        socks5::parse_userpass(data).map(|o| o.map(|(_, n)| n)),
        socks5::parse_request(data).map(|o| o.map(|(_, n)| n)),
    ] {
        if let Ok(Some(n)) = n {
            assert!(n <= data.len() && n <= socks5::MAX_MESSAGE);
        }
    }
    if let Ok(Some((r, _))) = socks5::parse_request(data) {
        let again = socks5::encode_request(3, &r.host, r.port);
        let (back, _) = socks5::parse_request(&again).unwrap().unwrap();
        assert_eq!((back.host, back.port), (r.host, r.port));
    }
    if let Ok(p) = socks5::parse_udp(data) {
        let again = socks5::encode_udp(&p.host, p.port, p.payload);
        assert_eq!(socks5::parse_udp(&again).unwrap().payload, p.payload);
    }
    if let Ok(Some((r, used))) = http_proxy::parse_head(data) {
        assert!(used <= data.len());
        let _ = http_proxy::origin_head(&r, "/");
        let _ = http_proxy::request_body(&r);
    }
    for (head_request, persistent) in [(false, true), (true, false)] {
        if let Ok(Some(h)) = http_proxy::client_response_head(data, head_request, persistent) {
            assert!(h.used <= data.len());
            assert!(!h.persistent || h.body != http_proxy::BodyLength::UntilClose);
        }
    }
    let mut chunked = proxyfleet_proto::chunked::ChunkedEnd::default();
    for part in data.chunks(7) {
        match chunked.feed(part) {
            Ok(n) => assert!(n <= part.len()),
            Err(_) => break,
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = http_proxy::basic_credentials(s);
        let _ = http_proxy::parse_authority(s, Some(80));
    }
});
