//! The retrieval-augmented chat pipeline, shared by chat-handler and voice-assistant.
//!
//! embed -> Milvus search -> rerank -> prompt with numbered context -> LLM (streamed), with a
//! direct-answer path that returns a stored answer (no LLM call) when an FAQ collection holds a
//! close enough match. Retrieval is an enhancement, not a dependency: when it fails the answer
//! comes from the LLM alone with `degraded: true` (unless configured to fail).
//!
//! Identical concurrent requests (same normalized message and options, no history) share one
//! run ([`Chat::answer`]): the run's text deltas are fanned out to every participant, a late
//! joiner first receives the text so far, and the run is cancelled when its last participant
//! goes away, so a dropped client still cancels the LLM call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::embed::{EmbedClient, EmbedConfig};
use crate::llm::{ChatMessage, CompletionRequest, Delta, LlmClient, LlmConfig, Usage};
use crate::milvus::{MilvusClient, MilvusConfig};
use crate::rerank::{RerankClient, RerankConfig};
use handler_kit::HandlerError;
use handler_kit::config::ConfigReader;
use handler_kit::telemetry;

/// Pipeline settings (`CHAT_*`) and its backends.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// `CHAT_COLLECTION` (default `documents`): the Milvus collection searched for context.
    pub collection: String,
    /// `CHAT_COLLECTIONS` (comma-separated; default `CHAT_COLLECTION` and
    /// `CHAT_FAQ_COLLECTION`): the collections a request's `collection` may name (422 for any
    /// other). A collection is a tenant's data: a caller that could name any would read what
    /// Milvus holds for everyone else.
    pub collections: Vec<String>,
    /// `CHAT_TOP_K` (default 8): documents fetched from Milvus.
    pub top_k: usize,
    /// `CHAT_RERANK_TOP_N` (default 4): documents kept after reranking (or after search).
    pub rerank_top_n: usize,
    /// `CHAT_MAX_TOP_K` (default 64): the largest `top_k` a request may ask for (422 above).
    /// It is the search's `limit`, one text per hit sent to the reranker and read back from
    /// Milvus, and Milvus itself accepts up to 16,384: a request could otherwise make one
    /// search answer megabytes and one rerank score thousands of texts. 64 is 8 times the
    /// default.
    pub max_top_k: usize,
    /// `CHAT_MAX_RERANK_TOP_N` (default 32): the largest `rerank_top_n` a request may ask for
    /// (422 above). Every document kept goes into the prompt; 32 passages of some 500 tokens
    /// fill a 16k-token context.
    pub max_rerank_top_n: usize,
    /// `CHAT_TEXT_FIELD` (default `text`): the document text field.
    pub text_field: String,
    /// `CHAT_SOURCE_FIELD` (default `source`): where a document came from (optional field).
    pub source_field: String,
    /// `CHAT_FAQ_COLLECTION` (unset: no direct answers): collection of questions with stored
    /// answers.
    pub faq_collection: Option<String>,
    /// `CHAT_FAQ_THRESHOLD` (default 0.9): the smallest similarity (COSINE/IP score) at which
    /// the stored answer is used instead of the LLM.
    pub faq_threshold: f32,
    /// `CHAT_FAQ_ANSWER_FIELD` (default `answer`): the stored answer's field.
    pub faq_answer_field: String,
    /// `CHAT_SYSTEM_PROMPT`: the default system prompt.
    pub system_prompt: String,
    /// `CHAT_ON_RETRIEVAL_FAILURE` (default `degrade`): `degrade` answers from the LLM alone
    /// with `degraded: true`; `fail` fails the event (retryably).
    pub degrade_on_retrieval_failure: bool,
    /// `CHAT_MAX_MESSAGE_CHARS` (default 8000): longer messages are refused with 422.
    pub max_message_chars: usize,
    /// The LLM (`LLM_*`).
    pub llm: LlmConfig,
    /// Embeddings (`EMBED_*`).
    pub embed: EmbedConfig,
    /// The reranker (`RERANK_*`), optional.
    pub rerank: Option<RerankConfig>,
    /// Milvus (`MILVUS_*`).
    pub milvus: MilvusConfig,
}

const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant. Answer from the numbered \
context when it is relevant and cite it as [n]; if the context does not contain the answer, \
say so briefly and answer from general knowledge.";

