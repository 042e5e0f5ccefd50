//! Every path through the pipeline: rag, direct, llm-only, degraded; and singleflight.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::{Backends, app, assert_error, chat, send};

async fn rag_backends() -> Backends {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits(
        "documents",
        json!([
            {"id": 1, "distance": 0.71, "text": "NATS is a messaging system.", "source": "nats.md"},
            {"id": 2, "distance": 0.64, "text": "JetStream adds persistence to NATS.", "source": "js.md"}
        ]),
    )
    .await;
    b.rerank(json!([{"index": 1, "score": 0.98}, {"index": 0, "score": 0.42}]))
        .await;
    b.llm_tokens(
        &["JetStream ", "persists ", "messages [1]."],
        Duration::ZERO,
    )
    .await;
    b
}

#[tokio::test]
async fn rag_answers_with_reranked_numbered_context() {
    let b = rag_backends().await;
    let app = app(&b.env(), &[]).await;
    let answer = send(&app, chat(json!({"request_id": "r1", "message": "How does NATS persist?", "temperature": 0.2, "max_tokens": 64}))).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let data = answer.json();
    assert_eq!(data["request_id"], "r1");
    assert_eq!(data["path"], "rag");
    assert_eq!(data["degraded"], false);
    assert_eq!(data["response"], "JetStream persists messages [1].");
    assert_eq!(data["sources"][0]["id"], "2", "reranked first");
    assert_eq!(data["sources"][0]["source"], "js.md");
    assert!((data["sources"][0]["score"].as_f64().unwrap_or_default() - 0.98).abs() < 1e-6);
    assert_eq!(data["sources"][1]["id"], "1");
    assert_eq!(data["usage"]["completion_tokens"], 3);
    for stage in ["embed", "search", "rerank", "ttft", "llm", "total"] {
        assert!(
            data["timings_ms"][stage].is_u64(),
            "timings_ms.{stage}: {data}"
        );
    }
    let llm = b.llm_requests().await;
    assert_eq!(llm.len(), 1);
    let system = llm[0]["messages"][0]["content"]
        .as_str()
        .unwrap_or_default();
    let first = system
        .find("[1] JetStream adds persistence to NATS. (js.md)")
        .expect("[1] is the reranked top doc");
    let second = system
        .find("[2] NATS is a messaging system. (nats.md)")
        .expect("[2]");
    assert!(first < second);
    assert_eq!(llm[0]["messages"][1]["content"], "How does NATS persist?");
    assert_eq!(llm[0]["stream"], true);
    assert_eq!(llm[0]["max_tokens"], 64);
    let metrics = handler_kit::telemetry::render_prometheus();
    assert!(
        metrics.contains("chat_answers_total{degraded=\"false\",path=\"rag\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("chat_time_to_first_token_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("chat_stage_duration_seconds_bucket{stage=\"rerank\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("handler_breaker_open{backend=\"llm\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn history_and_system_prompt_reach_the_llm_in_order() {
    let b = rag_backends().await;
    let app = app(&b.env(), &[]).await;
    let answer = send(
        &app,
        chat(json!({
            "message": "And now?",
            "system_prompt": "Be terse.",
            "enable_reranker": false,
            "rerank_top_n": 1,
            "history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        })),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json()["sources"].as_array().map(Vec::len),
        Some(1),
        "rerank_top_n applies without a reranker too"
    );
    let llm = b.llm_requests().await;
    let roles: Vec<&str> = llm[0]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert!(
        llm[0]["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .starts_with("Be terse.")
    );
    assert!(
        b.rerank
            .received_requests()
            .await
            .expect("wiremock records requests")
            .is_empty(),
        "reranker disabled"
    );
}

#[tokio::test]
async fn a_close_faq_match_is_answered_directly_without_the_llm() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits(
        "faq",
        json!([{"id": 7, "distance": 0.96, "answer": "Open Settings, then Reset password."}]),
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&b.llm)
        .await;
    let app = app(
        &b.env(),
        &[
            ("CHAT_FAQ_COLLECTION", "faq"),
            ("CHAT_FAQ_THRESHOLD", "0.9"),
        ],
    )
    .await;
    let answer = send(
        &app,
        chat(json!({"message": "How do I reset my password?"})),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let data = answer.json();
    assert_eq!(data["path"], "direct");
    assert_eq!(data["response"], "Open Settings, then Reset password.");
    assert_eq!(data["sources"][0]["id"], "7");
}

#[tokio::test]
async fn a_distant_faq_match_goes_to_the_llm() {
    let b = rag_backends().await;
    b.milvus_hits(
        "faq",
        json!([{"id": 7, "distance": 0.5, "answer": "Unrelated."}]),
    )
    .await;
    let app = app(&b.env(), &[("CHAT_FAQ_COLLECTION", "faq")]).await;
    let answer = send(&app, chat(json!({"message": "How does NATS persist?"}))).await;
    assert_eq!(answer.json()["path"], "rag");
    assert_eq!(b.llm_requests().await.len(), 1);
}

#[tokio::test]
async fn rag_disabled_goes_straight_to_the_llm() {
    let b = Backends::start().await;
    b.llm_tokens(&["Plain."], Duration::ZERO).await;
    let app = app(&b.env(), &[]).await;
    let answer = send(&app, chat(json!({"message": "Hi", "enable_rag": false}))).await;
    assert_eq!(answer.status, 200);
    let data = answer.json();
    assert_eq!(data["path"], "llm");
    assert_eq!(data["degraded"], false);
    assert_eq!(data["sources"], json!([]));
    assert!(
        b.embed
            .received_requests()
            .await
            .expect("wiremock records requests")
            .is_empty(),
        "no embedding without RAG"
    );
    assert!(
        b.milvus
            .received_requests()
            .await
            .expect("wiremock records requests")
            .is_empty()
    );
}

#[tokio::test]
async fn a_retrieval_failure_degrades_to_llm_only_or_fails_when_configured() {
    let b = Backends::start().await;
    b.embeddings().await;
    Mock::given(method("POST"))
        .and(path("/v2/vectordb/entities/search"))
        .respond_with(ResponseTemplate::new(503).set_body_string("milvus down"))
        .mount(&b.milvus)
        .await;
    b.llm_tokens(&["Best effort."], Duration::ZERO).await;
    let degrade = app(&b.env(), &[]).await;
    let answer = send(&degrade, chat(json!({"message": "Anything?"}))).await;
    assert_eq!(answer.status, 200);
    let data = answer.json();
    assert_eq!(data["path"], "llm");
    assert_eq!(data["degraded"], true);
    assert_eq!(data["response"], "Best effort.");

    // Failing instead, a Milvus that is down for now (503) is passed on as back-pressure.
    let fail = app(&b.env(), &[("CHAT_ON_RETRIEVAL_FAILURE", "fail")]).await;
    let answer = send(&fail, chat(json!({"message": "Anything?"}))).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "1");
}

#[tokio::test]
async fn a_failing_reranker_keeps_search_order_and_marks_degraded() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits("documents", json!([{"id": 1, "distance": 0.9, "text": "one"}, {"id": 2, "distance": 0.8, "text": "two"}])).await;
    Mock::given(method("POST"))
        .and(path("/rerank"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&b.rerank)
        .await;
    b.llm_tokens(&["ok"], Duration::ZERO).await;
    let app = app(&b.env(), &[]).await;
    let data = send(&app, chat(json!({"message": "q"}))).await.json();
    assert_eq!(data["path"], "rag");
    assert_eq!(data["degraded"], true);
    assert_eq!(data["sources"][0]["id"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_requests_share_one_llm_call() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits(
        "documents",
        json!([{"id": 1, "distance": 0.9, "text": "doc"}]),
    )
    .await;
    b.rerank(json!([{"index": 0, "score": 0.9}])).await;
    b.llm_tokens(&["Shared ", "answer."], Duration::from_millis(400))
        .await;
    let app = app(&b.env(), &[]).await;
    let requests = (0..5).map(|i| {
        let app = app.clone();
        async move { send(&app, chat(json!({"request_id": format!("s{i}"), "message": if i % 2 == 0 { "What is  NATS?" } else { "what is nats? " }}))).await }
    });
    let answers = futures::future::join_all(requests).await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.status, 200);
        let data = a.json();
        assert_eq!(data["request_id"], format!("s{i}"), "each keeps its own id");
        assert_eq!(data["response"], "Shared answer.");
    }
    assert_eq!(
        b.llm_requests().await.len(),
        1,
        "one LLM call for five identical requests"
    );
    assert_eq!(
        b.embed
            .received_requests()
            .await
            .expect("wiremock records requests")
            .len(),
        1
    );

    // With history, requests are a conversation each and do not share.
    let with_history = (0..2).map(|_| {
        let app = app.clone();
        async move { send(&app, chat(json!({"message": "What is NATS?", "history": [{"role": "user", "content": "hi"}]}))).await }
    });
    futures::future::join_all(with_history).await;
    assert_eq!(b.llm_requests().await.len(), 3);
}
