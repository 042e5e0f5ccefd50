//! Backend answers are read under caps: one that does not end is a 502 (retried; it counts
//! against the breaker), and the client hangs up after reading about its cap, which the test
//! backend sees as the bytes it managed to write.

use std::time::Duration;

use serde_json::json;
use testkit::endless::{EndlessAnswer, EndlessServer};

use crate::support::{Backends, app, assert_error, chat, send, sse_token};

/// Sends `data` to a chat-handler whose `backend` variable points at `server`, with `extra`.
async fn ask(
    b: &Backends,
    backend: &str,
    server: &EndlessServer,
    extra: &[(&str, &str)],
    data: serde_json::Value,
) -> testkit::cloudevent::Answer {
    let url = server.url();
    let mut vars = vec![(backend, url.as_str())];
    vars.extend_from_slice(extra);
    send(&app(&b.env(), &vars).await, chat(data)).await
}

#[tokio::test]
async fn an_llm_stream_without_end_is_a_502_once_it_passes_its_cap() {
    let b = Backends::start().await;
    let line = ("data: ".to_string(), "x".repeat(16 * 1024));
    let tokens = (String::new(), sse_token("more ").repeat(64));
    for ((start, piece), (variable, cap), what) in [
        (line, ("LLM_MAX_EVENT_BYTES", 65_536), "an endless SSE line"),
        (tokens, ("LLM_MAX_STREAM_BYTES", 262_144), "endless tokens"),
    ] {
        let llm = EndlessServer::start(EndlessAnswer::new("text/event-stream", start, piece))
            .await
            .expect("llm");
        let cap_text = cap.to_string();
        let answer = ask(
            &b,
            "LLM_URL",
            &llm,
            &[(variable, cap_text.as_str())],
            json!({"message": "Hi", "enable_rag": false}),
        )
        .await;
        assert_error(&answer, 502, "backend_error");
        let detail = answer.json()["detail"].to_string();
        assert!(detail.contains(variable), "{what}: {detail}");
        llm.assert_hung_up_within(cap, what).await;
    }
}

/// A search answer that never closes its list of hits.
async fn endless_milvus() -> EndlessServer {
    EndlessServer::start(EndlessAnswer::new(
        "application/json",
        r#"{"code": 0, "data": ["#,
        format!(
            r#"{{"id": 1, "distance": 0.5, "text": "{}"}}, "#,
            "t".repeat(1000)
        )
        .repeat(16),
    ))
    .await
    .expect("milvus")
}

#[tokio::test]
async fn a_milvus_answer_over_its_cap_fails_retrieval_or_degrades_it() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.llm_tokens(&["From memory."], Duration::ZERO).await;
    let milvus = endless_milvus().await;
    let cap = [("MILVUS_MAX_RESPONSE_BYTES", "65536")];
    let failing = [cap[0], ("CHAT_ON_RETRIEVAL_FAILURE", "fail")];
    let answer = ask(
        &b,
        "MILVUS_URL",
        &milvus,
        &failing,
        json!({"message": "Hi"}),
    )
    .await;
    assert_error(&answer, 502, "backend_error");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("milvus failed: answered more than 65536 bytes")),
        "{}",
        answer.json()
    );
    milvus
        .assert_hung_up_within(65536, "an endless Milvus answer")
        .await;

    // By default retrieval is an enhancement: the answer comes from the LLM alone.
    let answer = ask(&b, "MILVUS_URL", &milvus, &cap, json!({"message": "Hi"})).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["degraded"], true);
    assert_eq!(answer.json()["response"], "From memory.");
}

#[tokio::test]
async fn a_rerank_answer_over_its_cap_fails_retrieval() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits(
        "documents",
        json!([{"id": 1, "distance": 0.9, "text": "one"}]),
    )
    .await;
    b.llm_tokens(&["Never."], Duration::ZERO).await;
    let rerank = EndlessServer::start(EndlessAnswer::new(
        "application/json",
        "[",
        r#"{"index": 0, "score": 0.5}, "#.repeat(512),
    ))
    .await
    .expect("rerank");
    let answer = ask(
        &b,
        "RERANK_URL",
        &rerank,
        &[
            ("RERANK_MAX_RESPONSE_BYTES", "65536"),
            ("CHAT_ON_RETRIEVAL_FAILURE", "fail"),
        ],
        json!({"message": "Hi"}),
    )
    .await;
    assert_error(&answer, 502, "backend_error");
    rerank
        .assert_hung_up_within(65536, "an endless rerank answer")
        .await;
    assert!(b.llm_requests().await.is_empty());
}
