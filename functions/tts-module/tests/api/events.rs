//! The event contract: both content modes, JSON and MessagePack, the audio itself, sentence order.

use std::time::Duration;

use audio::Wav;
use serde_json::json;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{app, event, send, simulator};

#[tokio::test]
async fn binary_json_request_gets_binary_json_reply_with_a_valid_wav() {
    let app = app(&simulator().await, &[]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .id("evt-1")
            .json(&json!({"text": "Hello there. How are you?"}))
            .binary(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("ce-type"), "ai.tts.response");
    assert_eq!(answer.header("ce-specversion"), "1.0");
    assert_eq!(answer.header("ce-id"), "evt-1.reply");
    assert_eq!(answer.header("content-type"), "application/json");
    let data = answer.json();
    assert_eq!(
        data["request_id"], "evt-1",
        "the event id stands in for a missing request_id"
    );
    assert_eq!(data["chunks"], 2);
    let audio = base64_decode(data["audio"].as_str().expect("audio is base64 in JSON"));
    let wav = Wav::parse(&audio).expect("one valid WAV");
    // The simulator speaks 60 ms per character: "Hello there." (12) + "How are you?" (12).
    assert_eq!(wav.duration_ms(), 24 * 60);
    assert_eq!(data["duration_ms"], 24 * 60);
    assert_eq!(data["sample_rate"], 22050);
}

#[tokio::test]
async fn structured_request_gets_structured_reply() {
    let app = app(&simulator().await, &[]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .id("evt-2")
            .json(&json!({"request_id": "r-2", "text": "Structured."}))
            .structured(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        "application/cloudevents+json"
    );
    let envelope = answer.json();
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["type"], "ai.tts.response");
    assert_eq!(envelope["id"], "evt-2.reply");
    assert_eq!(envelope["datacontenttype"], "application/json");
    assert_eq!(envelope["data"]["request_id"], "r-2");
    let audio = base64_decode(envelope["data"]["audio"].as_str().expect("audio"));
    assert_eq!(Wav::parse(&audio).expect("WAV").duration_ms(), 11 * 60);
}

#[tokio::test]
async fn msgpack_request_gets_msgpack_reply_with_binary_audio() {
    let app = app(&simulator().await, &[]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .msgpack(&json!({"request_id": "mp", "text": "Packed."}))
            .binary(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), "application/msgpack");
    let data: rmpv_like::Reply = rmp_serde::from_slice(&answer.body).expect("msgpack reply");
    assert_eq!(data.request_id, "mp");
    assert_eq!(Wav::parse(&data.audio).expect("WAV").duration_ms(), 7 * 60);

    // In structured mode msgpack data travels base64-encoded as data_base64.
    let answer = send(
        &app,
        event("ai.tts.request")
            .msgpack(&json!({"text": "Packed."}))
            .structured(),
    )
    .await;
    assert_eq!(answer.status, 200);
    let envelope = answer.json();
    assert_eq!(envelope["datacontenttype"], "application/msgpack");
    let bytes = base64_decode(envelope["data_base64"].as_str().expect("data_base64"));
    let data: rmpv_like::Reply = rmp_serde::from_slice(&bytes).expect("msgpack data");
    assert_eq!(Wav::parse(&data.audio).expect("WAV").duration_ms(), 7 * 60);
}

#[tokio::test]
async fn accept_header_can_ask_for_json_from_a_msgpack_request() {
    let app = app(&simulator().await, &[]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .msgpack(&json!({"text": "Hi."}))
            .header("accept", "application/json")
            .binary(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), "application/json");
    assert!(answer.json()["audio"].is_string());
}

#[tokio::test]
async fn long_text_keeps_sentence_order_when_later_sentences_finish_first() {
    let tts = MockServer::start().await;
    let sentences = [
        "One.",
        "Two two.",
        "Three three three.",
        "Four.",
        "Five five.",
    ];
    // The first sentence is the slowest, so completion order is the reverse of text order.
    for (i, s) in sentences.iter().enumerate() {
        let wav = testkit::wav::sine_wav(100 + 10 * i as u32, 16000, 200.0 + 100.0 * i as f32);
        Mock::given(method("GET"))
            .and(path("/api/tts"))
            .and(query_param("text", *s))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_bytes(wav)
                    .set_delay(Duration::from_millis(50 * (sentences.len() - i) as u64)),
            )
            .expect(1)
            .mount(&tts)
            .await;
    }
    let app = app(&tts.uri(), &[("TTS_PARALLELISM", "5")]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"text": sentences.join(" ")}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let audio = base64_decode(answer.json()["audio"].as_str().expect("audio"));
    let got = testkit::wav::samples_i16(&audio).expect("samples");
    let expected: Vec<i16> = (0..sentences.len())
        .flat_map(|i| {
            let wav = testkit::wav::sine_wav(100 + 10 * i as u32, 16000, 200.0 + 100.0 * i as f32);
            testkit::wav::samples_i16(&wav).expect("samples")
        })
        .collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "audio is not in sentence order");
}

#[tokio::test]
async fn openai_style_backend_is_called_with_model_voice_and_wav_format() {
    let tts = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/audio/speech"))
        .and(wiremock::matchers::body_json(json!({
            "model": "tts-1-hd", "input": "Hi.", "voice": "nova", "response_format": "wav"
        })))
        .respond_with(
            ResponseTemplate::new(200).set_body_bytes(testkit::wav::sine_wav(50, 24000, 440.0)),
        )
        .expect(1)
        .mount(&tts)
        .await;
    let app = app(
        &tts.uri(),
        &[("TTS_API", "openai"), ("TTS_MODEL", "tts-1-hd")],
    )
    .await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"text": "Hi.", "voice": "nova"}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["sample_rate"], 24000);
}

#[tokio::test]
async fn coqui_backend_gets_speaker_and_language() {
    let tts = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .and(query_param("speaker_id", "p225"))
        .and(query_param("language_id", "en"))
        .respond_with(
            ResponseTemplate::new(200).set_body_bytes(testkit::wav::sine_wav(50, 22050, 440.0)),
        )
        .expect(1)
        .mount(&tts)
        .await;
    let app = app(&tts.uri(), &[]).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"text": "Hi.", "speaker_id": "p225", "language": "en"}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
}

#[tokio::test]
async fn operational_endpoints_answer() {
    let app = app(&simulator().await, &[]).await;
    let _ = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"text": "Count me."}))
            .binary(),
    )
    .await;
    let get = |p: &str| {
        http::Request::get(p)
            .body(axum::body::Body::empty())
            .expect("request")
    };
    assert_eq!(send(&app, get("/healthz")).await.status, 200);
    assert_eq!(send(&app, get("/readyz")).await.status, 200);
    let metrics = send(&app, get("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("handler_events_total{status=\"200\",type=\"ai.tts.request\"}"),
        "{text}"
    );
    assert!(
        text.contains("handler_backend_calls_total{backend=\"tts\",outcome=\"ok\"}"),
        "{text}"
    );
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

/// The reply as a msgpack consumer would decode it.
mod rmpv_like {
    #[derive(serde::Deserialize)]
    pub struct Reply {
        pub request_id: String,
        #[serde(with = "serde_bytes_vec")]
        pub audio: Vec<u8>,
    }

    mod serde_bytes_vec {
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            handler_kit::event::bytes_field::deserialize(d)
        }
    }
}
