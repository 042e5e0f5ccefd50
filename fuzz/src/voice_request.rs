//! `voice_request`: voice-assistant's HTTP surface: any request to its `app()`, with the
//! simulator and a Milvus stand-in as its backends.
//!
//! Whatever the headers and body, the answer is never a 500 and a 200 is a CloudEvent
//! ([`crate::common::check_answer`]).

use std::sync::OnceLock;

use axum::Router;

use crate::common::{Raw, check_answer, runtime, send};

fn app() -> &'static Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| {
        let env = crate::sim::env(
            &["STT", "TTS", "LLM", "EMBED", "RERANK", "MILVUS"],
            &[("STT_MAX_AUDIO_MS", "30000")],
        );
        let config = handler_kit::config::load(&env, voice_assistant::Config::read)
            .unwrap_or_else(|e| panic!("voice-assistant config: {e}"));
        let state = runtime()
            .block_on(voice_assistant::State::new(config))
            .unwrap_or_else(|e| panic!("voice-assistant state: {e}"));
        voice_assistant::app(state)
    })
}

/// One input: headers, a blank line, the body (`:path:` picks another route than `/`).
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let app = app();
    runtime().block_on(async { check_answer(&send(app, raw.request("/")).await) });
}
