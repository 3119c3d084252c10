//! Connections: a card per connection with its live usage bar, the create/edit form, and the actions
//! "Regenerate Password", "Reset Usage" (confirmed) and "Delete", with the usage chart.

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde_json::{json, Value};

use super::chart::usage_chart;
use super::client::Download;
use super::conn_form::{self, api_notes, FormValues};
use super::format::usage;
use super::layout::{confirm_button, load, outcome, page, respond, Notes, Section};
use super::once::OneTime;
use super::session::{Id, Op, Posted};
use super::DashState;

/// The live part of a connection, as the page shows it and the event stream updates it: state, percentage of
/// the limit (none when unlimited) and the texts.
pub fn live(c: &Value) -> (String, Option<u8>, Value) {
    let state = c["state"].as_str().unwrap_or("active").to_owned();
    let (line, pct) = usage(
        c["used_bytes"].as_u64().unwrap_or(0),
        c["bandwidth_limit_bytes"].as_u64(),
    );
    let label = match state.as_str() {
        "exhausted" => "Exhausted — limit reached",
        "disabled" => "Disabled",
        "no_device" => "No device",
        "device_revoked" => "Device revoked",
        _ => "Active",
    };
    let cells = json!({"usage": line, "pct": pct.map_or_else(String::new, |p| format!("{p}%")), "state": label});
    (state, pct, cells)
}

fn text<'a>(cells: &'a Value, f: &str) -> &'a str {
    cells[f].as_str().unwrap_or("")
}

/// Usage bar, usage line and state badge of a connection, marked for live updates.
fn meter(c: &Value) -> Markup {
    let (state, pct, cells) = live(c);
    let id = c["id"].as_str().unwrap_or("");
    html! {
        div.meter data-live=(format!("conn:{id}")) data-state=(state) {
            span.badge.state data-f="state" aria-live="polite" { (text(&cells, "state")) }
            div.bar role="progressbar" aria-label="Usage of the limit" aria-valuemin="0" aria-valuemax="100"
                aria-valuenow=[pct] hidden[pct.is_none()] {
                span style=(format!("width:{}%", pct.unwrap_or(0))) {}
            }
            p.usage { span data-f="usage" { (text(&cells, "usage")) } " " span.pct data-f="pct" { (text(&cells, "pct")) } }
        }
    }
}

fn device_name<'a>(devices: &'a [Value], id: Option<&str>) -> &'a str {
    id.and_then(|id| devices.iter().find(|d| d["id"].as_str() == Some(id)))
        .and_then(|d| d["name"].as_str())
        .unwrap_or("no device")
}

fn card(c: &Value, devices: &[Value]) -> Markup {
    let id = c["id"].as_str().unwrap_or("");
    html! {
        article.card.conn {
            h2 { a href=(format!("/connections/{id}")) { (c["name"].as_str().unwrap_or("")) } }
            p.meta { "Device: " (device_name(devices, c["device_id"].as_str())) " · user " code { (c["username"].as_str().unwrap_or("")) } }
            (meter(c))
        }
    }
}

