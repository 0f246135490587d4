//! API errors: `{"error": {"code", "message"}}` with a fitting status.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use meshca_issuer::IssuerError;
use meshca_store::StoreError;
use serde_json::json;

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// What happened and what to do.
    pub message: String,
    /// Seconds after which a refused caller may try again (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ApiError {
    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
            retry_after: None,
        }
    }
    /// A 401.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthenticated",
            message: message.into(),
            retry_after: None,
        }
    }
    /// A 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: message.into(),
            retry_after: None,
        }
    }
    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            retry_after: None,
        }
    }
    /// A 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: message.into(),
            retry_after: None,
        }
    }
    /// A 429 from one of the [`Limits`](crate::limits::Limits): the message
    /// names the setting; `Retry-After` says when to come back.
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: message.into(),
            retry_after: Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
        }
    }
    /// A 503 with `Retry-After` (a full listener, a busy server).
    pub fn unavailable_for(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Self {
            retry_after: Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
            ..Self::unavailable(message)
        }
    }
    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
            retry_after: None,
        }
    }
    /// A 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<IssuerError> for ApiError {
    fn from(e: IssuerError) -> Self {
        match &e {
            IssuerError::Policy(_) => Self {
                status: StatusCode::FORBIDDEN,
                code: "policy",
                message: e.to_string(),
                retry_after: None,
            },
            IssuerError::Store(s) => ApiError::from_store(s),
            IssuerError::Rotation(_) => Self {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: e.to_string(),
                retry_after: None,
            },
            _ if e.upstream_problem().is_some() => ApiError::unavailable(e.to_string()),
            _ if e.is_bad_input() => ApiError::bad_request(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl ApiError {
    fn from_store(e: &StoreError) -> Self {
        if e.is_not_found() {
            ApiError::not_found(e.to_string())
        } else if e.is_unavailable() {
            ApiError::unavailable(e.to_string())
        } else if e.is_conflict() {
            Self {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: e.to_string(),
                retry_after: None,
            }
        } else {
            ApiError::internal(e.to_string())
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from_store(&e)
    }
}

impl From<meshca_api::ApiInputError> for ApiError {
    fn from(e: meshca_api::ApiInputError) -> Self {
        if e.is_too_large() {
            return ApiError::too_large(e.to_string());
        }
        match e.pki() {
            Some(p) if !p.is_bad_input() => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<meshca_pki::PkiError> for ApiError {
    fn from(e: meshca_pki::PkiError) -> Self {
        if e.is_bad_input() {
            ApiError::bad_request(e.to_string())
        } else {
            ApiError::internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        resp
    }
}
