//! The fuzz targets of this crate (`fuzz/`, run with `just fuzz`) replayed over their committed
//! seeds, `fuzz/corpus/<target>/`: every seed, and every crash once fixed, stays a test of the
//! normal suite. The targets' code is compiled in from `fuzz/src` as it is (the fuzz crate itself
//! is outside the workspace: it needs libFuzzer).

// Each test binary uses its own part of the shared modules.
#![allow(dead_code)]

#[path = "../../../fuzz/src/cloudevent.rs"]
mod cloudevent;
#[path = "../../../fuzz/src/common.rs"]
mod common;
#[path = "../../../fuzz/src/replay.rs"]
mod replay;

fn corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn cloudevent_seeds_parse_and_round_trip() {
    replay::replay(&corpus(), "cloudevent", cloudevent::run);
}
