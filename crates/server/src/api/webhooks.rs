//! `/settings/webhook` and `/webhook-deliveries`: the caller's webhook endpoint, its signing secret (shown once),
//! "Send Test", and the delivery log with manual resend.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, AuthSession, ErrorBody};
use crate::clock::rfc3339;
use crate::webhooks::new_secret;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_webhook, put_webhook))
        .routes(routes!(rotate_secret))
        .routes(routes!(send_test))
        .routes(routes!(list_deliveries))
        .routes(routes!(resend))
}

/// "Send Test" at most this often per operator.
const TEST_INTERVAL: Duration = Duration::from_secs(3);

#[derive(Serialize, ToSchema)]
pub struct WebhookView {
    /// null when no endpoint is set.
    url: Option<String>,
    /// False after the receiver answered `410 Gone` (saving the URL again enables it).
    enabled: bool,
    disabled_reason: Option<String>,
    /// The signing secret, `whsec_…`: only in the answer that created or rotated it.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    updated_at: Option<String>,
}

async fn view(
    state: &AppState,
    operator_id: &str,
    secret: Option<String>,
) -> Result<WebhookView, ApiError> {
    let e = state.store.webhook_endpoint(operator_id).await?;
    Ok(WebhookView {
        enabled: e.as_ref().is_some_and(|e| e.disabled_at.is_none()),
        disabled_reason: e.as_ref().and_then(|e| e.disabled_reason.clone()),
        updated_at: e.as_ref().map(|e| rfc3339(e.updated_at)),
        url: e.map(|e| e.url),
        secret,
    })
}

/// Your webhook endpoint.
#[utoipa::path(get, path = "/settings/webhook", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, body = WebhookView), (status = 401, body = ErrorBody)))]
async fn get_webhook(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(view(&state, &s.operator_id, None).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutWebhookRequest {
    /// Where events are POSTed (http or https; private addresses are refused).
    url: String,
}

/// Set the endpoint URL. The first time, a signing secret is made and returned (once).
#[utoipa::path(put, path = "/settings/webhook", tag = "webhooks", security(("bearer" = [])), request_body = PutWebhookRequest,
    responses((status = 200, body = WebhookView), (status = 422, body = ErrorBody)))]
async fn put_webhook(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiJson(req): ApiJson<PutWebhookRequest>,
) -> Result<Json<WebhookView>, ApiError> {
    let url = req.url.trim();
    if url.len() > 2000 {
        return Err(ApiError::Unprocessable(
            "url must be at most 2000 characters".into(),
        ));
    }
    if let Some(why) = state.webhooks.sender.refuse_url(url) {
        return Err(ApiError::Unprocessable(why));
    }
    let now = state.auth.clock.now_ms();
    let new = state
        .store
        .webhook_endpoint(&s.operator_id)
        .await?
        .is_none();
    let secret = new.then(new_secret);
    let sealed = secret.as_deref().map(|x| state.webhooks.key.seal(x));
    state
        .store
        .put_webhook_endpoint(&s.operator_id, Some(url), sealed.as_deref(), now)
        .await?;
    Ok(Json(view(&state, &s.operator_id, secret).await?))
}

/// A new signing secret, returned once; the old one stops signing at once.
#[utoipa::path(post, path = "/settings/webhook/rotate-secret", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)))]
async fn rotate_secret(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<WebhookView>, ApiError> {
    if state
        .store
        .webhook_endpoint(&s.operator_id)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound);
    }
    let secret = new_secret();
    let sealed = state.webhooks.key.seal(&secret);
    let now = state.auth.clock.now_ms();
    state
        .store
        .put_webhook_endpoint(&s.operator_id, None, Some(&sealed), now)
        .await?;
    Ok(Json(view(&state, &s.operator_id, Some(secret)).await?))
}

#[derive(Serialize, ToSchema)]
pub struct TestResult {
    /// True for a 2xx answer.
    ok: bool,
    /// The receiver's HTTP status; null when no answer came.
    status_code: Option<u16>,
    latency_ms: i64,
    error: Option<String>,
}

/// Send a `device.test` event now: one attempt, no retries, no device state touched.
#[utoipa::path(post, path = "/settings/webhook/test", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, body = TestResult), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn send_test(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
) -> Result<Json<TestResult>, ApiError> {
    let endpoint = state
        .store
        .webhook_endpoint(&s.operator_id)
        .await?
        .ok_or_else(|| ApiError::Unprocessable("set a webhook URL first".into()))?;
    {
        let mut last = state
            .webhooks
            .last_test
            .lock()
            .map_err(|_| ApiError::Unavailable)?;
        if let Some(t) = last.get(&s.operator_id) {
            if t.elapsed() < TEST_INTERVAL {
                return Err(ApiError::TooManyRequests(TEST_INTERVAL - t.elapsed()));
            }
        }
        last.insert(s.operator_id.clone(), std::time::Instant::now());
    }
    let secret = state
        .webhooks
        .key
        .open(&endpoint.secret_enc)
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("webhook secret cannot be decrypted")))?;
    let now = state.auth.clock.now_ms();
    let data = json!({"message": "Test event from proxyfleet", "operator": s.username});
    let crate::store::NewEvent {
        id, payload: body, ..
    } = crate::webhooks::event(&s.operator_id, "device.test", now, data);
    let a = state
        .webhooks
        .sender
        .send(&endpoint.url, &secret, &id, now / 1000, &body)
        .await;
    Ok(Json(TestResult {
        ok: a.ok(),
        status_code: a.status,
        latency_ms: a.latency_ms,
        error: a.error,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// How many, newest first (default 50, at most 500).
    limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryView {
    /// The event's id, the same `webhook-id` on every attempt.
    event_id: String,
    event_type: String,
    /// The event's state: pending (will be retried), delivered, failed.
    event_status: String,
    attempted_at: String,
    status_code: Option<i64>,
    latency_ms: i64,
    error: Option<String>,
    /// The first bytes of the receiver's answer.
    response: Option<String>,
}

/// Recent delivery attempts, newest first.
#[utoipa::path(get, path = "/webhook-deliveries", tag = "webhooks", security(("bearer" = [])), params(DeliveriesQuery),
    responses((status = 200, body = Vec<DeliveryView>)))]
async fn list_deliveries(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiQuery(q): ApiQuery<DeliveriesQuery>,
) -> Result<Json<Vec<DeliveryView>>, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let rows = state.store.webhook_attempts(&s.operator_id, limit).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| DeliveryView {
                event_id: r.event_id,
                event_type: r.event_type,
                event_status: r.event_status,
                attempted_at: rfc3339(r.attempted_at),
                status_code: r.status_code,
                latency_ms: r.latency_ms,
                error: r.error,
                response: r.response_head,
            })
            .collect(),
    ))
}

/// Deliver an event again now, with the same `webhook-id`.
#[utoipa::path(post, path = "/webhook-deliveries/{event_id}/resend", tag = "webhooks", security(("bearer" = [])),
    params(("event_id" = String, Path)),
    responses((status = 202), (status = 404, body = ErrorBody)))]
async fn resend(
    State(state): State<AppState>,
    AuthSession(s): AuthSession,
    ApiPath(event_id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if !state
        .store
        .resend_event(&s.operator_id, &event_id, state.auth.clock.now_ms())
        .await?
    {
        return Err(ApiError::NotFound);
    }
    state.webhooks.wake.notify_one();
    Ok(StatusCode::ACCEPTED)
}
