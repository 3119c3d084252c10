//! `/devices`: an operator's devices, their pairing codes and live status. Every query is scoped to the caller;
//! another operator's device id is answered like an unknown one.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, AppState, AuthSession, ErrorBody};
use crate::clock::rfc3339;
use crate::store::{DeviceRow, NewDevice};
use crate::tunnel::pairing;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_devices, create_device))
        .routes(routes!(get_device, update_device, delete_device))
        .routes(routes!(revoke_device))
        .routes(routes!(rotate_ip))
}

/// What the device reports about itself (absent fields: the device does not expose them).
#[derive(Serialize, ToSchema)]
pub struct MetricsView {
    battery_percent: Option<u8>,
    charging: Option<bool>,
    signal_percent: Option<u8>,
    carrier: Option<String>,
    network_type: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceView {
    id: String,
    name: String,
    description: String,
    /// `pending` (not enrolled yet), `online`, `offline` or `revoked`.
    status: &'static str,
    /// RFC 3339 UTC timestamps.
    created_at: String,
    enrolled_at: Option<String>,
    pairing_expires_at: Option<String>,
    connected_since: Option<String>,
    last_heartbeat_at: Option<String>,
    last_seen_at: Option<String>,
    /// The device's public address as the server sees it.
    public_ip: Option<String>,
    /// `quic` while online.
    transport: Option<&'static str>,
    agent_version: Option<String>,
    /// What the online agent announced it can do: `tcp`, `udp`, `rotate_ip`, `dns_tcp`, `echo`. An agent without
    /// `dns_tcp` and `echo` predates DNS over TCP and ping through the OpenVPN door: update it.
    capabilities: Option<Vec<&'static str>>,
    metrics: Option<MetricsView>,
}

fn view(state: &AppState, d: DeviceRow) -> DeviceView {
    let live = state
        .registry
        .get(&d.id)
        .filter(|l| l.operator_id == d.operator_id);
    let status = match (&live, d.revoked_at, d.enrolled_at) {
        (_, Some(_), _) => "revoked",
        (Some(_), None, _) => "online",
        (None, None, Some(_)) => "offline",
        (None, None, None) => "pending",
    };
    let ts = |v: Option<i64>| v.map(rfc3339);
    DeviceView {
        status,
        created_at: rfc3339(d.created_at),
        enrolled_at: ts(d.enrolled_at),
        pairing_expires_at: ts(d.pairing_expires_at),
        connected_since: live.as_ref().map(|l| rfc3339(l.connected_since)),
        last_heartbeat_at: live.as_ref().and_then(|l| l.last_heartbeat).map(rfc3339),
        last_seen_at: ts(live
            .as_ref()
            .and_then(|l| l.last_heartbeat)
            .or(d.last_seen_at)),
        public_ip: live
            .as_ref()
            .map(|l| l.public_ip.clone())
            .or(d.last_public_ip),
        transport: live.as_ref().map(|l| l.link.transport()),
        agent_version: live.as_ref().map(|l| l.agent_version.clone()),
        capabilities: live
            .as_ref()
            .map(|l| proxyfleet_proto::control::caps::names(l.capabilities)),
        metrics: live.map(|l| MetricsView {
            battery_percent: l.metrics.battery_percent,
            charging: l.metrics.charging,
            signal_percent: l.metrics.signal_percent,
            carrier: l.metrics.carrier,
            network_type: l.metrics.network_type,
        }),
        id: d.id,
        name: d.name,
        description: d.description,
    }
}

pub(super) fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::Unprocessable(
            "name must be 1–100 characters".into(),
        ));
    }
    Ok(name.to_owned())
}

fn check_description(d: &str) -> Result<(), ApiError> {
    if d.chars().count() > 1000 {
        return Err(ApiError::Unprocessable(
            "description must be at most 1000 characters".into(),
        ));
    }
    Ok(())
}

/// Your devices with their live status.
#[utoipa::path(get, path = "/devices", tag = "devices", security(("bearer" = [])),
    responses((status = 200, body = Vec<DeviceView>), (status = 401, body = ErrorBody)))]