impl ChatConfig {
    /// Reads every variable.
    pub fn read(r: &mut ConfigReader) -> Self {
        let faq_threshold: f32 = r.parse("CHAT_FAQ_THRESHOLD", 0.9);
        let top_k = r.positive("CHAT_TOP_K", 8);
        let rerank_top_n = r.positive("CHAT_RERANK_TOP_N", 4);
        let max_top_k = r.positive("CHAT_MAX_TOP_K", 64);
        let max_rerank_top_n = r.positive("CHAT_MAX_RERANK_TOP_N", 32);
        for (default, max, default_var, max_var) in [
            (top_k, max_top_k, "CHAT_TOP_K", "CHAT_MAX_TOP_K"),
            (
                rerank_top_n,
                max_rerank_top_n,
                "CHAT_RERANK_TOP_N",
                "CHAT_MAX_RERANK_TOP_N",
            ),
        ] {
            if default > max {
                r.problem(format!(
                    "{default_var} ({default}) is over {max_var} ({max})"
                ));
            }
        }
        let collection = r.string("CHAT_COLLECTION", "documents");
        let faq_collection = r.optional("CHAT_FAQ_COLLECTION");
        let collections = match r.optional("CHAT_COLLECTIONS") {
            Some(list) => {
                let names: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect();
                if names.is_empty() {
                    r.problem("CHAT_COLLECTIONS names no collection".to_string());
                }
                names
            }
            None => std::iter::once(collection.clone())
                .chain(faq_collection.clone())
                .collect(),
        };
        Self {
            collection,
            collections,
            top_k,
            rerank_top_n,
            max_top_k,
            max_rerank_top_n,
            text_field: r.string("CHAT_TEXT_FIELD", "text"),
            source_field: r.string("CHAT_SOURCE_FIELD", "source"),
            faq_collection,
            faq_threshold,
            faq_answer_field: r.string("CHAT_FAQ_ANSWER_FIELD", "answer"),
            system_prompt: r.string("CHAT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            degrade_on_retrieval_failure: r.choice(
                "CHAT_ON_RETRIEVAL_FAILURE",
                "degrade",
                &["degrade", "fail"],
            ) == "degrade",
            max_message_chars: r.positive("CHAT_MAX_MESSAGE_CHARS", 8000),
            llm: LlmConfig::read(r),
            embed: EmbedConfig::read(r),
            rerank: RerankConfig::read_optional(r),
            milvus: MilvusConfig::read(r),
        }
    }
}

fn yes() -> bool {
    true
}

/// The chat options of a request (`ai.chat.request` data; voice requests embed the same).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatRequest {
    /// Correlates the reply and the stream; defaults to the event id.
    pub request_id: Option<String>,
    /// The user's message (for voice requests, filled in from the transcript).
    #[serde(default)]
    pub message: String,
    /// Earlier turns, oldest first.
    #[serde(default)]
    pub history: Vec<ChatMessage>,
    /// Replaces the configured system prompt.
    pub system_prompt: Option<String>,
    /// Replaces the configured collection; one of `CHAT_COLLECTIONS`.
    pub collection: Option<String>,
    /// Documents fetched from Milvus.
    pub top_k: Option<usize>,
    /// Documents kept after reranking.
    pub rerank_top_n: Option<usize>,
    /// Retrieve context (default true).
    #[serde(default = "yes")]
    pub enable_rag: bool,
    /// Rerank retrieved documents (default true; needs `RERANK_URL`).
    #[serde(default = "yes")]
    pub enable_reranker: bool,
    /// Publish text chunks as they are generated (default false).
    #[serde(default)]
    pub stream: bool,
    /// Sampling temperature for the LLM.
    pub temperature: Option<f32>,
    /// Longest answer in tokens.
    pub max_tokens: Option<u32>,
    /// Passed through for logs.
    pub user_id: Option<String>,
    /// Passed through for logs.
    pub session_id: Option<String>,
}

