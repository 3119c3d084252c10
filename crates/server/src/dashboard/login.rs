//! Logging in and out. The login is the API's (`POST /auth/login`): the same lockouts, the same answer for an
//! unknown username as for a wrong password.

use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde_json::json;

use super::client::call;
use super::layout::{respond, shell, Notes};
use super::session::{
    clear_cookie, cookie, set_cookie, LoginPost, Posted, CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE,
};
use super::DashState;

fn form(st: &DashState, username: &str, notes: &Notes, status: StatusCode) -> Response {
    // A fresh random value per form: the login form's CSRF check (double submit; the cookie is SameSite=Strict).
    let nonce: [u8; 24] = rand::random();
    let nonce = crate::pki::hex(&nonce);
    let (desc, invalid) = notes.described("login");
    let body = shell(
        "Log in",
        None,
        html! {
            main.narrow {
                h1 { "proxyfleet" }
                form method="post" action="/login" {
                    input type="hidden" name=(CSRF_FIELD) value=(nonce);
                    label for="username" { "Username" }
                    input id="username" name="username" autocomplete="username" required value=(username)
                        autofocus aria-invalid=[invalid] aria-describedby=[desc.clone()];
                    label for="password" { "Password" }
                    input id="password" name="password" type="password" autocomplete="current-password" required
                        aria-invalid=[invalid] aria-describedby=[desc];
                    (notes.at("login"))
                    button type="submit" { "Log in" }
                }
            }
        },
    );
    let mut resp = respond(status, body);
    resp.headers_mut()
        .append(header::SET_COOKIE, set_cookie(st, LOGIN_COOKIE, &nonce));
    resp
}

/// `GET /login`; an operator who is logged in already goes on to the connections.
pub async fn page(State(st): State<DashState>, headers: HeaderMap) -> Response {
    if let Some(token) = cookie(&headers, SESSION_COOKIE).filter(|t| t.len() <= 4096) {
        if let Ok(Some(_)) = st.app.auth.sessions.validate(token).await {
            return Redirect::to("/connections").into_response();
        }
    }
    form(&st, "", &Notes::default(), StatusCode::OK)
}

/// `POST /login`: on success the session's token goes into the cookie and the operator to their connections.
pub async fn submit(State(st): State<DashState>, post: LoginPost) -> Response {
    let f = &post.form;
    let username = f.get("username");
    let r = call(
        &st,
        &post.ctx,
        None,
        Method::POST,
        "/auth/login",
        Some(json!({"username": username, "password": f.get("password")})),
    )
    .await;
    match r.body["token"].as_str() {
        Some(token) if r.ok() => {
            let mut resp = Redirect::to("/connections").into_response();
            let h = resp.headers_mut();
            h.append(header::SET_COOKIE, set_cookie(&st, SESSION_COOKIE, token));
            h.append(header::SET_COOKIE, clear_cookie(&st, LOGIN_COOKIE));
            resp
        }
        _ => form(&st, username, &Notes::error("login", r.error()), r.status),
    }
}

/// `POST /logout`: the session ends on the server, the cookie is deleted.
pub async fn logout(State(st): State<DashState>, Posted { op, .. }: Posted) -> Response {
    let r = op.send(&st, Method::POST, "/auth/logout", None).await;
    if !r.ok() && r.status != StatusCode::UNAUTHORIZED {
        tracing::warn!(status = %r.status, "dashboard logout: the API refused");
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, clear_cookie(&st, SESSION_COOKIE));
    resp
}
