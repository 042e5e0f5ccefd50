//! Request values that become subject tokens and `Nats-Msg-Id`s are checked before any work:
//! a bad one is a final 422 naming the field, never a 500 the source would retry, and nothing
//! reaches the backend or NATS.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::json;
use testkit::nats_server::{NatsServer, assert_nothing_published};
use wiremock::MockServer;

use crate::support::{app, assert_error, event, send, simulator};

/// A client subscribed to every subject.
async fn everything(nats: &NatsServer) -> (async_nats::Client, async_nats::Subscriber) {
    let client = nats.client().await.expect("client");
    let all = client.subscribe(">").await.expect("sub");
    client.flush().await.expect("flush");
    (client, all)
}

#[tokio::test]
async fn a_request_id_with_a_newline_or_over_the_cap_is_422_and_nothing_is_published() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (client, mut all) = everything(&nats).await;
    // No mock is mounted: a call would show in received_requests.
    let tts = MockServer::start().await;
    let app = app(&tts.uri(), &[("NATS_URL", &nats.url())]).await;
    for (request_id, why) in [
        ("a\nb".to_string(), "control character U+000A"),
        (
            "a\r\nNats-Msg-Id: x".to_string(),
            "control character U+000D",
        ),
        ("x".repeat(6000), "6000 bytes long"),
    ] {
        let answer = send(
            &app,
            event("ai.tts.request")
                .json(&json!({"request_id": request_id, "text": "Hello.", "stream": true}))
                .binary(),
        )
        .await;
        assert_error(&answer, 422, "unprocessable");
        let detail = answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            detail.contains("request_id") && detail.contains(why),
            "{detail}"
        );
    }
    let calls = tts
        .received_requests()
        .await
        .expect("wiremock records requests");
    assert!(calls.is_empty(), "a bad id reached the backend: {calls:?}");
    assert_nothing_published(&client, &mut all, "test.sentinel").await;
}

/// Without `request_id` the event's `id` names the outputs; in structured mode it can carry a
/// newline too.
#[tokio::test]
async fn an_event_id_with_a_newline_is_422_when_it_stands_in_for_the_request_id() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (client, mut all) = everything(&nats).await;
    let app = app(&simulator().await, &[("NATS_URL", &nats.url())]).await;
    let request = event("ai.tts.request")
        .id("e\n1")
        .json(&json!({"text": "Hello."}))
        .structured();
    let answer = send(&app, request).await;
    assert_error(&answer, 422, "unprocessable");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("event id")),
        "{}",
        answer.json()
    );
    assert_nothing_published(&client, &mut all, "test.sentinel").await;
}

#[tokio::test]
async fn a_request_id_of_exactly_256_bytes_is_accepted_and_names_the_reply_subject() {
    let nats = NatsServer::start().await.expect("nats-server");
    let request_id = "r".repeat(handler_kit::event::MAX_ID_LEN);
    let client = nats.client().await.expect("client");
    let mut replies = client
        .subscribe(format!("ai.tts.response.{request_id}"))
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let app = app(&simulator().await, &[("NATS_URL", &nats.url())]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"request_id": request_id, "text": "Hello."}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("reply in time")
        .expect("subscription open");
    let msg_id = reply.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id"));
    assert_eq!(
        msg_id.map(|v| v.as_str().to_string()),
        Some(format!("{request_id}.reply"))
    );
}
