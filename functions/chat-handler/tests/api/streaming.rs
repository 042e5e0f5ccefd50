//! Chunks on a real nats-server: order, the closing chunk, the reply, and a stream that breaks.

use std::time::Duration;

use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use testkit::nats_server::NatsServer;

use crate::support::{Backends, RawLlm, app, assert_error, chat, send, sse_token};

#[derive(Debug, Deserialize)]
struct Chunk {
    request_id: String,
    seq: u64,
    text: String,
    done: bool,
    error: Option<String>,
}

async fn collect(sub: &mut async_nats::Subscriber) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("chunk in time")
            .expect("open");
        let chunk: Chunk = rmp_serde::from_slice(&msg.payload).expect("msgpack chunk");
        let done = chunk.done;
        chunks.push(chunk);
        if done {
            return chunks;
        }
    }
}

#[tokio::test]
async fn chunks_arrive_in_order_then_done_then_the_reply() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.chat.response.stream.c1")
        .await
        .expect("sub");
    let mut replies = client.subscribe("ai.chat.response.c1").await.expect("sub");
    client.flush().await.expect("flush");
    let b = Backends::start().await;
    let tokens = ["One ", "two ", "three ", "four ", "five."];
    b.llm_tokens(&tokens, Duration::ZERO).await;
    let app = app(&b.env(), &[("NATS_URL", &nats.url())]).await;
    let answer = send(
        &app,
        chat(json!({"request_id": "c1", "message": "Count", "enable_rag": false, "stream": true})),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    let chunks = collect(&mut stream).await;
    assert_eq!(chunks.len(), tokens.len() + 1);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.seq, i as u64);
        assert_eq!(c.request_id, "c1");
        assert!(c.error.is_none());
    }
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, tokens.concat());
    assert!(chunks.last().is_some_and(|c| c.done && c.text.is_empty()));

    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("reply")
        .expect("open");
    let data: serde_json::Value = rmp_serde::from_slice(&reply.payload).expect("msgpack reply");
    assert_eq!(data["response"], tokens.concat());
    assert_eq!(
        reply
            .headers
            .and_then(|h| h.get("Nats-Msg-Id").map(|v| v.to_string()))
            .as_deref(),
        Some("c1.reply")
    );
}

#[tokio::test]
async fn an_llm_failure_after_the_first_chunk_ends_the_stream_and_is_final() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.chat.response.stream.c2")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let llm = RawLlm::start(sse_token("Partial "), Some("data: {not json\n\n".into())).await;
    let b = Backends::start().await;
    let mut env = b.env();
    env.retain(|(k, _)| k != "LLM_URL");
    env.push(("LLM_URL".into(), llm.url.clone()));
    let app = app(&env, &[("NATS_URL", &nats.url())]).await;
    let answer = send(
        &app,
        chat(json!({"request_id": "c2", "message": "Go", "enable_rag": false, "stream": true})),
    )
    .await;
    assert_error(&answer, 422, "stream_interrupted");
    let chunks = collect(&mut stream).await;
    assert_eq!(chunks[0].text, "Partial ");
    let last = chunks.last().expect("closing chunk");
    assert!(last.done && last.error.is_some(), "{last:?}");

    // The same failure with nothing streamed yet is retryable.
    let answer = send(
        &app,
        chat(json!({"request_id": "c3", "message": "Go", "enable_rag": false})),
    )
    .await;
    assert!(
        answer.status >= 500,
        "{} {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
}

#[tokio::test]
async fn a_reply_that_cannot_be_kept_after_the_answer_was_streamed_is_final() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    // A stream that refuses the reply for good (larger than its message size limit); the
    // chunks, on ai.chat.response.stream.*, are not its subjects.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "CHAT_REPLIES".into(),
        subjects: vec!["ai.chat.response.*".into()],
        max_message_size: 16,
        ..Default::default()
    })
    .await
    .expect("replies stream");
    let mut stream = client
        .subscribe("ai.chat.response.stream.c4")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let b = Backends::start().await;
    b.llm_tokens(&["Streamed ", "once."], Duration::ZERO).await;
    let app = app(&b.env(), &[("NATS_URL", &nats.url())]).await;
    let answer = send(
        &app,
        chat(json!({"request_id": "c4", "message": "Go", "enable_rag": false, "stream": true})),
    )
    .await;
    // Retrying would stream the answer a second time: final.
    assert_error(&answer, 422, "stream_interrupted");
    let chunks = collect(&mut stream).await;
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "Streamed once.");

    // Nothing streamed (stream off): the same failure stays retryable.
    let answer = send(
        &app,
        chat(json!({"request_id": "c5", "message": "Go", "enable_rag": false})),
    )
    .await;
    assert!(
        answer.status >= 500,
        "{} {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
}
