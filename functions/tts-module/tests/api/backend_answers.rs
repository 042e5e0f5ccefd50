//! The backend's audio is read under `TTS_MAX_RESPONSE_BYTES`: a WAV that never ends is a 502
//! (retried; it counts against the breaker), after reading about the cap.

use serde_json::json;
use testkit::endless::{EndlessAnswer, EndlessServer};

use crate::support::{app, assert_error, event, send};

/// A 24 kHz mono 16-bit WAV header whose sizes claim 4 GiB, as a stream's header does.
fn endless_wav_header() -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(b"RIFF");
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.extend_from_slice(b"WAVEfmt ");
    header.extend_from_slice(&16u32.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes()); // PCM
    header.extend_from_slice(&1u16.to_le_bytes()); // mono
    header.extend_from_slice(&24_000u32.to_le_bytes());
    header.extend_from_slice(&48_000u32.to_le_bytes()); // bytes per second
    header.extend_from_slice(&2u16.to_le_bytes()); // block align
    header.extend_from_slice(&16u16.to_le_bytes());
    header.extend_from_slice(b"data");
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header
}

#[tokio::test]
async fn audio_without_end_is_a_502_after_reading_no_more_than_the_cap() {
    let tts = EndlessServer::start(EndlessAnswer::new(
        "audio/wav",
        endless_wav_header(),
        vec![0u8; 16 * 1024],
    ))
    .await
    .expect("endless TTS");
    let cap: u64 = 1024 * 1024;
    let app = app(
        &tts.url(),
        &[
            ("TTS_MAX_RESPONSE_BYTES", &cap.to_string()),
            ("TTS_BREAKER_FAILURES", "1"),
        ],
    )
    .await;
    let request = event("ai.tts.request").json(&json!({"text": "Hello."}));
    let answer = send(&app, request.clone().binary()).await;
    assert_error(&answer, 502, "backend_error");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("answered more than 1048576 bytes")),
        "{}",
        answer.json()
    );
    tts.assert_hung_up_within(cap, "an endless WAV").await;
    // It counted against the breaker: the next request is turned away without a call.
    assert_error(
        &send(&app, request.binary()).await,
        503,
        "backend_unavailable",
    );
    assert_eq!(tts.connections(), 1);
}
