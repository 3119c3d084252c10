//! Arbitrary lines through the OpenVPN management-interface parser: no panic, blocks stay bounded, and the
//! `status 3` line parser never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyfleet_proto::openvpn_mgmt::{status_client, Event, Parser, MAX_ENV};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut p = Parser::new();
    for line in text.split('\n') {
        if let Ok(Some(Event::Client { env, .. })) = p.feed(line) {
            assert!(env.len() <= MAX_ENV);
        }
        let _ = status_client(line);
    }
});
