//! The page shell (navigation, stylesheet, script), messages shown next to what caused them, and the small
//! pieces every page uses: the CSRF field, confirmation buttons, one-time secret boxes.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use serde_json::Value;

use super::client::Reply;
use super::session::{Op, CSRF_FIELD};
use super::DashState;

/// Which section of the navigation a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Connections,
    Devices,
    Webhook,
    Account,
}

/// Messages for a page, each tied to the field or action (by key) that caused it.
#[derive(Default)]
pub struct Notes(Vec<(String, bool, String)>);

impl Notes {
    pub fn error(key: &str, text: impl Into<String>) -> Notes {
        Notes(vec![(key.to_owned(), false, text.into())])
    }

    pub fn ok(key: &str, text: impl Into<String>) -> Notes {
        Notes(vec![(key.to_owned(), true, text.into())])
    }

    pub fn push_error(&mut self, key: &str, text: impl Into<String>) {
        self.0.push((key.to_owned(), false, text.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The message for `key`, rendered where the caller puts it (an error is announced to screen readers).
    pub fn at(&self, key: &str) -> Markup {
        html! {
            @for (k, ok, text) in &self.0 {
                @if k == key {
                    @if *ok { p.note.ok id=(format!("{key}-note")) role="status" { (text) } }
                    @else { p.note.err id=(format!("{key}-note")) role="alert" { (text) } }
                }
            }
        }
    }

    /// `aria-describedby`/`aria-invalid` values for an input whose note key is `key`.
    pub fn described(&self, key: &str) -> (Option<String>, Option<&'static str>) {
        let has_err = self.0.iter().any(|(k, ok, _)| k == key && !ok);
        (
            has_err.then(|| format!("{key}-note")),
            has_err.then_some("true"),
        )
    }
}

/// A whole page for a logged-in operator.
pub fn page(op: &Op, section: Section, title: &str, body: Markup) -> Markup {
    let nav = [
        (Section::Connections, "/connections", "Connections"),
        (Section::Devices, "/devices", "Devices"),
        (Section::Webhook, "/webhook", "Webhook"),
        (Section::Account, "/account", "Account"),
    ];
    shell(
        title,
        Some(&op.csrf),
        html! {
            header.top {
                a.brand href="/connections" { "proxyfleet" }
                nav aria-label="Main" {
                    @for (s, href, label) in nav {
                        a href=(href) aria-current=[(s == section).then_some("page")] { (label) }
                    }
                }
                form.logout method="post" action="/logout" {
                    (csrf(op))
                    span.who { (op.session.username) }
                    button.link type="submit" { "Log out" }
                }
            }
            main id="main" { h1 { (title) } (body) }
            dialog id="confirm" aria-labelledby="confirm-text" {
                p id="confirm-text" {}
                div.actions {
                    button type="button" id="confirm-yes" class="danger" { "Confirm" }
                    button type="button" id="confirm-no" autofocus { "Cancel" }
                }
            }
        },
    )
}

/// The document around `body`. `csrf` is exposed to the script (for fetch requests) in a meta tag.
pub fn shell(title: &str, csrf: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width,initial-scale=1";
                @if let Some(t) = csrf { meta name="csrf-token" content=(t); }
                title { (title) " — proxyfleet" }
                link rel="stylesheet" href="/dashboard/app.css";
                link rel="icon" type="image/svg+xml" href="/dashboard/icon.svg";
                script src="/dashboard/app.js" defer {}
            }
            body { (body) }
        }
    }
}

/// The hidden CSRF field of every form.
pub fn csrf(op: &Op) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(op.csrf); }
}

/// A one-button form that posts to `action` after the operator confirms `question` in a dialog.
pub fn confirm_button(op: &Op, action: &str, label: &str, question: &str, danger: bool) -> Markup {
    html! {
        form.inline method="post" action=(action) data-confirm=(question) {
            (csrf(op))
            button type="submit" class=[danger.then_some("danger")] { (label) }
        }
    }
}

/// A one-button form without confirmation.
pub fn post_button(op: &Op, action: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            (csrf(op))
            button type="submit" { (label) }
        }
    }
}

/// A secret shown once, with a copy button. `id` names the value for tests and the copy button.
pub fn secret_row(id: &str, label: &str, value: &str) -> Markup {
    html! {
        div.secret {
            label for=(id) { (label) }
            div.copyrow {
                input id=(id) type="text" readonly value=(value) spellcheck="false" autocomplete="off";
                button type="button" data-copy=(id) { "Copy" }
            }
        }
    }
}

/// The answer to a logged-in request: the page as HTML with a status.
pub fn respond(status: StatusCode, page: Markup) -> Response {
    (status, Html(page.into_string())).into_response()
}

/// GET `path` from the API for a page: its body, or the page that says why not (a resource the operator does not
/// have is "not found", anything else the API's message).
pub async fn load(
    st: &DashState,
    op: &Op,
    path: &str,
    section: Section,
    what: &str,
) -> Result<Value, Response> {
    let r = op.get(st, path).await;
    if r.ok() {
        return Ok(r.body);
    }
    if r.status == StatusCode::NOT_FOUND {
        let body = html! { p { "This " (what) " does not exist or is not yours." } };
        return Err(respond(
            StatusCode::NOT_FOUND,
            page(op, section, "Not found", body),
        ));
    }
    Err(respond(
        r.status,
        page(op, section, "Error", html! { p.note.err { (r.error()) } }),
    ))
}

/// The note for an action's answer: `ok_text` on success, the API's message otherwise.
pub fn outcome(r: &Reply, key: &str, ok_text: &str) -> Notes {
    if r.ok() {
        Notes::ok(key, ok_text)
    } else {
        Notes::error(key, r.error())
    }
}

/// A generic failure page (the detail is in the log).
pub fn server_error() -> Response {
    let body = shell(
        "Error",
        None,
        html! { main { h1 { "Something went wrong" }
        p { "The server could not answer this request; the details are in its log. "
            a href="/connections" { "Back to the dashboard" } } } },
    );
    respond(StatusCode::INTERNAL_SERVER_ERROR, body)
}
