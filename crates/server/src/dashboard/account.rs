//! The account page: change password, and the operator's sessions with "Revoke".

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde_json::json;

use super::format::short_time;
use super::layout::{confirm_button, csrf, load, page, respond, Notes, Section};
use super::session::{clear_cookie, set_cookie, Id, Op, Posted, SESSION_COOKIE};
use super::DashState;

async fn render(st: &DashState, op: &Op, notes: &Notes, status: StatusCode) -> Response {
    let body = match load(st, op, "/auth/sessions", Section::Account, "page").await {
        Ok(b) => b,
        Err(page) => return page,
    };
    let empty = Vec::new();
    let sessions = body["sessions"].as_array().unwrap_or(&empty);
    let field = |name: &str, label: &str, auto: &str| {
        let key = format!("pw-{name}");
        let (desc, invalid) = notes.described(&key);
        html! {
            label for=(key) { (label) }
            input id=(key) name=(name) type="password" autocomplete=(auto) required
                aria-invalid=[invalid] aria-describedby=[desc];
            (notes.at(&key))
        }
    };
    let body = html! {
        section.card {
            h2 { "Change password" }
            p.hint { "At least 8 characters with an uppercase letter, a lowercase letter, a digit and a special "
                "character; not a common password. Your other sessions end." }
            form method="post" action="/account/password" {
                (csrf(op))
                (field("current_password", "Current password", "current-password"))
                (field("new_password", "New password", "new-password"))
                (field("repeat_password", "New password again", "new-password"))
                button type="submit" { "Change password" }
                (notes.at("pw"))
            }
        }
        section.card {
            h2 { "Your sessions" }
            (notes.at("sessions"))
            div.scroll { table {
                thead { tr { th { "Address" } th { "Browser or client" } th { "Logged in (UTC)" } th { "Last activity (UTC)" } th {} } }
                tbody {
                    @for s in sessions {
                        @let id = s["id"].as_str().unwrap_or("");
                        tr data-session=(id) {
                            td { (s["ip"].as_str().unwrap_or("")) }
                            td.ua { (s["user_agent"].as_str().unwrap_or("")) }
                            td.nowrap { (short_time(s["created_at"].as_str().unwrap_or(""))) }
                            td.nowrap { (short_time(s["last_activity_at"].as_str().unwrap_or(""))) }
                            td {
                                @if s["current"].as_bool() == Some(true) { span.badge { "this session" } " " }
                                (confirm_button(op, &format!("/account/sessions/{id}/revoke"), "Revoke",
                                    "Revoke this session? Whoever uses it is logged out at once.", true))
                            }
                        }
                    }
                }
            } }
        }
    };
    respond(status, page(op, Section::Account, "Account", body))
}

/// `GET /account`.
pub async fn show(State(st): State<DashState>, op: Op) -> Response {
    render(&st, &op, &Notes::default(), StatusCode::OK).await
}

/// `POST /account/password`: on success the fresh token replaces the cookie (every other session has ended).
pub async fn change_password(
    State(st): State<DashState>,
    Posted { mut op, form }: Posted,
) -> Response {
    let (current, new) = (form.get("current_password"), form.get("new_password"));
    if new != form.get("repeat_password") {
        let notes = Notes::error("pw-repeat_password", "The two new passwords differ.");
        return render(&st, &op, &notes, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let r = op
        .send(
            &st,
            Method::POST,
            "/auth/change-password",
            Some(json!({"current_password": current, "new_password": new})),
        )
        .await;
    let token = match r.body["token"].as_str() {
        Some(t) if r.ok() => t.to_owned(),
        _ => {
            let key = match r.status {
                StatusCode::FORBIDDEN => "pw-current_password",
                StatusCode::UNPROCESSABLE_ENTITY => "pw-new_password",
                _ => "pw",
            };
            return render(&st, &op, &Notes::error(key, r.error()), r.status).await;
        }
    };
    op.csrf = super::session::csrf_token(&token);
    op.token = token;
    let notes = Notes::ok("pw", "Password changed. Your other sessions have ended.");
    let mut resp = render(&st, &op, &notes, StatusCode::OK).await;
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&st, SESSION_COOKIE, &op.token),
    );
    resp
}

/// `POST /account/sessions/{id}/revoke`. Revoking the current session logs out.
pub async fn revoke(
    State(st): State<DashState>,
    Id(id): Id,
    Posted { op, .. }: Posted,
) -> Response {
    let r = op
        .send(&st, Method::DELETE, &format!("/auth/sessions/{id}"), None)
        .await;
    if !r.ok() {
        return render(&st, &op, &Notes::error("sessions", r.error()), r.status).await;
    }
    if id == op.session.id {
        let mut resp = Redirect::to("/login").into_response();
        resp.headers_mut()
            .append(header::SET_COOKIE, clear_cookie(&st, SESSION_COOKIE));
        return resp;
    }
    Redirect::to("/account").into_response()
}
