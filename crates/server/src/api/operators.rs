//! `/operators`: operator accounts, for admins. Listings never carry password hashes or session data.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, AppState, AuthSession, ErrorBody};
use crate::auth::sessions::Session;
use crate::clock::rfc3339;
use crate::store::{Operator, Role};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_operators, create_operator))
        .routes(routes!(delete_operator))
        .routes(routes!(disable_operator))
        .routes(routes!(enable_operator))
}

#[derive(Serialize, ToSchema)]
pub struct OperatorView {
    id: String,
    username: String,
    role: Role,
    /// RFC 3339, UTC.
    created_at: String,
    disabled: bool,
}

impl From<Operator> for OperatorView {
    fn from(o: Operator) -> Self {
        OperatorView {
            id: o.id,
            username: o.username,
            role: o.role,
            created_at: rfc3339(o.created_at),
            disabled: o.disabled_at.is_some(),
        }
    }
}

async fn require_admin(state: &AppState, s: &Session) -> Result<Operator, ApiError> {
    match state.store.operator_by_id(&s.operator_id).await? {
        Some(op) if op.role == Role::Admin && op.disabled_at.is_none() => Ok(op),
        Some(_) => Err(ApiError::Forbidden("this needs the admin role")),
        None => Err(ApiError::Unauthorized),
    }
}

/// Load a target operator other than the caller.
async fn other_operator(
    state: &AppState,
    caller: &Operator,
    id: &str,
) -> Result<Operator, ApiError> {
    if id == caller.id {
        return Err(ApiError::Unprocessable(
            "you cannot disable or delete your own account".into(),
        ));
    }
    state
        .store
        .operator_by_id(id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// All operators (admins only).
#[utoipa::path(get, path = "/operators", tag = "operators", security(("bearer" = [])),
    responses((status = 200, body = Vec<OperatorView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_operators(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<Vec<OperatorView>>, ApiError> {
    require_admin(&state, &s).await?;
    let ops = state.store.list_operators().await?;
    Ok(Json(ops.into_iter().map(OperatorView::from).collect()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOperatorRequest {
    /// 3–64 letters, digits or underscores; case-insensitive.
    username: String,
    #[serde(default = "default_role")]
    role: Role,
}

fn default_role() -> Role {
    Role::Operator
}

/// A new operator and the one-time invitation with which they choose their own password.
#[derive(Serialize, ToSchema)]
pub struct InvitedOperator {
    #[serde(flatten)]
    operator: OperatorView,
    /// Shown once. Hand it (or `invite_url`) to the new operator.
    invite_token: String,
    invite_url: String,
    /// RFC 3339, UTC.
    invite_expires_at: String,
}

/// Create an operator (admins only). No password is set: the response carries a one-time invitation (valid
/// 24 h) with which the new operator chooses their own, so not even the admin knows it.
#[utoipa::path(post, path = "/operators", tag = "operators", security(("bearer" = [])),
    request_body = CreateOperatorRequest,
    responses((status = 201, body = InvitedOperator), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_operator(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiJson(req): ApiJson<CreateOperatorRequest>,
) -> Result<(StatusCode, Json<InvitedOperator>), ApiError> {
    let admin = require_admin(&state, &s).await?;
    let name = crate::auth::password::normalize_username(&req.username)
        .map_err(|m| ApiError::Unprocessable(m.to_owned()))?;
    let (token, hash) = crate::auth::new_setup_token();
    let now = state.auth.clock.now_ms();
    let expires = now + crate::auth::SETUP_TOKEN_TTL_MS;
    let op = state
        .store
        .create_invited_operator(&name, req.role, &hash, now, expires)
        .await?;
    tracing::info!(admin = %admin.username, username = %op.username, role = op.role.as_str(), "operator invited");
    Ok((
        StatusCode::CREATED,
        Json(InvitedOperator {
            operator: op.into(),
            invite_url: format!("{}/setup#invite.{token}", state.public_url),
            invite_token: token,
            invite_expires_at: rfc3339(expires),
        }),
    ))
}

/// Disable an operator (admins only): they cannot log in and every session of theirs ends at once.
#[utoipa::path(post, path = "/operators/{id}/disable", tag = "operators", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = OperatorView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn disable_operator(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OperatorView>, ApiError> {
    let admin = require_admin(&state, &s).await?;
    let mut target = other_operator(&state, &admin, &id).await?;
    let now = state.auth.clock.now_ms();
    state
        .store
        .set_operator_disabled(&id, Some(now), now)
        .await?;
    state
        .auth
        .sessions
        .revoke_all(&id, None, "operator_disabled")
        .await
        .map_err(ApiError::internal)?;
    kick_devices(&state, &id).await?;
    state.proxy.forget_operator(&id, false);
    tracing::info!(admin = %admin.username, username = %target.username, "operator disabled");
    target.disabled_at = Some(now);
    Ok(Json(target.into()))
}

/// Enable a disabled operator again (admins only).
#[utoipa::path(post, path = "/operators/{id}/enable", tag = "operators", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = OperatorView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn enable_operator(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OperatorView>, ApiError> {
    let admin = require_admin(&state, &s).await?;
    let mut target = other_operator(&state, &admin, &id).await?;
    state
        .store
        .set_operator_disabled(&id, None, state.auth.clock.now_ms())
        .await?;
    state.proxy.load_operator(&id).await?;
    target.disabled_at = None;
    Ok(Json(target.into()))
}

/// Delete an operator and everything of theirs (admins only); their sessions end at once.
#[utoipa::path(delete, path = "/operators/{id}", tag = "operators", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn delete_operator(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let admin = require_admin(&state, &s).await?;
    let target = other_operator(&state, &admin, &id).await?;
    // Revoke first so that Redis tombstones exist before the rows (and their jtis) are gone.
    state
        .auth
        .sessions
        .revoke_all(&id, None, "operator_deleted")
        .await
        .map_err(ApiError::internal)?;
    let devices = state.store.device_ids(&id).await?;
    state.store.delete_operator(&id).await?;
    for device in devices {
        state.registry.kick(&device);
    }
    state.proxy.forget_operator(&id, true);
    tracing::info!(admin = %admin.username, username = %target.username, "operator deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Close the tunnels of a disabled operator's devices. They are refused while the operator stays disabled (see
/// `Store::device_by_fingerprint`) but told to retry, so enabling the operator brings them back by themselves.
async fn kick_devices(state: &AppState, operator_id: &str) -> Result<(), ApiError> {
    for device in state.store.device_ids(operator_id).await? {
        state.registry.suspend(&device);
    }
    Ok(())
}
