//! `handler-kit`: everything a handler function needs besides its own logic.
//!
//! A function is an axum `Router` that answers CloudEvents on `POST /`. This crate gives it the
//! CloudEvents plumbing, the delivery contract with the NATS source, configuration, telemetry,
//! health endpoints, a server that drains on SIGTERM, and resilient clients for the inference
//! backends it calls. Cargo features keep each function's binary down to what it uses.
//!
//! # Layout
//! - [`error`]: [`HandlerError`], the one error type; it renders as a JSON 4xx/5xx.
//! - [`delivery`]: the single table that maps outcomes to HTTP statuses, and statuses back to
//!   what the source does with the message (ack, term, retry).
//! - [`event`]: the body-capped CloudEvent extractor ([`CloudEvent`]) and the reply responder.
//! - [`config`]: typed configuration from the environment; every problem reported at once.
//! - [`telemetry`]: JSON logs, metrics (served at `/metrics`, exported over OTLP when asked),
//!   traces that continue the caller's `traceparent`.
//! - [`serve`]: the standard router (health, metrics, panic guard) and serve-with-drain.
//! - [`text`]: sentence splitting for speech synthesis.
//! - `nats` (feature `nats`): a lazily connected NATS client publishing MessagePack.
//! - `resilience`, `http` (feature `http-client`): timeouts, circuit breaker, concurrency limit.
//! - `audio` (feature `audio`): WAV parsing, merging and splitting.
//! - `tts` (feature `tts`): the text-to-speech client.

#[cfg(feature = "audio")]
pub mod audio;
pub mod config;
pub mod delivery;
pub mod error;
pub mod event;
#[cfg(feature = "http-client")]
pub mod http;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "http-client")]
pub mod resilience;
pub mod serve;
pub mod telemetry;
pub mod text;
#[cfg(feature = "tts")]
pub mod tts;

pub use error::HandlerError;
pub use event::{CloudEvent, Reply};
