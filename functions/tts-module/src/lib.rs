//! tts-module: text to speech as a CloudEvents function.
//!
//! `ai.tts.request {request_id?, text, voice?, speaker_id?, language?, stream?}` comes in; the
//! text is cut into sentences, synthesized with bounded parallelism (order kept), and answered
//! as `ai.tts.response {request_id, audio, sample_rate, duration_ms, chunks}` with one WAV
//! under a correct header. With NATS configured the reply is also published to
//! `ai.tts.response.{request_id}`, and with `stream: true` each sentence's audio goes to
//! `ai.tts.response.stream.{request_id}` as soon as it (and every sentence before it) is ready.
//!
//! Audio never rides in a NATS message larger than the server's `max_payload`: stream chunks
//! are cut into playable WAV pieces, and a reply too large to publish carries
//! `audio_subject` (where the pieces are) instead of `audio`.
//!
//! # Layout
//! - [`Config`]: every environment variable, with defaults.
//! - [`State`] and [`app`]: the router tests drive and `main` serves.
//! - `handle`: one event, start to finish.
//! - [`tts`]: the synthesis client (Coqui `/api/tts`, OpenAI-style `/v1/audio/speech`);
//!   [`text`]: sentence splitting; [`stream`]: ordered, size-capped audio chunks on a subject.
//!   voice-assistant uses all three as a library.

pub mod stream;
pub mod text;
pub mod tts;

use std::sync::Arc;

use crate::stream::{AudioReply, AudioStream};
use crate::text::split_sentences;
use crate::tts::{Speech, TtsClient, TtsConfig};
use audio::Wav;
use axum::Router;
use axum::extract::State as Extract;
use axum::routing::post;
use futures::{StreamExt as _, TryStreamExt as _};
use handler_kit::config::{BaseConfig, ConfigReader};
use handler_kit::event::bytes_field;
use handler_kit::nats::{Nats, subject};
use handler_kit::serve::{Health, function_router};
use handler_kit::{CloudEvent, HandlerError, Reply};
use serde::{Deserialize, Serialize};

/// The CloudEvent type this function accepts.
pub const REQUEST_TYPE: &str = "ai.tts.request";
/// The CloudEvent type of its replies.
pub const RESPONSE_TYPE: &str = "ai.tts.response";

/// tts-module's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shared settings (`PORT`, `NATS_URL`, `MAX_BODY_BYTES` default 256 KiB, ...).
    pub base: BaseConfig,
    /// The TTS backend (`TTS_*`).
    pub tts: TtsConfig,
    /// `TTS_MAX_TEXT_CHARS` (default 5000): longer text is refused with 422.
    pub max_text_chars: usize,
    /// `TTS_MAX_CHUNK_CHARS` (default 300): the longest piece sent to the backend at once.
    pub max_chunk_chars: usize,
    /// `TTS_PARALLELISM` (default 4): pieces of one request synthesized at once.
    pub parallelism: usize,
    /// `TTS_REPLY_SUBJECT` (default `ai.tts.response.{request_id}`).
    pub reply_subject: String,
    /// `TTS_STREAM_SUBJECT` (default `ai.tts.response.stream.{request_id}`).
    pub stream_subject: String,
}

impl Config {
    /// Reads every variable; problems are collected by `r`.
    pub fn read(r: &mut ConfigReader) -> Self {
        Self {
            base: BaseConfig::read(r, "tts-module", 256 * 1024),
            tts: TtsConfig::read(r),
            max_text_chars: r.positive("TTS_MAX_TEXT_CHARS", 5000),
            max_chunk_chars: r.positive("TTS_MAX_CHUNK_CHARS", 300),
            parallelism: r.positive("TTS_PARALLELISM", 4),
            reply_subject: r.string("TTS_REPLY_SUBJECT", "ai.tts.response.{request_id}"),
            stream_subject: r.string("TTS_STREAM_SUBJECT", "ai.tts.response.stream.{request_id}"),
        }
    }
}

/// Shared by every request.
#[derive(Debug, Clone)]
pub struct State {
    config: Arc<Config>,
    tts: TtsClient,
    nats: Nats,
    health: Arc<Health>,
}

impl State {
    /// Builds clients; NATS connects in the background so this never waits on the network.
    pub async fn new(config: Config) -> Result<Self, HandlerError> {
        let http = handler_kit::http::client(
            config
                .tts
                .backend
                .timeout
                .min(std::time::Duration::from_secs(5)),
        )?;
        let nats = Nats::connect(config.base.nats.as_ref(), "tts-module").await?;
        Ok(Self {
            tts: TtsClient::new(http, config.tts.clone()),
            config: Arc::new(config),
            nats,
            health: Health::new(),
        })
    }

    /// Readiness, shared with the server so draining shows on `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }
}

handler_kit::function!("tts-module");

