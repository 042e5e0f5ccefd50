//! The fuzz targets of this crate (`fuzz/`, run with `just fuzz`) replayed over their committed
//! seeds, `fuzz/corpus/<target>/`: every seed, and every crash once fixed, stays a test of the
//! normal suite. The targets' code is compiled in from `fuzz/src` as it is (the fuzz crate itself
//! is outside the workspace: it needs libFuzzer).

// Each test binary uses its own part of the shared modules.
#![allow(dead_code)]
// The targets need the audio, VAD and retrieval clients.
#![cfg(all(feature = "stt", feature = "chat"))]

#[path = "../../../fuzz/src/answers.rs"]
mod answers;
#[path = "../../../fuzz/src/audio.rs"]
mod audio;
#[path = "../../../fuzz/src/backend.rs"]
mod backend;
#[path = "../../../fuzz/src/cloudevent.rs"]
mod cloudevent;
#[path = "../../../fuzz/src/common.rs"]
mod common;
#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/sse.rs"]
mod sse;
#[path = "../../../fuzz/src/vad.rs"]
mod vad;

fn corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn cloudevent_seeds_parse_and_round_trip() {
    replay::replay(&corpus(), "cloudevent", cloudevent::run);
}

#[test]
fn audio_seeds_decode_resample_and_segment() {
    replay::replay(&corpus(), "audio", audio::run);
}

#[test]
fn vad_seeds_stream_like_batch_and_survive_stored_state() {
    replay::replay(&corpus(), "vad", vad::run);
}

#[test]
fn sse_seeds_decode_alike_however_cut() {
    replay::replay(&corpus(), "sse", sse::run);
}

#[test]
fn answers_seeds_are_read_without_a_panic() {
    replay::replay(&corpus(), "answers", answers::run);
}
