//! The one error type of every handler. 4xx bodies carry a safe, useful message; 5xx bodies are generic and the
//! detail goes to the log.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::store::StoreError;

/// Body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in plain words.
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("invalid username or password")]
    BadCredentials,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    /// Not found, with the reason (a feature that is off, say).
    #[error("{0}")]
    NotFoundMsg(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("request body is too large")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("too many attempts; try again in {} seconds", retry_secs(*.0))]
    TooManyRequests(Duration),
    #[error("service unavailable")]
    Unavailable,
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::BadCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::NotFoundMsg(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "request failed");
        }
        let status = self.status();
        let body = axum::Json(ErrorBody {
            error: self.to_string(),
        });
        let mut resp = (status, body).into_response();
        match &self {
            ApiError::TooManyRequests(d) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(*d)));
            }
            ApiError::Unauthorized | ApiError::BadCredentials => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => ApiError::Conflict(format!("{what} is already taken")),
            other => ApiError::internal(other),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Login(_, Some(retry)) | AuthError::Locked(retry) => {
                ApiError::TooManyRequests(retry)
            }
            AuthError::Login(_, None) => ApiError::BadCredentials,
            AuthError::Policy(p) => ApiError::Unprocessable(p.to_string()),
            AuthError::Username(m) => ApiError::Unprocessable(m.to_owned()),
            AuthError::WrongCurrentPassword => ApiError::Forbidden("current password is incorrect"),
            AuthError::SamePassword => {
                ApiError::Unprocessable("new password must differ from the current one".into())
            }
            AuthError::NoOperator => ApiError::Unauthorized,
            AuthError::Store(s) => s.into(),
            AuthError::Hash(crate::auth::password::HashError::Busy) => ApiError::Unavailable,
            e @ (AuthError::Hash(_) | AuthError::Session(_)) => ApiError::internal(e),
        }
    }
}
