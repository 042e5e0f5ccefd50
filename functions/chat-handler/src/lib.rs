//! chat-handler: retrieval-augmented chat as a CloudEvents function.
//!
//! `ai.chat.request` comes in; the pipeline ([`rag`]) embeds the message,
//! searches Milvus, reranks, prompts the LLM with numbered context (or answers directly from
//! an FAQ collection), and the answer is replied as `ai.chat.response`. With `stream: true`
//! text chunks go to `ai.chat.response.stream.{request_id}` as the LLM produces them; with
//! NATS configured the reply is also published to `ai.chat.response.{request_id}`.
//!
//! A failure before anything was streamed is retryable (5xx). After the first chunk the stream
//! is closed with an error chunk (`done: true`, `error`) and the answer is a final 422, so a
//! redelivery never streams the same answer twice.
//!
//! # Layout
//! - [`Config`]: every environment variable.
//! - [`State`], [`app`]: the router tests drive and `main` serves.
//! - `handle`: one event; `ChunkPublisher`: the stream subject.
//! - [`rag`]: the pipeline (embed, search, rerank, prompt the LLM) with singleflight, and its
//!   backend clients [`llm`] (chat completions, whole or streamed), [`embed`], [`rerank`] (TEI
//!   or Cohere-style) and [`milvus`] (REST v2 or v1). voice-assistant uses them as a library.

pub mod embed;
pub mod llm;
pub mod milvus;
pub mod rag;
pub mod rerank;

use std::sync::Arc;

use crate::rag::{Chat, ChatConfig, ChatRequest, ChatResponse, DeltaSink};
use axum::Router;
use axum::extract::State as Extract;
use axum::routing::post;
use handler_kit::config::{BaseConfig, ConfigReader};
use handler_kit::nats::{Nats, Outbox, subject};
use handler_kit::serve::{Health, function_router};
use handler_kit::{CloudEvent, HandlerError, Reply};
use serde::{Deserialize, Serialize};

/// The CloudEvent type this function accepts.
pub const REQUEST_TYPE: &str = "ai.chat.request";
/// The CloudEvent type of its replies.
pub const RESPONSE_TYPE: &str = "ai.chat.response";

/// chat-handler's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shared settings (`PORT`, `NATS_URL`, `EVENT_TIMEOUT_MS`, `MAX_BODY_BYTES` default 256 KiB, ...).
    pub base: BaseConfig,
    /// The pipeline and its backends (`CHAT_*`, `LLM_*`, `EMBED_*`, `RERANK_*`, `MILVUS_*`).
    pub chat: ChatConfig,
    /// `CHAT_REPLY_SUBJECT` (default `ai.chat.response.{request_id}`).
    pub reply_subject: String,
    /// `CHAT_STREAM_SUBJECT` (default `ai.chat.response.stream.{request_id}`).
    pub stream_subject: String,
}

impl Config {
    /// Reads every variable; problems are collected by `r`.
    pub fn read(r: &mut ConfigReader) -> Self {
        Self {
            base: BaseConfig::read(r, "chat-handler", 256 * 1024),
            chat: ChatConfig::read(r),
            reply_subject: r.string("CHAT_REPLY_SUBJECT", "ai.chat.response.{request_id}"),
            stream_subject: r.string(
                "CHAT_STREAM_SUBJECT",
                "ai.chat.response.stream.{request_id}",
            ),
        }
    }
}

/// Shared by every request.
#[derive(Debug, Clone)]
pub struct State {
    config: Arc<Config>,
    chat: Chat,
    nats: Nats,
    health: Arc<Health>,
}

