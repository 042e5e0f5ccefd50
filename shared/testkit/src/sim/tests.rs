use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::*;
use crate::wav;

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }

    /// Asserts an OpenAI-style error with `status` and returns its message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert!(body["error"]["type"].is_string(), "{body}");
        body["error"]["message"].as_str().unwrap().to_owned()
    }
}

async fn send_with(config: SimConfig, request: Request<Body>) -> Reply {
    let response = router(config).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    assert_eq!(headers[SIMULATOR_HEADER], SIMULATOR_HEADER_VALUE);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

async fn send(request: Request<Body>) -> Reply {
    send_with(SimConfig::default(), request).await
}

fn post_json(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn post_raw(uri: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

// ---------------------------------------------------------------- general

#[tokio::test]
async fn healthz_is_ok_and_labelled() {
    let reply = send(get("/healthz")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"ok");
}

#[tokio::test]
async fn unknown_route_is_json_404() {
    let message = send(get("/v2/nothing")).await.error(StatusCode::NOT_FOUND);
    assert!(message.contains("/v2/nothing"), "{message}");
}

#[tokio::test]
async fn wrong_method_is_json_405() {
    send(get("/v1/chat/completions"))
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn latency_delays_inference_but_not_health() {
    let config = SimConfig {
        latency: Duration::from_millis(150),
        ..SimConfig::default()
    };
    let start = Instant::now();
    let reply = send_with(config, post_json("/v1/embeddings", &json!({"input": "x"}))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(150));

    let start = Instant::now();
    send_with(config, get("/healthz")).await;
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn spawn_serves_over_tcp() {
    let (addr, server) = spawn(SimConfig::default()).await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    server.abort();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.contains("x-inference-simulator: local stand-in"),
        "{raw}"
    );
    assert!(raw.ends_with("ok"), "{raw}");
}

#[test]
fn config_from_env_defaults_and_overrides() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        move |name: &str| map.get(name).map(|v| (*v).to_owned())
    };
    assert_eq!(
        SimConfig::from_lookup(env(&[])).unwrap(),
        SimConfig::default()
    );
    let config = SimConfig::from_lookup(env(&[
        ("SIM_LATENCY_MS", "25"),
        ("SIM_TOKEN_DELAY_MS", " 5 "),
        ("SIM_SAMPLE_RATE", "16000"),
        ("SIM_EMBEDDING_DIM", "64"),
        ("SIM_MS_PER_CHAR", ""),
    ]))
    .unwrap();
    assert_eq!(
        config,
        SimConfig {
            latency: Duration::from_millis(25),
            token_delay: Duration::from_millis(5),
            sample_rate: 16_000,
            embedding_dim: 64,
            ms_per_char: 60,
        }
    );
    let err = SimConfig::from_lookup(env(&[("SIM_LATENCY_MS", "soon")])).unwrap_err();
    assert!(err.to_string().contains("SIM_LATENCY_MS"), "{err}");
    assert!(SimConfig::from_lookup(env(&[("SIM_EMBEDDING_DIM", "0")])).is_err());
    assert!(SimConfig::from_lookup(env(&[("SIM_SAMPLE_RATE", "0")])).is_err());
}

// ---------------------------------------------------------------- chat

fn chat_request(stream: bool) -> Value {
    json!({
        "model": "llama-test",
        "stream": stream,
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "Answer from the context.\n[1] NATS is a messaging system.\n[3] JetStream adds persistence."},
            {"role": "user", "content": "What is NATS?"},
        ],
    })
}

const EXPECTED_ANSWER: &str = "Simulated answer: What is NATS? [1] [3]";

/// The `data:` payloads of an SSE body, in order.
fn sse_events(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{event:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn chat_non_stream_answers_with_citations_and_usage() {
    let reply = send(post_json("/v1/chat/completions", &chat_request(false))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.content_type().starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "llama-test");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], EXPECTED_ANSWER);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // System prompt: 4 + 6 + 4 words; user: 3 words; answer: 7 tokens.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24})
    );

    let again = send(post_json("/v1/chat/completions", &chat_request(false))).await;
    assert_eq!(again.body, reply.body, "same request, same bytes");
}

