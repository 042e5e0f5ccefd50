//! `tts_request`: tts-module's HTTP surface: any request to its `app()`, with the simulator
//! as its TTS backend.
//!
//! Whatever the headers and body, the answer is never a 500 and a 200 is a CloudEvent
//! ([`crate::common::check_answer`]).

use std::sync::OnceLock;

use axum::Router;

use crate::common::{Raw, check_answer, runtime, send};

fn app() -> &'static Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| {
        let env = crate::sim::env(&["TTS"], &[]);
        let config = handler_kit::config::load(&env, tts_module::Config::read)
            .unwrap_or_else(|e| panic!("tts-module config: {e}"));
        let state = runtime()
            .block_on(tts_module::State::new(config))
            .unwrap_or_else(|e| panic!("tts-module state: {e}"));
        tts_module::app(state)
    })
}

/// One input: headers, a blank line, the body (`:path:` picks another route than `/`).
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let app = app();
    runtime().block_on(async { check_answer(&send(app, raw.request("/")).await) });
}
