//! stt-module: speech to text as a CloudEvents function (the HTTP-forwarding variant).
//!
//! - `ai.stt.request {request_id?, audio, language?, prompt?}`: the WAV is decoded to 16 kHz
//!   mono, segmented by voice activity, and only the speech is sent to the Whisper-style
//!   backend, a few segments at a time, in order. Reply `ai.stt.response {request_id, text,
//!   segments [{start_ms, end_ms, text}], audio_ms, speech_ms}`, also published to
//!   `ai.stt.response.{request_id}`.
//! - `ai.stt.chunk {session_id, seq, audio, final?}`: session streaming. A session's pending
//!   audio and VAD state live in a NATS JetStream key-value bucket, updated with optimistic
//!   concurrency on the revision, so any replica can take the next chunk. When an utterance
//!   closes (enough silence, or `final`) it is transcribed and published to
//!   `ai.stt.transcript.{session_id}`. A redelivered `seq` is ignored; a chunk that arrives
//!   before its predecessor is answered 409 (retried later), for at most `STT_SESSION_GAP_MS`,
//!   after which the missing seqs count as lost; a chunk with bad audio is answered 422 and
//!   skipped, so the session goes on. Transcripts say which seqs were skipped. Order comes from
//!   nats-source with `ORDERING=subject` on `ai.stt.stream.{session_id}`.
//! - Either way the audio is read where it lies in the request body and decoded in one pass
//!   (`crate::stt::audio_field`): a request holds its body and the 16 kHz audio.
//!
//! # Layout
//! - [`Config`], [`State`], [`app`].
//! - `recording` (below): one-shot transcription; `session`: the chunked, KV-backed path.
//! - [`stt`]: the transcription client, which sends only the speech; [`vad`]: voice activity
//!   detection, a streaming segmenter whose state is stored between chunks. voice-assistant
//!   uses both as a library.

mod session;
pub mod stt;
pub mod vad;

use std::sync::Arc;

use crate::stt::{SttClient, SttConfig, TranscriptSegment, audio_field};
use axum::Router;
use axum::extract::State as Extract;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use handler_kit::config::{BaseConfig, ConfigReader};
use handler_kit::nats::{Nats, subject};
use handler_kit::serve::{Health, function_router};
use handler_kit::{CloudEvent, HandlerError};
use serde::{Deserialize, Serialize};

/// One-shot transcription requests.
pub const REQUEST_TYPE: &str = "ai.stt.request";
/// Session audio chunks.
pub const CHUNK_TYPE: &str = "ai.stt.chunk";
/// The type of replies to [`REQUEST_TYPE`].
pub const RESPONSE_TYPE: &str = "ai.stt.response";

/// stt-module's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shared settings (`PORT`, `NATS_URL`, `MAX_BODY_BYTES` default 32 MiB for audio, ...).
    pub base: BaseConfig,
    /// The STT backend and VAD (`STT_*`).
    pub stt: SttConfig,
    /// `STT_SESSION_BUCKET` (default `stt-sessions`): the KV bucket holding session state.
    pub session_bucket: String,
    /// `STT_SESSION_TTL_MS` (default 600000): idle sessions expire after this.
    pub session_ttl: std::time::Duration,
    /// `STT_SESSION_GAP_MS` (default 5000): how long a session waits for a missing `seq`
    /// while later chunks arrive (each answered 409, so the source retries it); past that the
    /// missing chunks count as lost and the session goes on. A chunk refused before the
    /// session could record it (unreadable data, over the body cap, a session expired
    /// mid-stream) leaves such a gap; with `ORDERING=subject` a later chunk only arrives once
    /// the source gave up on its predecessor, so waiting longer than a retry or two saves
    /// nothing and holds the session's subject.
    pub session_gap: std::time::Duration,
    /// `STT_REPLY_SUBJECT` (default `ai.stt.response.{request_id}`).
    pub reply_subject: String,
    /// `STT_TRANSCRIPT_SUBJECT` (default `ai.stt.transcript.{session_id}`).
    pub transcript_subject: String,
}

