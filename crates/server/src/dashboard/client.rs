//! In-process calls from the dashboard to the REST API: the same handlers, limits, messages and operator scoping
//! as for any API client, without a network hop.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::session::Ctx;
use super::DashState;

/// Largest API answer the dashboard reads, in bytes.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// An API answer: its status and JSON body (`Null` when it had none).
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The API's error message, in plain words; a generic one for server errors (whose detail is in the log).
    pub fn error(&self) -> String {
        if self.status.is_server_error() {
            return "Something went wrong on the server; the details are in its log. Try again."
                .into();
        }
        match self.body["error"].as_str() {
            Some(e) => sentence(e),
            None => format!("The request failed ({}).", self.status),
        }
    }
}

/// Capitalise the first letter and end with a full stop: the API's messages read as sentences on a page.
pub fn sentence(s: &str) -> String {
    let mut c = s.chars();
    let mut out: String = c
        .next()
        .map(|f| f.to_uppercase().collect())
        .unwrap_or_default();
    out.push_str(c.as_str());
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// Call `method /api/v1.0{path}` as the client in `ctx`, with the session `token` when given.
pub async fn call(
    st: &DashState,
    ctx: &Ctx,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Reply {
    let reply = match answer(st, ctx, token, method, path, body).await {
        Ok(resp) => reply_of(resp).await,
        Err(e) => Err(e),
    };
    reply.unwrap_or_else(|e| failed(path, &e))
}

/// The reply for a call that failed inside the process (the detail goes to the log).
fn failed(path: &str, e: &anyhow::Error) -> Reply {
    tracing::error!(error = %e, %path, "in-process API call failed");
    Reply {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: Value::Null,
    }
}

/// The API's answer as it is (status, headers, body), for the few answers that are not JSON.
async fn answer(
    st: &DashState,
    ctx: &Ctx,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<axum::response::Response> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/api/v1.0{path}"));
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ua) = &ctx.user_agent {
        req = req.header(header::USER_AGENT, ua);
    }
    for f in &ctx.forwarded_for {
        req = req.header("x-forwarded-for", f);
    }
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(serde_json::to_vec(&v)?)
        }
        None => Body::empty(),
    };
    let mut req = req.body(body)?;
    req.extensions_mut().insert(ConnectInfo(ctx.peer));
    Ok(st.api.clone().oneshot(req).await?)
}

/// An API answer read as a [`Reply`]: its status and JSON body.
async fn reply_of(resp: axum::response::Response) -> anyhow::Result<Reply> {
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES).await?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok(Reply { status, body })
}

/// A file the API serves (`GET`), passed to the browser with its type and file name when the API gave it, or
/// the API's refusal as a [`Reply`] for the page to show.
pub enum Download {
    File(axum::response::Response),
    Refused(Reply),
}

/// Shorthands for the logged-in operator's calls.
impl super::session::Op {
    pub async fn get(&self, st: &DashState, path: &str) -> Reply {
        call(st, &self.ctx, Some(&self.token), Method::GET, path, None).await
    }

    pub async fn send(
        &self,
        st: &DashState,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Reply {
        call(st, &self.ctx, Some(&self.token), method, path, body).await
    }

    /// `GET path` for a file (see [`Download`]).
    pub async fn download(&self, st: &DashState, path: &str) -> Download {
        let resp = match answer(st, &self.ctx, Some(&self.token), Method::GET, path, None).await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let reply = reply_of(r).await;
                return Download::Refused(reply.unwrap_or_else(|e| failed(path, &e)));
            }
            Err(e) => return Download::Refused(failed(path, &e)),
        };
        let (parts, body) = resp.into_parts();
        let mut out = axum::response::Response::new(body);
        *out.status_mut() = parts.status;
        for h in [header::CONTENT_TYPE, header::CONTENT_DISPOSITION] {
            if let Some(v) = parts.headers.get(&h) {
                out.headers_mut().insert(h, v.clone());
            }
        }
        Download::File(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_messages_become_sentences() {
        assert_eq!(super::sentence("device is offline"), "Device is offline.");
        assert_eq!(super::sentence("Done."), "Done.");
    }
}
