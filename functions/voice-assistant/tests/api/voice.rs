//! Speech in, sentence-streamed speech out.

use std::time::{Duration, Instant};

use audio::Wav;
use axum::Router;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use testkit::nats_server::{NatsServer, assert_nothing_published};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) async fn app(sim: &str, llm: &str, nats: Option<&str>) -> Router {
    app_with(sim, llm, nats, &[]).await
}

async fn app_with(sim: &str, llm: &str, nats: Option<&str>, extra: &[(&str, &str)]) -> Router {
    let mut env = vec![
        ("STT_URL", sim.to_string()),
        ("TTS_URL", sim.to_string()),
        ("EMBED_URL", sim.to_string()),
        ("LLM_URL", llm.to_string()),
        // Retrieval is off in these requests; the URL only has to be well-formed.
        ("MILVUS_URL", "http://127.0.0.1:9".to_string()),
    ];
    if let Some(url) = nats {
        env.push(("NATS_URL", url.to_string()));
    }
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let config = handler_kit::config::load(&env, voice_assistant::Config::read).expect("config");
    voice_assistant::app(voice_assistant::State::new(config).await.expect("state"))
}

pub(crate) async fn post(app: &Router, data: Value) -> (u16, Value) {
    let request = testkit::cloudevent::event("ai.voice.request")
        .json(&data)
        .binary();
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))),
    )
}

pub(crate) async fn simulator() -> String {
    let (addr, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("sim");
    format!("http://{addr}")
}

#[derive(Debug, serde::Deserialize)]
struct Chunk {
    seq: u64,
    #[serde(deserialize_with = "handler_kit::event::bytes_field::deserialize")]
    audio: Vec<u8>,
    text: Option<String>,
    done: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_end_to_end_on_the_simulator() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.voice.response.stream.v1")
        .await
        .expect("sub");
    let mut replies = client.subscribe("ai.voice.response.v1").await.expect("sub");
    client.flush().await.expect("flush");
    let sim = simulator().await;
    let url = nats.url();
    let app = app(&sim, &sim, Some(&url)).await;
    let audio = testkit::fixtures::speech("two-utterances-16k.wav");
    let (status, data) = post(
        &app,
        json!({"request_id": "v1", "audio": b64(&audio), "enable_rag": false}),
    )
    .await;
    assert_eq!(status, 200, "{data}");
    let transcript = data["transcript"].as_str().expect("transcript");
    // Two utterances, each transcribed by the simulator from its duration.
    assert_eq!(
        transcript.matches("simulated transcript of").count(),
        2,
        "{transcript}"
    );
    assert_eq!(data["response"], format!("Simulated answer: {transcript}"));
    let reply_audio = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(data["audio"].as_str().expect("audio"))
            .expect("base64")
    };
    let merged = Wav::parse(&reply_audio).expect("one WAV");
    for stage in ["stt", "ttft", "first_audio", "total"] {
        assert!(data["timings_ms"][stage].is_u64(), "{stage}");
    }

    let mut frames = 0;
    let mut spoken = String::new();
    let mut expected_seq = 0;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("chunk")
            .expect("open");
        let chunk: Chunk = rmp_serde::from_slice(&msg.payload).expect("msgpack");
        assert_eq!(chunk.seq, expected_seq);
        expected_seq += 1;
        if chunk.done {
            assert!(chunk.audio.is_empty());
            break;
        }
        frames += Wav::parse(&chunk.audio).expect("each chunk plays").frames();
        if let Some(t) = chunk.text {
            spoken.push_str(&t);
            spoken.push(' ');
        }
    }
    assert_eq!(
        frames,
        merged.frames(),
        "the stream carries exactly the reply's audio"
    );
    assert_eq!(spoken.trim(), data["response"].as_str().unwrap_or_default());
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("reply")
        .expect("open");
    #[derive(serde::Deserialize)]
    struct Published {
        transcript: String,
        audio_subject: Option<String>,
    }
    let published: Published = rmp_serde::from_slice(&reply.payload).expect("msgpack reply");
    assert_eq!(published.transcript, transcript);
    assert!(published.audio_subject.is_none(), "small audio is inlined");
}

