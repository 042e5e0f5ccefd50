//! The delivery contract between a function and the NATS source, in one place.
//!
//! A function tells the source what to do with a message only through its HTTP status, following
//! Knative's data-plane rules. [`Class::status`] is the function side (outcome -> status) and
//! [`disposition`] is the source side (status -> ack / term / retry); they live together so the
//! two can never drift apart.
//!
//! | function answers | meaning | source does |
//! |---|---|---|
//! | 200 with a CloudEvent | done, here is the reply | ack, publish the reply |
//! | 202 / 204 | done, nothing to reply | ack |
//! | 400, 401, 403, 413, 415, 422, other 4xx | can never succeed | term, dead-letter |
//! | 500, 502, 504, 404, 408, 409 | took it and failed: try again later | nak with backoff; counts against the retry budget |
//! | 503, 429 (also: refused, reset, no answer) | cannot take work now | close the gate to the sink for `Retry-After`; nak; not counted |
//!
//! The last two rows are why a backend outage delays messages instead of dead-lettering them:
//! a function whose backend is down answers 503 (its breaker is open), and the source slows
//! down for the whole sink rather than spending each message's retries in seconds. What bounds
//! a message that only ever meets backpressure is its age (the source's `RETRY_TIMEOUT`).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The kinds of failure a function reports, each with one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Malformed event or payload: 400.
    BadRequest,
    /// Missing or bad signature: 401.
    Unauthorized,
    /// Body over the cap: 413.
    TooLarge,
    /// Data encoding not supported: 415.
    UnsupportedMediaType,
    /// Well-formed but impossible to process: 422.
    Unprocessable,
    /// The request body broke off before its end: 408, retried later.
    Incomplete,
    /// Out of order or a lost race on shared state: 409, retried later.
    Conflict,
    /// A dependency is down or saturated: 503 with `Retry-After`.
    Unavailable(Duration),
    /// A dependency failed: 502.
    BadGateway,
    /// A dependency or the event's deadline timed out: 504.
    GatewayTimeout,
    /// A bug: 500.
    Internal,
}

impl Class {
    /// The HTTP status for this class.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Incomplete => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the source will try this event again.
    pub fn is_retryable(self) -> bool {
        matches!(
            disposition(self.status(), None),
            Disposition::Retry { .. } | Disposition::Backpressure { .. }
        )
    }
}

/// Renders an error class and a JSON body as a response, with `Retry-After` where it applies.
pub fn error_response(class: Class, body: &impl Serialize) -> Response {
    let mut response = (class.status(), axum::Json(body)).into_response();
    if let Class::Unavailable(after) = class {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after_value(after));
    }
    response
}

/// `Retry-After` in whole seconds, rounded up and at least 1 (0 would invite a hot loop).
pub fn retry_after_value(after: Duration) -> HeaderValue {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// Parses a `Retry-After` header given in seconds (the form functions send).
pub fn parse_retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// What the source does with a message after the function answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Acknowledge; `reply` says whether the answer carries a CloudEvent to publish.
    Ack {
        /// The answer was a 200 with a body to publish on the reply subject.
        reply: bool,
    },
    /// Terminate and dead-letter: this message can never succeed.
    Reject,
    /// The function took the event and failed: deliver it again later. Counts against the
    /// message's retry budget.
    Retry {
        /// The delay the function asked for, if any.
        after: Option<Duration>,
    },
    /// The sink cannot take work now (503, 429): hold off the whole sink, then deliver again.
    /// Not a failed attempt of this message, so it does not use up its retry budget.
    Backpressure {
        /// The delay the sink asked for, if any.
        after: Option<Duration>,
    },
}

/// The source side of the contract: what an HTTP status means for the message.
pub fn disposition(status: StatusCode, retry_after: Option<Duration>) -> Disposition {
    match status.as_u16() {
        200 => Disposition::Ack { reply: true },
        201..=299 => Disposition::Ack { reply: false },
        429 | 503 => Disposition::Backpressure { after: retry_after },
        404 | 408 | 409 => Disposition::Retry { after: retry_after },
        400..=499 => Disposition::Reject,
        // 1xx/3xx are not valid final answers from a function: treat as transient.
        _ => Disposition::Retry { after: retry_after },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_rejected_except_the_transient_ones() {
        for code in [400, 401, 403, 413, 415, 422] {
            let s = StatusCode::from_u16(code).expect("valid status");
            assert_eq!(disposition(s, None), Disposition::Reject, "{code}");
        }
        for code in [404, 408, 409, 500, 502, 504] {
            let s = StatusCode::from_u16(code).expect("valid status");
            assert!(
                matches!(disposition(s, None), Disposition::Retry { .. }),
                "{code}"
            );
        }
        for code in [429, 503] {
            let s = StatusCode::from_u16(code).expect("valid status");
            assert_eq!(
                disposition(s, Some(Duration::from_secs(5))),
                Disposition::Backpressure {
                    after: Some(Duration::from_secs(5))
                },
                "{code}"
            );
        }
        assert_eq!(
            disposition(StatusCode::OK, None),
            Disposition::Ack { reply: true }
        );
        assert_eq!(
            disposition(StatusCode::NO_CONTENT, None),
            Disposition::Ack { reply: false }
        );
    }

    #[test]
    fn every_class_maps_to_the_intended_side_of_the_contract() {
        assert!(!Class::BadRequest.is_retryable());
        assert!(!Class::Unauthorized.is_retryable());
        assert_eq!(Class::Unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert!(!Class::TooLarge.is_retryable());
        assert!(!Class::UnsupportedMediaType.is_retryable());
        assert!(!Class::Unprocessable.is_retryable());
        assert!(Class::Incomplete.is_retryable());
        assert_eq!(Class::Incomplete.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(Class::Conflict.is_retryable());
        assert!(Class::Unavailable(Duration::from_secs(1)).is_retryable());
        assert!(Class::BadGateway.is_retryable());
        assert!(Class::GatewayTimeout.is_retryable());
        assert!(Class::Internal.is_retryable());
    }

    #[test]
    fn retry_after_rounds_up_and_never_says_zero() {
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_secs(10)), "10");
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static(" 7 "))),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("soon"))),
            None
        );
    }
}
