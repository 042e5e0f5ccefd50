//! The fuzz targets of this crate (`fuzz/`, run with `just fuzz`) replayed over their committed
//! seeds, `fuzz/corpus/<target>/`: every seed, and every crash once fixed, stays a test of the
//! normal suite. The targets' code is compiled in from `fuzz/src` as it is (the fuzz crate itself
//! is outside the workspace: it needs libFuzzer).

// Each test binary uses its own part of the shared modules.
#![allow(dead_code)]

#[path = "../../../fuzz/src/answers.rs"]
mod answers;
#[path = "../../../fuzz/src/backend.rs"]
mod backend;
#[path = "../../../fuzz/src/chat_request.rs"]
mod chat_request;
#[path = "../../../fuzz/src/common.rs"]
mod common;
#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/sim.rs"]
mod sim;
#[path = "../../../fuzz/src/sse.rs"]
mod sse;

fn corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn chat_request_seeds_never_get_a_500() {
    replay::replay(&corpus(), "chat_request", chat_request::run);
}

#[test]
fn sse_seeds_decode_alike_however_cut() {
    replay::replay(&corpus(), "sse", sse::run);
}

#[test]
fn answers_seeds_are_read_without_a_panic() {
    replay::replay(&corpus(), "answers", answers::run);
}
