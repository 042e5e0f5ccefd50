//! Bad input gets a clear 4xx with a JSON error, never a 5xx, and never reaches the backend.

use serde_json::json;
use std::time::Duration;
use wiremock::MockServer;

use crate::support::{app, assert_error, event, send};

async fn app_and_backend() -> (axum::Router, MockServer) {
    // No mock is mounted: any call to the backend would answer 404 and show in received_requests.
    let tts = MockServer::start().await;
    let app = app(
        &tts.uri(),
        &[("TTS_MAX_TEXT_CHARS", "50"), ("MAX_BODY_BYTES", "1024")],
    )
    .await;
    (app, tts)
}

async fn assert_backend_untouched(tts: &MockServer) {
    let calls = tts
        .received_requests()
        .await
        .expect("wiremock records requests");
    assert!(calls.is_empty(), "bad input reached the backend: {calls:?}");
}

#[tokio::test]
async fn missing_ce_headers_is_400() {
    let (app, tts) = app_and_backend().await;
    let request = http::Request::post("/")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"text":"hi"}"#))
        .expect("request");
    assert_error(&send(&app, request).await, 400, "invalid_event");
    assert_backend_untouched(&tts).await;
}

#[tokio::test]
async fn missing_required_attribute_is_400() {
    let (app, _tts) = app_and_backend().await;
    let request = http::Request::post("/")
        .header("ce-specversion", "1.0")
        .header("ce-type", "ai.tts.request")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"text":"hi"}"#))
        .expect("request");
    assert_error(&send(&app, request).await, 400, "invalid_event");
}

#[tokio::test]
async fn wrong_specversion_is_400() {
    let (app, _tts) = app_and_backend().await;
    let mut request = event("ai.tts.request")
        .json(&json!({"text": "hi"}))
        .binary();
    request
        .headers_mut()
        .insert("ce-specversion", http::HeaderValue::from_static("0.1"));
    assert_error(&send(&app, request).await, 400, "invalid_event");
}

#[tokio::test]
async fn wrong_event_type_is_400() {
    let (app, _tts) = app_and_backend().await;
    let request = event("ai.chat.request")
        .json(&json!({"text": "hi"}))
        .binary();
    assert_error(&send(&app, request).await, 400, "invalid_event");
}

#[tokio::test]
async fn bad_msgpack_is_400() {
    let (app, tts) = app_and_backend().await;
    // 0xc1 is the one byte MessagePack never uses.
    let request = event("ai.tts.request")
        .raw("application/msgpack", vec![0x81, 0xc1, 0x00])
        .binary();
    assert_error(&send(&app, request).await, 400, "invalid_payload");
    assert_backend_untouched(&tts).await;
}

#[tokio::test]
async fn malformed_json_and_structured_envelopes_are_400() {
    let (app, _tts) = app_and_backend().await;
    let request = event("ai.tts.request")
        .raw("application/json", "{not json")
        .binary();
    assert_error(&send(&app, request).await, 400, "invalid_payload");
    let request = http::Request::post("/")
        .header("content-type", "application/cloudevents+json")
        .body(axum::body::Body::from("{\"specversion\": \"1.0\""))
        .expect("request");
    assert_error(&send(&app, request).await, 400, "invalid_event");
}

#[tokio::test]
async fn fields_of_the_wrong_type_are_400() {
    let (app, _tts) = app_and_backend().await;
    for data in [
        json!({"text": 5}),
        json!({"text": "hi", "stream": "yes"}),
        json!(["hi"]),
    ] {
        let request = event("ai.tts.request").json(&data).binary();
        assert_error(&send(&app, request).await, 400, "invalid_payload");
    }
}

#[tokio::test]
async fn empty_or_missing_text_is_rejected() {
    let (app, tts) = app_and_backend().await;
    let request = event("ai.tts.request")
        .json(&json!({"text": "  \n"}))
        .binary();
    assert_error(&send(&app, request).await, 422, "unprocessable");
    let request = event("ai.tts.request")
        .json(&json!({"voice": "x"}))
        .binary();
    assert_error(&send(&app, request).await, 400, "invalid_payload");
    assert_backend_untouched(&tts).await;
}

#[tokio::test]
async fn text_over_the_limit_is_422() {
    let (app, tts) = app_and_backend().await;
    let request = event("ai.tts.request")
        .json(&json!({"text": "a".repeat(51)}))
        .binary();
    let answer = send(&app, request).await;
    assert_error(&answer, 422, "unprocessable");
    assert!(
        answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("TTS_MAX_TEXT_CHARS")
    );
    assert_backend_untouched(&tts).await;
}

#[tokio::test]
async fn unsupported_datacontenttype_is_415() {
    let (app, _tts) = app_and_backend().await;
    let request = event("ai.tts.request").raw("text/plain", "hello").binary();
    assert_error(&send(&app, request).await, 415, "unsupported_media_type");
}

#[tokio::test]
async fn oversize_body_with_content_length_is_413() {
    let (app, tts) = app_and_backend().await;
    let request = event("ai.tts.request")
        .json(&json!({"text": "a".repeat(2000)}))
        .binary();
    assert_error(&send(&app, request).await, 413, "payload_too_large");
    assert_backend_untouched(&tts).await;
}

#[tokio::test]
async fn oversize_chunked_body_is_413_over_a_real_connection() {
    let (app, tts) = app_and_backend().await;
    let base = testkit::cloudevent::serve(app).await.expect("serve");
    let (headers, _) = event("ai.tts.request")
        .json(&json!({"text": "x"}))
        .binary_parts();
    // A body with no Content-Length, streamed in pieces: the cap must hold while reading.
    let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = (0..64)
        .map(|_| Ok(bytes::Bytes::from(vec![b'a'; 256])))
        .collect();
    let mut request = handler_kit::http::client(Duration::from_secs(5))
        .expect("client")
        .post(&base)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)));
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("answered, not reset");
    assert!(response.headers().get("content-length").is_some());
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("JSON error");
    assert_eq!(body["error"], "payload_too_large");
    assert_backend_untouched(&tts).await;
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let (app, _tts) = app_and_backend().await;
    let get = http::Request::get("/")
        .body(axum::body::Body::empty())
        .expect("request");
    assert_error(&send(&app, get).await, 405, "method_not_allowed");
    let other = http::Request::post("/nope")
        .body(axum::body::Body::empty())
        .expect("request");
    assert_error(&send(&app, other).await, 404, "not_found");
}
