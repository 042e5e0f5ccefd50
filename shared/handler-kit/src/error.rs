//! [`HandlerError`]: the one error type of the crate, and how it renders over HTTP.
//!
//! Every variant belongs to one [`Class`] of the delivery contract, so the status a caller sees
//! (and therefore whether the NATS source retries) is decided in one place, [`crate::delivery`].

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::delivery::{self, Class};

/// What went wrong while handling one event. `Clone` so one failure can answer every request
/// that shared its work (singleflight).
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// The request is not a valid CloudEvent (missing `ce-*` headers, wrong specversion, ...).
    #[error("invalid CloudEvent: {0}")]
    InvalidEvent(String),
    /// The event's data could not be decoded into the expected payload.
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    /// The payload decoded but cannot be processed (empty text, over a limit, ...).
    #[error("{0}")]
    Unprocessable(String),
    /// The request is not signed, or its signature does not verify (webhooks): 401, final.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The body is larger than this function accepts.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The request body broke off before its end (the connection failed mid-body): the event
    /// itself may be fine, so this is retryable (408), unlike a malformed one.
    #[error("the request body was cut off: {0}")]
    BodyIncomplete(String),
    /// The event's `datacontenttype` is not one this function decodes.
    #[error("unsupported datacontenttype {0:?}: use application/json or application/msgpack")]
    UnsupportedMediaType(String),
    /// A backend is known to be down (breaker open), saturated, or said it is busy (429, 503):
    /// try again later.
    #[error("{backend} unavailable: {reason}")]
    Unavailable {
        /// The backend's name.
        backend: &'static str,
        /// Why it is unavailable.
        reason: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// A backend failed in a way that may be transient (5xx, 401/403/404, connection error).
    #[error("{backend} failed: {detail}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What it answered or why the call failed.
        detail: String,
    },
    /// A backend refused this particular request (400, 409, 413, 422, ...): retrying will not
    /// help. `http::verdict` (feature `http-client`) says which statuses are the request's fault.
    #[error("{backend} rejected the request: {detail}")]
    BackendRejected {
        /// The backend's name.
        backend: &'static str,
        /// What it answered.
        detail: String,
    },
    /// A backend did not answer in time.
    #[error("{backend} timed out after {after:?}")]
    Timeout {
        /// The backend's name.
        backend: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The whole event took longer than its deadline.
    #[error("event deadline of {0:?} exceeded")]
    Deadline(Duration),
    /// The event arrived before one it depends on, or lost a race on shared state: it will
    /// succeed when retried later (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Something this one event needs is held by another (a lock): 409 with `Retry-After` (when
    /// it may be free), a failed attempt of this event only. Not `Unavailable`, whose 503
    /// would shut the source's gate and stall every other event to the function.
    #[error("{what}")]
    Held {
        /// What is held and by whom, e.g. `lock Lease deploy-prod is held by request r-1`.
        what: String,
        /// When it may be free.
        retry_after: Duration,
    },
    /// A backend failed after part of the answer was already streamed to the caller: retrying
    /// would stream it twice, so this is final.
    #[error("stream interrupted after it began: {0}")]
    StreamInterrupted(String),
    /// A bug or an impossible state; logged with detail, reported briefly.
    #[error("internal error: {0}")]
    Internal(String),
}

impl HandlerError {
    /// The delivery class of this error, which decides the HTTP status.
    pub fn class(&self) -> Class {
        match self {
            Self::InvalidEvent(_) | Self::InvalidPayload(_) => Class::BadRequest,
            Self::Unprocessable(_) | Self::BackendRejected { .. } | Self::StreamInterrupted(_) => {
                Class::Unprocessable
            }
            Self::Unauthorized(_) => Class::Unauthorized,
            Self::PayloadTooLarge { .. } => Class::TooLarge,
            Self::BodyIncomplete(_) => Class::Incomplete,
            Self::UnsupportedMediaType(_) => Class::UnsupportedMediaType,
            Self::Unavailable { retry_after, .. } => Class::Unavailable(*retry_after),
            Self::Backend { .. } => Class::BadGateway,
            Self::Conflict(_) | Self::Held { .. } => Class::Conflict,
            Self::Timeout { .. } | Self::Deadline(_) => Class::GatewayTimeout,
            Self::Internal(_) => Class::Internal,
        }
    }

    /// A short stable code for the JSON body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidEvent(_) => "invalid_event",
            Self::InvalidPayload(_) => "invalid_payload",
            Self::Unprocessable(_) => "unprocessable",
            Self::Unauthorized(_) => "unauthorized",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BodyIncomplete(_) => "body_incomplete",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Unavailable { .. } => "backend_unavailable",
            Self::Backend { .. } => "backend_error",
            Self::BackendRejected { .. } => "backend_rejected",
            Self::Timeout { .. } => "backend_timeout",
            Self::Deadline(_) => "deadline_exceeded",
            Self::StreamInterrupted(_) => "stream_interrupted",
            Self::Conflict(_) => "conflict",
            Self::Held { .. } => "held",
            Self::Internal(_) => "internal",
        }
    }

    /// Renders `body` with this error's status and, when it knows one, its `Retry-After`:
    /// [`delivery::error_response`] adds it for `Unavailable` (its class carries the delay),
    /// this for `Held` (a 409, whose class does not). For answers whose body is not
    /// [`ErrorBody`] (a webhook's list of outcomes).
    pub fn response(&self, body: &impl Serialize) -> Response {
        let mut response = delivery::error_response(self.class(), body);
        if let Self::Held { retry_after, .. } = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                delivery::retry_after_value(*retry_after),
            );
        }
        response
    }
}

/// The JSON body of every error answer: `{"error": "...", "detail": "..."}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// Stable machine-readable code.
    pub error: &'a str,
    /// Human-readable explanation.
    pub detail: String,
}

impl IntoResponse for HandlerError {
    fn into_response(self) -> Response {
        let class = self.class();
        if class.is_retryable() {
            tracing::warn!(error = self.code(), detail = %self, "event failed, retryable");
        } else {
            tracing::info!(error = self.code(), detail = %self, "event rejected");
        }
        self.response(&ErrorBody {
            error: self.code(),
            detail: self.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_signature_is_a_final_401_with_a_json_body() {
        let error = HandlerError::Unauthorized("signature does not match".into());
        assert!(!error.class().is_retryable());
        assert_eq!(error.code(), "unauthorized");
        let response = error.into_response();
        assert_eq!(response.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert!(response.headers().get("retry-after").is_none());
    }

    #[test]
    fn a_held_lock_is_a_counted_409_with_retry_after_not_backpressure() {
        let error = HandlerError::Held {
            what: "lock Lease deploy-prod is held by request a".into(),
            retry_after: Duration::from_millis(6500),
        };
        assert_eq!(error.code(), "held");
        assert!(matches!(
            delivery::disposition(error.class().status(), None),
            delivery::Disposition::Retry { .. }
        ));
        let response = error.into_response();
        assert_eq!(response.status(), axum::http::StatusCode::CONFLICT);
        assert_eq!(response.headers()["retry-after"], "7");
        // A plain conflict has no delay to offer.
        let conflict = HandlerError::Conflict("gap".into()).into_response();
        assert!(conflict.headers().get("retry-after").is_none());
    }
}
