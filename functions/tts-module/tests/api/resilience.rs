//! Backend outages: the breaker opens, answers fast with 503 + Retry-After, and recovers.

use std::time::Duration;

use serde_json::json;
use testkit::mocks::{coqui_tts, coqui_tts_failing};
use testkit::wav::sine_wav;
use wiremock::MockServer;

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

    for _ in 0..2 {
        let answer = send(&app, request()).await;
        assert_error(&answer, 502, "backend_error");
        assert!(
            answer.json()["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("model crashed")
        );
    }
    // Open: answered without calling the backend, with a hint when to come back.
    let answer = send(&app, request()).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "1");
    assert_eq!(
        failing.received_requests().await.len(),
        2,
        "open breaker still called the backend"
    );

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
    assert_error(&send(&app, request()).await, 422, "backend_rejected");
}

#[tokio::test]
async fn backend_answering_garbage_is_a_backend_error() {
    let tts = MockServer::start().await;
    let _garbage = coqui_tts_failing(&tts, 200, "<html>oops</html>").await;
    let app = app(&tts.uri(), &[]).await;
    assert_error(&send(&app, request()).await, 502, "backend_error");
}
