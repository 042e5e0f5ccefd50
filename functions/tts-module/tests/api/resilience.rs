//! Backend outages: the breaker opens, answers fast with 503 + Retry-After, and recovers.

use std::time::Duration;

use handler_kit::delivery::Disposition;
use serde_json::json;
use testkit::mocks::{coqui_tts, coqui_tts_failing};
use testkit::wav::sine_wav;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{app, assert_error, event, eventually, send};

fn request() -> http::Request<axum::body::Body> {
    event("ai.tts.request")
        .json(&json!({"text": "Hello."}))
        .binary()
}

#[tokio::test]
async fn failing_backend_opens_the_breaker_then_recovers() {
    let tts = MockServer::start().await;
    let failing = coqui_tts_failing(&tts, 500, "model crashed").await;
    let app = app(
        &tts.uri(),
        &[
            ("TTS_BREAKER_FAILURES", "2"),
            ("TTS_BREAKER_OPEN_MS", "300"),
        ],
    )
    .await;

    assert_failures_open_the_breaker(&app, &failing, "model crashed", "1").await;

    drop(failing);
    let _healthy = coqui_tts(&tts, sine_wav(50, 16000, 300.0), Duration::ZERO).await;
    let recovered = eventually(Duration::from_secs(5), || async {
        (send(&app, request()).await.status == 200).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "breaker never closed after the backend recovered"
    );
}

#[tokio::test]
async fn unreachable_backend_fails_fast_and_retryably() {
    let port = testkit::nats_server::free_port().expect("port");
    let app = app(
        &format!("http://127.0.0.1:{port}"),
        &[
            ("TTS_BREAKER_FAILURES", "1"),
            ("TTS_BREAKER_OPEN_MS", "60000"),
        ],
    )
    .await;
    let answer = send(&app, request()).await;
    assert_error(&answer, 502, "backend_error");
    let answer = send(&app, request()).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "60");
}

#[tokio::test]
async fn slow_backend_times_out_with_504() {
    let tts = MockServer::start().await;
    let _slow = coqui_tts(&tts, sine_wav(50, 16000, 300.0), Duration::from_secs(5)).await;
    let app = app(&tts.uri(), &[("TTS_TIMEOUT_MS", "100")]).await;
    assert_error(&send(&app, request()).await, 504, "backend_timeout");
}

#[tokio::test]
async fn backend_rejecting_the_request_is_not_retried() {
    let tts = MockServer::start().await;
    let _rejecting = coqui_tts_failing(&tts, 400, "unknown speaker").await;
    let app = app(&tts.uri(), &[]).await;
    let answer = send(&app, request()).await;
    assert_error(&answer, 422, "backend_rejected");
    assert_eq!(disposition(&answer), Disposition::Reject);
}

/// A rotated API key (401) or a model reloading (404) refuses every request: that is an outage
/// to wait out, not a verdict on each message, so nothing is dead-lettered.
#[tokio::test]
async fn a_backend_refusing_everyone_is_an_outage_that_opens_the_breaker() {
    for (status, body) in [
        (401, "invalid API key"),
        (403, "forbidden"),
        (404, "no model"),
    ] {
        let tts = MockServer::start().await;
        let refusing = coqui_tts_failing(&tts, status, body).await;
        let app = app(
            &tts.uri(),
            &[
                ("TTS_BREAKER_FAILURES", "2"),
                ("TTS_BREAKER_OPEN_MS", "30000"),
            ],
        )
        .await;
        assert_failures_open_the_breaker(&app, &refusing, body, "30").await;
    }
}

/// Two failures (`TTS_BREAKER_FAILURES=2`) are each a retryable 502 carrying the backend's
/// answer; then the open breaker answers 503 with `retry_after` without calling the backend.
async fn assert_failures_open_the_breaker(
    app: &axum::Router,
    backend: &wiremock::MockGuard,
    answered: &str,
    retry_after: &str,
) {
    for _ in 0..2 {
        let answer = send(app, request()).await;
        assert_error(&answer, 502, "backend_error");
        assert!(
            answer.json()["detail"]
                .as_str()
                .is_some_and(|d| d.contains(answered)),
            "{}",
            answer.json()
        );
        assert!(matches!(disposition(&answer), Disposition::Retry { .. }));
    }
    let answer = send(app, request()).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), retry_after, "{answered}");
    assert_eq!(
        backend.received_requests().await.len(),
        2,
        "{answered}: the open breaker still called the backend"
    );
}

/// A backend saying "not now" is back-pressure: its own Retry-After reaches the source.
#[tokio::test]
async fn a_busy_backend_is_answered_503_with_its_own_retry_after() {
    let tts = MockServer::start().await;
    let _busy = Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(
            ResponseTemplate::new(503)
                .insert_header("retry-after", "3")
                .set_body_string("model loading"),
        )
        .mount_as_scoped(&tts)
        .await;
    let app = app(&tts.uri(), &[("TTS_BREAKER_OPEN_MS", "10000")]).await;
    let answer = send(&app, request()).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "3");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("model loading")),
        "{}",
        answer.json()
    );
}

/// Throttling (429) without a Retry-After is retried after the shortest wait, 1 s.
#[tokio::test]
async fn a_throttling_backend_without_retry_after_is_retried_after_a_second() {
    let tts = MockServer::start().await;
    let _throttled = coqui_tts_failing(&tts, 429, "rate limited").await;
    let app = app(&tts.uri(), &[]).await;
    let answer = send(&app, request()).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "1");
}

/// What the event source does with this answer, through the shared delivery table.
fn disposition(answer: &testkit::cloudevent::Answer) -> Disposition {
    let status = http::StatusCode::from_u16(answer.status).expect("status");
    handler_kit::delivery::disposition(
        status,
        handler_kit::delivery::parse_retry_after(answer.headers.get("retry-after")),
    )
}

#[tokio::test]
async fn backend_answering_garbage_is_a_backend_error() {
    let tts = MockServer::start().await;
    let _garbage = coqui_tts_failing(&tts, 200, "<html>oops</html>").await;
    let app = app(&tts.uri(), &[]).await;
    assert_error(&send(&app, request()).await, 502, "backend_error");
}
