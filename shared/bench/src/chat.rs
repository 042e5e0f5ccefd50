//! The chat-handler section: what the generic table cannot show for a RAG pipeline.
//!
//! chat-handler is in the generic list too ([`crate::functions`]), so it gets binary size,
//! cold start, idle RSS and RSS with 100 events in flight (there, its LLM is a simulator
//! streaming tokens [`crate::STREAM_TOKEN_DELAY`] apart, so 100 LLM streams are open at once;
//! the number is repeated here). Every backend is on 127.0.0.1 and instant: `inference-sim` for
//! embeddings, rerank and the LLM, and the [`MilvusMock`] in the bench process for search.
//!
//! 1. **Added latency**: `BENCH_CHAT_EVENTS` (500) pairs, after [`WARMUP_PAIRS`], over
//!    `BENCH_CHAT_CONCURRENCY` (8) client threads with keep-alive connections. A pair is one
//!    request to chat-handler (RAG on, answered 200 with `path: rag`, both documents, not
//!    degraded), timed from writing the request to reading the whole reply, and the same four
//!    backend calls made by the bench itself, one after the other, with the payloads
//!    chat-handler sends (embeddings, search, rerank, then the completion streamed to
//!    `[DONE]`), each timed the same way. The order within a pair alternates. A pair's added
//!    latency is the function's time minus the sum of the four direct calls. Every pair asks a
//!    different question: identical concurrent requests would share one run. Alongside:
//!    chat-handler's own per-stage means from `/metrics` over the measured pairs, and its CPU
//!    time per pair.
//! 2. **TTFT overhead**: chat-handler with `NATS_URL` (a nats-server of its own) and its LLM on
//!    a dedicated simulator answering after `SIM_LATENCY_MS` = 50 ms. `BENCH_CHAT_TTFT_EVENTS`
//!    (100) pairs per mode, one at a time, after [`TTFT_WARMUP_PAIRS`]: the LLM's own time to
//!    first token (the bench writes the completion request and times the first content delta
//!    it reads), then a `stream: true` request to chat-handler timed from writing it to the
//!    first chunk read by a subscriber on `ai.chat.response.stream.{request_id}` (a plain NATS
//!    protocol connection in the bench, nothing between the socket and the clock). Overhead
//!    of a pair = first chunk - the LLM's own first token. RAG off isolates the LLM path; RAG
//!    on adds embeddings, search and rerank (instant) before the LLM call. chat-handler's own
//!    TTFT (`chat_time_to_first_token_seconds`) splits the mean overhead into its LLM client
//!    and the rest. Then both modes again with an LLM answering at once: the difference shows
//!    what waking up after an idle wait costs.
//!
//! Every child is a [`Proc`](crate::proc::Proc) killed on drop, every wait has a deadline.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

use crate::functions::{Endpoints, Function, set_var};
use crate::http::{Conn, Request, Response, exchange};
use crate::measure::{self, Held, Running, addr_of};
use crate::proc::cpu_ticks;
use crate::report::MeasureError;
use crate::stats::{Summary, ms};

/// The Milvus REST v2 search path the mock answers.
pub const MILVUS_SEARCH_PATH: &str = "/v2/vectordb/entities/search";
/// What the mock answers to every search: two documents.
pub const MILVUS_ANSWER: &str = r#"{"code":0,"data":[{"id":1,"distance":0.9,"text":"NATS is a messaging system.","source":"a.md"},{"id":2,"distance":0.8,"text":"JetStream persists messages.","source":"b.md"}]}"#;
/// chat-handler's default system prompt (`CHAT_SYSTEM_PROMPT` unset), for the direct calls.
const SYSTEM_PROMPT: &str = "You are a helpful assistant. Answer from the numbered \
context when it is relevant and cite it as [n]; if the context does not contain the answer, \
say so briefly and answer from general knowledge.";
/// chat-handler's defaults: `CHAT_COLLECTION`, `MILVUS_VECTOR_FIELD`, `CHAT_TOP_K`,
/// `CHAT_RERANK_TOP_N`, `CHAT_TEXT_FIELD`, `CHAT_SOURCE_FIELD`, `LLM_MODEL` / `EMBED_MODEL`.
const COLLECTION: &str = "documents";
const VECTOR_FIELD: &str = "vector";
const TOP_K: usize = 8;
const TOP_N: usize = 4;
const TEXT_FIELD: &str = "text";
const SOURCE_FIELD: &str = "source";
const MODEL: &str = "default";
/// The stream subject template (`CHAT_STREAM_SUBJECT` default).
const STREAM_SUBJECT: &str = "ai.chat.response.stream.";
/// Pairs sent before the added latency is measured.
pub const WARMUP_PAIRS: usize = 50;
/// Pairs sent per mode before TTFT is measured (the first publish waits for NATS).
pub const TTFT_WARMUP_PAIRS: usize = 5;
/// The dedicated LLM simulator's `SIM_LATENCY_MS` in the TTFT measurement.
pub const LLM_FIRST_TOKEN_DELAY: Duration = Duration::from_millis(50);
/// Longest one request, backend call or NATS read may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one series of pairs may take.
const SERIES_DEADLINE: Duration = Duration::from_secs(60);

