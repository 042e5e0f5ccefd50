//! The `request_id` names the audio stream, the reply subject and their `Nats-Msg-Id`s, so it is
//! checked before the audio is transcribed: a bad one is a final 422 naming it, and nothing is
//! spoken or published.

use serde_json::json;
use testkit::nats_server::{NatsServer, assert_nothing_published};

use crate::voice::{app, b64, post, simulator};

#[tokio::test]
async fn a_request_id_with_a_newline_or_over_the_cap_is_422_before_any_backend_call() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut published = client.subscribe(">").await.expect("sub");
    client.flush().await.expect("flush");
    // STT, TTS, embeddings and the LLM all on one wiremock without mocks: any call shows.
    let backends = wiremock::MockServer::start().await;
    let app = app(&backends.uri(), &backends.uri(), Some(&nats.url())).await;
    let audio = b64(&testkit::fixtures::speech("two-utterances-16k.wav"));
    for request_id in ["a\nb".to_string(), "x".repeat(6000)] {
        let (status, data) = post(
            &app,
            json!({"request_id": request_id, "audio": audio, "enable_rag": false}),
        )
        .await;
        assert_eq!(status, 422, "{data}");
        assert_eq!(data["error"], "unprocessable");
        assert!(
            data["detail"]
                .as_str()
                .is_some_and(|d| d.contains("request_id")),
            "{data}"
        );
    }
    let calls = backends
        .received_requests()
        .await
        .expect("wiremock records requests");
    assert!(calls.is_empty(), "a bad id reached a backend: {calls:?}");
    assert_nothing_published(&client, &mut published, "test.sentinel").await;
}

/// Streamed and published under the id on the way: a failed publish would not be 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_at_the_cap_is_answered() {
    let nats = NatsServer::start().await.expect("nats");
    let request_id = "v".repeat(handler_kit::event::MAX_ID_LEN);
    let sim = simulator().await;
    let app = app(&sim, &sim, Some(&nats.url())).await;
    let audio = b64(&testkit::fixtures::speech("two-utterances-16k.wav"));
    let request = json!({"request_id": request_id, "audio": audio, "enable_rag": false});
    let (status, data) = post(&app, request).await;
    assert_eq!(status, 200, "{data}");
    assert_eq!(data["request_id"], request_id.as_str());
}
