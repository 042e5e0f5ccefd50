//! One-shot transcription: VAD finds the utterances, silence is not forwarded, bad audio is 4xx.

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{app, assert_error, event, send, simulator};

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn utterances_are_found_and_only_speech_is_forwarded() {
    let stt = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/audio/transcriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"text": " words "})))
        .mount(&stt)
        .await;
    let app = app(&stt.uri(), &[]).await;
    // Real speech between long pauses, as a voice note has: 3 s of silence either side.
    let speech =
        audio::Wav::parse(&testkit::fixtures::speech("two-utterances-16k.wav")).expect("fixture");
    let mut samples = vec![0i16; 48_000];
    samples.extend(speech.to_mono_i16());
    samples.extend(vec![0i16; 48_000]);
    let audio = audio::encode_pcm16(&samples, 16_000).expect("encode");
    let answer = send(
        &app,
        event("ai.stt.request")
            .json(&json!({"request_id": "r1", "audio": b64(&audio)}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let data = answer.json();
    assert_eq!(data["request_id"], "r1");
    assert_eq!(data["segments"].as_array().map(Vec::len), Some(2), "{data}");
    assert_eq!(data["text"], "words words");
    let audio_ms = data["audio_ms"].as_u64().expect("audio_ms");
    let speech_ms = data["speech_ms"].as_u64().expect("speech_ms");
    assert!(
        speech_ms < audio_ms / 2,
        "speech {speech_ms} of {audio_ms} ms"
    );
    let received = stt
        .received_requests()
        .await
        .expect("wiremock records requests");
    assert_eq!(received.len(), 2, "one backend call per utterance");
    let forwarded: usize = received.iter().map(|r| r.body.len()).sum();
    assert!(
        forwarded < audio.len() / 2,
        "forwarded {forwarded} of {} bytes",
        audio.len()
    );
}

#[tokio::test]
async fn stereo_44k_audio_is_decoded_and_segmented_in_order() {
    let app = app(&simulator().await, &[]).await;
    let audio = testkit::fixtures::speech("three-utterances-44k-stereo.wav");
    let answer = send(
        &app,
        event("ai.stt.request")
            .json(&json!({"audio": b64(&audio)}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let data = answer.json();
    let segments = data["segments"].as_array().expect("segments").clone();
    assert_eq!(segments.len(), 3, "{data}");
    let starts: Vec<u64> = segments
        .iter()
        .map(|s| s["start_ms"].as_u64().unwrap_or_default())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
    for s in &segments {
        // The simulator transcribes by duration: each text names its own segment's length.
        assert!(
            s["text"]
                .as_str()
                .unwrap_or_default()
                .starts_with("simulated transcript of"),
            "{s}"
        );
    }
}

#[tokio::test]
async fn bad_audio_is_rejected_with_4xx() {
    let stt = MockServer::start().await;
    let app = app(&stt.uri(), &[("STT_MAX_AUDIO_MS", "1000")]).await;
    let good = testkit::fixtures::speech("two-utterances-16k.wav");
    let not_wav = b"this is not audio".to_vec();
    let truncated = good[..60].to_vec();
    for (audio, what) in [
        (not_wav, "not a WAV"),
        (truncated, "truncated"),
        (good.clone(), "too long"),
    ] {
        let answer = send(
            &app,
            event("ai.stt.request")
                .json(&json!({"audio": b64(&audio)}))
                .binary(),
        )
        .await;
        assert_eq!(answer.status, 422, "{what}: {}", answer.json());
        assert_error(&answer, 422, "unprocessable");
    }
    let answer = send(
        &app,
        event("ai.stt.request")
            .json(&json!({"audio": "%%% not base64"}))
            .binary(),
    )
    .await;
    assert_error(&answer, 400, "invalid_payload");
    assert!(
        stt.received_requests()
            .await
            .expect("wiremock records requests")
            .is_empty()
    );
}
