//! `/connections`: customers' proxy connections. Every query is scoped to the caller; another operator's connection
//! is answered like an unknown one. Passwords are generated here, shown once (create, regenerate) and stored only
//! as bcrypt hashes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::devices::{check_name, own_device};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, AuthSession, ErrorBody};
use crate::clock::rfc3339;
use crate::proxy::{PortError, Refusal};
use crate::store::{ConnectionRow, ConnectionSettings, HourUsage, StoreError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_connections, create_connection))
        .routes(routes!(
            get_connection,
            update_connection,
            delete_connection
        ))
        .routes(routes!(regenerate_password))
        .routes(routes!(openvpn_profile))
        .routes(routes!(reset_usage))
        .routes(routes!(connection_usage))
        .routes(routes!(device_usage))
}

/// Length of generated passwords: 24 characters from 62 give 142 bits of entropy, and letters and digits pass
/// through every client and OpenVPN's credential handling unchanged.
const PASSWORD_LEN: usize = 24;
/// Most CIDRs on one allow-list.
const MAX_ALLOW: usize = 50;

#[derive(Serialize, ToSchema)]
pub struct ConnectionView {
    id: String,
    name: String,
    /// The device the connection's traffic leaves through; null when it has none (its device was deleted).
    device_id: Option<String>,
    /// Customers authenticate with this username.
    username: String,
    /// Bytes allowed in total (both directions); null means unlimited.
    bandwidth_limit_bytes: Option<u64>,
    /// Same as `bandwidth_limit_bytes`.
    limit_bytes: Option<u64>,
    /// Payload bytes forwarded so far in both directions, since creation or the last reset.
    used_bytes: u64,
    /// Bytes left before the cut-off; null when unlimited.
    remaining_bytes: Option<u64>,
    /// `active`, `exhausted` (limit reached; reset to restore), `disabled`, `no_device`, or `device_revoked` (give it
    /// another device).
    state: &'static str,
    enabled: bool,
    /// Clients from these networks may use the dedicated port without credentials.
    allow_cidrs: Vec<String>,
    dedicated_port: Option<u16>,
    /// Proxy addresses to give the customer (`host:port`), when the doors are enabled.
    http_proxy: Option<String>,
    socks5_proxy: Option<String>,
    dedicated_proxy: Option<String>,
    /// Where the connection's OpenVPN profile connects, when the OpenVPN door is on. The profile itself (without
    /// the password) is at `GET /connections/{id}/profile.ovpn`.
    openvpn: Option<OpenVpnView>,
    /// RFC 3339 UTC timestamps.
    created_at: String,
    updated_at: String,
}

/// The OpenVPN door as a connection's profile uses it.
#[derive(Serialize, ToSchema)]
pub struct OpenVpnView {
    /// `host:port` of the server.
    remote: String,
    /// `udp` or `tcp`.
    proto: &'static str,
}

/// A connection with its password: only in the create and regenerate-password responses.
#[derive(Serialize, ToSchema)]
pub struct ConnectionWithPassword {
    #[serde(flatten)]
    connection: ConnectionView,
    /// Shown once; only a bcrypt hash is kept.
    password: String,
    /// Ready-to-use proxy URLs with the credentials (when the doors are enabled). `socks5h` resolves names on the
    /// device, so DNS does not leak from the customer's network.
    http_url: Option<String>,
    socks5_url: Option<String>,
    /// The OpenVPN profile (`.ovpn`) with the credentials inline, shown once like the password; null when the
    /// OpenVPN door is off. Afterwards `GET /connections/{id}/profile.ovpn` serves it without the password.
    ovpn: Option<String>,
}

fn state_name(r: Option<Refusal>) -> &'static str {
    match r {
        None => "active",
        Some(Refusal::Exhausted) => "exhausted",
        Some(Refusal::Disabled | Refusal::Deleted) => "disabled",
        Some(Refusal::NoDevice) => "no_device",
        Some(Refusal::DeviceRevoked) => "device_revoked",
    }
}

