//! LLM outages and overload: breaker states, the stream limit, and cancellation on disconnect.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::{Backends, RawLlm, app, assert_error, chat, eventually, send, sse_token};

#[tokio::test]
async fn the_llm_breaker_opens_fails_fast_half_opens_and_closes() {
    let b = Backends::start().await;
    let failing = Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(500).set_body_string("overloaded"))
        .mount_as_scoped(&b.llm)
        .await;
    let app = app(
        &b.env(),
        &[
            ("LLM_BREAKER_FAILURES", "2"),
            ("LLM_BREAKER_OPEN_MS", "300"),
        ],
    )
    .await;
    let request = || chat(json!({"message": "hi", "enable_rag": false}));
    for _ in 0..2 {
        assert_error(&send(&app, request()).await, 502, "backend_error");
    }
    // Open: no call reaches the LLM.
    let open = send(&app, request()).await;
    assert_error(&open, 503, "backend_unavailable");
    assert_eq!(
        open.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(failing.received_requests().await.len(), 2);
    drop(failing);
    b.llm_tokens(&["back"], Duration::ZERO).await;
    // Half-open after the wait: the probe succeeds and closes the breaker.
    let closed = eventually(Duration::from_secs(5), || async {
        (send(&app, request()).await.status == 200).then_some(())
    })
    .await;
    assert!(closed.is_some());
    assert_eq!(send(&app, request()).await.status, 200);
}

#[tokio::test]
async fn streams_beyond_the_limit_wait_then_get_503_with_retry_after() {
    let b = Backends::start().await;
    b.llm_tokens(&["slow"], Duration::from_millis(1500)).await;
    let app = app(
        &b.env(),
        &[("LLM_CONCURRENCY", "1"), ("LLM_QUEUE_TIMEOUT_MS", "100")],
    )
    .await;
    let first = tokio::spawn({
        let app = app.clone();
        async move {
            send(&app, chat(json!({"message": "first", "enable_rag": false})))
                .await
                .status
        }
    });
    let reached = eventually(Duration::from_secs(5), || async {
        (!b.llm_requests().await.is_empty()).then_some(())
    })
    .await;
    assert!(reached.is_some());
    let second = send(
        &app,
        chat(json!({"message": "second", "enable_rag": false})),
    )
    .await;
    assert_error(&second, 503, "backend_unavailable");
    assert!(second.headers.contains_key("retry-after"));
    assert_eq!(first.await.expect("first"), 200);
}

#[tokio::test]
async fn a_dropped_client_cancels_the_llm_request() {
    let llm = RawLlm::start(sse_token("Thinking "), None).await;
    let b = Backends::start().await;
    let mut env = b.env();
    env.retain(|(k, _)| k != "LLM_URL");
    env.push(("LLM_URL".into(), llm.url.clone()));
    let base = testkit::cloudevent::serve(app(&env, &[]).await)
        .await
        .expect("serve");
    let (headers, body) = testkit::cloudevent::event("ai.chat.request")
        .json(&json!({"message": "Long answer please", "enable_rag": false}))
        .binary_parts();
    let http = handler_kit::http::client(Duration::from_secs(5)).expect("client");
    let mut request = http.post(&base).body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let client_call = tokio::spawn(request.send());
    let started = eventually(Duration::from_secs(5), || async {
        (llm.connections.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(started.is_some(), "the LLM never got the request");
    client_call.abort();
    let cancelled = eventually(Duration::from_secs(5), || async {
        llm.hung_up.load(Ordering::SeqCst).then_some(())
    })
    .await;
    assert!(cancelled.is_some(), "the LLM request outlived its client");
}
