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
        }
    }
    /// A 401.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthenticated",
            message: message.into(),
        }
    }
    /// A 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: message.into(),
        }
    }
    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
    /// A 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: message.into(),
        }
    }
    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
        }
    }
    /// A 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: message.into(),
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
            },
            IssuerError::Store(s) => ApiError::from_store(s),
            IssuerError::Rotation(_) => Self {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: e.to_string(),
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
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}
