//! Ids that name subjects, `Nats-Msg-Id`s and KV keys (`request_id`, `session_id`) are checked
//! before the audio is decoded or NATS touched: a bad one is a final 422 naming it.

use serde_json::json;
use testkit::nats_server::{NatsServer, assert_nothing_published};

use crate::recording::b64;
use crate::support::{app, assert_error, event, send, simulator};

#[tokio::test]
async fn bad_request_and_session_ids_are_422_and_nothing_is_published() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut published = client.subscribe(">").await.expect("sub");
    client.flush().await.expect("flush");
    let stt = wiremock::MockServer::start().await;
    let app = app(&stt.uri(), &[("NATS_URL", nats.url().as_str())]).await;
    let audio = b64(&testkit::fixtures::speech("two-utterances-16k.wav"));
    for bad in ["a\nb".to_string(), "x".repeat(6000)] {
        let recording = event("ai.stt.request")
            .json(&json!({"request_id": bad, "audio": audio}))
            .binary();
        let chunk = event("ai.stt.chunk")
            .json(&json!({"session_id": bad, "seq": 0, "audio": audio}))
            .binary();
        for (request, field) in [(recording, "request_id"), (chunk, "session_id")] {
            let answer = send(&app, request).await;
            assert_error(&answer, 422, "unprocessable");
            assert!(
                answer.json()["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(field)),
                "{}",
                answer.json()
            );
        }
    }
    assert!(
        stt.received_requests()
            .await
            .expect("wiremock records requests")
            .is_empty()
    );
    // Nothing reached NATS: no reply, no transcript, no session-bucket request.
    assert_nothing_published(&client, &mut published, "test.sentinel").await;
}

/// Published to `ai.stt.response.{request_id}` on the way: a failed publish would not be 200.
#[tokio::test]
async fn a_request_id_at_the_cap_is_transcribed() {
    let nats = NatsServer::start().await.expect("nats");
    let request_id = "s".repeat(handler_kit::event::MAX_ID_LEN);
    let app = app(&simulator().await, &[("NATS_URL", nats.url().as_str())]).await;
    let audio = b64(&testkit::fixtures::speech("two-utterances-16k.wav"));
    let request = json!({"request_id": request_id, "audio": audio});
    let answer = send(&app, event("ai.stt.request").json(&request).binary()).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["request_id"], request_id.as_str());
}
