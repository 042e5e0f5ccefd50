//! Fuzz targets for everything that reads hostile input: CloudEvents, the functions' requests,
//! audio, backend answers, the pipeline catalog, webhooks and NATS messages.
//!
//! Each module is one target: a `run(data)` that decodes `data` through the crate's public API
//! (a function's `app()` driven with `tower::ServiceExt::oneshot`, a client against a local
//! server, or a pub function) and asserts what must hold for *any* input: no panic, no 500
//! (the source would retry a hostile event until its attempts run out), and the target's own
//! invariants (a reply parses back, streaming equals batch, names are DNS labels, ...).
//! `fuzz_targets/<name>.rs` only hands libFuzzer's bytes to `run`.
//!
//! The same modules are compiled into the workspace's tests with `#[path]` (each owning crate
//! has a `tests/fuzz_corpus.rs`), which replay the committed seeds of `corpus/<target>/`: the
//! seeds and every crash once fixed are regression tests of the normal suite, without this
//! crate (and libfuzzer-sys) being part of the workspace. So a module uses only what the owning
//! crate's tests have: its dependencies and dev-dependencies.
//!
//! # Layout
//! - [`common`]: the text format of requests, one runtime, sending to a router.
//! - [`replay`]: running a target over its committed seeds, for the workspace's tests.
//! - [`backend`]: a local HTTP server answering whatever the current input says (SSE, answers).
//! - [`sim`]: the inference simulator plus a Milvus stand-in, for the functions' targets.
//! - [`cloudevent`]: handler-kit; [`audio`], [`vad`]: the audio crate and stt-module;
//!   [`sse`], [`answers`]: chat-handler's backend clients.
//! - [`tts_request`], [`stt_request`], [`chat_request`], [`voice_request`]: the functions'
//!   HTTP surfaces.
//! - [`pipeline_request`], [`webhook`], [`catalog`]: pipeline-bridge ([`pipeline`]: its
//!   harness).
//! - [`nats_event`]: nats-source's message -> CloudEvent mapping.

pub mod answers;
pub mod audio;
pub mod backend;
pub mod catalog;
pub mod chat_request;
pub mod cloudevent;
pub mod common;
pub mod nats_event;
pub mod pipeline;
pub mod pipeline_request;
pub mod replay;
pub mod sim;
pub mod sse;
pub mod stt_request;
pub mod tts_request;
pub mod vad;
pub mod voice_request;
pub mod webhook;