impl ChatRequest {
    /// Rejects what can never succeed, before any backend is called.
    pub fn validate(&self, config: &ChatConfig) -> Result<(), HandlerError> {
        if self.message.trim().is_empty() {
            return Err(HandlerError::Unprocessable("message is empty".into()));
        }
        let chars = self.message.chars().count();
        if chars > config.max_message_chars {
            return Err(HandlerError::Unprocessable(format!(
                "message has {chars} characters; the limit is {} (CHAT_MAX_MESSAGE_CHARS)",
                config.max_message_chars
            )));
        }
        if let Some(turn) = self
            .history
            .iter()
            .find(|m| !matches!(m.role.as_str(), "user" | "assistant" | "system"))
        {
            return Err(HandlerError::Unprocessable(format!(
                "history role {:?} is not user, assistant or system",
                turn.role
            )));
        }
        if self.top_k == Some(0) || self.rerank_top_n == Some(0) {
            return Err(HandlerError::Unprocessable(
                "top_k and rerank_top_n must be at least 1".into(),
            ));
        }
        if let Some(collection) = &self.collection
            && !config.collections.iter().any(|c| c == collection)
        {
            // The name is the caller's own text: quoted, and cut, so the answer stays small.
            let shown: String = collection.chars().take(64).collect();
            return Err(HandlerError::Unprocessable(format!(
                "collection {shown:?} is not one this function serves (CHAT_COLLECTIONS)"
            )));
        }
        for (field, asked, max, variable) in [
            ("top_k", self.top_k, config.max_top_k, "CHAT_MAX_TOP_K"),
            (
                "rerank_top_n",
                self.rerank_top_n,
                config.max_rerank_top_n,
                "CHAT_MAX_RERANK_TOP_N",
            ),
        ] {
            if let Some(asked) = asked
                && asked > max
            {
                return Err(HandlerError::Unprocessable(format!(
                    "{field} is {asked}; the limit is {max} ({variable})"
                )));
            }
        }
        Ok(())
    }

    /// Identical requests share a run only without history (a conversation is its own).
    fn flight_key(&self) -> Option<String> {
        if !self.history.is_empty() {
            return None;
        }
        let normalized: String = self
            .message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        Some(format!(
            "{normalized}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{:?}",
            self.system_prompt,
            self.collection,
            self.top_k,
            self.rerank_top_n,
            self.enable_rag,
            self.enable_reranker,
            self.temperature.map(f32::to_bits),
            self.max_tokens,
        ))
    }
}

/// A context document in the answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceDoc {
    /// Milvus primary key.
    pub id: String,
    /// The document text.
    pub text: String,
    /// Where it came from, when stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Rerank score if reranked, else the search score.
    pub score: f32,
}

/// Milliseconds per stage.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Timings {
    /// Embedding the message.
    pub embed: u64,
    /// Searching Milvus (FAQ and documents).
    pub search: u64,
    /// Reranking.
    pub rerank: u64,
    /// From the LLM request to its first token.
    pub ttft: u64,
    /// The whole LLM call.
    pub llm: u64,
    /// Everything.
    pub total: u64,
}

/// `ai.chat.response` data.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    /// The request's id.
    pub request_id: String,
    /// The full answer.
    pub response: String,
    /// Context used, in prompt order (`[1]` first).
    pub sources: Vec<SourceDoc>,
    /// `direct` (stored answer), `rag` (LLM with context) or `llm` (LLM alone).
    pub path: &'static str,
    /// Retrieval failed and the answer was made without it.
    pub degraded: bool,
    /// Token counts reported by the LLM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Stage timings.
    pub timings_ms: Timings,
}

/// Receives answer text as it is produced.
pub trait DeltaSink: Send {
    /// One piece of text, in order.
    fn delta(&mut self, text: &str) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Whether deltas reach someone (a stream subscriber). A failure after a visible delta is
    /// final; before one (or when nothing is visible) it can be retried.
    fn visible(&self) -> bool {
        true
    }
}

/// A sink for non-streamed requests.
#[derive(Debug, Default)]
pub struct Discard;

impl DeltaSink for Discard {
    async fn delta(&mut self, _text: &str) -> Result<(), HandlerError> {
        Ok(())
    }

    fn visible(&self) -> bool {
        false
    }
}

struct ChatMetrics {
    ttft: Histogram<f64>,
    stage: Histogram<f64>,
    paths: Counter<u64>,
    shared: Counter<u64>,
}

