//! What the test sends and what it reads back: good `ai.tts.request` messages, poison
//! messages (one per way a message can be bad), the replies stored and the dead letters.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;

/// The request subject and streams, as in `knative/tts-module/source/`.
pub const SUBJECT: &str = "ai.tts.request";
pub const STREAM: &str = "AI_TTS";
pub const DLQ_STREAM: &str = "AI_TTS_DLQ";
pub const CONSUMER: &str = "tts-module";
/// Stores tts-module's replies, `ai.tts.response.{request_id}`, so they can be counted.
pub const REPLY_STREAM: &str = "AI_TTS_REPLIES";

/// The good request `i`: its id (also its `Nats-Msg-Id`) and its msgpack payload.
pub fn good(i: usize) -> (String, Vec<u8>) {
    let id = format!("req-{i}");
    let payload = serde_json::json!({"request_id": id, "text": format!("Request number {i}.")});
    (id, rmp_serde::to_vec_named(&payload).expect("msgpack"))
}

/// A message no delivery can succeed with; it must end in the DLQ, once.
pub struct Poison {
    pub name: &'static str,
    /// `Nats-Msg-Id`, possibly one no HTTP header can carry.
    pub msg_id: &'static str,
    pub content_type: Option<&'static str>,
    pub payload: Vec<u8>,
}

pub fn poison() -> Vec<Poison> {
    let msgpack = |v: serde_json::Value| rmp_serde::to_vec_named(&v).expect("msgpack");
    let structured = serde_json::json!({
        "specversion": "1.0",
        "id": "poison\nnewline",
        "source": "/cluster-faults",
        "type": SUBJECT,
        "datacontenttype": "application/json",
        "data": {"request_id": "poison-ce-newline", "text": "An id with a newline."},
    });
    vec![
        // tts-module: 422.
        Poison {
            name: "empty text",
            msg_id: "poison-empty",
            content_type: None,
            payload: msgpack(serde_json::json!({"request_id": "poison-empty", "text": ""})),
        },
        // 0xc1 is never used in msgpack: tts-module cannot decode it (400).
        Poison {
            name: "undecodable msgpack",
            msg_id: "poison-undecodable",
            content_type: None,
            payload: vec![0xc1, 0xff, 0x00],
        },
        // A control character no HTTP header can carry as `ce-id`. (CR or LF would be the
        // obvious ones, and nats-server stores them as sent, but async-nats 0.51 cannot
        // receive such a message at all: a lone CR panics its connection task, an LF makes
        // it drop the connection; nats-io/nats.rs#1612. No source built on it can
        // dead-letter what never reaches it, so those are not part of this test.)
        Poison {
            name: "NUL in Nats-Msg-Id",
            msg_id: "poison-\0nul",
            content_type: None,
            payload: msgpack(
                serde_json::json!({"request_id": "poison-nul", "text": "A NUL in the id."}),
            ),
        },
        Poison {
            name: "LF in a structured CloudEvent's id",
            msg_id: "poison-ce-newline",
            content_type: Some("application/cloudevents+json"),
            payload: serde_json::to_vec(&structured).expect("json"),
        },
        Poison {
            name: "10 KB request_id",
            msg_id: "poison-long-id",
            content_type: None,
            payload: msgpack(
                serde_json::json!({"request_id": "r".repeat(10 * 1024), "text": "A long id."}),
            ),
        },
    ]
}

/// Creates the request, DLQ and reply streams with three replicas, and the durable consumer,
/// with the settings of `knative/tts-module/source/jetstream.yaml` (the source binds to them,
/// `CREATE=false`).
pub async fn declare(js: &jetstream::Context) {
    use jetstream::stream::{Config, RetentionPolicy, StorageType};
    let stream = |name: &str, subject: &str, retention| Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: StorageType::File,
        retention,
        duplicate_window: Duration::from_secs(120),
        num_replicas: 3,
        ..Default::default()
    };
    let requests = js
        .create_stream(Config {
            max_age: Duration::from_secs(24 * 3600),
            ..stream(STREAM, SUBJECT, RetentionPolicy::WorkQueue)
        })
        .await
        .expect("request stream");
    js.create_stream(Config {
        max_age: Duration::from_secs(336 * 3600),
        ..stream(DLQ_STREAM, "dlq.AI_TTS.>", RetentionPolicy::Limits)
    })
    .await
    .expect("DLQ stream");
    js.create_stream(stream(
        REPLY_STREAM,
        "ai.tts.response.>",
        RetentionPolicy::Limits,
    ))
    .await
    .expect("reply stream");
    requests
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            filter_subject: SUBJECT.into(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .expect("consumer");
}

/// Publishes `good` requests with the poison messages spread among them, each stored
/// (PubAck) before this returns.
pub async fn publish(js: &jetstream::Context, good: usize, poison: &[Poison]) {
    let every = good / (poison.len() + 1);
    let mut acks = Vec::with_capacity(512);
    let mut next_poison = poison.iter();
    for i in 0..good {
        if i > 0
            && i % every == 0
            && let Some(p) = next_poison.next()
        {
            for ack in acks.drain(..) {
                stored(ack).await;
            }
            publish_poison(js, p).await;
        }
        let (id, payload) = self::good(i);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(SUBJECT, headers, payload.into())
                .await
                .expect("publish"),
        );
        if acks.len() == 512 {
            for ack in acks.drain(..) {
                stored(ack).await;
            }
        }
    }
    for ack in acks {
        stored(ack).await;
    }
    for p in next_poison {
        publish_poison(js, p).await;
    }
}

async fn stored(ack: jetstream::context::PublishAckFuture) {
    let ack = ack.await.expect("stored");
    assert!(!ack.duplicate, "seq {} stored twice", ack.sequence);
}

async fn publish_poison(js: &jetstream::Context, p: &Poison) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", p.msg_id);
    if let Some(ct) = p.content_type {
        headers.insert("Content-Type", ct);
    }
    stored(
        js.publish_with_headers(SUBJECT, headers, p.payload.clone().into())
            .await
            .expect("publish"),
    )
    .await;
}

/// Stored replies per request id (from the reply stream's per-subject counts).
pub async fn replies(js: &jetstream::Context) -> HashMap<String, u64> {
    let stream = js.get_stream(REPLY_STREAM).await.expect("reply stream");
    let mut subjects = stream
        .info_with_subjects("ai.tts.response.>")
        .await
        .expect("reply subjects");
    let mut out = HashMap::new();
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.expect("subject count");
        let id = subject.strip_prefix("ai.tts.response.").unwrap_or(&subject);
        out.insert(id.to_string(), count as u64);
    }
    out
}

/// Messages in `stream` now.
pub async fn stored_messages(js: &jetstream::Context, stream: &str) -> Option<u64> {
    let info = js.get_stream(stream).await.ok()?.get_info().await.ok()?;
    Some(info.state.messages)
}

/// Every dead letter, as (payload, `Dlq-Reason`, `Dlq-Deliveries`).
pub async fn dead_letters(js: &jetstream::Context) -> Vec<(Vec<u8>, String, String)> {
    let expected = stored_messages(js, DLQ_STREAM).await.unwrap_or(0);
    let stream = js.get_stream(DLQ_STREAM).await.expect("DLQ stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .expect("DLQ reader");
    let mut out = Vec::new();
    let mut messages = consumer.messages().await.expect("DLQ messages");
    while (out.len() as u64) < expected {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        out.push((
            m.payload.to_vec(),
            header("Dlq-Reason"),
            header("Dlq-Deliveries"),
        ));
        let _ = m.ack().await;
    }
    out
}
