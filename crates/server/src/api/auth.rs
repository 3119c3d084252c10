//! `/auth/*`: login, logout, password change and the caller's own sessions.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, AppState, AuthSession, ClientIp, ErrorBody, UserAgent};
use crate::auth::sessions::Issued;
use crate::auth::AuthError;
use crate::clock::rfc3339;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(change_password))
        .routes(routes!(list_sessions))
        .routes(routes!(revoke_session))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    #[schema(format = Password)]
    password: String,
}

/// A bearer token and when it stops working (24 h after issue, never extended).
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    token: String,
    token_type: &'static str,
    /// RFC 3339, UTC.
    expires_at: String,
}

impl From<Issued> for TokenResponse {
    fn from(i: Issued) -> Self {
        TokenResponse {
            token: i.token,
            token_type: "Bearer",
            expires_at: rfc3339(i.session.expires_at),
        }
    }
}

/// Log in with username and password.
///
/// Unknown usernames and wrong passwords get the same answer. After repeated failures for a username or from
/// an address, attempts are refused with 429 and `Retry-After` for a growing period.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 429, body = ErrorBody, headers(("Retry-After" = u64, description = "seconds")))))]
async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    UserAgent(ua): UserAgent,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let ip = ip.to_string();
    match state
        .auth
        .login(&req.username, &req.password, &ip, &ua)
        .await
    {
        Ok(issued) => {
            state.metrics.logins.with_label_values(&["password"]).inc();
            tracing::info!(username = %req.username.to_lowercase(), %ip, "operator logged in");
            Ok(Json(issued.into()))
        }
        Err(AuthError::Login(reason, retry)) => {
            state
                .metrics
                .login_failures
                .with_label_values(&[reason.as_str()])
                .inc();
            // Log the name only when it is a well-formed username: people type passwords into the username
            // field, and a raw value could also forge log lines.
            let username = crate::auth::password::normalize_username(&req.username)
                .unwrap_or_else(|_| "<malformed>".to_owned());
            tracing::warn!(%username, %ip,
                reason = reason.as_str(), "login failed");
            Err(AuthError::Login(reason, retry).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// End the current session; its token stops working at once.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody)))]
async fn logout(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<StatusCode, ApiError> {
    state
        .auth
        .sessions
        .revoke(&s.operator_id, &s.id, "logout")
        .await
        .map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    #[schema(format = Password)]
    current_password: String,
    #[schema(format = Password)]
    new_password: String,
}

/// Change your password. Every session of yours ends, this one included; the response carries a fresh token.
#[utoipa::path(post, path = "/auth/change-password", tag = "auth", security(("bearer" = [])),
    request_body = ChangePasswordRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "current password is incorrect"),
              (status = 422, body = ErrorBody, description = "new password breaks a rule (named in the message)"),
              (status = 429, body = ErrorBody)))]
async fn change_password(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ClientIp(ip): ClientIp,
    UserAgent(ua): UserAgent,
    ApiJson(req): ApiJson<ChangePasswordRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let ip = ip.to_string();
    let issued = state
        .auth
        .change_password(&s.operator_id, &req.current_password, &req.new_password, &ip, &ua)
        .await
        .inspect_err(|e| {
            if matches!(e, AuthError::WrongCurrentPassword) {
                state.metrics.login_failures.with_label_values(&["bad_current_password"]).inc();
                tracing::warn!(username = %s.username, %ip, reason = "bad_current_password", "password change refused");
            }
        })?;
    tracing::info!(username = %s.username, %ip, "operator changed password; other sessions revoked");
    Ok(Json(issued.into()))
}

/// One of your sessions. Never carries its token or token id.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    id: String,
    username: String,
    ip: String,
    user_agent: String,
    /// Login time, RFC 3339 UTC.
    created_at: String,
    last_activity_at: String,
    expires_at: String,
    /// True for the session making this request.
    current: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionsResponse {
    active_count: usize,
    sessions: Vec<SessionView>,
}

/// Your active sessions.
#[utoipa::path(get, path = "/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = SessionsResponse), (status = 401, body = ErrorBody)))]
async fn list_sessions(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<SessionsResponse>, ApiError> {
    let rows = state
        .auth
        .sessions
        .list(&s.operator_id)
        .await
        .map_err(ApiError::internal)?;
    let sessions: Vec<SessionView> = rows
        .into_iter()
        .map(|r| SessionView {
            current: r.id == s.id,
            id: r.id,
            username: r.username,
            ip: r.ip,
            user_agent: r.user_agent,
            created_at: rfc3339(r.created_at),
            last_activity_at: rfc3339(r.last_activity_at),
            expires_at: rfc3339(r.expires_at),
        })
        .collect();
    Ok(Json(SessionsResponse {
        active_count: sessions.len(),
        sessions,
    }))
}

/// Revoke one of your sessions. Someone else's session id is answered like an unknown one.
#[utoipa::path(delete, path = "/auth/sessions/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id from GET /auth/sessions")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_session(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .auth
        .sessions
        .revoke(&s.operator_id, &id, "revoked")
        .await
        .map_err(ApiError::internal)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}
