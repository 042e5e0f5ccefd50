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
    b.assert_untouched().await;
}

#[tokio::test]
async fn top_k_and_rerank_top_n_over_their_caps_are_422_naming_the_field_before_any_backend_call() {
    let b = Backends::start().await;
    let app = app(&b.env(), &[]).await;
    for (data, field, variable) in [
        (
            json!({"message": "hi", "top_k": 16384}),
            "top_k",
            "CHAT_MAX_TOP_K",
        ),
        (
            json!({"message": "hi", "top_k": 65}),
            "top_k",
            "CHAT_MAX_TOP_K",
        ),
        (
            json!({"message": "hi", "rerank_top_n": 33}),
            "rerank_top_n",
            "CHAT_MAX_RERANK_TOP_N",
        ),
    ] {
        let answer = send(&app, chat(data)).await;
        assert_error(&answer, 422, "unprocessable");
        let detail = answer.json()["detail"].to_string();
        assert!(
            detail.starts_with(&format!("\"{field} is ")) && detail.contains(variable),
            "{detail}"
        );
    }
    b.assert_untouched().await;
}

#[tokio::test]
async fn a_top_k_at_its_cap_is_the_search_limit_and_defaults_over_the_caps_are_config_errors() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits("documents", json!([])).await;
    b.llm_tokens(&["Fine."], std::time::Duration::ZERO).await;
    let app = app(&b.env(), &[("CHAT_MAX_TOP_K", "100")]).await;
    let answer = send(&app, chat(json!({"message": "hi", "top_k": 100}))).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    let searches = b
        .milvus
        .received_requests()
        .await
        .expect("wiremock records requests");
    let search: serde_json::Value = serde_json::from_slice(&searches[0].body).expect("json");
    assert_eq!(search["limit"], 100);

    let mut env = b.env();
    env.extend([
        ("CHAT_TOP_K".to_string(), "80".to_string()),
        ("CHAT_MAX_RERANK_TOP_N".to_string(), "2".to_string()),
    ]);
    let err = handler_kit::config::load(&env, chat_handler::Config::read).expect_err("invalid");
    let text = err.to_string();
    for problem in [
        "CHAT_TOP_K (80) is over CHAT_MAX_TOP_K (64)",
        "CHAT_RERANK_TOP_N (4) is over CHAT_MAX_RERANK_TOP_N (2)",
    ] {
        assert!(text.contains(problem), "{problem} missing from: {text}");
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
