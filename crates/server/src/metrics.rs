//! Prometheus metrics, one registry per server (so tests can run several servers in one process).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub login_failures: IntCounterVec,
    pub logins: IntCounterVec,
    pub redis_up: IntGauge,
    pub devices_online: IntGauge,
    pub proxy_flows_active: IntGauge,
    pub proxy_flows: IntCounterVec,
    pub proxy_bytes: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("proxyfleet".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["method", "route"],
        )?;
        let login_failures = IntCounterVec::new(
            Opts::new("login_failures_total", "Failed operator logins by reason"),
            &["reason"],
        )?;
        let logins = IntCounterVec::new(
            Opts::new("logins_total", "Successful operator logins"),
            &["kind"],
        )?;
        let redis_up = IntGauge::new("redis_up", "1 when Redis is configured and reachable")?;
        let devices_online = IntGauge::new(
            "devices_online",
            "Devices with a live tunnel to this server",
        )?;
        let proxy_flows_active =
            IntGauge::new("proxy_flows_active", "Customer flows open through devices")?;
        let proxy_flows = IntCounterVec::new(
            Opts::new(
                "proxy_flows_total",
                "Customer flow attempts by outcome (opened, refused, device_offline, unsupported, target_failed, auth_failed)",
            ),
            &["outcome"],
        )?;
        let proxy_bytes = IntCounterVec::new(
            Opts::new(
                "proxy_bytes_total",
                "Payload bytes forwarded for customers, by direction (up: to the target)",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(proxy_flows_active.clone()))?;
        registry.register(Box::new(proxy_flows.clone()))?;
        registry.register(Box::new(proxy_bytes.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(login_failures.clone()))?;
        registry.register(Box::new(logins.clone()))?;
        registry.register(Box::new(redis_up.clone()))?;
        registry.register(Box::new(devices_online.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            login_failures,
            logins,
            redis_up,
            devices_online,
            proxy_flows_active,
            proxy_flows,
            proxy_bytes,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Middleware: count and time every request by its route template (never the raw path, which would let clients
/// create unbounded label values).
pub async fn track(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // Only standard methods become label values; anything else could mint unbounded series.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics
        .http_duration
        .with_label_values(&[method.as_str(), route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[method.as_str(), route.as_str(), resp.status().as_str()])
        .inc();
    resp
}
