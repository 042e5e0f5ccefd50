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
//! - [`event`]: the body-capped CloudEvent extractor ([`CloudEvent`]), the reply responder, and
//!   the check of ids that become subject tokens and headers ([`event::check_token`]: not
//!   empty, at most [`event::MAX_ID_LEN`] bytes, no control characters); data decoded nested at
//!   most [`event::MAX_DATA_DEPTH`] levels, no length prefix sizing an allocation.
//! - [`config`]: typed configuration from the environment; every problem reported at once.
//! - [`telemetry`]: JSON logs, metrics (served at `/metrics`, exported over OTLP when asked),
//!   traces that continue the caller's `traceparent`.
//! - [`serve`]: the standard router (health, metrics, panic guard) and serve-with-drain.
//! - [`text`]: sentence splitting for speech synthesis.
//! - `nats` (feature `nats`): a lazily connected NATS client publishing MessagePack, and
//!   `NatsConfig`: `NATS_URL`, the credential file (token, user/password, nkey, `.creds`, read
//!   again at every reconnect) and TLS, turned into the client's connect options in one place.
//! - `resilience`, `http` (feature `http-client`): timeouts, circuit breaker, concurrency limit;
//!   every backend answer read under its cap (`{PREFIX}_MAX_RESPONSE_BYTES`).
//! - `audio` (feature `audio`): WAV parsing, merging and splitting; conversion to 16 kHz mono.
//! - `stream` (features `nats` + `audio`): ordered, size-capped audio chunks on a subject.
//! - `tts` (feature `tts`): the text-to-speech client.
//! - `vad` (feature `stt`): voice activity detection; a streaming segmenter whose state can be
//!   stored between chunks.
//! - `stt` (feature `stt`): the speech-to-text client that transcribes only the speech.
//! - `chat` (feature `chat`): the RAG pipeline (embed, search, rerank, LLM) with singleflight.
//! - `llm` (feature `llm`): OpenAI-compatible chat completions, whole or streamed.
//! - `embed` (feature `embed`): OpenAI-compatible embeddings.
//! - `rerank` (feature `rerank`): reranking with TEI or a Cohere-style API.
//! - `milvus` (feature `milvus`): vector search in Milvus over its REST API.

#[cfg(feature = "audio")]
pub mod audio;
#[cfg(feature = "chat")]
pub mod chat;
pub mod config;
pub mod delivery;
#[cfg(feature = "embed")]
pub mod embed;
pub mod error;
pub mod event;
#[cfg(feature = "http-client")]
pub mod http;
#[cfg(feature = "llm")]
pub mod llm;
#[cfg(feature = "milvus")]
pub mod milvus;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rerank")]
pub mod rerank;
#[cfg(feature = "http-client")]
pub mod resilience;
pub mod serve;
#[cfg(all(feature = "nats", feature = "audio"))]
pub mod stream;
#[cfg(feature = "stt")]
pub mod stt;
pub mod telemetry;
pub mod text;
#[cfg(feature = "tts")]
pub mod tts;
#[cfg(feature = "stt")]
pub mod vad;

pub use error::HandlerError;
pub use event::{CloudEvent, Reply};
