//! The fuzz targets of this crate (`fuzz/`, run with `just fuzz`) replayed over their committed
//! seeds, `fuzz/corpus/<target>/`: every seed, and every crash once fixed, stays a test of the
//! normal suite. The targets' code is compiled in from `fuzz/src` as it is (the fuzz crate itself
//! is outside the workspace: it needs libFuzzer).

// Each test binary uses its own part of the shared modules.
#![allow(dead_code)]

#[path = "../../../fuzz/src/catalog.rs"]
mod catalog;
#[path = "../../../fuzz/src/common.rs"]
mod common;
#[path = "../../../fuzz/src/pipeline.rs"]
mod pipeline;
#[path = "../../../fuzz/src/pipeline_request.rs"]
mod pipeline_request;
#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/webhook.rs"]
mod webhook;

fn corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn pipeline_request_seeds_never_get_a_500() {
    replay::replay(&corpus(), "pipeline_request", pipeline_request::run);
}

#[test]
fn webhook_seeds_are_signed_before_read() {
    replay::replay(&corpus(), "webhook", webhook::run);
}

#[test]
fn catalog_seeds_validate_and_fill_safely() {
    replay::replay(&corpus(), "catalog", catalog::run);
}