async fn list_devices(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let rows = state.store.devices(&s.operator_id).await?;
    Ok(Json(rows.into_iter().map(|d| view(&state, d)).collect()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeviceRequest {
    name: String,
    #[serde(default)]
    description: String,
}

/// A new device and its one-time pairing code (shown once).
#[derive(Serialize, ToSchema)]
pub struct CreatedDevice {
    #[serde(flatten)]
    device: DeviceView,
    /// For `proxyfleet-agent enroll --code`. Valid once, until `pairing_expires_at`.
    pairing_code: String,
    /// The pairing code as an SVG QR code.
    pairing_qr_svg: String,
    /// `HOST:PORT` for `proxyfleet-agent enroll --server`: the proxy public host and the tunnel's port. Absent
    /// when this server runs no tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    enroll_server: Option<String>,
}

/// Add a device. Enroll it with `proxyfleet-agent enroll --server HOST:PORT --code CODE --state-dir DIR`.
#[utoipa::path(post, path = "/devices", tag = "devices", security(("bearer" = [])), request_body = CreateDeviceRequest,
    responses((status = 201, body = CreatedDevice), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_device(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiJson(req): ApiJson<CreateDeviceRequest>,
) -> Result<(StatusCode, Json<CreatedDevice>), ApiError> {
    let name = check_name(&req.name)?;
    check_description(&req.description)?;
    let (code, hash) = pairing::new_code(&state.pki.ca_fingerprint());
    let now = state.auth.clock.now_ms();
    let ttl = i64::try_from(state.pairing_ttl.as_millis()).unwrap_or(900_000);
    let row = state
        .store
        .create_device(NewDevice {
            operator_id: &s.operator_id,
            name: &name,
            description: &req.description,
            pairing_code_hash: &hash,
            pairing_expires_at: now + ttl,
            now,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedDevice {
            device: view(&state, row),
            pairing_qr_svg: pairing::qr_svg(&code),
            pairing_code: code,
            enroll_server: state.tunnel_addr.map(|a| {
                format!(
                    "{}:{}",
                    super::connections::bracket(&state.proxy.public_host),
                    a.port()
                )
            }),
        }),
    ))
}

pub(super) async fn own_device(
    state: &AppState,
    operator_id: &str,
    id: &str,
) -> Result<DeviceRow, ApiError> {
    state
        .store
        .device(operator_id, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// One of your devices.
#[utoipa::path(get, path = "/devices/{id}", tag = "devices", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)))]
async fn get_device(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let row = own_device(&state, &s.operator_id, &id).await?;
    Ok(Json(view(&state, row)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDeviceRequest {
    name: Option<String>,
    description: Option<String>,
}

/// Rename or describe a device.
#[utoipa::path(patch, path = "/devices/{id}", tag = "devices", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = UpdateDeviceRequest,
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn update_device(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateDeviceRequest>,
) -> Result<Json<DeviceView>, ApiError> {
    let name = req.name.as_deref().map(check_name).transpose()?;
    if let Some(d) = &req.description {
        check_description(d)?;
    }
    let now = state.auth.clock.now_ms();
    if !state
        .store
        .update_device(
            &s.operator_id,
            &id,
            name.as_deref(),
            req.description.as_deref(),
            now,
        )
        .await?
    {
        return Err(ApiError::NotFound);
    }
    Ok(Json(view(
        &state,
        own_device(&state, &s.operator_id, &id).await?,
    )))
}

/// Revoke a device: its tunnel closes at once and its certificate is refused from then on.
#[utoipa::path(post, path = "/devices/{id}/revoke", tag = "devices", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)))]
async fn revoke_device(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceView>, ApiError> {
    own_device(&state, &s.operator_id, &id).await?;
    state
        .store
        .revoke_device(&s.operator_id, &id, state.auth.clock.now_ms())
        .await?;
    state.registry.kick(&id);
    state.proxy.ctx.dir.device_gone(&id, false);
    tracing::info!(device = %id, operator = %s.username, "device revoked");
    Ok(Json(view(
        &state,
        own_device(&state, &s.operator_id, &id).await?,
    )))
}

/// Delete a device: like revoke, and the record is gone.
#[utoipa::path(delete, path = "/devices/{id}", tag = "devices", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_device(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if !state.store.delete_device(&s.operator_id, &id).await? {
        return Err(ApiError::NotFound);
    }
    state.registry.kick(&id);
    state.proxy.ctx.dir.device_gone(&id, true);
    Ok(StatusCode::NO_CONTENT)
}

/// The outcome of an IP rotation, with the address before and after as this server saw it.
#[derive(Serialize, ToSchema)]
pub struct RotateResult {
    /// Whether the device's rotation command succeeded.
    ok: bool,
    /// The command's last line of output, or why nothing ran.
    message: String,
    ip_before: String,
    ip_after: String,
    /// True when the public address actually changed.
    changed: bool,
}

/// How long a rotation command may take on the device.
const ROTATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);
/// How long to wait for a device whose tunnel dropped during the rotation to come back.
const ROTATE_RECONNECT: std::time::Duration = std::time::Duration::from_secs(90);
/// How long to watch for the device's new address after the command finished.
const ROTATE_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Ask the device to rotate its public IP (it runs its configured rotation command, for example a modem
/// reconnect) and report the address before and after.
#[utoipa::path(post, path = "/devices/{id}/rotate", tag = "devices", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = RotateResult), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "device offline"), (status = 504, body = ErrorBody)))]
async fn rotate_ip(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RotateResult>, ApiError> {
    own_device(&state, &s.operator_id, &id).await?;
    let live = state
        .registry
        .get(&id)
        .filter(|l| l.operator_id == s.operator_id)
        .ok_or_else(|| ApiError::Conflict("device is offline".into()))?;
    let ip_before = live.link.peer().ip().to_canonical();
    let session_before = live.session;
    let (reply, outcome) = tokio::sync::oneshot::channel();
    live.commands
        .send(crate::tunnel::DeviceCommand::RotateIp { reply })
        .await
        .map_err(|_| ApiError::Conflict("device is offline".into()))?;
    let (outcome, settle) = match tokio::time::timeout(ROTATE_TIMEOUT, outcome).await {
        Ok(Ok(o)) => (o, ROTATE_SETTLE),
        // A modem reconnect often drops the tunnel with the old address: wait for the device to come back.
        Ok(Err(_)) => (
            crate::tunnel::RotateOutcome {
                ok: true,
                message: "the device reconnected during the rotation".into(),
            },
            ROTATE_RECONNECT,
        ),
        Err(_) => {
            return Err(ApiError::GatewayTimeout(
                "device did not finish rotating in time".into(),
            ))
        }
    };
    // Read the address from whatever session the device has now. A new session (the device reconnected: a modem
    // reconnect drops the tunnel, and a tunnel over TCP is made again after every rotation) tells at once; the
    // same one (QUIC migrates) once its address differs or the settle time is over. A device between two sessions
    // is waited for as long as one that dropped mid-rotation.
    let current = || {
        state
            .registry
            .get(&id)
            .map(|l| (l.session, l.link.peer().ip().to_canonical()))
    };
    let since = tokio::time::Instant::now();
    let mut now = current();
    // A failed command changed nothing: its answer is the address as it is.
    loop {
        let waited = since.elapsed();
        let done = !outcome.ok
            || match now {
                Some((session, ip)) => {
                    session != session_before || ip != ip_before || waited >= settle
                }
                None => waited >= ROTATE_RECONNECT,
            };
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        now = current();
    }
    let ip_after = now.map(|(_, ip)| ip);
    let Some(ip_after) = ip_after else {
        return Err(ApiError::Conflict(
            "device went offline during the rotation and has not come back".into(),
        ));
    };
    tracing::info!(device = %id, ok = outcome.ok, %ip_before, %ip_after, "IP rotation");
    Ok(Json(RotateResult {
        ok: outcome.ok,
        message: outcome.message,
        ip_before: ip_before.to_string(),
        ip_after: ip_after.to_string(),
        changed: ip_before != ip_after,
    }))
}