fn view(state: &AppState, row: ConnectionRow) -> ConnectionView {
    let proxy = &state.proxy;
    let limit = row.limit_bytes.and_then(|l| u64::try_from(l).ok());
    let stored = u64::try_from(row.used_bytes).unwrap_or(0);
    // The meter where this process runs it; elsewhere the row, which the process that meters writes every flush
    // interval (this process's own directory would show usage as of its start).
    let (used, refusal) = match proxy.ctx.dir.get(&row.id).filter(|_| state.data_plane) {
        Some(e) => {
            let u = e.usage();
            (u.used, u.refusal)
        }
        None => (
            stored,
            Refusal::of(
                row.disabled_at.is_none(),
                stored,
                limit,
                row.device_id.is_some(),
                row.device_revoked_at.is_some(),
            ),
        ),
    };
    let host = bracket(&proxy.public_host);
    let at = |port: Option<u16>| port.map(|p| format!("{host}:{p}"));
    let dedicated_port = row.dedicated_port.and_then(|p| u16::try_from(p).ok());
    ConnectionView {
        state: state_name(refusal),
        enabled: row.disabled_at.is_none(),
        allow_cidrs: crate::proxy::directory::parse_cidrs(&row.allow_cidrs)
            .iter()
            .map(ToString::to_string)
            .collect(),
        remaining_bytes: limit.map(|l| l.saturating_sub(used)),
        bandwidth_limit_bytes: limit,
        limit_bytes: limit,
        used_bytes: used,
        http_proxy: at(proxy.http_addr.map(|a| a.port())),
        socks5_proxy: at(proxy.socks5_addr.map(|a| a.port())),
        dedicated_proxy: at(dedicated_port),
        dedicated_port,
        openvpn: proxy.openvpn.as_ref().map(|d| OpenVpnView {
            remote: format!("{}:{}", bracket(&d.public_host), d.settings.listen.port()),
            proto: d.settings.proto,
        }),
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(row.updated_at),
        id: row.id,
        name: row.name,
        device_id: row.device_id,
        username: row.username,
    }
}

/// IPv6 literals go in brackets in `host:port`.
pub(super) fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn with_password(state: &AppState, row: ConnectionRow, password: String) -> ConnectionWithPassword {
    let proxy = &state.proxy;
    let host = bracket(&proxy.public_host);
    // Imported usernames may hold any character (`john@shop.com`): userinfo is percent-encoded so that the URLs
    // work as given (RFC 3986 section 3.2.1).
    let creds = format!("{}:{}", userinfo(&row.username), userinfo(&password));
    ConnectionWithPassword {
        ovpn: proxy
            .openvpn
            .as_ref()
            .map(|d| d.profile(&row.username, Some(&password))),
        http_url: proxy
            .http_addr
            .map(|a| format!("http://{creds}@{host}:{}", a.port())),
        socks5_url: proxy
            .socks5_addr
            .map(|a| format!("socks5h://{creds}@{host}:{}", a.port())),
        connection: view(state, row),
        password,
    }
}

/// `s` as the user or password part of a URL's userinfo: everything but RFC 3986's unreserved characters encoded.
fn userinfo(s: &str) -> String {
    const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, ENCODED).to_string()
}

fn new_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN)
}

/// `pf` and ten base32 characters: 50 random bits, lowercase letters and digits only.
fn new_username() -> String {
    let bytes: [u8; 7] = rand::random();
    let tail: String = proxyfleet_proto::base32::encode(&bytes)
        .to_ascii_lowercase()
        .chars()
        .take(10)
        .collect();
    format!("pf{tail}")
}

/// Tells a field that is absent (`None`) from one set to null (`Some(None)`).
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn check_limit(limit: Option<u64>) -> Result<Option<i64>, ApiError> {
    match limit {
        None => Ok(None),
        Some(0) => Err(ApiError::Unprocessable(
            "bandwidth_limit_bytes must be at least 1 (use null for unlimited)".into(),
        )),
        Some(l) => i64::try_from(l)
            .map(Some)
            .map_err(|_| ApiError::Unprocessable("bandwidth_limit_bytes is too large".into())),
    }
}