/// Settings of the section, from `BENCH_CHAT_*` variables.
#[derive(Debug, Clone, Serialize)]
pub struct ChatSettings {
    /// Pairs measured for the added latency (`BENCH_CHAT_EVENTS`, 500).
    pub events: usize,
    /// Client threads for them (`BENCH_CHAT_CONCURRENCY`, 8).
    pub concurrency: usize,
    /// Pairs sent before (not measured).
    pub warmup_events: usize,
    /// Pairs measured per mode for TTFT (`BENCH_CHAT_TTFT_EVENTS`, 100).
    pub ttft_events: usize,
    /// Pairs sent per mode before (not measured).
    pub ttft_warmup_events: usize,
    /// The LLM simulator's response delay in the TTFT measurement, ms.
    pub llm_first_token_delay_ms: u64,
}

impl ChatSettings {
    /// Reads the variables.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            events: crate::env_count("BENCH_CHAT_EVENTS", 500)?,
            concurrency: crate::env_count("BENCH_CHAT_CONCURRENCY", 8)?,
            warmup_events: WARMUP_PAIRS,
            ttft_events: crate::env_count("BENCH_CHAT_TTFT_EVENTS", 100)?,
            ttft_warmup_events: TTFT_WARMUP_PAIRS,
            llm_first_token_delay_ms: u64::try_from(LLM_FIRST_TOKEN_DELAY.as_millis())
                .unwrap_or(u64::MAX),
        })
    }
}

/// Milliseconds per backend call (or pipeline stage), and for the whole.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stages {
    /// Embeddings.
    pub embed: Option<f64>,
    /// Milvus search.
    pub search: Option<f64>,
    /// Rerank.
    pub rerank: Option<f64>,
    /// The LLM call, streamed to its end.
    pub llm: Option<f64>,
    /// Everything: the four calls, or the whole event.
    pub total: Option<f64>,
}

/// Added latency of chat-handler over its backends.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// Pairs measured.
    pub events: usize,
    /// Client threads.
    pub concurrency: usize,
    /// chat-handler, request written -> whole reply read, ms.
    pub e2e_ms: Summary,
    /// The four backend calls made directly, summed, ms.
    pub direct_ms: Summary,
    /// Per pair: e2e - direct, ms.
    pub added_ms: Summary,
    /// e2e p50 - direct p50, ms.
    pub added_p50_vs_median_ms: f64,
    /// e2e p99 - direct p50, ms.
    pub added_p99_vs_median_ms: f64,
    /// Mean of each direct call, ms (`total`: the sum).
    pub direct_means_ms: Stages,
    /// chat-handler's own view over the measured pairs, means in ms, from `/metrics`:
    /// `chat_stage_duration_seconds{stage}` and (`total`) `handler_event_duration_seconds`.
    pub function_means_ms: Stages,
    /// Mean e2e, ms (to compare with `function_means_ms.total`).
    pub e2e_mean_ms: f64,
    /// CPU time chat-handler used per measured pair (user + system, from `/proc/<pid>/stat`,
    /// 10 ms ticks over the whole run), ms.
    pub function_cpu_ms_per_event: Option<f64>,
}

/// Time to first token through chat-handler, against the LLM's own.
#[derive(Debug, Clone, Serialize)]
pub struct Ttft {
    /// Whether retrieval ran (`enable_rag`).
    pub rag: bool,
    /// The LLM simulator's `SIM_LATENCY_MS`: how long it waits before answering.
    pub llm_delay_ms: u64,
    /// Pairs measured.
    pub events: usize,
    /// The LLM's own: request written -> first content delta read, ms.
    pub llm_ms: Summary,
    /// Through chat-handler: request written -> first chunk read on the stream subject, ms.
    pub first_chunk_ms: Summary,
    /// Per pair: first chunk - the LLM's own, ms.
    pub overhead_ms: Summary,
    /// chat-handler's `timings_ms.ttft` (whole ms: LLM request -> first token, as it sees it).
    pub reported_ttft_ms: Summary,
    /// Through chat-handler: request written -> whole HTTP reply read, ms.
    pub answer_ms: Summary,
    /// Mean of the LLM's own, ms.
    pub llm_mean_ms: f64,
    /// Mean of the first chunk, ms.
    pub first_chunk_mean_ms: f64,
    /// chat-handler's own TTFT (LLM request -> first token, as its LLM client sees it), mean
    /// over the measured pairs from `chat_time_to_first_token_seconds` at `/metrics`, ms.
    pub function_ttft_mean_ms: Option<f64>,
}

/// Everything measured in the section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatResult {
    /// `chat-handler`.
    pub name: String,
    /// Added latency.
    pub added: Option<Added>,
    /// TTFT overhead: RAG off and on with the LLM answering after
    /// [`ChatSettings::llm_first_token_delay_ms`], then the same with an LLM answering at once.
    pub ttft: Vec<Ttft>,
    /// RSS with 100 events (and LLM streams) in flight, from the generic measurement.
    pub rss_in_flight: Option<Held>,
    /// Searches the Milvus mock answered over the whole run.
    pub milvus_searches: usize,
    /// Failed measurements.
    pub errors: Vec<MeasureError>,
}

/// Measurement names, as used in [`ChatResult::errors`].
pub mod measures {
    /// Added latency.
    pub const ADDED: &str = "added latency";
    /// TTFT, one mode.
    pub const TTFT: &str = "TTFT";
    /// Starting the simulator, nats-server and chat-handler for TTFT.
    pub const TTFT_SETUP: &str = "TTFT setup";
}

