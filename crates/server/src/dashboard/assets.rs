//! The dashboard's stylesheet and script, compiled into the binary.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Small and tied to the binary's version; an hour keeps page loads cheap without outliving an upgrade long.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    resp
}

/// `GET /dashboard/app.js`.
pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

/// `GET /dashboard/app.css`.
pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}
