#![forbid(unsafe_code)]
//! proxyfleet server library: configuration, store, operator auth and the HTTP API. `main.rs` only parses the
//! command line and calls in here.

pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod legacy;
pub mod metrics;
pub mod monitor;
pub mod openvpn;
pub mod pki;
pub mod proxy;
pub mod redis;
pub mod server;
pub mod store;
pub mod tunnel;
pub mod webhooks;