impl ChatResult {
    fn fail(&mut self, measure: &'static str, error: &anyhow::Error) {
        self.errors.push(MeasureError {
            measure,
            error: format!("{error:#}"),
        });
    }

    /// Whether `measure` failed.
    pub fn failed(&self, measure: &str) -> bool {
        self.errors.iter().any(|e| e.measure == measure)
    }
}

/// A Milvus REST v2 stand-in in the bench process (axum on the bench's tokio runtime):
/// `POST` [`MILVUS_SEARCH_PATH`] answers [`MILVUS_ANSWER`] at once. Stopped when dropped.
#[derive(Debug)]
pub struct MilvusMock {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    searches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl Drop for MilvusMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn milvus_search(
    axum::extract::State(searches): axum::extract::State<Arc<AtomicUsize>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // A cheap sanity check, not a parse: the request is a search of a collection.
    if !body.windows(16).any(|w| w == b"\"collectionName\"") {
        return (axum::http::StatusCode::BAD_REQUEST, "no collectionName").into_response();
    }
    searches.fetch_add(1, Ordering::Relaxed);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        MILVUS_ANSWER,
    )
        .into_response()
}

impl MilvusMock {
    /// Binds 127.0.0.1 on a free port and serves on `rt`.
    pub fn start(rt: &Runtime) -> anyhow::Result<Self> {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .context("binding the Milvus mock")?;
        let addr = listener.local_addr()?;
        let searches = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(MILVUS_SEARCH_PATH, axum::routing::post(milvus_search))
            .with_state(searches.clone());
        let task = rt.spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            url: format!("http://{addr}"),
            searches,
            task,
        })
    }

    /// Searches answered so far.
    pub fn searches(&self) -> usize {
        self.searches.load(Ordering::Relaxed)
    }
}

/// The question of the request with `ce-id` (or `request_id`) `id`; chat-handler's sample
/// event asks it too ([`crate::functions::CHAT_SAMPLE`]).
pub fn message(id: &str) -> String {
    format!("What is NATS? ({id})")
}

/// What the section needs from the run.
#[derive(Debug)]
pub struct ChatEnv<'a> {
    /// chat-handler, as in the generic list.
    pub function: &'a Function,
    /// The instant simulator and the Milvus mock (the rest unused).
    pub endpoints: &'a Endpoints,
    /// Where `inference-sim` is.
    pub bin_dir: &'a Path,
    /// The nats-server binary.
    pub nats_server: &'a Path,
    /// Child output.
    pub logs: &'a Path,
    /// The runtime the mock runs on (nats-server's readiness check uses it too).
    pub rt: &'a Runtime,
}

