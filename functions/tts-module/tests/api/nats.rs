//! Publishing on a real nats-server: stream chunks in order, the reply, and payload limits.

use std::time::Duration;

use audio::Wav;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use testkit::nats_server::{NatsOptions, NatsServer};

use crate::support::{app, assert_error, event, send, simulator};

#[derive(Debug, Deserialize)]
struct Chunk {
    request_id: String,
    seq: usize,
    #[serde(deserialize_with = "handler_kit::event::bytes_field::deserialize")]
    audio: Vec<u8>,
    done: bool,
}

#[derive(Debug, Deserialize)]
struct Reply {
    request_id: String,
    #[serde(
        default,
        deserialize_with = "handler_kit::event::bytes_field::deserialize"
    )]
    audio: Vec<u8>,
    audio_subject: Option<String>,
    duration_ms: u64,
    chunks: usize,
}

async fn next_message(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("message in time")
        .expect("subscription open")
}

async fn collect_stream(sub: &mut async_nats::Subscriber) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    loop {
        let msg = next_message(sub).await;
        let chunk: Chunk = rmp_serde::from_slice(&msg.payload).expect("msgpack chunk");
        let done = chunk.done;
        chunks.push(chunk);
        if done {
            return chunks;
        }
    }
}

#[tokio::test]
async fn streamed_chunks_arrive_in_order_and_the_reply_is_published() {
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.tts.response.stream.r-7")
        .await
        .expect("sub");
    let mut replies = client.subscribe("ai.tts.response.r-7").await.expect("sub");
    client.flush().await.expect("flush");

    let app = app(
        &simulator().await,
        &[("NATS_URL", &nats.url()), ("TTS_PARALLELISM", "3")],
    )
    .await;
    let text = "First sentence. Second one here! A third? And the fourth.";
    let answer = send(
        &app,
        event("ai.tts.request")
            .msgpack(&json!({"request_id": "r-7", "text": text, "stream": true}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    let chunks = collect_stream(&mut stream).await;
    assert_eq!(chunks.len(), 4);
    let mut frames = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.seq, i);
        assert_eq!(chunk.request_id, "r-7");
        assert_eq!(chunk.done, i == 3);
        frames += Wav::parse(&chunk.audio)
            .expect("each chunk is a WAV")
            .frames();
    }
    // Chunk i is sentence i: the simulator speaks 60 ms per character.
    let first = Wav::parse(&chunks[0].audio).expect("WAV");
    assert_eq!(first.duration_ms(), "First sentence.".len() as u64 * 60);

    let msg = next_message(&mut replies).await;
    let headers = msg.headers.clone().expect("headers");
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("r-7.reply")
    );
    assert_eq!(
        headers.get("Content-Type").map(|v| v.as_str()),
        Some("application/msgpack")
    );
    let reply: Reply = rmp_serde::from_slice(&msg.payload).expect("msgpack reply");
    assert_eq!(reply.request_id, "r-7");
    assert_eq!(reply.chunks, 4);
    let merged = Wav::parse(&reply.audio).expect("merged WAV");
    assert_eq!(merged.frames(), frames);
    assert_eq!(reply.duration_ms, merged.duration_ms());
    assert!(reply.audio_subject.is_none());
}

#[tokio::test]
async fn audio_over_max_payload_is_never_inlined() {
    let nats = NatsServer::start_with(NatsOptions {
        max_payload: Some(32 * 1024),
        ..NatsOptions::default()
    })
    .await
    .expect("nats-server");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.tts.response.stream.big")
        .await
        .expect("sub");
    let mut replies = client.subscribe("ai.tts.response.big").await.expect("sub");
    client.flush().await.expect("flush");

    let app = app(&simulator().await, &[("NATS_URL", &nats.url())]).await;
    // ~6 s of 22.05 kHz 16-bit audio: about 260 KB, far over the 32 KiB limit.
    let text = "This sentence is long enough to need many pieces. So is this other one here.";
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"request_id": "big", "text": text}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let http_duration = answer.json()["duration_ms"].as_u64().expect("duration");

    let reply_msg = next_message(&mut replies).await;
    assert!(reply_msg.payload.len() <= 32 * 1024);
    let reply: Reply = rmp_serde::from_slice(&reply_msg.payload).expect("reply");
    assert!(reply.audio.is_empty(), "audio inlined over max payload");
    assert_eq!(
        reply.audio_subject.as_deref(),
        Some("ai.tts.response.stream.big")
    );

    let mut total_ms = 0;
    let mut count = 0;
    loop {
        let msg = next_message(&mut stream).await;
        assert!(
            msg.payload.len() <= 32 * 1024,
            "{} bytes",
            msg.payload.len()
        );
        let chunk: Chunk = rmp_serde::from_slice(&msg.payload).expect("chunk");
        assert_eq!(chunk.seq, count);
        count += 1;
        total_ms +=
            Wav::parse(&chunk.audio).expect("piece is a WAV").frames() as u64 * 1000 / 22050;
        if chunk.done {
            break;
        }
    }
    assert!(count > 5, "{count} pieces");
    // Each piece rounds down by under a millisecond.
    assert!(
        http_duration - total_ms < count as u64 + 1,
        "{http_duration} vs {total_ms}"
    );
}

#[tokio::test]
async fn nats_outage_is_a_fast_retryable_503() {
    let port = testkit::nats_server::free_port().expect("port");
    let url = format!("nats://127.0.0.1:{port}");
    let app = app(&simulator().await, &[("NATS_URL", &url)]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"text": "Hi."}))
            .binary(),
    )
    .await;
    assert_error(&answer, 503, "backend_unavailable");
    assert!(!answer.header("retry-after").is_empty());
}
