//! Webhook settings: the endpoint URL, "Send Test" with the receiver's status and latency, the signing secret
//! (shown once, rotate), and recent deliveries with "Resend".

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use maud::html;
use serde_json::{json, Value};

use super::format::short_time;
use super::layout::{
    confirm_button, csrf, load, outcome, page, post_button, respond, secret_row, Notes, Section,
};
use super::session::{Id, Op, Posted};
use super::DashState;

async fn render(
    st: &DashState,
    op: &Op,
    secret: Option<&str>,
    notes: &Notes,
    status: StatusCode,
) -> Response {
    let w = match load(st, op, "/settings/webhook", Section::Webhook, "page").await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let d = op.get(st, "/webhook-deliveries?limit=20").await;
    let url = w["url"].as_str();
    let empty = Vec::new();
    let deliveries = d.body.as_array().unwrap_or(&empty);
    let (desc, invalid) = notes.described("wh-url");
    let body = html! {
        @if let Some(s) = secret {
            section.card.once {
                h2 { "Signing secret" }
                p.warn { "Shown only now. Your receiver verifies each delivery's signature with it (Standard Webhooks)." }
                (secret_row("wh-secret", "Signing secret", s))
            }
        }
        section.card {
            h2 { "Endpoint" }
            @if w["enabled"].as_bool() == Some(false) && url.is_some() {
                p.note.err { "Deliveries are paused: " (w["disabled_reason"].as_str().unwrap_or("disabled"))
                    ". Save the URL again to resume." }
            }
            form.row method="post" action="/webhook" novalidate {
                (csrf(op))
                div.grow { label for="wh-url" { "URL events are POSTed to" }
                    input id="wh-url" name="url" type="url" required value=(url.unwrap_or("")) placeholder="https://example.com/hooks/proxyfleet"
                        aria-invalid=[invalid] aria-describedby=[desc];
                    (notes.at("wh-url")) }
                div { button type="submit" { "Save" } }
            }
            @if url.is_some() {
                div.actions {
                    (post_button(op, "/webhook/test", "Send Test"))
                    (confirm_button(op, "/webhook/rotate", "Rotate secret",
                        "Make a new signing secret? The current one stops signing at once.", true))
                }
                (notes.at("wh-test"))
            }
        }
        section.card {
            h2 { "Recent deliveries" }
            (notes.at("wh-deliveries"))
            @if deliveries.is_empty() { p { "No deliveries yet." } }
            @else {
                div.scroll { table {
                    thead { tr { th { "Time (UTC)" } th { "Event" } th { "Attempt" } th { "HTTP" } th { "Latency" } th {} } }
                    tbody { @for a in deliveries { (delivery(op, a)) } }
                } }
            }
        }
    };
    respond(status, page(op, Section::Webhook, "Webhook", body))
}

fn delivery(op: &Op, a: &Value) -> maud::Markup {
    let id = a["event_id"].as_str().unwrap_or("");
    html! {
        tr {
            td.nowrap { (short_time(a["attempted_at"].as_str().unwrap_or(""))) }
            td { code { (a["event_type"].as_str().unwrap_or("")) } }
            // This attempt's own result (any 2xx is success), then the event's state after all its attempts.
            td {
                @if a["status_code"].as_i64().is_some_and(|c| (200..300).contains(&c)) {
                    span.badge { "accepted" }
                } @else {
                    span.badge { "failed" }
                }
                @if let Some(e) = a["error"].as_str() { br; span.err { (e) } }
                br; span.hint.event-state { "event " (a["event_status"].as_str().unwrap_or("")) }
            }
            td { (a["status_code"].as_i64().map_or_else(|| "—".to_owned(), |c| c.to_string())) }
            td { (a["latency_ms"].as_i64().unwrap_or(0)) " ms" }
            td { (post_button(op, &format!("/webhook/deliveries/{id}/resend"), "Resend")) }
        }
    }
}

/// `GET /webhook`.
pub async fn show(State(st): State<DashState>, op: Op) -> Response {
    render(&st, &op, None, &Notes::default(), StatusCode::OK).await
}

/// `POST /webhook`: save the URL; the first time, the signing secret is shown once.
pub async fn save(State(st): State<DashState>, Posted { op, form }: Posted) -> Response {
    let r = op
        .send(
            &st,
            Method::PUT,
            "/settings/webhook",
            Some(json!({"url": form.get("url")})),
        )
        .await;
    if !r.ok() {
        return render(&st, &op, None, &Notes::error("wh-url", r.error()), r.status).await;
    }
    render(
        &st,
        &op,
        r.body["secret"].as_str(),
        &Notes::ok("wh-url", "Saved."),
        StatusCode::OK,
    )
    .await
}

/// `POST /webhook/test`: one `device.test` delivery now; the answer shows the receiver's status and latency.
pub async fn test(State(st): State<DashState>, Posted { op, .. }: Posted) -> Response {
    let r = op
        .send(&st, Method::POST, "/settings/webhook/test", None)
        .await;
    let b = &r.body;
    let latency = b["latency_ms"].as_i64().unwrap_or(0);
    let notes = match (r.ok(), b["ok"].as_bool(), b["status_code"].as_u64()) {
        (false, ..) => Notes::error("wh-test", r.error()),
        (true, Some(true), Some(code)) => Notes::ok(
            "wh-test",
            format!("Receiver answered HTTP {code} in {latency} ms."),
        ),
        (true, _, Some(code)) => Notes::error(
            "wh-test",
            format!("Receiver answered HTTP {code} in {latency} ms: not a success."),
        ),
        (true, ..) => Notes::error(
            "wh-test",
            format!(
                "No answer from the receiver after {latency} ms: {}",
                b["error"].as_str().unwrap_or("unknown error")
            ),
        ),
    };
    render(&st, &op, None, &notes, StatusCode::OK).await
}

/// `POST /webhook/rotate`: a new signing secret, shown once.
pub async fn rotate(State(st): State<DashState>, Posted { op, .. }: Posted) -> Response {
    let r = op
        .send(&st, Method::POST, "/settings/webhook/rotate-secret", None)
        .await;
    if !r.ok() {
        return render(
            &st,
            &op,
            None,
            &Notes::error("wh-test", r.error()),
            r.status,
        )
        .await;
    }
    render(
        &st,
        &op,
        r.body["secret"].as_str(),
        &Notes::default(),
        StatusCode::OK,
    )
    .await
}

/// `POST /webhook/deliveries/{id}/resend`.
pub async fn resend(
    State(st): State<DashState>,
    Id(id): Id,
    Posted { op, .. }: Posted,
) -> Response {
    let r = op
        .send(
            &st,
            Method::POST,
            &format!("/webhook-deliveries/{id}/resend"),
            None,
        )
        .await;
    let notes = outcome(
        &r,
        "wh-deliveries",
        "Queued for delivery again; it appears below once sent.",
    );
    render(&st, &op, None, &notes, StatusCode::OK).await
}