async fn devices(st: &DashState, op: &Op) -> Vec<Value> {
    match op.get(st, "/devices").await {
        r if r.ok() => r.body.as_array().cloned().unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// `GET /connections`: every connection as a card.
pub async fn list(State(st): State<DashState>, op: Op) -> Response {
    let list = match load(&st, &op, "/connections", Section::Connections, "page").await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let devices = devices(&st, &op).await;
    let empty = Vec::new();
    let conns = list.as_array().unwrap_or(&empty);
    let body = html! {
        p { a.button href="/connections/new" { "New connection" } }
        @if conns.is_empty() { p { "No connections yet." } }
        div.cards { @for c in conns { (card(c, &devices)) } }
    };
    respond(
        StatusCode::OK,
        page(&op, Section::Connections, "Connections", body),
    )
}

async fn render_new(
    st: &DashState,
    op: &Op,
    v: &FormValues,
    notes: &Notes,
    status: StatusCode,
) -> Response {
    let devices = devices(st, op).await;
    let body = html! { section.card { (conn_form::render(op, "/connections", "Create connection", v, &devices, notes)) } };
    respond(
        status,
        page(op, Section::Connections, "New connection", body),
    )
}

/// `GET /connections/new`.
pub async fn new_form(State(st): State<DashState>, op: Op) -> Response {
    render_new(
        &st,
        &op,
        &FormValues::blank(),
        &Notes::default(),
        StatusCode::OK,
    )
    .await
}

/// The page after create or regenerate: the credentials once, then the connection.
fn one_time(op: &Op, answer: &Value, what: &str, status: StatusCode) -> Response {
    let once = OneTime::from_answer(answer);
    let body = html! { (once.render(what)) };
    respond(
        status,
        page(op, Section::Connections, "Connection credentials", body),
    )
}

/// `POST /connections`.
pub async fn create(State(st): State<DashState>, Posted { op, form }: Posted) -> Response {
    let v = FormValues::submitted(&form);
    let body = match v.to_json() {
        Ok(b) => b,
        Err(notes) => {
            return render_new(&st, &op, &v, &notes, StatusCode::UNPROCESSABLE_ENTITY).await
        }
    };
    let r = op.send(&st, Method::POST, "/connections", Some(body)).await;
    if r.ok() {
        one_time(&op, &r.body, "created", StatusCode::CREATED)
    } else {
        render_new(&st, &op, &v, &api_notes(&r), r.status).await
    }
}

async fn render_detail(
    st: &DashState,
    op: &Op,
    id: &str,
    form: Option<&FormValues>,
    notes: &Notes,
    status: StatusCode,
) -> Response {
    let c = match load(
        st,
        op,
        &format!("/connections/{id}"),
        Section::Connections,
        "connection",
    )
    .await
    {
        Ok(b) => b,
        Err(page) => return page,
    };
    let c = &c;
    let devices = devices(st, op).await;
    let usage = op.get(st, &format!("/connections/{id}/usage")).await;
    let current = FormValues::of(c);
    let name = c["name"].as_str().unwrap_or("");
    let addr = |k: &str| c[k].as_str().map(str::to_owned);
    let body = html! {
        section.card {
            p.meta { "Device: " (device_name(&devices, c["device_id"].as_str())) " · user " code { (c["username"].as_str().unwrap_or("")) } }
            (meter(c))
            dl.facts {
                dt { "HTTP proxy" } dd { (addr("http_proxy").unwrap_or_else(|| "off".into())) }
                dt { "SOCKS5 proxy" } dd { (addr("socks5_proxy").unwrap_or_else(|| "off".into())) }
                @if let Some(own) = addr("dedicated_proxy") {
                    dt { "Own port" } dd id="conn-dedicated" { (own) span.hint { " HTTP and SOCKS5" } }
                }
                @let allow: Vec<&str> = c["allow_cidrs"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
                @if !allow.is_empty() {
                    dt { "No login from" } dd id="conn-allow" { (allow.join(", ")) span.hint { " on the own port (set through the API)" } }
                }
                dt { "OpenVPN" } dd {
                    @match c["openvpn"]["remote"].as_str() {
                        Some(remote) => {
                            (remote) " " (c["openvpn"]["proto"].as_str().unwrap_or("").to_uppercase()) " · "
                            a id="conn-ovpn" href=(format!("/connections/{id}/profile.ovpn")) download {
                                "Download profile (.ovpn)" }
                            span.hint { " without the password: the customer's client asks for it" }
                        }
                        None => "off",
                    }
                }
            }
            (notes.at("openvpn"))
            div.actions {
                (confirm_button(op, &format!("/connections/{id}/regenerate"), "Regenerate Password",
                    "Make a new password? The current one stops working for new connections at once.", false))
                (confirm_button(op, &format!("/connections/{id}/reset"), "Reset Usage",
                    "Reset this connection's usage to zero? An exhausted connection works again.", false))
                (confirm_button(op, &format!("/connections/{id}/delete"), "Delete",
                    "Delete this connection? Its open connections close and its credentials stop working.", true))
            }
            (notes.at("actions"))
        }
        section.card {
            h2 { "Settings" }
            (conn_form::render(op, &format!("/connections/{id}"), "Save", form.unwrap_or(&current), &devices, notes))
        }
        section.card {
            h2 { "Usage history" }
            @if usage.ok() { (usage_chart(&usage.body)) } @else { p.note.err { (usage.error()) } }
        }
    };
    respond(
        status,
        page(
            op,
            Section::Connections,
            &format!("Connection “{name}”"),
            body,
        ),
    )
}

/// `GET /connections/{id}`.
pub async fn detail(State(st): State<DashState>, Id(id): Id, op: Op) -> Response {
    render_detail(&st, &op, &id, None, &Notes::default(), StatusCode::OK).await
}

/// `GET /connections/{id}/profile.ovpn`: the OpenVPN profile without the password, as a download.
pub async fn profile(State(st): State<DashState>, Id(id): Id, op: Op) -> Response {
    match op
        .download(&st, &format!("/connections/{id}/profile.ovpn"))
        .await
    {
        Download::File(f) => f,
        Download::Refused(r) => {
            let notes = Notes::error("openvpn", r.error());
            render_detail(&st, &op, &id, None, &notes, r.status).await
        }
    }
}

/// `POST /connections/{id}`: save the form.
pub async fn update(
    State(st): State<DashState>,
    Id(id): Id,
    Posted { op, form }: Posted,
) -> Response {
    let v = FormValues::submitted(&form);
    let body = match v.to_json() {
        Ok(b) => b,
        Err(notes) => {
            return render_detail(
                &st,
                &op,
                &id,
                Some(&v),
                &notes,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    };
    let r = op
        .send(
            &st,
            Method::PATCH,
            &format!("/connections/{id}"),
            Some(body),
        )
        .await;
    if r.ok() {
        render_detail(
            &st,
            &op,
            &id,
            None,
            &Notes::ok("f-form", "Saved."),
            StatusCode::OK,
        )
        .await
    } else {
        render_detail(&st, &op, &id, Some(&v), &api_notes(&r), r.status).await
    }
}

/// `POST /connections/{id}/regenerate`.
pub async fn regenerate(
    State(st): State<DashState>,
    Id(id): Id,
    Posted { op, .. }: Posted,
) -> Response {
    let r = op
        .send(
            &st,
            Method::POST,
            &format!("/connections/{id}/regenerate-password"),
            None,
        )
        .await;
    if r.ok() {
        one_time(&op, &r.body, "has a new password", StatusCode::OK)
    } else {
        render_detail(
            &st,
            &op,
            &id,
            None,
            &Notes::error("actions", r.error()),
            r.status,
        )
        .await
    }
}

/// `POST /connections/{id}/reset`.
pub async fn reset(State(st): State<DashState>, Id(id): Id, Posted { op, .. }: Posted) -> Response {
    let r = op
        .send(
            &st,
            Method::POST,
            &format!("/connections/{id}/reset-usage"),
            None,
        )
        .await;
    let notes = outcome(&r, "actions", "Usage reset to zero.");
    render_detail(&st, &op, &id, None, &notes, r.status).await
}

/// `POST /connections/{id}/delete`.
pub async fn delete(
    State(st): State<DashState>,
    Id(id): Id,
    Posted { op, .. }: Posted,
) -> Response {
    let r = op
        .send(&st, Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    if r.ok() {
        return Redirect::to("/connections").into_response();
    }
    render_detail(
        &st,
        &op,
        &id,
        None,
        &Notes::error("actions", r.error()),
        r.status,
    )
    .await
}
