//! Backend outages: the breaker opens, answers fast with 503 + Retry-After, and recovers.

use std::time::Duration;

use serde_json::json;
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
    let failing = Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(ResponseTemplate::new(500).set_body_string("model crashed"))
        .mount_as_scoped(&tts)
        .await;
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
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(
            ResponseTemplate::new(200).set_body_bytes(testkit::wav::sine_wav(50, 16000, 300.0)),
        )
        .mount(&tts)
        .await;
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
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(testkit::wav::sine_wav(50, 16000, 300.0))
                .set_delay(Duration::from_secs(5)),
        )
        .mount(&tts)
        .await;
    let app = app(&tts.uri(), &[("TTS_TIMEOUT_MS", "100")]).await;
    assert_error(&send(&app, request()).await, 504, "backend_timeout");
}

#[tokio::test]
async fn backend_rejecting_the_request_is_not_retried() {
    let tts = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(ResponseTemplate::new(400).set_body_string("unknown speaker"))
        .mount(&tts)
        .await;
    let app = app(&tts.uri(), &[]).await;
    assert_error(&send(&app, request()).await, 422, "backend_rejected");
}

#[tokio::test]
async fn backend_answering_garbage_is_a_backend_error() {
    let tts = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>oops</html>"))
        .mount(&tts)
        .await;
    let app = app(&tts.uri(), &[]).await;
    assert_error(&send(&app, request()).await, 502, "backend_error");
}