impl ChatMetrics {
    fn new() -> Self {
        let meter = telemetry::meter("chat");
        let buckets = vec![
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        Self {
            ttft: meter
                .f64_histogram("chat_time_to_first_token_seconds")
                .with_description("From the LLM request to its first token")
                .with_boundaries(buckets.clone())
                .build(),
            stage: meter
                .f64_histogram("chat_stage_duration_seconds")
                .with_description("Pipeline stage latency, by stage")
                .with_boundaries(buckets)
                .build(),
            paths: meter
                .u64_counter("chat_answers")
                .with_description("Answers by path (direct, rag, llm) and degraded")
                .build(),
            shared: meter
                .u64_counter("chat_shared_runs")
                .with_description("Requests that joined an identical run already in progress")
                .build(),
        }
    }
}

/// The pipeline's backends.
struct Pipeline {
    config: ChatConfig,
    llm: LlmClient,
    embed: EmbedClient,
    rerank: Option<RerankClient>,
    milvus: MilvusClient,
    metrics: ChatMetrics,
}

/// The chat pipeline with singleflight. Cheap to clone.
#[derive(Clone)]
pub struct Chat {
    pipeline: Arc<Pipeline>,
    flights: Flights,
    next_flight: Arc<AtomicU64>,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat").finish_non_exhaustive()
    }
}