#[tokio::test]
async fn chat_uses_last_user_message_and_content_parts() {
    let request = json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "question"}]},
        ],
    });
    let body = send(post_json("/v1/chat/completions", &request))
        .await
        .json();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Simulated answer: second question"
    );
}

#[tokio::test]
async fn chat_stream_reassembles_to_the_non_stream_answer() {
    let reply = send(post_json("/v1/chat/completions", &chat_request(true))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "text/event-stream");
    let events = sse_events(&reply.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let (finish_chunk, token_chunks) = rest.split_last().unwrap();

    assert_eq!(token_chunks.len(), 7, "one chunk per word token");
    assert_eq!(token_chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = token_chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, EXPECTED_ANSWER);
    assert!(
        token_chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    assert_eq!(finish_chunk["choices"][0]["finish_reason"], "stop");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 24);
}

#[tokio::test]
async fn chat_max_tokens_truncates_both_modes() {
    let mut request = chat_request(false);
    request["max_tokens"] = json!(3);
    let body = send(post_json("/v1/chat/completions", &request))
        .await
        .json();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Simulated answer: What"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    request["stream"] = json!(true);
    let events = sse_events(&send(post_json("/v1/chat/completions", &request)).await.body);
    // 3 tokens + finish + usage + [DONE]
    assert_eq!(events.len(), 6);
    let finish: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn chat_stream_waits_token_delay_per_token() {
    let config = SimConfig {
        token_delay: Duration::from_millis(20),
        ..SimConfig::default()
    };
    let start = Instant::now();
    let reply = send_with(
        config,
        post_json("/v1/chat/completions", &chat_request(true)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        start.elapsed() >= Duration::from_millis(7 * 20),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn chat_rejects_bad_input() {
    let bad_json = post_raw("/v1/chat/completions", "application/json", "{not json");
    let message = send(bad_json).await.error(StatusCode::BAD_REQUEST);
    assert!(message.contains("invalid JSON"), "{message}");

    let no_messages = json!({"model": "m", "messages": []});
    send(post_json("/v1/chat/completions", &no_messages))
        .await
        .error(StatusCode::BAD_REQUEST);

    let missing = json!({"model": "m"});
    send(post_json("/v1/chat/completions", &missing))
        .await
        .error(StatusCode::BAD_REQUEST);

    let mut zero = chat_request(false);
    zero["max_tokens"] = json!(0);
    send(post_json("/v1/chat/completions", &zero))
        .await
        .error(StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------- embeddings

async fn embed_all(inputs: &[&str]) -> Vec<Vec<f32>> {
    let reply = send(post_json(
        "/v1/embeddings",
        &json!({"model": "e", "input": inputs}),
    ))
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i);
            assert_eq!(item["object"], "embedding");
            item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn embeddings_are_deterministic_unit_vectors() {
    let request = json!({"model": "e", "input": "Deterministic vectors, please!"});
    let first = send(post_json("/v1/embeddings", &request)).await;
    let second = send(post_json("/v1/embeddings", &request)).await;
    assert_eq!(first.body, second.body);

    let body = first.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "e");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    let vectors = embed_all(&["Deterministic vectors, please!", ""]).await;
    for vector in &vectors {
        assert_eq!(vector.len(), 384);
        assert!((cosine(vector, vector) - 1.0).abs() < 1e-4);
    }
    // Case and punctuation do not matter: only the words do.
    let same = embed_all(&["deterministic VECTORS please"]).await;
    assert_eq!(same[0], vectors[0]);
}

#[tokio::test]
async fn embeddings_rank_the_document_sharing_words_first() {
    let docs = [
        "Bananas are yellow and rich in potassium.",
        "JetStream stream retention limits are configured per stream in NATS.",
        "The weather in Paris is mild in spring.",
    ];
    let mut inputs = vec!["How is JetStream retention configured in NATS?"];
    inputs.extend(docs);
    let vectors = embed_all(&inputs).await;
    let scores: Vec<f32> = vectors[1..]
        .iter()
        .map(|d| cosine(&vectors[0], d))
        .collect();
    assert!(scores[1] > scores[0] && scores[1] > scores[2], "{scores:?}");
}

#[tokio::test]
async fn embeddings_honour_dimensions_and_reject_bad_input() {
    let body = send(post_json(
        "/v1/embeddings",
        &json!({"input": "short", "dimensions": 8}),
    ))
    .await
    .json();
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 8);

    for bad in [
        json!({"input": 42}),
        json!({"input": []}),
        json!({"model": "e"}),
        json!({"input": "x", "encoding_format": "base64"}),
        json!({"input": "x", "dimensions": 0}),
    ] {
        send(post_json("/v1/embeddings", &bad))
            .await
            .error(StatusCode::BAD_REQUEST);
    }
}

// ---------------------------------------------------------------- rerank

#[tokio::test]
async fn tei_rerank_orders_by_overlap_with_ties_by_index() {
    let request = json!({
        "query": "nats jetstream retention",
        "texts": ["cooking pasta", "nats jetstream retention policy", "jetstream basics", "gardening tips"],
    });
    let reply = send(post_json("/rerank", &request)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let results = reply.json();
    let indices: Vec<u64> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [1, 2, 0, 3]);
    let scores: Vec<f64> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!((scores[0] - 0.75).abs() < 1e-6, "{scores:?}");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    assert_eq!(scores[2], 0.0);

    let mut raw = request.clone();
    raw["raw_scores"] = json!(true);
    raw["return_text"] = json!(true);
    let raw = send(post_json("/rerank", &raw)).await.json();
    let raw_indices: Vec<u64> = raw
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(raw_indices, indices);
    assert_eq!(raw[0]["text"], "nats jetstream retention policy");

    send(post_json("/rerank", &json!({"query": "q", "texts": []})))
        .await
        .error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn cohere_rerank_orders_truncates_and_returns_documents() {
    let request = json!({
        "model": "rerank-sim",
        "query": "how to tune jetstream",
        "documents": ["unrelated text", {"text": "tune jetstream limits"}, "how to bake bread"],
        "top_n": 2,
    });
    let body = send(post_json("/v1/rerank", &request)).await.json();
    assert_eq!(body["model"], "rerank-sim");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["index"], 1);
    assert_eq!(results[0]["document"]["text"], "tune jetstream limits");
    assert_eq!(results[1]["index"], 2);
    assert!(
        results[0]["relevance_score"].as_f64().unwrap()
            > results[1]["relevance_score"].as_f64().unwrap()
    );

    let mut bare = request.clone();
    bare["return_documents"] = json!(false);
    bare.as_object_mut().unwrap().remove("top_n");
    let body = send(post_json("/v1/rerank", &bare)).await.json();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r.get("document").is_none()));

    send(post_json(
        "/v1/rerank",
        &json!({"query": "q", "documents": []}),
    ))
    .await
    .error(StatusCode::BAD_REQUEST);
    send(post_json(
        "/v1/rerank",
        &json!({"query": "q", "documents": [7]}),
    ))
    .await
    .error(StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------- transcription

const BOUNDARY: &str = "sim-test-boundary";

fn multipart(fields: &[(&str, &[u8])]) -> Request<Body> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        if *name == "file" {
            body.extend_from_slice(
                b"Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n",
            );
        } else {
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    post_raw(
        "/v1/audio/transcriptions",
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        body,
    )
}

#[tokio::test]
async fn transcription_reports_the_audio_duration() {
    let audio = wav::sine_wav(1_234, 16_000, 440.0);
    let reply = send(multipart(&[("model", b"whisper-1"), ("file", &audio)])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({"text": "simulated transcript of 1230 ms"})
    );

    let reply = send(multipart(&[
        ("file", &audio),
        ("model", b"whisper-1"),
        ("language", b"de"),
        ("response_format", b"verbose_json"),
    ]))
    .await;
    let body = reply.json();
    assert_eq!(body["text"], "simulated transcript of 1230 ms");
    assert_eq!(body["language"], "de");
    assert!((body["duration"].as_f64().unwrap() - 1.23).abs() < 1e-9);

    let reply = send(multipart(&[("file", &audio), ("response_format", b"text")])).await;
    assert!(reply.content_type().starts_with("text/plain"));
    assert_eq!(&reply.body[..], b"simulated transcript of 1230 ms");
}

#[tokio::test]
async fn transcription_rejects_bad_input() {
    send(multipart(&[("model", b"whisper-1")]))
        .await
        .error(StatusCode::BAD_REQUEST);
    send(multipart(&[("file", b"RIFF but not really")]))
        .await
        .error(StatusCode::BAD_REQUEST);
    let audio = wav::silence_wav(100, 8_000);
    send(multipart(&[("file", &audio), ("response_format", b"srt")]))
        .await
        .error(StatusCode::BAD_REQUEST);
    send(post_json("/v1/audio/transcriptions", &json!({"file": "x"})))
        .await
        .error(StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------- TTS

fn assert_wav(reply: &Reply, duration_ms: u64) -> Vec<i16> {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.content_type(), "audio/wav");
    let info = wav::wav_info(&reply.body).unwrap();
    assert_eq!(
        (
            info.sample_rate,
            info.channels,
            info.bits_per_sample,
            info.duration_ms
        ),
        (22_050, 1, 16, duration_ms)
    );
    let samples = wav::samples_i16(&reply.body).unwrap();
    assert!(
        samples.iter().any(|s| s.unsigned_abs() > 1_000),
        "audible tone"
    );
    samples
}

#[tokio::test]
async fn coqui_tts_get_post_and_header_agree() {
    // 11 chars * 60 ms
    let by_query = send(get(
        "/api/tts?text=hello%20world&speaker_id=p225&language_id=en",
    ))
    .await;
    let samples = assert_wav(&by_query, 660);

    let by_form = send(post_raw(
        "/api/tts",
        "application/x-www-form-urlencoded",
        "text=hello+world&speaker_id=p225",
    ))
    .await;
    assert_wav(&by_form, 660);
    assert_eq!(by_form.body, by_query.body);

    let by_post_query = send(post_raw("/api/tts?text=hello%20world", "text/plain", "")).await;
    assert_eq!(by_post_query.body, by_query.body);

    let by_header = Request::post("/api/tts")
        .header("text", "hello world")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(by_header).await.body, by_query.body);

    let other = send(get("/api/tts?text=goodbye%20world")).await;
    assert_ne!(
        assert_wav(&other, 780),
        samples[..],
        "pitch follows the text"
    );
}

#[tokio::test]
async fn coqui_tts_has_a_minimum_duration_and_rejects_empty_text() {
    assert_wav(&send(get("/api/tts?text=a")).await, 100);
    send(get("/api/tts")).await.error(StatusCode::BAD_REQUEST);
    send(get("/api/tts?text="))
        .await
        .error(StatusCode::BAD_REQUEST);
    let too_long = format!("/api/tts?text={}", "a".repeat(20_000));
    send(get(&too_long)).await.error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn openai_speech_returns_wav() {
    let request = json!({"model": "tts-1", "input": "hello world", "voice": "alloy", "response_format": "wav"});
    let reply = send(post_json("/v1/audio/speech", &request)).await;
    assert_wav(&reply, 660);
    let coqui = send(get("/api/tts?text=hello%20world")).await;
    assert_eq!(
        reply.body, coqui.body,
        "same text, same audio in both styles"
    );

    let no_format =
        json!({"model": "tts-1", "input": "hello world", "voice": "alloy", "speed": 2.0});
    assert_wav(&send(post_json("/v1/audio/speech", &no_format)).await, 330);
}

#[tokio::test]
async fn openai_speech_rejects_bad_input() {
    for bad in [
        json!({"model": "tts-1", "input": "hi", "voice": "alloy", "response_format": "mp3"}),
        json!({"model": "tts-1", "input": "", "voice": "alloy"}),
        json!({"model": "tts-1", "voice": "alloy"}),
        json!({"model": "tts-1", "input": "hi", "voice": "alloy", "speed": 10.0}),
    ] {
        send(post_json("/v1/audio/speech", &bad))
            .await
            .error(StatusCode::BAD_REQUEST);
    }
}
