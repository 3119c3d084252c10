//! Request extractors: JSON bodies with JSON errors, the authenticated session, the client's IP and user agent.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, StatusCode};
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use super::{ApiError, AppState};
use crate::auth::sessions::Session;

/// `axum::Json`, but every rejection is a JSON error body without internals.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(r: &JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("expected Content-Type: application/json".into())
        }
        JsonRejection::JsonSyntaxError(_) => ApiError::BadRequest("malformed JSON body".into()),
        JsonRejection::JsonDataError(e) => {
            // serde's message names the field and the expected type, nothing internal.
            let detail = std::error::Error::source(e)
                .map(ToString::to_string)
                .unwrap_or_default();
            ApiError::BadRequest(format!("invalid JSON body: {detail}"))
        }
        JsonRejection::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge
        }
        _ if r.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest("could not read request body".into()),
    }
}

/// `axum::extract::Path`, but a malformed segment (bad percent-encoding, wrong type) is a JSON 400.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|_| ApiError::BadRequest("invalid path parameter".into()))
    }
}

/// `axum::extract::Query`, but a malformed query string is a JSON 400 naming the problem.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))
    }
}

/// The caller's live session, from `Authorization: Bearer <token>`. Tokens anywhere else (query string,
/// cookies) are ignored; the dashboard has its own cookie session.
pub struct AuthSession(pub Session);

impl FromRequestParts<AppState> for AuthSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ApiError::Unauthorized)?;
        if token.len() > 4096 {
            return Err(ApiError::Unauthorized);
        }
        match state.auth.sessions.validate(token).await {
            Ok(Some(s)) => Ok(AuthSession(s)),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(ApiError::internal(e)),
        }
    }
}

/// The client's address: the socket peer, or, when the peer is a configured trusted proxy, the right-most
/// untrusted address of `X-Forwarded-For`.
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("no peer address on request")))?;
        let forwarded: Vec<&str> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        Ok(ClientIp(client_ip(
            peer,
            &forwarded,
            &state.trusted_proxies,
        )))
    }
}

pub fn client_ip(peer: IpAddr, forwarded: &[&str], trusted: &[IpNet]) -> IpAddr {
    let canon = |ip: IpAddr| ip.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    let mut ip = canon(peer);
    if !is_trusted(ip) {
        return ip;
    }
    let hops = forwarded
        .iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .rev();
    for hop in hops {
        match hop.parse::<IpAddr>() {
            Ok(addr) => {
                ip = canon(addr);
                if !is_trusted(ip) {
                    return ip;
                }
            }
            // A garbled hop: trust nothing further left of it.
            Err(_) => return ip,
        }
    }
    ip
}

/// The `User-Agent` header, or empty.
pub struct UserAgent(pub String);

impl<S: Send + Sync> FromRequestParts<S> for UserAgent {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ua = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Ok(UserAgent(ua.chars().take(512).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let table: &[(&str, &[&str], &str)] = &[
            // Untrusted peer: header ignored.
            ("203.0.113.9", &["198.51.100.1"], "203.0.113.9"),
            // Trusted peer: right-most untrusted hop.
            ("127.0.0.1", &["198.51.100.1, 10.1.2.3"], "198.51.100.1"),
            // A client-supplied left-most value is not believed past an untrusted hop.
            ("127.0.0.1", &["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
            // Several header lines count as one list.
            ("10.0.0.5", &["198.51.100.7", "10.0.0.4"], "198.51.100.7"),
            // Garbage stops the walk at the last good address.
            ("127.0.0.1", &["nonsense, 10.0.0.9"], "10.0.0.9"),
            // No header: the peer.
            ("127.0.0.1", &[], "127.0.0.1"),
            // IPv4-mapped IPv6 peer is canonicalised.
            ("::ffff:203.0.113.9", &[], "203.0.113.9"),
        ];
        for (peer, fwd, want) in table {
            assert_eq!(
                client_ip(ip(peer), fwd, &trusted),
                ip(want),
                "{peer} {fwd:?}"
            );
        }
    }
}