/// The function's router: `POST /` plus the standard endpoints.
pub fn app(state: State) -> Router {
    let limit = state.config.base.max_body_bytes;
    let health = state.health.clone();
    let events = Router::new().route("/", post(handle)).with_state(state);
    function_router(events, health, limit)
}

/// `ai.tts.request` data.
#[derive(Debug, Clone, Deserialize)]
struct TtsRequest {
    request_id: Option<String>,
    text: String,
    voice: Option<String>,
    speaker_id: Option<String>,
    language: Option<String>,
    #[serde(default)]
    stream: bool,
}

/// `ai.tts.response` data.
#[derive(Debug, Serialize)]
struct TtsResponse {
    request_id: String,
    /// The whole utterance as one WAV; absent on NATS when it would not fit.
    #[serde(with = "bytes_field", skip_serializing_if = "Vec::is_empty")]
    audio: Vec<u8>,
    /// Where the audio pieces were published when `audio` is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_subject: Option<String>,
    sample_rate: u32,
    duration_ms: u64,
    /// Number of pieces the text was synthesized in.
    chunks: usize,
}

impl AudioReply for TtsResponse {
    fn audio_mut(&mut self) -> &mut Vec<u8> {
        &mut self.audio
    }

    fn audio_subject_mut(&mut self) -> &mut Option<String> {
        &mut self.audio_subject
    }
}

async fn handle(Extract(state): Extract<State>, event: CloudEvent) -> Result<Reply, HandlerError> {
    event.expect_type(&[REQUEST_TYPE])?;
    let request: TtsRequest = event.data()?;
    let request_id = event.request_id(request.request_id.as_deref())?;
    let config = &state.config;
    let chars = request.text.chars().count();
    if request.text.trim().is_empty() {
        return Err(HandlerError::Unprocessable("text is empty".into()));
    }
    if chars > config.max_text_chars {
        return Err(HandlerError::Unprocessable(format!(
            "text has {chars} characters; the limit is {} (TTS_MAX_TEXT_CHARS)",
            config.max_text_chars
        )));
    }
    let deadline = config.base.event_timeout;
    let response = tokio::time::timeout(deadline, synthesize(&state, &request, &request_id))
        .await
        .map_err(|_| HandlerError::Deadline(deadline))??;
    event.reply(RESPONSE_TYPE, &config.base.source, &response)
}

async fn synthesize(
    state: &State,
    request: &TtsRequest,
    request_id: &str,
) -> Result<TtsResponse, HandlerError> {
    let config = &state.config;
    // Learn NATS' limit (and that NATS is up) before spending backend time on audio.
    let max_payload = state.nats.max_payload().await?;
    let pieces = split_sentences(&request.text, config.max_chunk_chars);
    let total = pieces.len();
    let stream_subject = subject(&config.stream_subject, &[("request_id", request_id)]);
    let mut stream = AudioStream::new(&state.nats, max_payload, stream_subject, request_id);
    // `buffered` runs up to `parallelism` syntheses at once but yields them in text order,
    // so each piece can be streamed the moment it and every piece before it are ready.
    let request = Arc::new(request.clone());
    let mut audio = futures::stream::iter(pieces)
        .map(|text| speak(state.tts.clone(), request.clone(), text))
        .buffered(config.parallelism);
    let mut wavs = Vec::with_capacity(total);
    let mut index = 0;
    while let Some(wav) = audio.try_next().await? {
        index += 1;
        if request.stream {
            stream.send(&wav, None, index == total).await?;
        }
        wavs.push(wav);
    }
    let merged = Wav::concat(wavs)
        .map_err(|e| HandlerError::Backend {
            backend: "tts",
            detail: e,
        })?
        .ok_or_else(|| HandlerError::Unprocessable("text has nothing to speak".into()))?;
    let bytes = merged
        .to_bytes()
        .map_err(|e| HandlerError::Internal(format!("encoding WAV: {e}")))?;
    let mut response = TtsResponse {
        request_id: request_id.to_string(),
        audio: bytes,
        audio_subject: None,
        sample_rate: merged.sample_rate(),
        duration_ms: merged.duration_ms(),
        chunks: total,
    };
    if state.nats.is_enabled() {
        // Too big for one message: the reply points to the stream, published now if it was
        // not asked for.
        if !request.stream && !stream.fits(response.audio.len()) {
            stream.send(&merged, None, true).await?;
        }
        let reply_subject = subject(&config.reply_subject, &[("request_id", request_id)]);
        stream
            .publish_reply(reply_subject, &format!("{request_id}.reply"), &mut response)
            .await?;
    }
    Ok(response)
}

/// One piece, with owned inputs so the futures can run side by side without borrowing.
async fn speak(
    tts: TtsClient,
    request: Arc<TtsRequest>,
    text: String,
) -> Result<Wav, HandlerError> {
    let speech = Speech {
        text: &text,
        voice: request.voice.as_deref(),
        speaker_id: request.speaker_id.as_deref(),
        language: request.language.as_deref(),
    };
    tts.synthesize(&speech).await
}