impl State {
    /// Builds clients; NATS connects in the background so this never waits on the network.
    pub async fn new(config: Config) -> Result<Self, HandlerError> {
        let http = handler_kit::http::client(std::time::Duration::from_secs(5))?;
        let nats = Nats::connect(config.base.nats.as_ref(), "chat-handler").await?;
        Ok(Self {
            chat: Chat::new(http, config.chat.clone()),
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

handler_kit::function!("chat-handler");

/// The function's router: `POST /` plus the standard endpoints.
pub fn app(state: State) -> Router {
    let limit = state.config.base.max_body_bytes;
    let health = state.health.clone();
    let events = Router::new().route("/", post(handle)).with_state(state);
    function_router(events, health, limit)
}

async fn handle(Extract(state): Extract<State>, event: CloudEvent) -> Result<Reply, HandlerError> {
    event.expect_type(&[REQUEST_TYPE])?;
    let ChatEventData {
        message,
        options: mut request,
    } = event.data()?;
    request.message = message;
    let request_id = event.request_id(request.request_id.as_deref())?;
    let config = &state.config;
    request.validate(&config.chat)?;
    // Learn that NATS is up before spending backend time on an answer it must carry.
    state.nats.max_payload().await?;
    let stream_subject = subject(&config.stream_subject, &[("request_id", &request_id)]);
    let mut chunks = ChunkPublisher {
        outbox: state.nats.outbox(),
        subject: stream_subject,
        request_id: &request_id,
        seq: 0,
        enabled: request.stream && state.nats.is_enabled(),
    };
    let deadline = config.base.event_timeout;
    let answered = tokio::time::timeout(
        deadline,
        state.chat.answer(&request, &request_id, &mut chunks),
    )
    .await;
    let response = match answered {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(chunks.fail(e).await),
        Err(_) => return Err(chunks.fail(HandlerError::Deadline(deadline)).await),
    };
    if let Err(e) = publish_answer(&state, &mut chunks, &request_id, &response).await {
        // Part of the answer was streamed: a retry would stream it (another one) again, so a
        // failure now is final, like one mid-stream.
        return Err(if chunks.seq > 0 {
            HandlerError::StreamInterrupted(format!("after the answer was streamed: {e}"))
        } else {
            e
        });
    }
    event.reply(RESPONSE_TYPE, &config.base.source, &response)
}

/// Closes the stream and publishes the reply, then waits once for all of them to be kept.
async fn publish_answer(
    state: &State,
    chunks: &mut ChunkPublisher<'_>,
    request_id: &str,
    response: &ChatResponse,
) -> Result<(), HandlerError> {
    chunks.finish().await?;
    if state.nats.is_enabled() {
        let reply_subject = subject(&state.config.reply_subject, &[("request_id", request_id)]);
        let msg_id = format!("{request_id}.reply");
        // One wait for the reply and every chunk before it: stored, or flushed.
        chunks
            .outbox
            .publish(reply_subject, response, Some(&msg_id))
            .await?;
        chunks.outbox.kept().await?;
    }
    Ok(())
}

/// `ai.chat.request` data: `message` is required here (a missing one is a malformed payload,
/// 400), while the shared [`ChatRequest`] defaults it because voice requests fill it in from
/// the transcript.
#[derive(Debug, Deserialize)]
struct ChatEventData {
    message: String,
    #[serde(flatten)]
    options: ChatRequest,
}

/// One message on the stream subject.
#[derive(Debug, Serialize)]
struct TextChunk<'a> {
    request_id: &'a str,
    seq: u64,
    text: &'a str,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Publishes answer text to the stream subject as it arrives; `seq` counts from 0.
struct ChunkPublisher<'a> {
    outbox: Outbox<'a>,
    subject: String,
    request_id: &'a str,
    seq: u64,
    enabled: bool,
}

impl ChunkPublisher<'_> {
    async fn send(
        &mut self,
        text: &str,
        done: bool,
        error: Option<String>,
    ) -> Result<(), HandlerError> {
        let chunk = TextChunk {
            request_id: self.request_id,
            seq: self.seq,
            text,
            done,
            error,
        };
        self.outbox
            .publish_chunk(self.subject.clone(), self.request_id, &mut self.seq, &chunk)
            .await
    }

    /// Closes the stream with `done: true`.
    async fn finish(&mut self) -> Result<(), HandlerError> {
        if self.enabled {
            self.send("", true, None).await?;
        }
        Ok(())
    }

    /// Ends a stream that had begun with an error chunk; returns the error to answer with.
    async fn fail(&mut self, error: HandlerError) -> HandlerError {
        if !self.enabled || self.seq == 0 {
            return error;
        }
        let final_error = match error {
            e @ HandlerError::StreamInterrupted(_) => e,
            other => HandlerError::StreamInterrupted(other.to_string()),
        };
        if let Err(e) = self.send("", true, Some(final_error.to_string())).await {
            tracing::warn!(error = %e, "could not publish the error chunk");
        }
        final_error
    }
}

impl DeltaSink for ChunkPublisher<'_> {
    async fn delta(&mut self, text: &str) -> Result<(), HandlerError> {
        if self.enabled && !text.is_empty() {
            self.send(text, false, None).await?;
        }
        Ok(())
    }

    fn visible(&self) -> bool {
        self.enabled
    }
}
