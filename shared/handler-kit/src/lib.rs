//! `handler-kit`: what every function needs besides its own logic, and nothing more.
//!
//! A function is an axum `Router` that answers CloudEvents on `POST /`. This crate gives it the
//! CloudEvents plumbing, the delivery contract with the NATS source, configuration, telemetry,
//! health endpoints, a server that drains on SIGTERM, the guarded HTTP client its backend
//! clients are built on, and NATS. Every function uses all of it, so there are no features.
//! Domain code lives with the function that owns it: the RAG pipeline and its clients in
//! chat-handler, VAD and the transcription client in stt-module, the synthesis client and audio
//! streaming in tts-module; WAV handling is the `audio` crate beside this one.
//!
//! # Layout
//! - [`error`]: [`HandlerError`], the one error type; it renders as a JSON 4xx/5xx.
//! - [`delivery`]: the single table that maps outcomes to HTTP statuses, and statuses back to
//!   what the source does with the message (ack, term, retry).
//! - [`event`]: the body-capped CloudEvent extractor ([`CloudEvent`]), the reply responder, and
//!   the check of ids that become subject tokens and headers ([`event::check_token`]: not
//!   empty, at most [`event::MAX_ID_LEN`] bytes, no control characters); data decoded nested at
//!   most [`event::MAX_DATA_DEPTH`] levels, no length prefix sizing an allocation.
//! - [`config`]: typed configuration from the environment; every problem reported at once.
//! - [`telemetry`]: JSON logs, metrics (served at `/metrics`, exported over OTLP when asked),
//!   traces that continue the caller's `traceparent`.
//! - [`serve`]: the standard router (health, metrics, panic guard) and serve-with-drain.
//! - [`nats`]: a lazily connected NATS client publishing MessagePack, and `NatsConfig`:
//!   `NATS_URL`, the credential file (token, user/password, nkey, `.creds`, read again at every
//!   reconnect) and TLS, turned into the client's connect options in one place.
//! - [`resilience`], [`http`]: timeouts, circuit breaker, concurrency limit; every backend
//!   answer read under its cap (`{PREFIX}_MAX_RESPONSE_BYTES`).

pub mod config;
pub mod delivery;
pub mod error;
pub mod event;
pub mod http;
pub mod nats;
pub mod resilience;
pub mod serve;
pub mod telemetry;

pub use error::HandlerError;
pub use event::{CloudEvent, Reply};
