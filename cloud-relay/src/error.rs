//! The relay's one error type. Each `ErrorCode` maps to exactly one HTTP status and one stable
//! code string; `internal` errors keep their detail for the log and never show it to clients.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use comatching_protocol::ValidationError;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    ValidationFailed,
    Unauthorized,
    Forbidden,
    NotFound,
    UsernameTaken,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InsufficientPoints,
    NoCandidate,
    MatcherUnavailable,
    RateLimited,
    PayloadTooLarge,
    WrongPassword,
    MethodNotAllowed,
    /// The student already has a pending charge request.
    ChargePending,
    /// The charge request was already approved, rejected or cancelled.
    ChargeDecided,
    /// The relay serves as many live event streams as it is configured for.
    TooManyStreams,
    RequestTimeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UsernameTaken => "username_taken",
            ErrorCode::IdempotencyInProgress => "idempotency_in_progress",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::InsufficientPoints => "insufficient_points",
            ErrorCode::NoCandidate => "no_candidate",
            ErrorCode::MatcherUnavailable => "matcher_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::WrongPassword => "wrong_password",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ChargePending => "charge_pending",
            ErrorCode::ChargeDecided => "charge_decided",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Internal => "internal",
        }
    }

    /// What the code means, for the OpenAPI document's response descriptions.
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorCode::ValidationFailed => {
                "the body, a header or a parameter is invalid (`field` names it)"
            }
            ErrorCode::Unauthorized => "no valid session token (or wrong credentials at login)",
            ErrorCode::Forbidden => "the route is for operators",
            ErrorCode::NotFound => "no such resource",
            ErrorCode::UsernameTaken => "the username is taken",
            ErrorCode::IdempotencyInProgress => {
                "a request with this Idempotency-Key is still running"
            }
            ErrorCode::IdempotencyKeyReused => {
                "this Idempotency-Key was used with a different body"
            }
            ErrorCode::InsufficientPoints => "not enough points for this request",
            ErrorCode::NoCandidate => "nobody matches right now (not charged)",
            ErrorCode::MatcherUnavailable => "no appliance answered in time (not charged)",
            ErrorCode::RateLimited => "too many requests from this address or account",
            ErrorCode::PayloadTooLarge => "the body is larger than `http.max_body_bytes`",
            ErrorCode::WrongPassword => "the current password is wrong",
            ErrorCode::MethodNotAllowed => "the path exists but not with this method",
            ErrorCode::ChargePending => "the student already has a pending charge request",
            ErrorCode::ChargeDecided => {
                "the charge request was already approved, rejected or cancelled"
            }
            ErrorCode::TooManyStreams => "the relay serves as many event streams as configured",
            ErrorCode::RequestTimeout => {
                "the request body did not arrive within `http.body_timeout_ms`"
            }
            ErrorCode::Internal => "an internal error (logged; no detail is shown)",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::ValidationFailed => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::WrongPassword => StatusCode::FORBIDDEN,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::NotFound | ErrorCode::NoCandidate => StatusCode::NOT_FOUND,
            ErrorCode::UsernameTaken
            | ErrorCode::IdempotencyInProgress
            | ErrorCode::ChargePending
            | ErrorCode::ChargeDecided => StatusCode::CONFLICT,
            ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InsufficientPoints => StatusCode::PAYMENT_REQUIRED,
            ErrorCode::MatcherUnavailable | ErrorCode::TooManyStreams => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    /// Shown to the client, except for `internal`.
    pub message: String,
    pub field: Option<String>,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: Some(field.into()),
            retry_after: None,
        }
    }
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::field(ErrorCode::ValidationFailed, field, message)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, detail)
    }
    pub fn with_retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "a valid session token is required")
    }

    /// The JSON body clients see.
    pub fn body(&self) -> serde_json::Value {
        let message = if self.code == ErrorCode::Internal {
            "internal error".to_owned()
        } else {
            self.message.clone()
        };
        let mut err = json!({ "code": self.code.as_str(), "message": message });
        if let Some(f) = &self.field {
            err["field"] = json!(f);
        }
        json!({ "error": err })
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::validation(e.field, e.message)
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::internal(format!("database: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code == ErrorCode::Internal {
            tracing::error!(detail = %self.message, "internal error");
        }
        let mut resp = (self.code.status(), axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if matches!(
            self.code,
            ErrorCode::PayloadTooLarge | ErrorCode::RequestTimeout
        ) {
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a client reuses it and its next request dies with it.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}