/// Runs the section. Failures are recorded in the result, never returned.
pub fn run(settings: &ChatSettings, env: &ChatEnv<'_>) -> ChatResult {
    let mut r = ChatResult {
        name: env.function.name.to_string(),
        ..ChatResult::default()
    };
    eprintln!(
        "bench: chat-handler: added latency ({} pairs after {} warm-up, {} threads)",
        settings.events, settings.warmup_events, settings.concurrency
    );
    match added_latency(settings, env) {
        Ok(a) => r.added = Some(a),
        Err(e) => r.fail(measures::ADDED, &e),
    }
    eprintln!(
        "bench: chat-handler: TTFT overhead ({} pairs per mode after {} warm-up, LLM first token after {} ms)",
        settings.ttft_events, settings.ttft_warmup_events, settings.llm_first_token_delay_ms
    );
    let nats =
        match crate::source::start_nats(env.nats_server, env.logs, "nats-server-chat", env.rt) {
            Ok(n) => n,
            Err(e) => {
                r.fail(measures::TTFT_SETUP, &e);
                return r;
            }
        };
    let delays = [
        Duration::from_millis(settings.llm_first_token_delay_ms),
        Duration::ZERO,
    ];
    for delay in delays {
        match TtftRig::start(env, &nats.url, delay) {
            Ok(mut rig) => {
                for rag in [false, true] {
                    match rig.measure(settings, rag) {
                        Ok(t) => r.ttft.push(t),
                        Err(e) => r.fail(measures::TTFT, &e),
                    }
                }
            }
            Err(e) => r.fail(measures::TTFT_SETUP, &e),
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Direct backend calls.

/// One keep-alive connection to a backend, opened (untimed) on first use.
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    conn: Option<Conn>,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    pub(crate) fn conn(&mut self) -> io::Result<&mut Conn> {
        if self.conn.is_none() {
            self.conn = Some(Conn::connect(self.addr, CALL_TIMEOUT)?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| io::Error::other("no connection"))
    }

    /// Writes `request`, reads the answer with `on_body`; returns it with the moment before
    /// the write and the time from then to the end of the body. Any failure drops the
    /// connection.
    pub(crate) fn send(
        &mut self,
        request: &Request,
        on_body: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<(Response, Instant, Duration)> {
        let conn = self.conn()?;
        let started = Instant::now();
        let result = conn.write(request).and_then(|()| conn.read_with(on_body));
        let took = started.elapsed();
        match result {
            Ok(r) => Ok((r, started, took)),
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// `POST path` with a JSON body, which must be answered 200.
    fn post_json(
        &mut self,
        path: &str,
        body: &Value,
        on_body: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<(Response, Instant, Duration)> {
        let request = Request::new(
            "POST",
            self.addr,
            path,
            &[("content-type", "application/json"), ("accept", "*/*")],
            body.to_string().as_bytes(),
            true,
        );
        let (r, started, took) = self
            .send(&request, on_body)
            .with_context(|| format!("POST {path} on {}", self.addr))?;
        ensure!(
            r.status == 200,
            "POST {path} on {} answered HTTP {}: {}",
            self.addr,
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        Ok((r, started, took))
    }
}

/// Times the first content delta of a server-sent-events completion as it is read.
#[derive(Default)]
struct FirstToken {
    pending: Vec<u8>,
    at: Option<Instant>,
}

impl FirstToken {
    fn feed(&mut self, bytes: &[u8]) {
        let now = Instant::now();
        if self.at.is_some() {
            return;
        }
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            if text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .any(|data| has_content(data.trim()))
            {
                self.at = Some(now);
                return;
            }
        }
    }
}

/// Whether an SSE `data` payload carries a non-empty `choices[0].delta.content`.
fn has_content(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|v| {
        v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    })
}

/// The completion request chat-handler sends for `message` with `docs` (text, source) as
/// numbered context.
pub(crate) fn completion_body(message: &str, docs: &[(String, Option<String>)]) -> Value {
    let mut system = SYSTEM_PROMPT.to_string();
    if !docs.is_empty() {
        system.push_str("\n\nContext:\n");
        for (i, (text, source)) in docs.iter().enumerate() {
            let origin = source
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            system.push_str(&format!("[{}] {}{}\n", i + 1, text.trim(), origin));
        }
    }
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": message},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Streams a completion to `[DONE]`: (first content delta, whole stream), both from before
/// the request was written.
fn stream_completion(peer: &mut Peer, body: &Value) -> anyhow::Result<(Duration, Duration)> {
    let mut first = FirstToken::default();
    let (r, started, took) =
        peer.post_json("/v1/chat/completions", body, &mut |b| first.feed(b))?;
    ensure!(
        r.body.windows(12).any(|w| w == b"data: [DONE]"),
        "the completion stream did not end with [DONE]"
    );
    let at = first
        .at
        .context("the completion stream carried no content")?;
    Ok((at.saturating_duration_since(started), took))
}

/// Streams a completion to `[DONE]`: (the answer's text, the whole stream's time from before
/// the request was written).
pub(crate) fn stream_completion_text(
    peer: &mut Peer,
    body: &Value,
) -> anyhow::Result<(String, Duration)> {
    let (r, _, took) = peer.post_json("/v1/chat/completions", body, &mut |_| {})?;
    let mut text = String::new();
    let mut done = false;
    for data in String::from_utf8_lossy(&r.body)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
    {
        if data == "[DONE]" {
            done = true;
        } else if let Ok(v) = serde_json::from_str::<Value>(data)
            && let Some(t) = v["choices"][0]["delta"]["content"].as_str()
        {
            text.push_str(t);
        }
    }
    ensure!(done, "the completion stream did not end with [DONE]");
    ensure!(!text.is_empty(), "the completion stream carried no content");
    Ok((text, took))
}

#[derive(Deserialize)]
struct EmbeddingAnswer {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct SearchAnswer {
    code: i64,
    data: Vec<Value>,
}

#[derive(Deserialize)]
struct RankItem {
    index: usize,
    score: f32,
}

/// The four direct calls of one RAG answer.
#[derive(Debug, Clone, Copy)]
struct Chain {
    embed: Duration,
    search: Duration,
    rerank: Duration,
    llm: Duration,
}

impl Chain {
    fn total(&self) -> Duration {
        self.embed + self.search + self.rerank + self.llm
    }
}

/// The bench's own connections to chat-handler's backends.
struct Direct {
    sim: Peer,
    milvus: Peer,
    llm: Peer,
}

impl Direct {
    /// Embeddings, search, rerank and the streamed completion for `message`, as chat-handler
    /// makes them.
    fn chain(&mut self, message: &str) -> anyhow::Result<Chain> {
        let body = json!({"model": MODEL, "input": [message], "encoding_format": "float"});
        let (r, _, embed) = self.sim.post_json("/v1/embeddings", &body, &mut |_| {})?;
        let answer: EmbeddingAnswer =
            serde_json::from_slice(&r.body).context("reading the embeddings answer")?;
        let vector = answer
            .data
            .into_iter()
            .next()
            .context("no embedding")?
            .embedding;

        let vector: &[f32] = &vector;
        let body = json!({
            "collectionName": COLLECTION,
            "data": [vector],
            "annsField": VECTOR_FIELD,
            "limit": TOP_K,
            "outputFields": [TEXT_FIELD, SOURCE_FIELD],
        });
        let (r, _, search) = self
            .milvus
            .post_json(MILVUS_SEARCH_PATH, &body, &mut |_| {})?;
        let answer: SearchAnswer =
            serde_json::from_slice(&r.body).context("reading the search answer")?;
        ensure!(answer.code == 0, "search answered code {}", answer.code);
        let docs: Vec<(String, Option<String>)> = answer
            .data
            .iter()
            .filter_map(|h| {
                let text = h[TEXT_FIELD].as_str()?.to_string();
                Some((text, h[SOURCE_FIELD].as_str().map(str::to_string)))
            })
            .collect();
        ensure!(
            docs.len() == 2,
            "search found {} documents, not 2",
            docs.len()
        );

        let texts: Vec<&str> = docs.iter().map(|(t, _)| t.as_str()).collect();
        let body = json!({"query": message, "texts": texts});
        let (r, _, rerank) = self.sim.post_json("/rerank", &body, &mut |_| {})?;
        let mut ranked: Vec<RankItem> =
            serde_json::from_slice(&r.body).context("reading the rerank answer")?;
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut ordered: Vec<(String, Option<String>)> = ranked
            .iter()
            .filter_map(|r| docs.get(r.index).cloned())
            .collect();
        ordered.truncate(TOP_N);

        let (_, llm) = stream_completion(&mut self.llm, &completion_body(message, &ordered))?;
        Ok(Chain {
            embed,
            search,
            rerank,
            llm,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Requests to chat-handler.

/// A binary-mode `ai.chat.request` with `ce-id: id` and `data` as its body.
fn chat_event(addr: SocketAddr, id: &str, data: &Value) -> Request {
    Request::new(
        "POST",
        addr,
        "/",
        &[
            ("ce-specversion", "1.0"),
            ("ce-type", "ai.chat.request"),
            ("ce-source", "bench"),
            ("content-type", "application/json"),
            ("ce-id", id),
        ],
        data.to_string().as_bytes(),
        true,
    )
}

/// Checks chat-handler's answer to `id`: 200, `ce-id: <id>.reply`, the expected `path`, not
/// degraded, and (for `rag`) both documents as sources. Returns the data.
fn check_answer(r: &Response, id: &str, path: &str) -> anyhow::Result<Value> {
    ensure!(
        r.status == 200,
        "chat-handler answered HTTP {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let want = format!("{id}.reply");
    ensure!(
        r.header("ce-id") == Some(want.as_str()),
        "chat-handler's answer has ce-id {:?}, expected {want:?}",
        r.header("ce-id")
    );
    let data: Value = serde_json::from_slice(&r.body).context("reading chat-handler's answer")?;
    ensure!(
        data["path"] == path && data["degraded"] == false,
        "answer path {} degraded {}, expected path {path:?} not degraded",
        data["path"],
        data["degraded"]
    );
    if path == "rag" {
        let sources = data["sources"].as_array().map_or(0, Vec::len);
        ensure!(sources == 2, "answer has {sources} sources, not 2");
    }
    Ok(data)
}

// ---------------------------------------------------------------------------------------------
// Added latency.

struct Pair {
    e2e: Duration,
    chain: Chain,
}

/// Backend addresses of the direct calls.
#[derive(Clone, Copy)]
struct Targets {
    function: SocketAddr,
    sim: SocketAddr,
    milvus: SocketAddr,
    llm: SocketAddr,
}

/// One pair: the direct chain and one request to chat-handler, in alternating order.
fn pair(
    i: usize,
    tag: &str,
    function: &mut Peer,
    direct: &mut Direct,
    f: &Function,
) -> anyhow::Result<Pair> {
    let id = format!("chat-{tag}-{i}");
    let question = message(&id);
    let request = f.event.request(function.addr, &id, true);
    let mut ask = || -> anyhow::Result<Duration> {
        let (r, _, took) = function
            .send(&request, &mut |_| {})
            .context("sending an event to chat-handler")?;
        check_answer(&r, &id, "rag")?;
        Ok(took)
    };
    let (e2e, chain) = if i.is_multiple_of(2) {
        let chain = direct.chain(&question)?;
        (ask()?, chain)
    } else {
        let e2e = ask()?;
        (e2e, direct.chain(&question)?)
    };
    Ok(Pair { e2e, chain })
}

/// `count` pairs over `concurrency` threads.
fn pairs(
    f: &Function,
    targets: Targets,
    count: usize,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<Vec<Pair>> {
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let deadline = Instant::now() + SERIES_DEADLINE;
    let worker = || -> anyhow::Result<Vec<Pair>> {
        let mut function = Peer::new(targets.function);
        let mut direct = Direct {
            sim: Peer::new(targets.sim),
            milvus: Peer::new(targets.milvus),
            llm: Peer::new(targets.llm),
        };
        let mut out = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count || abort.load(Ordering::Relaxed) {
                return Ok(out);
            }
            ensure!(
                Instant::now() < deadline,
                "not done within {SERIES_DEADLINE:?}"
            );
            match pair(i, tag, &mut function, &mut direct, f) {
                Ok(p) => out.push(p),
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    return Err(e.context(format!("pair {i}")));
                }
            }
        }
    };
    thread::scope(|s| {
        let mut handles = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let handle = thread::Builder::new()
                .stack_size(512 * 1024)
                .spawn_scoped(s, worker)
                .context("starting a client thread");
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        let mut all = Vec::with_capacity(count);
        let mut first_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok(p)) => all.extend(p),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow!("client thread panicked"));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        ensure!(all.len() == count, "{} of {count} pairs done", all.len());
        Ok(all)
    })
}

/// `(sum, count)` of a Prometheus histogram over the series whose labels contain `label`.
fn histogram(metrics: &str, name: &str, label: &str) -> (f64, f64) {
    let value = |suffix: &str| -> f64 {
        let series = format!("{name}_{suffix}");
        metrics
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(series.as_str())?;
                let (labels, value) = match rest.strip_prefix('{') {
                    Some(r) => r.split_once('}')?,
                    None => ("", rest),
                };
                if !value.starts_with(' ') || !labels.contains(label) {
                    return None;
                }
                value.trim().parse::<f64>().ok()
            })
            .sum()
    };
    (value("sum"), value("count"))
}

/// chat-handler's stage and event means between two `/metrics` scrapes, ms.
fn stage_means(before: &str, after: &str) -> Stages {
    let mean = |name: &str, label: &str| {
        let (s0, c0) = histogram(before, name, label);
        let (s1, c1) = histogram(after, name, label);
        (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1000.0)
    };
    let stage = |s: &str| mean("chat_stage_duration_seconds", &format!("stage=\"{s}\""));
    Stages {
        embed: stage("embed"),
        search: stage("search"),
        rerank: stage("rerank"),
        llm: stage("llm"),
        total: mean("handler_event_duration_seconds", "type=\"ai.chat.request\""),
    }
}

fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let r = exchange(addr, &Request::get(addr, "/metrics"), CALL_TIMEOUT)?;
    ensure!(r.status == 200, "GET /metrics answered HTTP {}", r.status);
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

fn mean_ms(values: impl Iterator<Item = Duration>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), d| (s + ms(d), n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn added_latency(settings: &ChatSettings, env: &ChatEnv<'_>) -> anyhow::Result<Added> {
    let f = env.function;
    let mut running = measure::start_ready(f, env.endpoints, None, env.logs)?;
    let sim = addr_of(env.endpoints.instant.as_deref().context("no simulator")?)?;
    let targets = Targets {
        function: running.addr,
        sim,
        milvus: addr_of(env.endpoints.milvus.as_deref().context("no Milvus mock")?)?,
        llm: sim,
    };
    pairs(
        f,
        targets,
        settings.warmup_events,
        settings.concurrency,
        "warm",
    )
    .context("warm-up")?;
    let before = scrape(running.addr)?;
    let ticks_before = cpu_ticks(running.proc.pid()).ok();
    let measured = pairs(f, targets, settings.events, settings.concurrency, "ev")?;
    let ticks_after = cpu_ticks(running.proc.pid()).ok();
    let after = scrape(running.addr)?;
    running.proc.check_alive()?;
    let function_cpu_ms_per_event = match (ticks_before, ticks_after) {
        (Some(a), Some(b)) if !measured.is_empty() => {
            Some(b.saturating_sub(a) as f64 * 10.0 / measured.len() as f64)
        }
        _ => None,
    };

    let e2e: Vec<Duration> = measured.iter().map(|p| p.e2e).collect();
    let direct: Vec<Duration> = measured.iter().map(|p| p.chain.total()).collect();
    let added: Vec<f64> = measured
        .iter()
        .map(|p| ms(p.e2e) - ms(p.chain.total()))
        .collect();
    let e2e_ms = Summary::of(&e2e).context("no pairs")?;
    let direct_ms = Summary::of(&direct).context("no pairs")?;
    Ok(Added {
        events: measured.len(),
        concurrency: settings.concurrency,
        added_p50_vs_median_ms: e2e_ms.p50 - direct_ms.p50,
        added_p99_vs_median_ms: e2e_ms.p99 - direct_ms.p50,
        added_ms: Summary::of_ms(&added).context("no pairs")?,
        direct_means_ms: Stages {
            embed: mean_ms(measured.iter().map(|p| p.chain.embed)),
            search: mean_ms(measured.iter().map(|p| p.chain.search)),
            rerank: mean_ms(measured.iter().map(|p| p.chain.rerank)),
            llm: mean_ms(measured.iter().map(|p| p.chain.llm)),
            total: mean_ms(direct.iter().copied()),
        },
        function_means_ms: stage_means(&before, &after),
        e2e_mean_ms: mean_ms(e2e.iter().copied()).unwrap_or_default(),
        function_cpu_ms_per_event,
        e2e_ms,
        direct_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// TTFT.

/// A NATS subscriber speaking the client protocol over a blocking socket: `CONNECT`, `SUB`,
/// `PING`/`PONG`, and `MSG`/`HMSG` read as they arrive.
pub(crate) struct RawSubscriber {
    reader: BufReader<TcpStream>,
}

/// One message read by [`RawSubscriber`].
pub(crate) struct NatsMessage {
    /// When its first line was read.
    pub(crate) at: Instant,
    pub(crate) subject: String,
    pub(crate) headers: String,
    pub(crate) payload: Vec<u8>,
}

impl RawSubscriber {
    /// Connects to `nats://127.0.0.1:PORT` and subscribes to `subject`; returns once the
    /// server has confirmed (`PONG` after `SUB`).
    pub(crate) fn connect(url: &str, subject: &str) -> anyhow::Result<Self> {
        let addr: SocketAddr = url
            .strip_prefix("nats://")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{url:?} is not nats://IP:PORT"))?;
        let stream = TcpStream::connect_timeout(&addr, CALL_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(CALL_TIMEOUT))?;
        let mut sub = Self {
            reader: BufReader::new(stream),
        };
        let info = sub.line()?;
        ensure!(info.starts_with("INFO "), "nats-server said {info:?} first");
        let hello = format!(
            "CONNECT {}\r\nSUB {subject} 1\r\nPING\r\n",
            json!({"verbose": false, "pedantic": false, "headers": true, "protocol": 1,
                   "name": "bench", "lang": "rust", "version": "0"})
        );
        sub.write(hello.as_bytes())?;
        loop {
            match sub.line()?.as_str() {
                "PONG" => return Ok(sub),
                "PING" => sub.write(b"PONG\r\n")?,
                // The server may send INFO again at any time (e.g. after CONNECT).
                l if l == "+OK" || l.starts_with("INFO ") => {}
                other => bail!("nats-server answered {other:?} to CONNECT/SUB"),
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(64 * 1024)
            .read_line(&mut line)
            .context("reading from nats-server")?;
        ensure!(n > 0, "nats-server closed the connection");
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    /// The next message (answering the server's `PING`s on the way).
    pub(crate) fn next(&mut self) -> anyhow::Result<NatsMessage> {
        loop {
            let line = self.line()?;
            let at = Instant::now();
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.first().copied() {
                Some("PING") => self.write(b"PONG\r\n")?,
                Some("+OK" | "PONG" | "INFO") => {}
                Some("MSG" | "HMSG") => {
                    let with_headers = parts[0] == "HMSG";
                    let sizes: Vec<usize> = parts
                        .iter()
                        .rev()
                        .take(if with_headers { 2 } else { 1 })
                        .map(|s| s.parse())
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("bad message line {line:?}"))?;
                    let (total, header_len) = if with_headers {
                        (sizes[0], sizes[1])
                    } else {
                        (sizes[0], 0)
                    };
                    ensure!(header_len <= total, "bad message line {line:?}");
                    let mut body = vec![0; total + 2];
                    self.reader
                        .read_exact(&mut body)
                        .context("reading a message")?;
                    body.truncate(total);
                    let payload = body.split_off(header_len);
                    return Ok(NatsMessage {
                        at,
                        subject: parts.get(1).map_or_else(String::new, |s| s.to_string()),
                        headers: String::from_utf8_lossy(&body).into_owned(),
                        payload,
                    });
                }
                _ => bail!("nats-server said {line:?}"),
            }
        }
    }
}

/// Whether a MessagePack text chunk (`{request_id, seq, text, done, error?}`, a map) has
/// `done` set to `value`.
pub(crate) fn chunk_done_is(payload: &[u8], value: bool) -> bool {
    let needle = [
        0xa4,
        b'd',
        b'o',
        b'n',
        b'e',
        if value { 0xc3 } else { 0xc2 },
    ];
    payload.windows(needle.len()).any(|w| w == needle)
}

/// The processes of one TTFT measurement: an LLM simulator answering after `delay`, and
/// chat-handler publishing to `nats_url`.
struct TtftRig {
    function: &'static str,
    delay: Duration,
    _llm: measure::Backend,
    chat: Running,
    llm: Peer,
    subscriber: RawSubscriber,
}

impl TtftRig {
    fn start(env: &ChatEnv<'_>, nats_url: &str, delay: Duration) -> anyhow::Result<Self> {
        let llm = measure::start_backend(
            env.bin_dir,
            delay,
            Duration::ZERO,
            env.logs,
            &format!("llm-first-token-{}ms", delay.as_millis()),
        )?;
        let f = env.function;
        let mut vars = f.environment(0, env.endpoints, None);
        set_var(&mut vars, "LLM_URL", llm.url.clone());
        set_var(&mut vars, "NATS_URL", nats_url);
        let chat = measure::start_ready_with(f, vars, env.logs)?;
        let subscriber = RawSubscriber::connect(nats_url, &format!("{STREAM_SUBJECT}>"))?;
        Ok(Self {
            function: f.name,
            delay,
            llm: Peer::new(llm.addr()?),
            _llm: llm,
            chat,
            subscriber,
        })
    }

    /// One pair: the LLM's own first token, then chat-handler's first chunk.
    fn pair(&mut self, id: &str, rag: bool, function: &mut Peer) -> anyhow::Result<TtftPair> {
        let question = message(id);
        let docs: Vec<(String, Option<String>)> = if rag {
            vec![
                ("NATS is a messaging system.".into(), Some("a.md".into())),
                ("JetStream persists messages.".into(), Some("b.md".into())),
            ]
        } else {
            Vec::new()
        };
        let (llm, _) = stream_completion(&mut self.llm, &completion_body(&question, &docs))?;

        let data =
            json!({"message": question, "request_id": id, "stream": true, "enable_rag": rag});
        let request = chat_event(function.addr, id, &data);
        let subject = format!("{STREAM_SUBJECT}{id}");
        let conn = function.conn()?;
        let sent = Instant::now();
        conn.write(&request)
            .context("sending an event to chat-handler")?;
        // Chunks are published before the reply is written: read them first, up to `done`.
        let mut first = None;
        let deadline = sent + CALL_TIMEOUT;
        loop {
            ensure!(
                Instant::now() < deadline,
                "no done chunk on {subject} within {CALL_TIMEOUT:?}"
            );
            let m = self.subscriber.next()?;
            if m.subject != subject {
                continue; // a late chunk of an earlier request
            }
            if first.is_none() {
                ensure!(
                    m.headers.contains(&format!("Nats-Msg-Id: {id}.0")),
                    "the first message on {subject} is not seq 0: {:?}",
                    m.headers
                );
                ensure!(
                    chunk_done_is(&m.payload, false),
                    "the first message on {subject} is not a text chunk"
                );
                first = Some(m.at);
            }
            if chunk_done_is(&m.payload, true) {
                break;
            }
        }
        let r = conn.read().context("reading chat-handler's answer")?;
        let answered = sent.elapsed();
        let data = check_answer(&r, id, if rag { "rag" } else { "llm" })?;
        let reported = data["timings_ms"]["ttft"]
            .as_f64()
            .context("no timings_ms.ttft in the answer")?;
        let first = first.context("no chunk")?;
        Ok(TtftPair {
            llm,
            first_chunk: first.saturating_duration_since(sent),
            reported_ms: reported,
            answered,
        })
    }

    fn measure(&mut self, settings: &ChatSettings, rag: bool) -> anyhow::Result<Ttft> {
        let mode = format!(
            "{}-{}ms",
            if rag { "rag" } else { "norag" },
            self.delay.as_millis()
        );
        let mut function = Peer::new(self.chat.addr);
        let started = Instant::now();
        let mut samples = Vec::with_capacity(settings.ttft_events);
        let mut before = None;
        for i in 0..settings.ttft_warmup_events + settings.ttft_events {
            ensure!(
                started.elapsed() < SERIES_DEADLINE,
                "not done within {SERIES_DEADLINE:?}"
            );
            if i == settings.ttft_warmup_events {
                before = Some(scrape(self.chat.addr)?);
            }
            let id = format!("ttft-{mode}-{i}");
            let p = self
                .pair(&id, rag, &mut function)
                .with_context(|| format!("{} request {id}", self.function))?;
            if i >= settings.ttft_warmup_events {
                samples.push(p);
            }
        }
        let after = scrape(self.chat.addr)?;
        self.chat.proc.check_alive()?;
        let function_ttft_mean_ms = before.and_then(|before| {
            let name = "chat_time_to_first_token_seconds";
            let (s0, c0) = histogram(&before, name, "");
            let (s1, c1) = histogram(&after, name, "");
            (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1000.0)
        });
        let of = |v: Vec<Duration>| Summary::of(&v).context("no samples");
        Ok(Ttft {
            rag,
            llm_delay_ms: u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
            events: samples.len(),
            llm_ms: of(samples.iter().map(|p| p.llm).collect())?,
            first_chunk_ms: of(samples.iter().map(|p| p.first_chunk).collect())?,
            overhead_ms: Summary::of_ms(
                &samples
                    .iter()
                    .map(|p| ms(p.first_chunk) - ms(p.llm))
                    .collect::<Vec<_>>(),
            )
            .context("no samples")?,
            reported_ttft_ms: Summary::of_ms(
                &samples.iter().map(|p| p.reported_ms).collect::<Vec<_>>(),
            )
            .context("no samples")?,
            answer_ms: of(samples.iter().map(|p| p.answered).collect())?,
            llm_mean_ms: mean_ms(samples.iter().map(|p| p.llm)).unwrap_or_default(),
            first_chunk_mean_ms: mean_ms(samples.iter().map(|p| p.first_chunk)).unwrap_or_default(),
            function_ttft_mean_ms,
        })
    }
}

struct TtftPair {
    llm: Duration,
    first_chunk: Duration,
    reported_ms: f64,
    answered: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::EVENT_ID;

    #[test]
    fn the_sample_event_asks_the_message_of_its_id() {
        let body = crate::functions::CHAT_SAMPLE.replace(EVENT_ID, "x-1");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, json!({"message": message("x-1")}));
    }

    #[test]
    fn first_token_waits_for_content() {
        let mut f = FirstToken::default();
        f.feed(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"cho");
        assert!(f.at.is_none());
        f.feed(b"ices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n");
        assert!(f.at.is_some());
    }

    #[test]
    fn histogram_sums_matching_series() {
        let text = "chat_stage_duration_seconds_bucket{stage=\"embed\",le=\"0.01\"} 3\n\
                    chat_stage_duration_seconds_sum{stage=\"embed\"} 0.5\n\
                    chat_stage_duration_seconds_count{stage=\"embed\"} 4\n\
                    chat_stage_duration_seconds_sum{stage=\"llm\"} 9\n";
        assert_eq!(
            histogram(text, "chat_stage_duration_seconds", "stage=\"embed\""),
            (0.5, 4.0)
        );
        let later = text.replace("0.5", "1.5").replace("} 4", "} 8");
        let s = stage_means(text, &later);
        assert_eq!(s.embed, Some(250.0));
        assert_eq!(s.llm, None);
    }

    #[test]
    fn done_flag_in_msgpack_chunks() {
        let chunk = [0x84, 0xa4, b'd', b'o', b'n', b'e', 0xc2];
        assert!(chunk_done_is(&chunk, false) && !chunk_done_is(&chunk, true));
    }

    #[test]
    fn completion_body_numbers_the_context() {
        let body = completion_body("q", &[("a ".into(), Some("s".into())), ("b".into(), None)]);
        let system = body["messages"][0]["content"].as_str().unwrap();
        assert!(
            system.ends_with("\n\nContext:\n[1] a (s)\n[2] b\n"),
            "{system}"
        );
        assert_eq!(body["messages"][1]["content"], "q");
    }
}
