//! The one place where errors become wire answers: a [`ServeError`] (plus the few failures only
//! HTTP has) to an HTTP status, OpenAI error body and `Retry-After`, to a `tonic::Code`, and to
//! the `outcome` label of the request metrics.
//!
//! The HTTP status and OpenAI `type` of a `ServeError` are its own methods
//! (`coordinator/src/api.rs`); this module adds the rest and renders them.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyserve_coordinator::api::ServeError;
use serde::Serialize;

/// A failed HTTP request.
#[derive(Debug)]
pub(crate) enum ApiError {
    Serve(ServeError),
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge { limit: usize },
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        ApiError::Serve(e)
    }
}

/// OpenAI's error envelope: `{"error": {...}}`.
#[derive(Serialize)]
pub(crate) struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Serialize)]
pub(crate) struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Serve(e) => {
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub(crate) fn envelope(&self) -> ErrorEnvelope {
        let error = match self {
            ApiError::Serve(e) => ErrorBody {
                message: e.to_string(),
                kind: e.openai_type(),
                param: e.param().filter(|p| !p.is_empty()).map(str::to_string),
                code: match e {
                    ServeError::Unauthorized => Some("invalid_api_key"),
                    ServeError::Overloaded { .. } => Some("rate_limit_exceeded"),
                    _ => None,
                },
            },
            ApiError::NotFound => ErrorBody {
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            },
            ApiError::MethodNotAllowed => ErrorBody {
                message: "method not allowed for this endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("method_not_allowed"),
            },
            ApiError::PayloadTooLarge { limit } => ErrorBody {
                message: format!("the request body is larger than {limit} bytes"),
                kind: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
            },
        };
        ErrorEnvelope { error }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.envelope())).into_response();
        if let ApiError::Serve(e) = &self
            && let Some(after) = e.retry_after()
        {
            // Whole seconds, rounded up: "0" would invite an immediate retry storm.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// The gRPC status of a serving error.
pub(crate) fn grpc_status(e: &ServeError) -> tonic::Status {
    let code = match e {
        ServeError::InvalidRequest { .. } => tonic::Code::InvalidArgument,
        ServeError::Overloaded { .. } => tonic::Code::ResourceExhausted,
        ServeError::Unavailable { .. } => tonic::Code::Unavailable,
        ServeError::Unauthorized => tonic::Code::Unauthenticated,
        ServeError::Internal { .. } => tonic::Code::Internal,
    };
    let message = match e.param() {
        Some(field) if !field.is_empty() => format!("{field}: {e}"),
        _ => e.to_string(),
    };
    tonic::Status::new(code, message)
}

/// `outcome` label of `hyserve_requests_total` for a failed request.
pub(crate) fn outcome(e: &ServeError) -> &'static str {
    match e {
        ServeError::InvalidRequest { .. } => "invalid_request",
        ServeError::Overloaded { .. } => "overloaded",
        ServeError::Unavailable { .. } => "unavailable",
        ServeError::Unauthorized => "unauthorized",
        ServeError::Internal { .. } => "internal_error",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_serve_error_maps_to_http_and_grpc() {
        let cases = [
            (
                ServeError::invalid("n", "bad"),
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                ServeError::Overloaded {
                    message: "full".into(),
                    retry_after: Duration::from_millis(1500),
                },
                429,
                tonic::Code::ResourceExhausted,
            ),
            (
                ServeError::Unavailable {
                    message: "starting".into(),
                },
                503,
                tonic::Code::Unavailable,
            ),
            (ServeError::Unauthorized, 401, tonic::Code::Unauthenticated),
            (
                ServeError::Internal {
                    message: "worker died".into(),
                },
                500,
                tonic::Code::Internal,
            ),
        ];
        for (e, http, grpc) in cases {
            assert_eq!(grpc_status(&e).code(), grpc);
            let resp = ApiError::Serve(e.clone()).into_response();
            assert_eq!(resp.status().as_u16(), http);
            let retry = resp.headers().get(header::RETRY_AFTER);
            match &e {
                ServeError::Overloaded { .. } => assert_eq!(retry.unwrap(), "2"),
                ServeError::Unavailable { .. } => assert_eq!(retry.unwrap(), "1"),
                _ => assert!(retry.is_none()),
            }
        }
    }
}