impl Chat {
    /// Builds the clients on one shared HTTP client.
    pub fn new(http: reqwest::Client, config: ChatConfig) -> Self {
        let pipeline = Pipeline {
            llm: LlmClient::new(http.clone(), config.llm.clone()),
            embed: EmbedClient::new(http.clone(), config.embed.clone()),
            rerank: config
                .rerank
                .clone()
                .map(|c| RerankClient::new(http.clone(), c)),
            milvus: MilvusClient::new(http, config.milvus.clone()),
            metrics: ChatMetrics::new(),
            config,
        };
        Self {
            pipeline: Arc::new(pipeline),
            flights: Arc::default(),
            next_flight: Arc::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ChatConfig {
        &self.pipeline.config
    }

    /// Answers `request` as `request_id`, feeding text to `sink` as it is produced.
    ///
    /// Joins an identical run already in progress when there is one. If the LLM fails after
    /// `sink` has visibly received text, the error is [`HandlerError::StreamInterrupted`]
    /// (final); otherwise the backend's own (retryable) error is returned.
    pub async fn answer(
        &self,
        request: &ChatRequest,
        request_id: &str,
        sink: &mut impl DeltaSink,
    ) -> Result<ChatResponse, HandlerError> {
        let pipeline = self.pipeline.clone();
        let run_request = request.clone();
        let joined = self.join(request.flight_key(), move |mut emitter| async move {
            pipeline.run(&run_request, &mut emitter).await
        });
        self.follow(joined, request_id, sink).await
    }

    /// Takes part in a run until it is done, passing its text to `sink`.
    async fn follow(
        &self,
        joined: Joined,
        request_id: &str,
        sink: &mut impl DeltaSink,
    ) -> Result<ChatResponse, HandlerError> {
        let Joined {
            flight,
            mut events,
            prefix,
        } = joined;
        let mut streamed = false;
        if !prefix.is_empty() {
            sink.delta(&prefix).await?;
            streamed = sink.visible();
        }
        let outcome = loop {
            match events.recv().await {
                Ok(FlightEvent::Delta(text)) => {
                    sink.delta(&text).await?;
                    streamed |= sink.visible();
                }
                Ok(FlightEvent::Done(result)) => break *result,
                Err(broadcast::error::RecvError::Lagged(_))
                | Err(broadcast::error::RecvError::Closed) => {
                    break Err(HandlerError::Internal(
                        "lost track of a shared answer; retry".into(),
                    ));
                }
            }
        };
        drop(flight);
        match outcome {
            Ok(mut response) => {
                response.request_id = request_id.to_string();
                Ok(response)
            }
            Err(e) if streamed && e.class().is_retryable() => {
                Err(HandlerError::StreamInterrupted(e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Joins the run for `key`, or starts one with `run` (no key: always a run of its own).
    fn join<F, Fut>(&self, key: Option<String>, run: F) -> Joined
    where
        F: FnOnce(Emitter) -> Fut,
        Fut: Future<Output = Result<ChatResponse, HandlerError>> + Send + 'static,
    {
        let mut flights = lock(&self.flights);
        if let Some(flight) = key
            .as_ref()
            .and_then(|k| flights.get(k))
            .and_then(|entry| entry.flight.upgrade())
        {
            let (events, prefix) = flight.channel.subscribe();
            self.pipeline.metrics.shared.add(1, &[]);
            return Joined {
                flight,
                events,
                prefix,
            };
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let channel = Arc::new(FlightChannel::default());
        let (events, prefix) = channel.subscribe();
        let work = run(Emitter(channel.clone()));
        let guard = RunGuard {
            owner: key.clone().map(|key| FlightOwner {
                flights: self.flights.clone(),
                key,
                id,
            }),
            channel: channel.clone(),
            finished: false,
        };
        let task = tokio::spawn(async move {
            // Dropped unfinished when `work` panics (or the run is cancelled): the guard then
            // fails the flight, so participants hear about it at once, not at their deadline.
            let guard = guard;
            let result = work.await;
            guard.finish(result);
        });
        let flight = Arc::new(Flight {
            channel,
            task: task.abort_handle(),
            owner: key.clone().map(|key| FlightOwner {
                flights: self.flights.clone(),
                key,
                id,
            }),
        });
        if let Some(k) = key {
            flights.insert(
                k,
                FlightEntry {
                    id,
                    flight: Arc::downgrade(&flight),
                },
            );
        }
        Joined {
            flight,
            events,
            prefix,
        }
    }
}

/// Locks a mutex even if a panic poisoned it: the maps and channels here stay consistent
/// (every change is a single insert, remove or send), and this runs in `Drop`.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A participant's view of a run.
struct Joined {
    flight: Arc<Flight>,
    events: broadcast::Receiver<FlightEvent>,
    prefix: String,
}

/// The runs in progress by key. Each entry names its flight by `id`, so only the flight that
/// put an entry there removes it, never a newer run under the same key.
type Flights = Arc<Mutex<HashMap<String, FlightEntry>>>;

struct FlightEntry {
    id: u64,
    flight: Weak<Flight>,
}

/// A flight's claim on its key in [`Flights`].
struct FlightOwner {
    flights: Flights,
    key: String,
    id: u64,
}

impl FlightOwner {
    /// Removes the key if it still names this flight, so nobody joins a finished run and dead
    /// entries do not pile up.
    fn release(&self) {
        let mut flights = lock(&self.flights);
        if flights.get(&self.key).is_some_and(|e| e.id == self.id) {
            flights.remove(&self.key);
        }
    }
}

/// Lives in the run's task: it always finishes the flight, with the run's result or, when the
/// task ends without one (a panic, an abort), with an internal error.
struct RunGuard {
    owner: Option<FlightOwner>,
    channel: Arc<FlightChannel>,
    finished: bool,
}

impl RunGuard {
    fn finish(mut self, result: Result<ChatResponse, HandlerError>) {
        self.finished = true;
        self.end(result);
    }

    fn end(&self, result: Result<ChatResponse, HandlerError>) {
        // Remove the key first, under the same lock joiners take, so nobody joins a finished
        // run: whoever joined before this sees the Done below.
        if let Some(owner) = &self.owner {
            owner.release();
        }
        self.channel.finish(result);
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.end(Err(HandlerError::Internal(
                "the shared answer's run stopped without a result; retry".into(),
            )));
        }
    }
}

enum FlightEvent {
    Delta(String),
    Done(Box<Result<ChatResponse, HandlerError>>),
}

impl Clone for FlightEvent {
    fn clone(&self) -> Self {
        match self {
            Self::Delta(t) => Self::Delta(t.clone()),
            Self::Done(r) => Self::Done(r.clone()),
        }
    }
}

/// One run's output: the text so far and a channel of what follows, changed under one lock so
/// a joiner sees every delta exactly once.
struct FlightChannel {
    state: Mutex<(String, broadcast::Sender<FlightEvent>)>,
}

impl Default for FlightChannel {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            state: Mutex::new((String::new(), tx)),
        }
    }
}

impl FlightChannel {
    fn subscribe(&self) -> (broadcast::Receiver<FlightEvent>, String) {
        let state = lock(&self.state);
        (state.1.subscribe(), state.0.clone())
    }

    fn delta(&self, text: &str) {
        let mut state = lock(&self.state);
        state.0.push_str(text);
        let _ = state.1.send(FlightEvent::Delta(text.to_string()));
    }

    fn finish(&self, result: Result<ChatResponse, HandlerError>) {
        let state = lock(&self.state);
        let _ = state.1.send(FlightEvent::Done(Box::new(result)));
    }
}

/// Held by every participant; the last one out cancels the run (and so the LLM request) and
/// gives up the key.
struct Flight {
    channel: Arc<FlightChannel>,
    task: tokio::task::AbortHandle,
    owner: Option<FlightOwner>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(owner) = &self.owner {
            owner.release();
        }
    }
}

struct Emitter(Arc<FlightChannel>);

impl DeltaSink for Emitter {
    async fn delta(&mut self, text: &str) -> Result<(), HandlerError> {
        self.0.delta(text);
        Ok(())
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What retrieval produced.
struct Retrieved {
    sources: Vec<SourceDoc>,
    degraded: bool,
}

impl Pipeline {
    async fn run(
        &self,
        request: &ChatRequest,
        sink: &mut Emitter,
    ) -> Result<ChatResponse, HandlerError> {
        let started = Instant::now();
        let mut timings = Timings::default();
        let request_id = request.request_id.clone().unwrap_or_default();

        let needs_vector = request.enable_rag || self.config.faq_collection.is_some();
        let vector = if needs_vector {
            let t = Instant::now();
            let result = self
                .embed
                .embed(std::slice::from_ref(&request.message))
                .await;
            timings.embed = ms(t.elapsed());
            self.stage("embed", t);
            match result.map(|mut v| v.pop()) {
                Ok(Some(v)) => Some(v),
                Ok(None) => None,
                Err(e) if self.config.degrade_on_retrieval_failure => {
                    tracing::warn!(error = %e, "embedding failed, answering without retrieval");
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let retrieval_failed = needs_vector && vector.is_none();

        // Direct answer: a stored answer close enough to the question skips the LLM.
        if let (Some(faq), Some(v)) = (&self.config.faq_collection, &vector) {
            let t = Instant::now();
            let hits = self
                .milvus
                .search(faq, v, 1, &[self.config.faq_answer_field.as_str()])
                .await;
            timings.search += ms(t.elapsed());
            self.stage("faq_search", t);
            match hits {
                Ok(hits) => {
                    let best = hits.into_iter().next().and_then(|h| {
                        let answer = h
                            .fields
                            .get(&self.config.faq_answer_field)
                            .and_then(|v| v.as_str())
                            .map(str::to_string)?;
                        (h.score >= self.config.faq_threshold).then_some((h, answer))
                    });
                    if let Some((hit, answer)) = best {
                        for piece in words_in_groups(&answer, 4) {
                            sink.delta(&piece).await?;
                        }
                        timings.total = ms(started.elapsed());
                        self.metrics.paths.add(
                            1,
                            &[
                                KeyValue::new("path", "direct"),
                                KeyValue::new("degraded", false),
                            ],
                        );
                        return Ok(ChatResponse {
                            request_id,
                            response: answer.clone(),
                            sources: vec![SourceDoc {
                                id: hit.id,
                                text: answer,
                                source: Some(faq.clone()),
                                score: hit.score,
                            }],
                            path: "direct",
                            degraded: false,
                            usage: None,
                            timings_ms: timings,
                        });
                    }
                }
                Err(e) if self.config.degrade_on_retrieval_failure => {
                    tracing::warn!(error = %e, "FAQ search failed, continuing without a direct answer");
                }
                Err(e) => return Err(e),
            }
        }

        let retrieved = match (&vector, request.enable_rag) {
            (Some(v), true) => self.retrieve(request, v, &mut timings).await?,
            _ => Retrieved {
                sources: Vec::new(),
                degraded: false,
            },
        };
        let degraded = retrieved.degraded || (request.enable_rag && retrieval_failed);

        let messages = self.prompt(request, &retrieved.sources);
        let completion = CompletionRequest {
            messages,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
        };
        let t = Instant::now();
        let mut stream = self.llm.stream(&completion).await?;
        let mut response = String::new();
        let mut usage = None;
        while let Some(delta) = stream.next().await {
            match delta? {
                Delta::Text(text) => {
                    if response.is_empty() {
                        timings.ttft = ms(t.elapsed());
                        self.metrics.ttft.record(t.elapsed().as_secs_f64(), &[]);
                    }
                    response.push_str(&text);
                    sink.delta(&text).await?;
                }
                Delta::Usage(u) => usage = Some(u),
            }
        }
        timings.llm = ms(t.elapsed());
        self.stage("llm", t);
        timings.total = ms(started.elapsed());
        let path = if retrieved.sources.is_empty() {
            "llm"
        } else {
            "rag"
        };
        self.metrics.paths.add(
            1,
            &[
                KeyValue::new("path", path),
                KeyValue::new("degraded", degraded),
            ],
        );
        Ok(ChatResponse {
            request_id,
            response,
            sources: retrieved.sources,
            path,
            degraded,
            usage,
            timings_ms: timings,
        })
    }

    async fn retrieve(
        &self,
        request: &ChatRequest,
        vector: &[f32],
        timings: &mut Timings,
    ) -> Result<Retrieved, HandlerError> {
        let config = &self.config;
        let collection = request.collection.as_deref().unwrap_or(&config.collection);
        let top_k = request.top_k.unwrap_or(config.top_k);
        let top_n = request.rerank_top_n.unwrap_or(config.rerank_top_n);
        let t = Instant::now();
        let hits = self
            .milvus
            .search(
                collection,
                vector,
                top_k,
                &[config.text_field.as_str(), config.source_field.as_str()],
            )
            .await;
        timings.search += ms(t.elapsed());
        self.stage("search", t);
        let hits = match hits {
            Ok(h) => h,
            Err(e) if config.degrade_on_retrieval_failure => {
                tracing::warn!(error = %e, "search failed, answering without retrieval");
                return Ok(Retrieved {
                    sources: Vec::new(),
                    degraded: true,
                });
            }
            Err(e) => return Err(e),
        };
        let mut docs: Vec<SourceDoc> = hits
            .into_iter()
            .filter_map(|h| {
                let text = h.fields.get(&config.text_field)?.as_str()?.to_string();
                let source = h
                    .fields
                    .get(&config.source_field)
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                Some(SourceDoc {
                    id: h.id,
                    text,
                    source,
                    score: h.score,
                })
            })
            .collect();
        let mut degraded = false;
        if let (true, Some(reranker), false) =
            (request.enable_reranker, &self.rerank, docs.is_empty())
        {
            let t = Instant::now();
            let texts: Vec<String> = docs.iter().map(|d| d.text.clone()).collect();
            let ranked = reranker.rerank(&request.message, &texts).await;
            timings.rerank = ms(t.elapsed());
            self.stage("rerank", t);
            match ranked {
                Ok(ranked) => {
                    docs = ranked
                        .into_iter()
                        .filter_map(|r| {
                            docs.get(r.index).cloned().map(|d| SourceDoc {
                                score: r.score,
                                ..d
                            })
                        })
                        .collect();
                }
                Err(e) if config.degrade_on_retrieval_failure => {
                    // Search order is still a useful order.
                    tracing::warn!(error = %e, "rerank failed, keeping search order");
                    degraded = true;
                }
                Err(e) => return Err(e),
            }
        }
        docs.truncate(top_n);
        Ok(Retrieved {
            sources: docs,
            degraded,
        })
    }

    fn prompt(&self, request: &ChatRequest, sources: &[SourceDoc]) -> Vec<ChatMessage> {
        let mut system = request
            .system_prompt
            .clone()
            .unwrap_or_else(|| self.config.system_prompt.clone());
        if !sources.is_empty() {
            system.push_str("\n\nContext:\n");
            for (i, doc) in sources.iter().enumerate() {
                let origin = doc
                    .source
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                system.push_str(&format!("[{}] {}{}\n", i + 1, doc.text.trim(), origin));
            }
        }
        let mut messages = Vec::with_capacity(request.history.len() + 2);
        messages.push(ChatMessage {
            role: "system".into(),
            content: system,
        });
        messages.extend(request.history.iter().cloned());
        messages.push(ChatMessage {
            role: "user".into(),
            content: request.message.clone(),
        });
        messages
    }

    fn stage(&self, stage: &'static str, since: Instant) {
        self.metrics.stage.record(
            since.elapsed().as_secs_f64(),
            &[KeyValue::new("stage", stage)],
        );
    }
}

/// Splits text into groups of `n` words (keeping the spaces), for streaming stored answers.
fn words_in_groups(text: &str, n: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    words.chunks(n.max(1)).map(<[&str]>::concat).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_answers_stream_in_word_groups_that_rejoin_exactly() {
        let text = "Reset it from the settings page, then sign in again.";
        let groups = words_in_groups(text, 4);
        assert_eq!(groups.concat(), text);
        assert_eq!(groups.len(), 3);
    }

    fn chat() -> Chat {
        let env = [
            ("LLM_URL", "http://127.0.0.1:9"),
            ("EMBED_URL", "http://127.0.0.1:9"),
            ("MILVUS_URL", "http://127.0.0.1:9"),
        ];
        let config = handler_kit::config::load(&env, ChatConfig::read).expect("config");
        let http = handler_kit::http::client(Duration::from_secs(1)).expect("http client");
        Chat::new(http, config)
    }

    fn answered(text: &str) -> ChatResponse {
        ChatResponse {
            request_id: String::new(),
            response: text.into(),
            sources: Vec::new(),
            path: "llm",
            degraded: false,
            usage: None,
            timings_ms: Timings::default(),
        }
    }

    fn open_flights(chat: &Chat) -> usize {
        lock(&chat.flights).len()
    }

    #[tokio::test]
    async fn a_panicking_run_fails_every_participant_at_once_and_is_not_joined_again() {
        let chat = chat();
        let key = Some("same question".to_string());
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let leader = chat.join(key.clone(), move |_| async move {
            let _ = wait.await;
            panic!("a bug in the pipeline");
        });
        let follower = chat.join(key.clone(), |_| async {
            unreachable!("joins the leader's run instead of starting one")
        });
        assert!(Arc::ptr_eq(&leader.flight, &follower.flight));
        let _ = go.send(());
        let deadline = Duration::from_secs(5);
        for (joined, id) in [(leader, "a"), (follower, "b")] {
            let outcome = tokio::time::timeout(deadline, chat.follow(joined, id, &mut Discard))
                .await
                .expect("answered promptly, not at the participant's deadline");
            assert!(
                matches!(&outcome, Err(HandlerError::Internal(_))),
                "{outcome:?}"
            );
            assert!(outcome.is_err_and(|e| e.class().is_retryable()));
        }
        assert_eq!(open_flights(&chat), 0, "the key is free again");

        // The next identical request starts a fresh run.
        let fresh = chat.join(key, |_| async { Ok(answered("fresh")) });
        let outcome = tokio::time::timeout(deadline, chat.follow(fresh, "c", &mut Discard))
            .await
            .expect("in time")
            .expect("the fresh run answers");
        assert_eq!(outcome.response, "fresh");
        assert_eq!(outcome.request_id, "c");
        assert_eq!(open_flights(&chat), 0);
    }

    #[tokio::test]
    async fn an_abandoned_run_gives_up_its_key() {
        let chat = chat();
        let joined = chat.join(Some("k".into()), |_| std::future::pending());
        assert_eq!(open_flights(&chat), 1);
        // The last participant goes away (a caller disconnected): the run is cancelled and its
        // entry removed rather than left behind as a dead Weak.
        drop(joined);
        assert_eq!(open_flights(&chat), 0);
        let again = chat.join(Some("k".into()), |_| async { Ok(answered("again")) });
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            chat.follow(again, "x", &mut Discard),
        )
        .await
        .expect("in time")
        .expect("answer");
        assert_eq!(outcome.response, "again");
    }

    #[test]
    fn flight_keys_normalize_whitespace_and_case_and_exclude_conversations() {
        let a = ChatRequest {
            message: "What is  NATS?".into(),
            enable_rag: true,
            ..Default::default()
        };
        let b = ChatRequest {
            message: " what is nats? ".into(),
            enable_rag: true,
            ..Default::default()
        };
        assert_eq!(a.flight_key(), b.flight_key());
        let c = ChatRequest {
            max_tokens: Some(5),
            ..a.clone()
        };
        assert_ne!(a.flight_key(), c.flight_key());
        let d = ChatRequest {
            history: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            ..a
        };
        assert_eq!(d.flight_key(), None);
    }
}