/// What a scripted LLM does, step by step, after sending its response headers.
#[derive(Debug, Clone, Copy)]
enum Llm {
    /// Streams this text as one delta.
    Say(&'static str),
    /// Waits this long.
    Pause(Duration),
    /// Never says anything more (and never closes).
    Hang,
    /// Ends the response cleanly but without `[DONE]` or a finish reason: a broken stream.
    Break,
}

/// An OpenAI-style streaming LLM that follows `script` (then `[DONE]`) for every request;
/// also returns how many requests it received.
async fn scripted_llm(
    script: Vec<Llm>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (script, counter) = (script.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let _ = socket.write_all(head.as_bytes()).await;
                let chunk = |e: &str| format!("{:x}\r\n{e}\r\n", e.len());
                for step in script {
                    match step {
                        Llm::Say(t) => {
                            let e = format!(
                                "data: {}\n\n",
                                json!({"choices": [{"index": 0, "delta": {"content": t}}]})
                            );
                            let _ = socket.write_all(chunk(&e).as_bytes()).await;
                            let _ = socket.flush().await;
                        }
                        Llm::Pause(d) => tokio::time::sleep(d).await,
                        Llm::Hang => std::future::pending::<()>().await,
                        Llm::Break => {
                            let _ = socket.write_all(b"0\r\n\r\n").await;
                            return;
                        }
                    }
                }
                let done = chunk("data: [DONE]\n\n");
                let _ = socket
                    .write_all(format!("{done}0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    (url, calls)
}

/// An LLM that says one sentence at once and then writes slowly.
async fn slow_llm() -> String {
    let mut script = vec![Llm::Say("Here is the first sentence. ")];
    for word in [
        "Then ", "a ", "slow ", "second ", "one ", "follows ", "word ", "by ", "word.",
    ] {
        script.push(Llm::Pause(Duration::from_millis(150)));
        script.push(Llm::Say(word));
    }
    scripted_llm(script).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sentence_is_heard_before_the_llm_finishes() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.voice.response.stream.v2")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let sim = simulator().await;
    let llm = slow_llm().await;
    let url = nats.url();
    let app = app(&sim, &llm, Some(&url)).await;
    let audio = testkit::fixtures::speech("two-utterances-16k.wav");
    let started = Instant::now();
    let call = tokio::spawn(async move {
        post(
            &app,
            json!({"request_id": "v2", "audio": b64(&audio), "enable_rag": false}),
        )
        .await
    });
    let first = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("first audio")
        .expect("open");
    let first_at = started.elapsed();
    let chunk: Chunk = rmp_serde::from_slice(&first.payload).expect("chunk");
    assert_eq!(chunk.text.as_deref(), Some("Here is the first sentence."));
    let (status, data) = call.await.expect("task");
    let done_at = started.elapsed();
    assert_eq!(status, 200, "{data}");
    // The LLM needs 9 x 150 ms after its first sentence: the first audio must come well before.
    assert!(
        first_at + Duration::from_millis(900) < done_at,
        "first audio {first_at:?}, answer {done_at:?}"
    );
    let (first, total) = (
        data["timings_ms"]["first_audio"].as_u64(),
        data["timings_ms"]["total"].as_u64(),
    );
    assert!(
        first.zip(total).is_some_and(|(first, total)| first < total),
        "{first:?} then {total:?}"
    );
}

#[tokio::test]
async fn bad_or_silent_audio_is_rejected() {
    let sim = simulator().await;
    let app = app(&sim, &sim, None).await;
    let (status, data) = post(&app, json!({"audio": b64(b"not audio")})).await;
    assert_eq!(status, 422, "{data}");
    let silence = testkit::wav::silence_wav(2000, 16_000);
    let (status, data) = post(&app, json!({"audio": b64(&silence)})).await;
    assert_eq!(status, 422, "{data}");
    assert!(
        data["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no speech"),
        "{data}"
    );
}

/// Receives the next stream message, or fails after a generous deadline.
async fn next_chunk(stream: &mut async_nats::Subscriber) -> Chunk {
    let msg = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a stream message in time")
        .expect("open");
    rmp_serde::from_slice(&msg.payload).expect("msgpack chunk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_after_audio_was_heard_ends_the_stream_and_is_final() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.voice.response.stream.late")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let sim = simulator().await;
    // One sentence at once, then an LLM that never finishes: the deadline fires mid-answer.
    let (llm, _) = scripted_llm(vec![
        Llm::Say("Here is the first sentence. "),
        Llm::Say("Then "),
        Llm::Hang,
    ])
    .await;
    let url = nats.url();
    let app = app_with(&sim, &llm, Some(&url), &[("EVENT_TIMEOUT_MS", "5000")]).await;
    let audio = testkit::fixtures::speech("two-utterances-16k.wav");
    let (status, data) = post(
        &app,
        json!({"request_id": "late", "audio": b64(&audio), "enable_rag": false}),
    )
    .await;
    // Final (422), not a retryable 504: the listener heard the first sentence already.
    assert_eq!(status, 422, "{data}");
    assert_eq!(data["error"], "stream_interrupted", "{data}");
    let first = next_chunk(&mut stream).await;
    assert_eq!(first.seq, 0);
    assert_eq!(first.text.as_deref(), Some("Here is the first sentence."));
    assert!(!first.done);
    let end = next_chunk(&mut stream).await;
    assert_eq!(end.seq, 1);
    assert!(end.done, "the stream is ended for the listener");
    assert!(end.audio.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_before_any_audio_is_retryable_and_silent() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.voice.response.stream.early")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let sim = simulator().await;
    let (llm, calls) = scripted_llm(vec![Llm::Hang]).await;
    let url = nats.url();
    let app = app_with(&sim, &llm, Some(&url), &[("EVENT_TIMEOUT_MS", "3000")]).await;
    let audio = testkit::fixtures::speech("two-utterances-16k.wav");
    let (status, data) = post(
        &app,
        json!({"request_id": "early", "audio": b64(&audio), "enable_rag": false}),
    )
    .await;
    assert_eq!(status, 504, "{data}");
    assert_eq!(data["error"], "deadline_exceeded", "{data}");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the deadline fired while the LLM was answering"
    );
    assert_nothing_published(&client, &mut stream, "ai.voice.response.stream.early").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_failure_before_any_sentence_is_spoken_is_retryable_and_silent() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut stream = client
        .subscribe("ai.voice.response.stream.broken")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let sim = simulator().await;
    // Text arrives, but no sentence is complete when the stream breaks: nothing was spoken.
    let (llm, calls) = scripted_llm(vec![Llm::Say("Here is an unfinished "), Llm::Break]).await;
    let url = nats.url();
    let app = app(&sim, &llm, Some(&url)).await;
    let audio = testkit::fixtures::speech("two-utterances-16k.wav");
    let (status, data) = post(
        &app,
        json!({"request_id": "broken", "audio": b64(&audio), "enable_rag": false}),
    )
    .await;
    assert_eq!(status, 502, "{data}");
    assert_eq!(data["error"], "backend_error", "{data}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_nothing_published(&client, &mut stream, "ai.voice.response.stream.broken").await;
}
