//! `pipeline_request`: pipeline-bridge's CloudEvents (`ai.pipeline.trigger`, status requests,
//! ApiServerSource resource events) through its `app()`, against the fake cluster
//! ([`crate::pipeline`]).
//!
//! Whatever the headers and body, the answer is never a 500 and a 200 is a CloudEvent
//! ([`crate::common::check_answer`]).

use crate::common::{Raw, check_answer, runtime, send};

/// One input: headers, a blank line, the body (`:path:` picks another route than `/`).
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let app = crate::pipeline::app();
    runtime().block_on(async { check_answer(&send(&app, raw.request("/")).await) });
}
