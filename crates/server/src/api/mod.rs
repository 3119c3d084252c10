//! REST API under `/api/v1.0`, plus health and metrics endpoints. Every handler is scoped to the calling operator.

mod auth;
mod connections;
mod devices;
mod error;
mod extract;
mod health;
mod operators;
mod setup;
mod webhooks;

pub use error::{ApiError, ErrorBody};
pub use extract::{ApiJson, ApiPath, ApiQuery, AuthSession, ClientIp, UserAgent};

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use ipnet::IpNet;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::redis::Redis;
use crate::store::Store;

/// Largest accepted request body, in bytes. Bigger bodies get 413 before any parsing or hashing.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// An oversized body announced by `Content-Length` is read and discarded up to this many bytes before the 413,
/// so that ordinary clients see the answer instead of a connection reset; beyond it the connection is dropped.
const MAX_DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// Longest time spent discarding an oversized body.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What an API-only server answers to a change the data plane must apply while another process serves it.
pub const ELSEWHERE: &str =
    "this server does not serve devices and proxy doors, and another one on its database \
does; make changes to operators, devices and connections there, where they take effect at once";

/// Middleware: on a server that does not serve the data plane, refuse changes to operators, devices and
/// connections while another process serves it, because that process would not see them until it restarts
/// (decision 79). Reads pass, and so does everything while nobody serves the data plane. The caller's
/// session is checked first, so only an operator learns how the servers are laid out.
async fn data_plane_only(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::extract::FromRequestParts;
    use axum::response::IntoResponse;
    if state.data_plane || req.method().is_safe() {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    if let Err(e) = extract::AuthSession::from_request_parts(&mut parts, &state).await {
        return e.into_response();
    }
    match state.store.data_plane_locked().await {
        Ok(false) => {
            next.run(axum::extract::Request::from_parts(parts, body))
                .await
        }
        Ok(true) => ApiError::Conflict(ELSEWHERE.into()).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Middleware: refuse bodies whose `Content-Length` is over [`MAX_BODY_BYTES`] before any handler runs. Bodies
/// without a length are cut at the same limit by `DefaultBodyLimit` when a handler reads them.
async fn refuse_oversized(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    let len = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(len) = len.filter(|l| *l > MAX_BODY_BYTES as u64) else {
        return next.run(req).await;
    };
    if len <= MAX_DRAIN_BYTES {
        let mut body = req.into_body();
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    }
    let mut resp = ApiError::PayloadTooLarge.into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

pub struct AppInner {
    pub proxy: Arc<crate::server::Proxy>,
    pub webhooks: WebhookState,
    pub auth: Auth,
    pub store: Store,
    pub metrics: Metrics,
    pub redis: Option<Redis>,
    pub trusted_proxies: Vec<IpNet>,
    pub public_url: String,
    pub pki: Arc<crate::pki::Pki>,
    pub registry: Arc<crate::tunnel::Registry>,
    pub pairing_ttl: std::time::Duration,
    /// Where the device tunnel listens, when it does (for the enroll command shown with a pairing code).
    pub tunnel_addr: Option<std::net::SocketAddr>,
    /// This process holds the data-plane lock (decision 79).
    pub data_plane: bool,
}

/// What the webhook settings endpoints need.
pub struct WebhookState {
    pub key: crate::webhooks::DataKey,
    pub sender: crate::webhooks::Sender,
    /// Wakes the delivery worker.
    pub wake: Arc<tokio::sync::Notify>,
    /// Last "Send Test" per operator (rate limit).
    pub last_test: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// Shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<AppInner>);

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "proxyfleet API", description = "Operator API of proxyfleet. Authenticate with `POST /api/v1.0/auth/login` and send the token as `Authorization: Bearer <token>`."),
    modifiers(&BearerAuth),
    tags((name = "auth", description = "Operator login, sessions and password"),
         (name = "operators", description = "Operator accounts (admins only)"),
         (name = "setup", description = "First-run setup"),
         (name = "devices", description = "Devices: enrollment, status, revocation"),
         (name = "connections", description = "Proxy connections: credentials, limits, usage"),
         (name = "webhooks", description = "Webhook endpoint, signing secret, deliveries"),
         (name = "system", description = "Health, readiness and metrics"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The whole HTTP surface and its OpenAPI document, built from the same route list so they cannot drift apart.
pub fn router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    // What the data plane must apply as it happens: changes to these are made where it runs.
    let applied = OpenApiRouter::new()
        .merge(operators::router())
        .merge(devices::router())
        .merge(connections::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            data_plane_only,
        ));
    let api = OpenApiRouter::new()
        .merge(auth::router())
        .merge(applied)
        .merge(webhooks::router())
        .merge(setup::router());
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1.0", api)
        .merge(health::router())
        .split_for_parts();
    let spec = openapi.clone();
    // The dashboard calls the API in-process, through these same routes.
    let dashboard =
        crate::dashboard::router(state.clone(), router.clone().with_state(state.clone()));
    let router = router
        .route(
            "/api/v1.0/openapi.json",
            axum::routing::get(move || async move { axum::Json(spec) }),
        )
        .merge(setup::page_router())
        .with_state(state.clone())
        .merge(dashboard)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ));
    (router, openapi)
}
