//! The deterministic inference simulator: a labelled **local stand-in** for the
//! inference backends the functions call (OpenAI-compatible chat, embeddings and
//! transcription, TEI/Cohere/Jina-style rerank, Coqui/OpenAI-style TTS).
//!
//! It exists so tests and `just dev` can exercise real HTTP clients without a model
//! server; it must never be a production default. Every response carries
//! `x-inference-simulator: local stand-in` so a misconfigured deployment is easy to
//! spot, and the same request always yields the same response bytes so tests can
//! assert exact output.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;

mod audio;
mod chat;
mod embeddings;
mod rerank;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test, with its location
mod tests;

/// Header set on every simulator response.
pub const SIMULATOR_HEADER: &str = "x-inference-simulator";
/// Value of [`SIMULATOR_HEADER`].
pub const SIMULATOR_HEADER_VALUE: &str = "local stand-in";

/// Request bodies above this are refused; it leaves room for a few minutes of
/// uncompressed audio, like the hosted transcription APIs' 25 MB limit.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Tunables of the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Delay before every inference endpoint answers (not `/healthz`).
    pub latency: Duration,
    /// Delay before each streamed chat token.
    pub token_delay: Duration,
    /// Sample rate of synthesized speech.
    pub sample_rate: u32,
    /// Length of embedding vectors.
    pub embedding_dim: usize,
    /// Synthesized speech lasts this many milliseconds per character of text.
    pub ms_per_char: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            sample_rate: 22_050,
            embedding_dim: 384,
            ms_per_char: 60,
        }
    }
}

impl SimConfig {
    /// The defaults, overridden by `SIM_LATENCY_MS`, `SIM_TOKEN_DELAY_MS`,
    /// `SIM_SAMPLE_RATE`, `SIM_EMBEDDING_DIM` and `SIM_MS_PER_CHAR` where set.
    ///
    /// Fails on a value that is not a number, and on a zero sample rate or
    /// embedding dimension, rather than silently simulating something odd.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        fn parse<T: std::str::FromStr>(
            lookup: &impl Fn(&str) -> Option<String>,
            name: &str,
            default: T,
        ) -> anyhow::Result<T>
        where
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            match lookup(name) {
                Some(raw) if !raw.trim().is_empty() => raw
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={raw:?} is not a valid number")),
                _ => Ok(default),
            }
        }

        let defaults = Self::default();
        let config = Self {
            latency: Duration::from_millis(parse(&lookup, "SIM_LATENCY_MS", 0)?),
            token_delay: Duration::from_millis(parse(&lookup, "SIM_TOKEN_DELAY_MS", 0)?),
            sample_rate: parse(&lookup, "SIM_SAMPLE_RATE", defaults.sample_rate)?,
            embedding_dim: parse(&lookup, "SIM_EMBEDDING_DIM", defaults.embedding_dim)?,
            ms_per_char: parse(&lookup, "SIM_MS_PER_CHAR", defaults.ms_per_char)?,
        };
        anyhow::ensure!(config.sample_rate > 0, "SIM_SAMPLE_RATE must be above 0");
        anyhow::ensure!(
            config.embedding_dim > 0,
            "SIM_EMBEDDING_DIM must be above 0"
        );
        Ok(config)
    }
}

/// The simulator's routes; see the module docs.
pub fn router(config: SimConfig) -> Router {
    let inference = Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/rerank", post(rerank::tei))
        .route("/v1/rerank", post(rerank::cohere))
        .route("/v1/audio/transcriptions", post(audio::transcriptions))
        .route("/v1/audio/speech", post(audio::openai_speech))
        .route("/api/tts", get(audio::coqui_tts).post(audio::coqui_tts))
        .route_layer(middleware::from_fn_with_state(config, simulated_latency));

    Router::new()
        .merge(inference)
        // Health checks skip the latency so dev readiness probes stay fast.
        .route("/healthz", get(|| async { "ok" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(label))
        .with_state(config)
}

/// Serves [`router`] on an ephemeral port of 127.0.0.1, for tests.
///
/// Returns the bound address and the server task; aborting the task stops it.
pub async fn spawn(config: SimConfig) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding the inference simulator to 127.0.0.1")?;
    let addr = listener.local_addr()?;
    let app = router(config);
    let handle = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("inference-sim (local stand-in) stopped: {err}");
        }
    });
    Ok((addr, handle))
}

async fn simulated_latency(
    State(config): State<SimConfig>,
    request: Request,
    next: Next,
) -> Response {
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    next.run(request).await
}

async fn label(mut response: Response) -> Response {
    response.headers_mut().insert(
        SIMULATOR_HEADER,
        HeaderValue::from_static(SIMULATOR_HEADER_VALUE),
    );
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!(
            "no route {} {} on the inference simulator",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "method {} not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// An OpenAI-style error response: `{"error": {"message", "type"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "code": null }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Parses a JSON body so malformed input gets the OpenAI-style 400 rather than
/// axum's plain-text 415/422 rejections.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("invalid JSON body: {err}")))
}

/// 64-bit FNV-1a: fixed across runs and platforms, unlike `RandomState`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Lowercased alphanumeric words, the unit of every text similarity here.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
}

/// Whitespace-separated word count, the simulator's notion of a token.
fn count_tokens(text: &str) -> usize {
    text.split_whitespace().count()
}
