//! A `request_id` names the stream and reply subjects and their `Nats-Msg-Id`s, so it is checked
//! before any backend is called: a bad one is a final 422 naming it, and nothing is published.

use std::time::Duration;

use serde_json::json;
use testkit::nats_server::{NatsServer, assert_nothing_published};

use crate::support::{Backends, app, assert_error, chat, send};

#[tokio::test]
async fn a_request_id_with_a_newline_or_over_the_cap_is_422_before_any_backend_call() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut published = client.subscribe(">").await.expect("sub");
    client.flush().await.expect("flush");
    let b = Backends::start().await;
    b.llm_tokens(&["Never."], Duration::ZERO).await;
    let app = app(&b.env(), &[("NATS_URL", &nats.url())]).await;
    for request_id in ["a\nb".to_string(), "x".repeat(6000)] {
        let answer = send(
            &app,
            chat(json!({"request_id": request_id, "message": "Hi", "stream": true})),
        )
        .await;
        assert_error(&answer, 422, "unprocessable");
        assert!(
            answer.json()["detail"]
                .as_str()
                .is_some_and(|d| d.contains("request_id")),
            "{}",
            answer.json()
        );
    }
    b.assert_untouched().await;
    assert_nothing_published(&client, &mut published, "test.sentinel").await;
}

/// Published to `ai.chat.response.{request_id}` on the way: a failed publish would not be 200.
#[tokio::test]
async fn a_request_id_at_the_cap_is_answered() {
    let nats = NatsServer::start().await.expect("nats");
    let request_id = "c".repeat(handler_kit::event::MAX_ID_LEN);
    let b = Backends::start().await;
    b.llm_tokens(&["Fine."], Duration::ZERO).await;
    let app = app(&b.env(), &[("NATS_URL", &nats.url())]).await;
    let request = json!({"request_id": request_id, "message": "Hi", "enable_rag": false});
    let answer = send(&app, chat(request)).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["request_id"], request_id.as_str());
}

/// A collection is a tenant's data: a request names one of `CHAT_COLLECTIONS` or gets a final
/// 422 before any backend is called. By default that is `CHAT_COLLECTION` and the FAQ
/// collection.
#[tokio::test]
async fn a_collection_outside_chat_collections_is_422_and_no_backend_is_called() {
    let b = Backends::start().await;
    for (extra, refused) in [
        (vec![], "tenant-b"),
        (vec![("CHAT_FAQ_COLLECTION", "faq")], "tenant-b"),
        (
            vec![("CHAT_COLLECTIONS", "documents, tenant-a")],
            "tenant-b",
        ),
        (vec![("CHAT_COLLECTIONS", "documents")], "faq"),
    ] {
        let app = app(&b.env(), &extra).await;
        let answer = send(
            &app,
            chat(json!({"message": "What is in there?", "collection": refused})),
        )
        .await;
        assert_error(&answer, 422, "unprocessable");
        let detail = answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            detail.contains(refused) && detail.contains("CHAT_COLLECTIONS"),
            "{extra:?}: {detail}"
        );
    }
    b.assert_untouched().await;
}

#[tokio::test]
async fn a_collection_in_chat_collections_is_searched() {
    let b = Backends::start().await;
    b.embeddings().await;
    b.milvus_hits(
        "tenant-a",
        json!([{"id": 3, "distance": 0.8, "text": "Tenant A's handbook.", "source": "a.md"}]),
    )
    .await;
    b.llm_tokens(&["From the handbook [1]."], Duration::ZERO)
        .await;
    let app = app(&b.env(), &[("CHAT_COLLECTIONS", "documents,tenant-a")]).await;
    let answer = send(
        &app,
        chat(json!({"message": "Handbook?", "collection": "tenant-a", "enable_reranker": false})),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["path"], "rag");
    assert_eq!(answer.json()["sources"][0]["text"], "Tenant A's handbook.");
}

#[tokio::test]
async fn an_empty_chat_collections_is_a_config_error() {
    let mut env: Vec<(String, String)> = Backends::start().await.env();
    env.push(("CHAT_COLLECTIONS".into(), " , ".into()));
    let err = handler_kit::config::load(&env, chat_handler::Config::read)
        .expect_err("an empty list is refused");
    assert!(err.to_string().contains("CHAT_COLLECTIONS"), "{err}");
}
