//! Bad input: a clear 4xx with a JSON error, and no backend is called.

use serde_json::json;

use crate::support::{Backends, app, assert_error, chat, event, send};

#[tokio::test]
async fn bad_requests_are_rejected_before_any_backend_call() {
    let b = Backends::start().await;
    let app = app(&b.env(), &[("CHAT_MAX_MESSAGE_CHARS", "20")]).await;
    let cases = [
        (json!({"message": "  "}), 422, "unprocessable"),
        (json!({"message": "x".repeat(21)}), 422, "unprocessable"),
        (
            json!({"message": "hi", "history": [{"role": "robot", "content": "x"}]}),
            422,
            "unprocessable",
        ),
        (json!({"message": "hi", "top_k": 0}), 422, "unprocessable"),
        (json!({"message": 5}), 400, "invalid_payload"),
        (
            json!({"message": "hi", "stream": "yes"}),
            400,
            "invalid_payload",
        ),
        (json!({"text": "hi"}), 400, "invalid_payload"),
    ];
    for (data, status, code) in cases {
        assert_error(&send(&app, chat(data)).await, status, code);
    }
    let wrong_type = event("ai.tts.request")
        .json(&json!({"message": "hi"}))
        .binary();
    assert_error(&send(&app, wrong_type).await, 400, "invalid_event");
    let not_an_event = http::Request::post("/")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(r#"{"message":"hi"}"#))
        .expect("request");
    assert_error(&send(&app, not_an_event).await, 400, "invalid_event");
    for server in [&b.llm, &b.embed, &b.milvus, &b.rerank] {
        assert!(
            server
                .received_requests()
                .await
                .unwrap_or_default()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn missing_backend_urls_are_all_reported() {
    let err =
        handler_kit::config::load(&Vec::<(String, String)>::new(), chat_handler::Config::read)
            .expect_err("invalid");
    let text = err.to_string();
    for v in ["LLM_URL", "EMBED_URL", "MILVUS_URL"] {
        assert!(text.contains(v), "{v} missing from: {text}");
    }
}
