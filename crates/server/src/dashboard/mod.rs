//! The operator dashboard: server-rendered HTML at `/`, a small script for live updates over SSE, inline SVG for
//! charts and QR codes.
//!
//! The dashboard is a client of the REST API that runs in the same process: every action is an in-process call
//! (see [`client`]) with the session's token, so login limits, validation, error messages and the scoping to the
//! calling operator are the API's own and cannot drift. The session travels in an HttpOnly, SameSite=Strict cookie
//! (`Secure` when the public URL is https); every state-changing request carries a per-session CSRF token.

mod account;
mod assets;
mod chart;
mod client;
mod conn_form;
mod connections;
mod devices;
mod events;
mod format;
mod layout;
mod login;
mod once;
mod session;
mod webhook;

use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::AppState;

/// What every dashboard handler has: the server's state and the API router it calls in-process.
pub struct Dash {
    pub app: AppState,
    /// The `/api/v1.0` routes with their state, without the outer layers (the dashboard request already passed
    /// them).
    api: Router,
    /// Mark cookies `Secure`: the public URL is https (TLS is terminated in front of proxyfleet).
    secure_cookies: bool,
}

/// Cheap-to-clone handle on [`Dash`].
#[derive(Clone)]
pub struct DashState(Arc<Dash>);

impl std::ops::Deref for DashState {
    type Target = Dash;
    fn deref(&self) -> &Dash {
        &self.0
    }
}

/// The dashboard's routes. `api` is the API router (with its state) that the dashboard calls in-process.
pub fn router(app: AppState, api: Router) -> Router {
    let secure_cookies = app.public_url.starts_with("https://");
    let st = DashState(Arc::new(Dash {
        app,
        api,
        secure_cookies,
    }));
    Router::new()
        .route("/", get(|| async { Redirect::to("/connections") }))
        .route("/login", get(login::page).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/account", get(account::show))
        .route("/account/password", post(account::change_password))
        .route("/account/sessions/{id}/revoke", post(account::revoke))
        .route("/devices", get(devices::list).post(devices::create))
        .route("/devices/{id}", get(devices::detail))
        .route("/devices/{id}/rename", post(devices::rename))
        .route("/devices/{id}/revoke", post(devices::revoke))
        .route("/devices/{id}/delete", post(devices::delete))
        .route("/devices/{id}/rotate", post(devices::rotate))
        .route(
            "/connections",
            get(connections::list).post(connections::create),
        )
        .route("/connections/new", get(connections::new_form))
        .route(
            "/connections/{id}",
            get(connections::detail).post(connections::update),
        )
        .route(
            "/connections/{id}/regenerate",
            post(connections::regenerate),
        )
        .route("/connections/{id}/reset", post(connections::reset))
        .route("/connections/{id}/profile.ovpn", get(connections::profile))
        .route("/connections/{id}/delete", post(connections::delete))
        .route("/webhook", get(webhook::show).post(webhook::save))
        .route("/webhook/test", post(webhook::test))
        .route("/webhook/rotate", post(webhook::rotate))
        .route("/webhook/deliveries/{id}/resend", post(webhook::resend))
        .route("/dashboard/events", get(events::stream))
        .route("/dashboard/app.js", get(assets::script))
        .route("/dashboard/app.css", get(assets::style))
        .route("/dashboard/icon.svg", get(assets::icon))
        .layer(axum::middleware::map_response(harden))
        .with_state(st)
}

/// Headers on every dashboard answer: no framing, no inline script, no referrer, no sniffing.
async fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    // Inline style attributes carry the usage bars' widths; scripts come only from /dashboard/app.js.
    set(
        h,
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
         frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-content-type-options", "nosniff");
    // Pages hold operator data and sometimes a secret shown once: never from a cache or the back button's copy.
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    resp
}