impl Config {
    /// Reads every variable; problems are collected by `r`.
    pub fn read(r: &mut ConfigReader) -> Self {
        Self {
            base: BaseConfig::read(r, "stt-module", 32 * 1024 * 1024),
            stt: SttConfig::read(r),
            session_bucket: r.string("STT_SESSION_BUCKET", "stt-sessions"),
            session_ttl: r.millis("STT_SESSION_TTL_MS", 600_000),
            session_gap: r.millis("STT_SESSION_GAP_MS", 5_000),
            reply_subject: r.string("STT_REPLY_SUBJECT", "ai.stt.response.{request_id}"),
            transcript_subject: r
                .string("STT_TRANSCRIPT_SUBJECT", "ai.stt.transcript.{session_id}"),
        }
    }
}

/// Shared by every request.
#[derive(Debug, Clone)]
pub struct State {
    config: Arc<Config>,
    stt: SttClient,
    nats: Nats,
    health: Arc<Health>,
    sessions: session::Sessions,
}

impl State {
    /// Builds clients; NATS connects in the background so this never waits on the network.
    pub async fn new(config: Config) -> Result<Self, HandlerError> {
        let http = handler_kit::http::client(std::time::Duration::from_secs(5))?;
        let nats = Nats::connect(config.base.nats.as_ref(), "stt-module").await?;
        Ok(Self {
            stt: SttClient::new(http, config.stt.clone()),
            sessions: session::Sessions::new(&config),
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

handler_kit::function!("stt-module");

/// The function's router: `POST /` plus the standard endpoints.
pub fn app(state: State) -> Router {
    let limit = state.config.base.max_body_bytes;
    let health = state.health.clone();
    let events = Router::new().route("/", post(handle)).with_state(state);
    function_router(events, health, limit)
}

/// `ai.stt.request` data. The audio is checked here and read in place by [`audio_field`].
#[derive(Debug, Deserialize)]
struct SttRequest {
    request_id: Option<String>,
    #[allow(dead_code)] // required; read by `audio_field`
    audio: serde::de::IgnoredAny,
    language: Option<String>,
    prompt: Option<String>,
}

/// `ai.stt.response` data.
#[derive(Debug, Serialize)]
struct SttResponse {
    request_id: String,
    text: String,
    segments: Vec<TranscriptSegment>,
    audio_ms: u64,
    speech_ms: u64,
}

async fn handle(
    Extract(state): Extract<State>,
    event: CloudEvent,
) -> Result<Response, HandlerError> {
    event.expect_type(&[REQUEST_TYPE, CHUNK_TYPE])?;
    let deadline = state.config.base.event_timeout;
    let work = async {
        if event.ty() == CHUNK_TYPE {
            let chunk: session::Chunk = event.data()?;
            session::handle_chunk(&state, chunk, audio_field(&event)?)
                .await
                .map(IntoResponse::into_response)
        } else {
            recording(&state, &event)
                .await
                .map(IntoResponse::into_response)
        }
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| HandlerError::Deadline(deadline))?
}

async fn recording(state: &State, event: &CloudEvent) -> Result<handler_kit::Reply, HandlerError> {
    let request: SttRequest = event.data()?;
    let audio = audio_field(event)?;
    let request_id = event.request_id(request.request_id.as_deref())?;
    // Learn that NATS is up before spending backend time on a transcript it must carry.
    state.nats.max_payload().await?;
    let transcript = state
        .stt
        .transcribe_recording(
            &audio,
            request.language.as_deref(),
            request.prompt.as_deref(),
        )
        .await?;
    let response = SttResponse {
        request_id: request_id.clone(),
        text: transcript.text,
        segments: transcript.segments,
        audio_ms: transcript.audio_ms,
        speech_ms: transcript.speech_ms,
    };
    if state.nats.is_enabled() {
        let reply_subject = subject(&state.config.reply_subject, &[("request_id", &request_id)]);
        let msg_id = format!("{request_id}.reply");
        state
            .nats
            .publish(reply_subject, &response, Some(&msg_id))
            .await?;
    }
    event.reply(RESPONSE_TYPE, &state.config.base.source, &response)
}