/// Parse and normalise an allow-list: addresses become /32 or /128 networks, host bits are cleared.
fn check_cidrs(list: &[String]) -> Result<String, ApiError> {
    if list.len() > MAX_ALLOW {
        return Err(ApiError::Unprocessable(format!(
            "allow_cidrs may hold at most {MAX_ALLOW} entries"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for c in list {
        let c = c.trim();
        let net = c
            .parse::<IpNet>()
            .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| ApiError::Unprocessable(format!("{c:?} is not an IP address or CIDR")))?;
        let net = match net {
            IpNet::V6(n) => match n.addr().to_ipv4_mapped() {
                // Clients are compared by their canonical address, so a mapped IPv4 network is an IPv4 one.
                Some(v4) if n.prefix_len() >= 96 => IpNet::new(v4.into(), n.prefix_len() - 96)
                    .map_err(|_| ApiError::Unprocessable(format!("{c:?} is not a valid CIDR")))?,
                _ => IpNet::V6(n),
            },
            v4 => v4,
        };
        let s = net.trunc().to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out.join(","))
}

/// The device must be one of the operator's and not revoked.
async fn check_device(
    state: &AppState,
    operator_id: &str,
    device_id: Option<&str>,
) -> Result<(), ApiError> {
    let Some(id) = device_id else { return Ok(()) };
    let d = own_device(state, operator_id, id)
        .await
        .map_err(|_| ApiError::Unprocessable("device_id is not one of your devices".into()))?;
    if d.revoked_at.is_some() {
        return Err(ApiError::Unprocessable("that device is revoked".into()));
    }
    Ok(())
}

fn port_error(e: PortError) -> ApiError {
    match e {
        PortError::InUse(_) => ApiError::Conflict(e.to_string()),
        PortError::Disabled | PortError::OutOfRange(..) => ApiError::Unprocessable(e.to_string()),
    }
}

async fn own(state: &AppState, operator_id: &str, id: &str) -> Result<ConnectionRow, ApiError> {
    state
        .store
        .connection(operator_id, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// Your proxy connections with their live usage.
#[utoipa::path(get, path = "/connections", tag = "connections", security(("bearer" = [])),
    responses((status = 200, body = Vec<ConnectionView>), (status = 401, body = ErrorBody)))]
async fn list_connections(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<Vec<ConnectionView>>, ApiError> {
    let rows = state.store.connections(&s.operator_id).await?;
    Ok(Json(rows.into_iter().map(|r| view(&state, r)).collect()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConnectionRequest {
    name: String,
    device_id: String,
    /// Total bytes allowed (both directions); null or absent: unlimited.
    #[serde(default)]
    bandwidth_limit_bytes: Option<u64>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    allow_cidrs: Vec<String>,
    /// A port of this connection's own (within the server's `proxy_dedicated_ports`).
    #[serde(default)]
    dedicated_port: Option<u16>,
}

fn yes() -> bool {
    true
}

/// Create a connection. The response holds the generated password: the only time it is ever shown.
#[utoipa::path(post, path = "/connections", tag = "connections", security(("bearer" = [])),
    request_body = CreateConnectionRequest,
    responses((status = 201, body = ConnectionWithPassword), (status = 401, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "dedicated port taken"), (status = 422, body = ErrorBody)))]
async fn create_connection(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiJson(req): ApiJson<CreateConnectionRequest>,
) -> Result<(StatusCode, Json<ConnectionWithPassword>), ApiError> {
    let settings = ConnectionSettings {
        name: check_name(&req.name)?,
        device_id: Some(req.device_id),
        limit_bytes: check_limit(req.bandwidth_limit_bytes)?,
        disabled_at: (!req.enabled).then(|| state.auth.clock.now_ms()),
        allow_cidrs: check_cidrs(&req.allow_cidrs)?,
        dedicated_port: req.dedicated_port.map(i64::from),
    };
    check_device(&state, &s.operator_id, settings.device_id.as_deref()).await?;
    let placeholder_id = uuid::Uuid::now_v7().to_string();
    let listener = match req.dedicated_port {
        Some(p) => state
            .proxy
            .dedicated
            .reserve(&placeholder_id, p)
            .await
            .map_err(port_error)?,
        None => None,
    };
    let password = new_password();
    let hash = state
        .auth
        .hasher
        .hash(&password)
        .await
        .map_err(ApiError::internal)?;
    let mut attempt = 0;
    let row = loop {
        attempt += 1;
        let now = state.auth.clock.now_ms();
        match state
            .store
            .create_connection(&s.operator_id, &new_username(), &hash, &settings, now)
            .await
        {
            // A username collision (50 random bits) is next to impossible; a port collision is not retried away.
            Err(StoreError::Conflict(_)) if attempt < 3 && req.dedicated_port.is_none() => continue,
            other => break other?,
        }
    };
    let entry = state.proxy.ctx.dir.upsert(&row);
    if let Some(l) = listener {
        state.proxy.dedicated.start(&state.proxy.ctx, &entry.id, l);
    }
    tracing::info!(connection = %row.id, operator = %s.username, "connection created");
    Ok((
        StatusCode::CREATED,
        Json(with_password(&state, row, password)),
    ))
}

/// One of your connections.
#[utoipa::path(get, path = "/connections/{id}", tag = "connections", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = ConnectionView), (status = 404, body = ErrorBody)))]
async fn get_connection(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ConnectionView>, ApiError> {
    Ok(Json(view(&state, own(&state, &s.operator_id, &id).await?)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConnectionRequest {
    name: Option<String>,
    /// Moving a connection to another device closes its open flows; null detaches it from its device (its flows
    /// are refused until it gets one). Sending its current device again changes nothing, even if that device has
    /// been revoked since.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    device_id: Option<Option<String>>,
    /// null: unlimited. Lowering it to or below the usage cuts the connection off at once.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u64>)]
    bandwidth_limit_bytes: Option<Option<u64>>,
    /// Disabling closes every open flow.
    enabled: Option<bool>,
    allow_cidrs: Option<Vec<String>>,
    /// null: no dedicated port.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u16>)]
    dedicated_port: Option<Option<u16>>,
}

/// Change a connection. Absent fields stay as they are.
#[utoipa::path(patch, path = "/connections/{id}", tag = "connections", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = UpdateConnectionRequest,
    responses((status = 200, body = ConnectionView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn update_connection(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateConnectionRequest>,
) -> Result<Json<ConnectionView>, ApiError> {
    let current = own(&state, &s.operator_id, &id).await?;
    let now = state.auth.clock.now_ms();
    let settings = ConnectionSettings {
        name: match &req.name {
            Some(n) => check_name(n)?,
            None => current.name.clone(),
        },
        device_id: match req.device_id {
            Some(Some(d)) if current.device_id.as_deref() == Some(d.as_str()) => Some(d),
            Some(Some(d)) => {
                check_device(&state, &s.operator_id, Some(&d)).await?;
                Some(d)
            }
            Some(None) => None,
            None => current.device_id.clone(),
        },
        limit_bytes: match req.bandwidth_limit_bytes {
            Some(l) => check_limit(l)?,
            None => current.limit_bytes,
        },
        disabled_at: match req.enabled {
            Some(true) => None,
            Some(false) => current.disabled_at.or(Some(now)),
            None => current.disabled_at,
        },
        allow_cidrs: match &req.allow_cidrs {
            Some(list) => check_cidrs(list)?,
            None => current.allow_cidrs.clone(),
        },
        dedicated_port: match req.dedicated_port {
            Some(p) => p.map(i64::from),
            None => current.dedicated_port,
        },
    };
    let new_port = settings.dedicated_port.and_then(|p| u16::try_from(p).ok());
    let listener = match new_port {
        Some(p) => state
            .proxy
            .dedicated
            .reserve(&id, p)
            .await
            .map_err(port_error)?,
        None => None,
    };
    if !state
        .store
        .update_connection(&s.operator_id, &id, &settings, now)
        .await?
    {
        return Err(ApiError::NotFound);
    }
    let row = own(&state, &s.operator_id, &id).await?;
    state.proxy.ctx.dir.upsert(&row);
    match (new_port, listener) {
        (None, _) => state.proxy.dedicated.stop(&id),
        (Some(_), Some(l)) => state.proxy.dedicated.start(&state.proxy.ctx, &id, l),
        (Some(_), None) => {}
    }
    Ok(Json(view(&state, row)))
}

/// Delete a connection: its open flows close at once. Its usage history is kept.
#[utoipa::path(delete, path = "/connections/{id}", tag = "connections", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_connection(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if !state.store.delete_connection(&s.operator_id, &id).await? {
        return Err(ApiError::NotFound);
    }
    state.proxy.ctx.dir.remove(&id);
    state.proxy.dedicated.stop(&id);
    if let Some(vpn) = &state.proxy.openvpn {
        vpn.sessions.forget_address(&id);
    }
    tracing::info!(connection = %id, operator = %s.username, "connection deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The connection's OpenVPN profile without the password (the customer's client asks for it). 404 when the
/// OpenVPN door is off.
#[utoipa::path(get, path = "/connections/{id}/profile.ovpn", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, content_type = "application/x-openvpn-profile", body = String),
        (status = 404, body = ErrorBody)))]
async fn openvpn_profile(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let row = own(&state, &s.operator_id, &id).await?;
    let Some(vpn) = &state.proxy.openvpn else {
        return Err(ApiError::NotFoundMsg(
            "the OpenVPN door is off on this server",
        ));
    };
    let name = format!("attachment; filename=\"{}.ovpn\"", row.username);
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/x-openvpn-profile".to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, name),
        ],
        vpn.profile(&row.username, None),
    )
        .into_response())
}

/// A new password, shown once. The old one stops working for new flows at once; open flows continue (a VPN
/// session, which outlives flows, ends).
#[utoipa::path(post, path = "/connections/{id}/regenerate-password", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = ConnectionWithPassword), (status = 404, body = ErrorBody)))]
async fn regenerate_password(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ConnectionWithPassword>, ApiError> {
    own(&state, &s.operator_id, &id).await?;
    let password = new_password();
    let hash = state
        .auth
        .hasher
        .hash(&password)
        .await
        .map_err(ApiError::internal)?;
    let now = state.auth.clock.now_ms();
    if !state
        .store
        .set_connection_password(&s.operator_id, &id, &hash, now)
        .await?
    {
        return Err(ApiError::NotFound);
    }
    state.proxy.ctx.dir.set_password(&id, &hash);
    tracing::info!(connection = %id, operator = %s.username, "connection password regenerated");
    let row = own(&state, &s.operator_id, &id).await?;
    Ok(Json(with_password(&state, row, password)))
}

/// Usage back to zero: an exhausted connection works again. Nothing resets usage automatically.
#[utoipa::path(post, path = "/connections/{id}/reset-usage", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = ConnectionView), (status = 404, body = ErrorBody)))]
async fn reset_usage(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ConnectionView>, ApiError> {
    if !state.proxy.ctx.dir.reset_usage(&s.operator_id, &id).await? {
        return Err(ApiError::NotFound);
    }
    tracing::info!(connection = %id, operator = %s.username, "connection usage reset");
    Ok(Json(view(&state, own(&state, &s.operator_id, &id).await?)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start, Unix milliseconds UTC (default: 7 days before `until`).
    since: Option<i64>,
    /// End (exclusive), Unix milliseconds UTC (default: now).
    until: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct HourView {
    /// Start of the UTC hour, RFC 3339.
    hour: String,
    /// Start of the UTC hour, Unix milliseconds.
    hour_ms: i64,
    bytes_up: i64,
    bytes_down: i64,
    bytes_total: i64,
}

/// Hourly usage. The last few seconds may be missing until the next usage flush.
#[derive(Serialize, ToSchema)]
pub struct UsageHistory {
    since: i64,
    until: i64,
    hours: Vec<HourView>,
}

const MAX_RANGE_MS: i64 = 400 * 24 * 3_600_000;

fn range(state: &AppState, q: &UsageQuery) -> Result<(i64, i64), ApiError> {
    let until = q.until.unwrap_or_else(|| state.auth.clock.now_ms() + 1);
    let since = q.since.unwrap_or(until - 7 * 24 * 3_600_000);
    if since >= until || until - since > MAX_RANGE_MS {
        return Err(ApiError::Unprocessable(
            "since must be before until, at most 400 days apart".into(),
        ));
    }
    Ok((since, until))
}

fn history(since: i64, until: i64, rows: Vec<HourUsage>) -> UsageHistory {
    UsageHistory {
        since,
        until,
        hours: rows
            .into_iter()
            .map(|h| HourView {
                hour: rfc3339(h.hour),
                hour_ms: h.hour,
                bytes_up: h.bytes_up,
                bytes_down: h.bytes_down,
                bytes_total: h.bytes_up.saturating_add(h.bytes_down),
            })
            .collect(),
    }
}

/// Hourly usage of a connection (through any device); also of a deleted one, whose history is kept.
#[utoipa::path(get, path = "/connections/{id}/usage", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path), UsageQuery),
    responses((status = 200, body = UsageHistory), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn connection_usage(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<UsageHistory>, ApiError> {
    usage(&state, &s.operator_id, &id, &q, false).await
}

/// Hourly usage through a device (all its connections); also through a deleted one, whose history is kept.
#[utoipa::path(get, path = "/devices/{id}/usage", tag = "devices", security(("bearer" = [])),
    params(("id" = String, Path), UsageQuery),
    responses((status = 200, body = UsageHistory), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn device_usage(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<UsageHistory>, ApiError> {
    usage(&state, &s.operator_id, &id, &q, true).await
}

/// The hourly history of a connection or (with `device`) a device the caller owns or owned: one that is gone is
/// known by its history (which is the caller's own: every row carries its operator). Anything else is `404`.
async fn usage(
    state: &AppState,
    operator_id: &str,
    id: &str,
    q: &UsageQuery,
    device: bool,
) -> Result<Json<UsageHistory>, ApiError> {
    let exists = if device {
        state.store.device(operator_id, id).await?.is_some()
    } else {
        state.store.connection(operator_id, id).await?.is_some()
    };
    if !exists && !state.store.has_usage(operator_id, id, device).await? {
        return Err(ApiError::NotFound);
    }
    let (since, until) = range(state, q)?;
    let rows = if device {
        state
            .store
            .device_usage(operator_id, id, since, until)
            .await?
    } else {
        state
            .store
            .connection_usage(operator_id, id, since, until)
            .await?
    };
    Ok(Json(history(since, until, rows)))
}
