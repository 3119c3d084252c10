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

/// The tab icon: a signal-bars mark, so the browser does not ask for a missing `/favicon.ico` on every page.
const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\">\
<rect width=\"32\" height=\"32\" rx=\"6\" fill=\"#1f4e79\"/>\
<rect x=\"6\" y=\"19\" width=\"4\" height=\"7\" fill=\"#fff\"/>\
<rect x=\"12\" y=\"14\" width=\"4\" height=\"12\" fill=\"#fff\"/>\
<rect x=\"18\" y=\"10\" width=\"4\" height=\"16\" fill=\"#fff\"/>\
<rect x=\"24\" y=\"6\" width=\"4\" height=\"20\" fill=\"#fff\"/></svg>";

/// `GET /dashboard/icon.svg`.
pub async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}

/// `GET /dashboard/app.css`.
pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}
