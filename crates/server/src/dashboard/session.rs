//! The dashboard's session: the API's bearer token kept in an HttpOnly cookie, the per-session CSRF token, and
//! the extractors that turn a request into "this operator, this client".

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::DashState;
use crate::auth::sessions::Session;

/// The cookie holding the session's token.
pub const SESSION_COOKIE: &str = "pf_session";
/// The cookie holding the login form's CSRF value (there is no session yet to bind it to).
pub const LOGIN_COOKIE: &str = "pf_login";
/// Form field and header that carry the CSRF token.
pub const CSRF_FIELD: &str = "_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Largest form body the dashboard reads, in bytes (the API refuses bigger ones anyway).
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The value of cookie `name`, if the request has it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path `/`, `Secure` when served over https. No `Max-Age`:
/// the cookie ends with the browser session; the token inside ends after 24 h or 1 h idle regardless.
pub fn set_cookie(st: &DashState, name: &str, value: &str) -> HeaderValue {
    let secure = if st.secure_cookies { "; Secure" } else { "" };
    let v = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}");
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("pf_invalid=1"))
}

/// A `Set-Cookie` value that deletes cookie `name`.
pub fn clear_cookie(st: &DashState, name: &str) -> HeaderValue {
    let secure = if st.secure_cookies { "; Secure" } else { "" };
    let v = format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("pf_invalid=1"))
}

/// The CSRF token of a session: HMAC-SHA256 keyed with the session's token (a secret only the cookie holds), so
/// it needs no storage, is the same on every node and dies with the session.
pub fn csrf_token(session_token: &str) -> String {
    use base64::Engine;
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(session_token.as_bytes()) else {
        return String::new();
    };
    mac.update(b"proxyfleet dashboard csrf v1");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of two tokens.
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // Equal length and equal bytes, without an early exit on the first difference.
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who the request comes from, as the API needs it for login limits and the sessions list.
#[derive(Clone)]
pub struct Ctx {
    pub peer: SocketAddr,
    pub user_agent: Option<HeaderValue>,
    pub forwarded_for: Vec<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())?;
        Ok(Ctx {
            peer,
            user_agent: parts.headers.get(header::USER_AGENT).cloned(),
            forwarded_for: parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .cloned()
                .collect(),
        })
    }
}

/// A logged-in operator: the live session, its token (to call the API with) and its CSRF token.
pub struct Op {
    pub session: Session,
    pub token: String,
    pub csrf: String,
    pub ctx: Ctx,
}

impl FromRequestParts<DashState> for Op {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &DashState) -> Result<Self, Response> {
        let ctx = Ctx::from_request_parts(parts, st).await?;
        let not_logged_in = || {
            if parts.method == Method::GET && !parts.uri.path().starts_with("/dashboard/") {
                Redirect::to("/login").into_response()
            } else {
                let body = super::layout::shell(
                    "Session ended",
                    None,
                    maud::html! { main.narrow { h1 { "Your session has ended" }
                    p { a href="/login" { "Log in again" } } } },
                );
                super::layout::respond(StatusCode::UNAUTHORIZED, body)
            }
        };
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE).filter(|t| t.len() <= 4096) else {
            return Err(not_logged_in());
        };
        match st.app.auth.sessions.validate(token).await {
            Ok(Some(session)) => Ok(Op {
                session,
                csrf: csrf_token(token),
                token: token.to_owned(),
                ctx,
            }),
            Ok(None) => Err(not_logged_in()),
            Err(e) => {
                tracing::error!(error = %e, "dashboard session check failed");
                Err(super::layout::server_error())
            }
        }
    }
}

/// A resource id from the URL path. Ids are UUIDs; anything else (slashes, `?`, `..`) is answered 404 before it
/// can reach an API path.
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, Response> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|_| StatusCode::NOT_FOUND.into_response())?;
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Id(id))
        } else {
            Err((StatusCode::NOT_FOUND, "Not found.").into_response())
        }
    }
}

/// The fields of a submitted form.
#[derive(Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(body: &[u8]) -> Fields {
        Fields(url::form_urlencoded::parse(body).into_owned().collect())
    }

    /// The field's value, or empty.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// A checkbox: present means checked.
    pub fn checked(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }
}

async fn read_form(req: Request, st: &DashState) -> Result<Fields, Response> {
    let body = Bytes::from_request(req, st)
        .await
        .map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.").into_response())?;
    if body.len() > MAX_FORM_BYTES {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.").into_response());
    }
    Ok(Fields::parse(&body))
}

/// The refusal of a state-changing request without a valid CSRF token.
pub fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        "This request did not come from a page of this dashboard (its security token is missing or wrong). \
         Reload the page and try again.",
    )
        .into_response()
}

/// A state-changing request from a logged-in operator, checked for its CSRF token (form field `_csrf` or header
/// `X-CSRF-Token`) before anything else happens.
pub struct Posted {
    pub op: Op,
    pub form: Fields,
}

impl FromRequest<DashState> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, st: &DashState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let op = Op::from_request_parts(&mut parts, st).await?;
        let header = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let form = read_form(Request::from_parts(parts, body), st).await?;
        let sent = header.as_deref().unwrap_or_else(|| form.get(CSRF_FIELD));
        if !same_token(sent, &op.csrf) {
            tracing::warn!(operator = %op.session.username, "dashboard request without a valid CSRF token refused");
            return Err(csrf_refused());
        }
        Ok(Posted { op, form })
    }
}

/// The login form: the CSRF value must match the `pf_login` cookie set when the form was shown.
pub struct LoginPost {
    pub ctx: Ctx,
    pub form: Fields,
}

impl FromRequest<DashState> for LoginPost {
    type Rejection = Response;

    async fn from_request(req: Request, st: &DashState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let ctx = Ctx::from_request_parts(&mut parts, st).await?;
        let expected = cookie(&parts.headers, LOGIN_COOKIE).map(str::to_owned);
        let form = read_form(Request::from_parts(parts, body), st).await?;
        match expected {
            Some(e) if same_token(form.get(CSRF_FIELD), &e) => Ok(LoginPost { ctx, form }),
            _ => Err(csrf_refused()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_are_per_session_and_compared_exactly() {
        let a = csrf_token("token-a");
        assert_eq!(a, csrf_token("token-a"));
        assert_ne!(a, csrf_token("token-b"));
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token("", ""), "an empty token never matches");
        assert!(!same_token(&a, &a[..a.len() - 1]));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; pf_session=tok; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("tok"));
        assert_eq!(cookie(&h, "pf"), None);
    }
}
