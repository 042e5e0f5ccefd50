//! The chat-handler section: what the generic table cannot show for a RAG pipeline.
//!
//! chat-handler is in the generic list too ([`catalog`](crate::harness::catalog)), so it gets
//! binary size, cold start, idle RSS and RSS with 100 events in flight (there, its LLM is a
//! simulator streaming tokens [`STREAM_TOKEN_DELAY`](crate::harness::function::STREAM_TOKEN_DELAY)
//! apart, so 100 LLM streams are open at once; the number is repeated here). Every backend is on
//! 127.0.0.1 and instant: `inference-sim` for embeddings, rerank and the LLM, and the
//! [`MilvusMock`](crate::harness::backends::MilvusMock) in the bench process for search.
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
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Error, Result, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

use crate::harness::backends::{Backend, MILVUS_SEARCH_PATH, addr_of, start_backend};
use crate::harness::catalog::CHAT_HANDLER;
use crate::harness::function::{Endpoints, Function, set_var};
use crate::harness::http::{Peer, Request, Response};
use crate::harness::llm::{MODEL, completion_body, stream_completion};
use crate::harness::load::join_clients;
use crate::harness::measure::{Held, Running, start_ready, start_ready_with};
use crate::harness::metrics::Metrics;
use crate::harness::nats::{RawSubscriber, start_nats};
use crate::harness::proc::cpu_ticks;
use crate::harness::results::{MeasureError, fail, failed};
use crate::harness::section::{Context, Section, env_count};
use crate::harness::stats::{Summary, mean_ms, ms};

/// chat-handler's defaults: `CHAT_COLLECTION`, `MILVUS_VECTOR_FIELD`, `CHAT_TOP_K`,
/// `CHAT_RERANK_TOP_N`, `CHAT_TEXT_FIELD`, `CHAT_SOURCE_FIELD`.
const COLLECTION: &str = "documents";
const VECTOR_FIELD: &str = "vector";
const TOP_K: usize = 8;
const TOP_N: usize = 4;
const TEXT_FIELD: &str = "text";
const SOURCE_FIELD: &str = "source";
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
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            events: env_count("BENCH_CHAT_EVENTS", 500)?,
            concurrency: env_count("BENCH_CHAT_CONCURRENCY", 8)?,
            warmup_events: WARMUP_PAIRS,
            ttft_events: env_count("BENCH_CHAT_TTFT_EVENTS", 100)?,
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
    function_means_ms: Stages,
    /// Mean e2e, ms (to compare with `function_means_ms.total`).
    pub e2e_mean_ms: f64,
    /// CPU time chat-handler used per measured pair (user + system, from `/proc/<pid>/stat`,
    /// 10 ms ticks over the whole run), ms.
    function_cpu_ms_per_event: Option<f64>,
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
    function_ttft_mean_ms: Option<f64>,
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
    fn fail(&mut self, measure: &'static str, error: &Error) {
        fail(&mut self.errors, measure, error);
    }

    /// Whether `measure` failed.
    pub fn failed(&self, measure: &str) -> bool {
        failed(&self.errors, measure)
    }
}

/// The question of the request with `ce-id` (or `request_id`) `id`; chat-handler's sample
/// event asks it too ([`CHAT_SAMPLE`](crate::harness::catalog::CHAT_SAMPLE)).
pub fn message(id: &str) -> String {
    format!("What is NATS? ({id})")
}

/// What the section needs from the run.
#[derive(Debug)]
struct ChatEnv<'a> {
    /// chat-handler, as in the generic list.
    function: &'a Function,
    /// The instant simulator and the Milvus mock (the rest unused).
    endpoints: &'a Endpoints,
    /// Where `inference-sim` is.
    bin_dir: &'a Path,
    /// The nats-server binary.
    nats_server: &'a Path,
    /// Child output.
    logs: &'a Path,
    /// The runtime the mock runs on (nats-server's readiness check uses it too).
    rt: &'a Runtime,
}

