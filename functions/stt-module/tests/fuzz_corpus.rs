//! The fuzz targets of this crate (`fuzz/`, run with `just fuzz`) replayed over their committed
//! seeds, `fuzz/corpus/<target>/`: every seed, and every crash once fixed, stays a test of the
//! normal suite. The targets' code is compiled in from `fuzz/src` as it is (the fuzz crate itself
//! is outside the workspace: it needs libFuzzer).

// Each test binary uses its own part of the shared modules.
#![allow(dead_code)]

#[path = "../../../fuzz/src/audio.rs"]
mod audio;
#[path = "../../../fuzz/src/common.rs"]
mod common;
#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/sim.rs"]
mod sim;
#[path = "../../../fuzz/src/stt_request.rs"]
mod stt_request;
#[path = "../../../fuzz/src/vad.rs"]
mod vad;

fn corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn stt_request_seeds_never_get_a_500() {
    replay::replay(&corpus(), "stt_request", stt_request::run);
}

#[test]
fn audio_seeds_decode_resample_and_segment() {
    replay::replay(&corpus(), "audio", audio::run);
}

#[test]
fn vad_seeds_stream_like_batch_and_survive_stored_state() {
    replay::replay(&corpus(), "vad", vad::run);
}
