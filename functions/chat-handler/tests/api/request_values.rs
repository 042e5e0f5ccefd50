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