/// Runs the section. Failures are recorded in the result, never returned.
fn run(settings: &ChatSettings, env: &ChatEnv<'_>) -> ChatResult {
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
    let nats = match start_nats(env.nats_server, env.logs, "nats-server-chat", env.rt) {
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
    fn chain(&mut self, message: &str) -> Result<Chain> {
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
fn check_answer(r: &Response, id: &str, path: &str) -> Result<Value> {
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
) -> Result<Pair> {
    let id = format!("chat-{tag}-{i}");
    let question = message(&id);
    let request = f.event.request(function.addr, &id, true);
    let mut ask = || -> Result<Duration> {
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
) -> Result<Vec<Pair>> {
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let deadline = Instant::now() + SERIES_DEADLINE;
    let worker = || -> Result<Vec<Pair>> {
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
        let all = join_clients(handles, count)?;
        ensure!(all.len() == count, "{} of {count} pairs done", all.len());
        Ok(all)
    })
}

/// chat-handler's stage and event means between two `/metrics` scrapes, ms.
fn stage_means(before: &Metrics, after: &Metrics) -> Stages {
    let stage =
        |s: &str| after.mean_ms_since(before, "chat_stage_duration_seconds", Some(("stage", s)));
    Stages {
        embed: stage("embed"),
        search: stage("search"),
        rerank: stage("rerank"),
        llm: stage("llm"),
        total: after.mean_ms_since(
            before,
            "handler_event_duration_seconds",
            Some(("type", "ai.chat.request")),
        ),
    }
}

fn added_latency(settings: &ChatSettings, env: &ChatEnv<'_>) -> Result<Added> {
    let f = env.function;
    let mut running = start_ready(f, env.endpoints, None, env.logs)?;
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
    let before = Metrics::get(running.addr, CALL_TIMEOUT)?;
    let ticks_before = cpu_ticks(running.proc.pid()).ok();
    let measured = pairs(f, targets, settings.events, settings.concurrency, "ev")?;
    let ticks_after = cpu_ticks(running.proc.pid()).ok();
    let after = Metrics::get(running.addr, CALL_TIMEOUT)?;
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

/// The processes of one TTFT measurement: an LLM simulator answering after `delay`, and
/// chat-handler publishing to `nats_url`.
struct TtftRig {
    function: &'static str,
    delay: Duration,
    _llm: Backend,
    chat: Running,
    llm: Peer,
    subscriber: RawSubscriber,
}

impl TtftRig {
    fn start(env: &ChatEnv<'_>, nats_url: &str, delay: Duration) -> Result<Self> {
        let llm = start_backend(
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
        let chat = start_ready_with(f, vars, env.logs)?;
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
    fn pair(&mut self, id: &str, rag: bool, function: &mut Peer) -> Result<TtftPair> {
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
        let first = self
            .subscriber
            .stream_until_done(&subject, sent + CALL_TIMEOUT, |m| {
                ensure!(
                    m.headers.contains(&format!("Nats-Msg-Id: {id}.0")),
                    "the first message on {subject} is not seq 0: {:?}",
                    m.headers
                );
                Ok(())
            })?;
        let r = conn.read().context("reading chat-handler's answer")?;
        let answered = sent.elapsed();
        let data = check_answer(&r, id, if rag { "rag" } else { "llm" })?;
        let reported = data["timings_ms"]["ttft"]
            .as_f64()
            .context("no timings_ms.ttft in the answer")?;
        Ok(TtftPair {
            llm,
            first_chunk: first.saturating_duration_since(sent),
            reported_ms: reported,
            answered,
        })
    }

    fn measure(&mut self, settings: &ChatSettings, rag: bool) -> Result<Ttft> {
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
                before = Some(Metrics::get(self.chat.addr, CALL_TIMEOUT)?);
            }
            let id = format!("ttft-{mode}-{i}");
            let p = self
                .pair(&id, rag, &mut function)
                .with_context(|| format!("{} request {id}", self.function))?;
            if i >= settings.ttft_warmup_events {
                samples.push(p);
            }
        }
        let after = Metrics::get(self.chat.addr, CALL_TIMEOUT)?;
        self.chat.proc.check_alive()?;
        let function_ttft_mean_ms = before.and_then(|before| {
            let name = "chat_time_to_first_token_seconds";
            after.mean_ms_since(&before, name, None)
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

// ---------------------------------------------------------------------------------------------
// The section.

/// The chat-handler section.
#[derive(Debug)]
pub struct ChatSection {
    settings: ChatSettings,
    stream_token_delay_ms: u64,
    function: Option<Function>,
    result: ChatResult,
}

impl ChatSection {
    /// Measures chat-handler when `BENCH_ONLY` lets it run.
    pub fn new(
        settings: ChatSettings,
        run: &crate::harness::section::RunSettings,
        catalog: &[Function],
    ) -> Self {
        let function = catalog
            .iter()
            .find(|f| f.name == CHAT_HANDLER && run.wants(f.name))
            .cloned();
        Self {
            settings,
            stream_token_delay_ms: run.stream_token_delay_ms,
            function,
            result: ChatResult::default(),
        }
    }
}

impl Section for ChatSection {
    fn key(&self) -> &'static str {
        "chat_handler"
    }

    fn selected(&self) -> bool {
        self.function.is_some()
    }

    fn functions(&self) -> Vec<&Function> {
        self.function.iter().collect()
    }

    fn run(&mut self, ctx: &mut Context<'_>) {
        let Some(function) = &self.function else {
            return;
        };
        let rt = match ctx.rt() {
            Ok(rt) => rt,
            Err(e) => {
                self.result.name = function.name.to_string();
                self.result.fail(measures::ADDED, &e);
                return;
            }
        };
        let endpoints = ctx.endpoints();
        let env = ChatEnv {
            function,
            endpoints: &endpoints,
            bin_dir: ctx.bin_dir(),
            nats_server: &ctx.nats_server,
            logs: &ctx.logs,
            rt,
        };
        self.result = run(&self.settings, &env);
        self.result.rss_in_flight = ctx.held(function.name).cloned();
        self.result.milvus_searches = ctx.backends().map_or(0, |b| b.milvus_searches());
    }

    fn render(&self) -> Option<String> {
        (!self.result.name.is_empty()).then(|| render(&self.result, self.stream_token_delay_ms))
    }

    fn notes(&self) -> Vec<String> {
        if self.function.is_some() {
            notes(&self.settings)
        } else {
            Vec::new()
        }
    }

    fn errors(&self) -> Vec<String> {
        let r = &self.result;
        r.errors
            .iter()
            .map(|e| format!("{} {}: {}", r.name, e.measure, e.error))
            .collect()
    }

    fn result_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&self.result)
    }
}

// ---------------------------------------------------------------------------------------------
// Report.

/// `function/direct` per stage, ms.
fn stage_pairs(function: &Stages, direct: &Stages) -> String {
    let one = |v: Option<f64>| v.map_or_else(|| "?".to_string(), |v| format!("{v:.2}"));
    [
        ("embed", function.embed, direct.embed),
        ("search", function.search, direct.search),
        ("rerank", function.rerank, direct.rerank),
        ("llm", function.llm, direct.llm),
        ("total", function.total, direct.total),
    ]
    .iter()
    .map(|(name, f, d)| format!("{name} {}/{}", one(*f), one(*d)))
    .collect::<Vec<_>>()
    .join(", ")
}

fn ttft_rows(t: &Ttft) -> [String; 2] {
    let split = t.function_ttft_mean_ms.map_or_else(
        || "function's own TTFT not found at /metrics".to_string(),
        |f| {
            format!(
                "its LLM client {:.2} (own TTFT {f:.2} - LLM's {:.2}), the rest {:.2} (event in -> \
                 LLM request, first token -> chunk at the subscriber)",
                f - t.llm_mean_ms,
                t.llm_mean_ms,
                t.first_chunk_mean_ms - f
            )
        },
    );
    [
        format!(
            "{:.2} / {:.2} ms   (first chunk on NATS {:.2} - LLM's own first token {:.2}, p50s; \
             timings_ms.ttft p50 {:.0} ms; whole answer {:.2} ms; {} pairs)",
            t.overhead_ms.p50,
            t.overhead_ms.p90,
            t.first_chunk_ms.p50,
            t.llm_ms.p50,
            t.reported_ttft_ms.p50,
            t.answer_ms.p50,
            t.events
        ),
        format!(
            "{:.2} ms mean overhead = {split}",
            t.first_chunk_mean_ms - t.llm_mean_ms
        ),
    ]
}

/// The chat-handler section of the report.
fn render(r: &ChatResult, stream_token_delay_ms: u64) -> String {
    use measures::*;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (RAG: embeddings + Milvus search + rerank + streamed LLM, every backend instant on 127.0.0.1):",
        r.name
    );
    let mut row = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<32}{value}");
    };
    let or_err = |failed: bool| if failed { "ERR" } else { "-" }.to_string();
    match &r.added {
        Some(a) => added_rows(a, &mut row),
        None => row("added latency p50/p99", or_err(r.failed(ADDED))),
    }
    let delayed: Vec<&Ttft> = r.ttft.iter().filter(|t| t.llm_delay_ms > 0).collect();
    for t in &delayed {
        let [head, split] = ttft_rows(t);
        row(
            &format!(
                "TTFT overhead p50/p90, RAG {}",
                if t.rag { "on" } else { "off" }
            ),
            head,
        );
        row("", split);
    }
    let instant: Vec<String> = r
        .ttft
        .iter()
        .filter(|t| t.llm_delay_ms == 0)
        .map(|t| {
            format!(
                "RAG {} {:.2} / {:.2}",
                if t.rag { "on" } else { "off" },
                t.overhead_ms.p50,
                t.overhead_ms.p90
            )
        })
        .collect();
    if !instant.is_empty() {
        row(
            "  same, LLM answering at once",
            format!(
                "{} ms p50/p90   (no idle wait before the first token)",
                instant.join(", ")
            ),
        );
    }
    if delayed.is_empty() {
        row(
            "TTFT overhead",
            or_err(r.failed(TTFT_SETUP) || r.failed(TTFT)),
        );
    }
    row(
        "RSS with 100 streams",
        r.rss_in_flight.as_ref().map_or_else(
            || "ERR (see the table)".to_string(),
            |h| {
                format!(
                    "{:.2} MiB   ({} events in flight, each an LLM stream of 8 tokens {} ms apart; LLM_CONCURRENCY=100)",
                    h.rss_mib, h.events, stream_token_delay_ms
                )
            },
        ),
    );
    row("Milvus mock searches", r.milvus_searches.to_string());
    out
}

/// The rows of the added latency.
fn added_rows(a: &Added, row: &mut impl FnMut(&str, String)) {
    row(
        "added latency p50/p99",
        format!(
            "{:.2} / {:.2} ms   (per pair: function - its 4 backend calls made directly; {} pairs, {} threads)",
            a.added_ms.p50, a.added_ms.p99, a.events, a.concurrency
        ),
    );
    row(
        "  vs median direct",
        format!(
            "{:.2} / {:.2} ms   (function p50 / p99 - direct p50)",
            a.added_p50_vs_median_ms, a.added_p99_vs_median_ms
        ),
    );
    row(
        "  function p50/p99",
        format!(
            "{:.2} / {:.2} ms   (request written -> whole reply read; mean {:.2})",
            a.e2e_ms.p50, a.e2e_ms.p99, a.e2e_mean_ms
        ),
    );
    row(
        "  direct backends p50/p99",
        format!(
            "{:.2} / {:.2} ms   (embeddings + search + rerank + completion to [DONE], summed)",
            a.direct_ms.p50, a.direct_ms.p99
        ),
    );
    row(
        "  means function/direct ms",
        stage_pairs(&a.function_means_ms, &a.direct_means_ms),
    );
    row(
        "  chat-handler CPU per event",
        a.function_cpu_ms_per_event.map_or_else(
            || "?".to_string(),
            |c| format!("{c:.2} ms   (user + system over the measured pairs)"),
        ),
    );
}

/// How the chat-handler section was measured.
fn notes(c: &ChatSettings) -> Vec<String> {
    vec![
        format!(
            "chat-handler: every event asks a different question (\"What is NATS? (<ce-id>)\"): \
             identical concurrent requests would share one pipeline run. Milvus mock: POST {} \
             answers 2 documents at once (MILVUS_API=v2); no NATS_URL except for TTFT.",
            MILVUS_SEARCH_PATH
        ),
        format!(
            "chat added latency: {} pairs after {} warm-up over {} client threads, keep-alive \
             everywhere. A pair = one RAG request to chat-handler (written -> whole reply read) and \
             the same 4 backend calls made by the bench itself in turn with chat-handler's payloads \
             (embeddings, search, rerank, completion streamed to [DONE]; each written -> whole answer \
             read), order alternating; added = function - sum of the direct calls, per pair \
             (\"vs median\": function p50/p99 - direct p50). Stage means: the function's \
             chat_stage_duration_seconds / handler_event_duration_seconds over the measured pairs, \
             against the bench's direct calls under the same load. CPU per event: chat-handler's \
             utime + stime over the measured pairs (10 ms ticks).",
            c.events, c.warmup_events, c.concurrency
        ),
        format!(
            "chat TTFT: LLM on its own inference-sim with SIM_LATENCY_MS={} (delays the response \
             start), embeddings/rerank instant; chat-handler with NATS_URL (its own nats-server). \
             {} pairs per mode after {} warm-up, one at a time: the LLM's own first token (bench \
             writes the completion request -> reads the first content delta), then chat-handler \
             with stream: true (request written -> first chunk read by a raw NATS-protocol \
             subscriber on ai.chat.response.stream.> in the bench). Overhead = per-pair \
             difference; RAG on includes embeddings + search + rerank on instant backends. \
             timings_ms.ttft = the answer's own (whole ms); the split uses chat-handler's \
             chat_time_to_first_token_seconds mean. \"LLM answering at once\": the same with \
             SIM_LATENCY_MS=0 on a second simulator and chat-handler.",
            c.llm_first_token_delay_ms, c.ttft_events, c.ttft_warmup_events
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::function::EVENT_ID;

    #[test]
    fn the_sample_event_asks_the_message_of_its_id() {
        let body = crate::harness::catalog::CHAT_SAMPLE.replace(EVENT_ID, "x-1");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, json!({"message": message("x-1")}));
    }

    #[test]
    fn stage_means_come_from_the_histograms_between_scrapes() {
        let before = "chat_stage_duration_seconds_sum{stage=\"embed\"} 0.5\n\
                      chat_stage_duration_seconds_count{stage=\"embed\"} 4\n\
                      chat_stage_duration_seconds_sum{stage=\"llm\"} 9\n";
        let after = before.replace("0.5", "1.5").replace("} 4", "} 8");
        let s = stage_means(&Metrics::parse(before), &Metrics::parse(&after));
        assert_eq!(s.embed, Some(250.0));
        assert_eq!(s.llm, None);
    }
}
