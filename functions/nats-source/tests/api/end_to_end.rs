//! msgpack on `ai.tts.request` -> nats-source -> tts-module -> reply on `ai.tts.response.{id}`.

use std::time::Duration;

use futures::StreamExt as _;
use testkit::nats_server::NatsServer;

use crate::support::Source;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tts_request_published_as_msgpack_gets_its_reply_on_nats() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let (sim, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("sim");
    let sim_url = format!("http://{sim}");
    let env = [("TTS_URL", sim_url.as_str()), ("NATS_URL", &nats.url())];
    let config =
        handler_kit::config::load(&env.to_vec(), tts_module::Config::read).expect("config");
    let tts = tts_module::app(tts_module::State::new(config).await.expect("state"));
    let tts_url = testkit::cloudevent::serve(tts)
        .await
        .expect("serve tts-module");

    let source = Source::start(
        &nats.url(),
        &tts_url,
        &[
            ("STREAM", "AI_TTS"),
            ("CONSUMER", "tts-module"),
            ("SUBJECTS", "ai.tts.request"),
            ("DLQ_SUBJECT", "dlq.{stream}.{subject}"),
        ],
    );
    source.ready().await;
    let mut replies = client
        .subscribe("ai.tts.response.e2e-1")
        .await
        .expect("sub");
    client.flush().await.expect("flush");

    let request = serde_json::json!({"request_id": "e2e-1", "text": "From NATS to speech."});
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        "ai.tts.request",
        rmp_serde::to_vec_named(&request).expect("msgpack").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
        .await
        .expect("reply in time")
        .expect("subscription open");
    #[derive(serde::Deserialize)]
    struct Reply {
        request_id: String,
        #[serde(deserialize_with = "handler_kit::event::bytes_field::deserialize")]
        audio: Vec<u8>,
        duration_ms: u64,
    }
    let reply: Reply = rmp_serde::from_slice(&reply.payload).expect("msgpack reply");
    assert_eq!(reply.request_id, "e2e-1");
    assert_eq!(reply.duration_ms, 20 * 60);
    assert!(audio::Wav::parse(&reply.audio).is_ok());
    source.stop().await;
}
