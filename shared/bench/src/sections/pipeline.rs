//! The pipeline-bridge section: triggers over a fake Kubernetes API.
//!
//! pipeline-bridge is in the generic list too ([`catalog`](crate::harness::catalog)), against a
//! `fake-kube` process (testkit's fake API server, answering at once; after
//! [`HOLD`](crate::harness::function::HOLD) for the 100-in-flight measurement) through a
//! kubeconfig, with the catalog [`CATALOG`](crate::harness::fixtures::CATALOG). Here: trigger
//! latency with 100 triggers in flight at once (100 keep-alive connections, each sending its next
//! trigger as soon as the last is answered), every trigger a new `request_id`, so each one creates
//! a Job:
//!
//! - `bench`: no lock, one API call per trigger (`POST .../jobs`);
//! - `bench-locked`: a lock per trigger (`bench-{request}`), three calls (`GET` the Lease, 404,
//!   `POST` it, `POST` the Job).
//!
//! Target: p99 < [`TRIGGER_P99_MAX_MS`] without a lock.
//!
//! Next to it, under the same load, the floor of a function that makes one backend call per
//! event: `forward-floor` (axum, handler-kit's HTTP client) POSTing each event to an
//! `echo-floor`, which answers at once. Its p99 is what this machine allows for the target with
//! the client, the function and its backend on the same two cores.
//!
//! The 100 connections are driven from one client thread (an epoll loop,
//! [`load_evented`]), as a load generator does. The no-lock series is repeated with the
//! generic measurement's client, a blocking thread per connection, for reference: on two shared
use std::path::Path;
use std::time::Duration;

use crate::harness::error::{Context as _, Result};
use serde::Serialize;

use crate::harness::backends::FakeKube;
use crate::harness::catalog::{PIPELINE_BRIDGE, floor};
use crate::harness::fixtures::{self, LOCKED_SAMPLE};
use crate::harness::function::{Endpoints, Function, SampleEvent};
use crate::harness::load::{Throughput, WARMUP_EVENTS, load, load_evented};
use crate::harness::measure::{Running, start_ready, start_ready_with};
use crate::harness::proc::cpu_ticks;
use crate::harness::results::{Bound, MeasureError, TargetCheck, check_bound};
use crate::harness::section::{Context, RunSettings, Section};
use crate::harness::stats::Summary;

/// The target for a trigger's p99 with 100 in flight, ms.
pub const TRIGGER_P99_MAX_MS: f64 = 10.0;
/// Triggers in flight at once.
pub const CONCURRENT_TRIGGERS: usize = 100;

/// One series of triggers.
#[derive(Debug, Clone, Serialize)]
pub struct Triggers {
    /// Latency and rate.
    pub load: Throughput,
    /// CPU time pipeline-bridge used per trigger (user + system, 10 ms ticks over the run), ms.
    pub function_cpu_ms: f64,
    /// CPU time fake-kube used per trigger, ms.
    pub fake_api_cpu_ms: f64,
}

/// Everything measured in the section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineResult {
    /// `pipeline-bridge`.
    pub name: String,
    /// Triggers without a lock, [`CONCURRENT_TRIGGERS`] in flight.
    pub plain: Option<Triggers>,
    /// The floor under the same load: `forward-floor` calling an `echo-floor` once per event
    /// (`fake_api_cpu_ms` is the `echo-floor` backend's).
    pub floor: Option<Triggers>,
    /// The same, driven by a blocking client thread per connection (for reference).
    pub plain_threads: Option<Triggers>,
    /// Triggers each taking a lock of its own, [`CONCURRENT_TRIGGERS`] in flight.
    pub locked: Option<Triggers>,
    /// Failed measurements.
    pub errors: Vec<MeasureError>,
}

/// How the runner drives the 100 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// One client thread, an epoll loop ([`load_evented`]).
    Evented,
    /// A blocking client thread per connection ([`load`]).
    Threads,
}

/// One series: a fresh fake API and pipeline-bridge, a warm-up, then `triggers` timed.
fn series(
    f: &Function,
    endpoints: &Endpoints,
    triggers: usize,
    client: Client,
    bin_dir: &Path,
    logs: &Path,
) -> Result<Triggers> {
    let kube = FakeKube::start(bin_dir, Duration::ZERO, logs, "triggers")?;
    let endpoints = Endpoints {
        kube: Some(kube.kubeconfig.clone()),
        ..endpoints.clone()
    };
    let mut running = start_ready(f, &endpoints, None, logs)?;
    let load = match client {
        Client::Evented => load_evented,
        Client::Threads => load,
    };
    timed(f, &mut running, kube.pid(), load, triggers)
}

/// A signature shared by [`load`] and [`load_evented`].
type Load =
    fn(&Function, std::net::SocketAddr, usize, usize, &str) -> Result<(Vec<Duration>, Duration)>;

/// A warm-up, then `events` timed through `load` with [`CONCURRENT_TRIGGERS`] in flight,
/// with the CPU time `running` and its backend (`backend_pid`) used meanwhile.
fn timed(
    f: &Function,
    running: &mut Running,
    backend_pid: u32,
    load: Load,
    events: usize,
) -> Result<Triggers> {
    let n = CONCURRENT_TRIGGERS;
    load(f, running.addr, WARMUP_EVENTS, n, "warm").context("warm-up")?;
    let (f0, b0) = (cpu_ticks(running.proc.pid())?, cpu_ticks(backend_pid)?);
    let (latencies, wall) = load(f, running.addr, events, n, "ev")?;
    let (f1, b1) = (cpu_ticks(running.proc.pid())?, cpu_ticks(backend_pid)?);
    running.proc.check_alive()?;
    // USER_HZ is 100: one tick is 10 ms.
    let per_event = |t: u64| t as f64 * 10.0 / events as f64;
    Ok(Triggers {
        load: Throughput {
            events,
            concurrency: n,
            seconds: wall.as_secs_f64(),
            per_sec: events as f64 / wall.as_secs_f64(),
            latency_ms: Summary::of(&latencies).context("no events measured")?,
        },
        function_cpu_ms: per_event(f1.saturating_sub(f0)),
        fake_api_cpu_ms: per_event(b1.saturating_sub(b0)),
    })
}

/// The floor series: `forward-floor` in front of an `echo-floor`, loaded like [`series`].
fn floor_series(f: &Function, triggers: usize, bin_dir: &Path, logs: &Path) -> Result<Triggers> {
    let backend_fn = floor(bin_dir);
    let backend = start_ready_with(&backend_fn, Vec::new(), logs)?;
    let forward = Function {
        name: "forward-floor",
        binary: bin_dir.join("forward-floor"),
        ..f.clone()
    };
    let env = vec![(
        "ECHO_FORWARD_URL".to_string(),
        format!("http://{}/", backend.addr),
    )];
    let mut running = start_ready_with(&forward, env, logs)?;
    timed(
        &forward,
        &mut running,
        backend.proc.pid(),
        load_evented,
        triggers,
    )
}

/// Measures `f` (pipeline-bridge) against a fake API of its own per series.
fn run(
    f: &Function,
    endpoints: &Endpoints,
    triggers: usize,
    bin_dir: &Path,
    logs: &Path,
) -> PipelineResult {
    let mut r = PipelineResult {
        name: f.name.to_string(),
        ..PipelineResult::default()
    };
    let locked = Function {
        event: SampleEvent::json("ai.pipeline.trigger", LOCKED_SAMPLE),
        ..f.clone()
    };
    for (label, function, client, slot) in [
        ("no lock", f, Client::Evented, &mut r.plain),
        ("a lock each", &locked, Client::Evented, &mut r.locked),
        (
            "no lock, a client thread per connection",
            f,
            Client::Threads,
            &mut r.plain_threads,
        ),
    ] {
        eprintln!(
            "bench: pipeline-bridge: {triggers} triggers ({label}), {CONCURRENT_TRIGGERS} in flight"
        );
        match series(function, endpoints, triggers, client, bin_dir, logs) {
            Ok(t) => *slot = Some(t),
            Err(e) => r.errors.push(MeasureError {
                measure: "trigger latency",
                error: format!("{label}: {e:#}"),
            }),
        }
    }
    eprintln!("bench: forward-floor: {triggers} events, {CONCURRENT_TRIGGERS} in flight");
    match floor_series(f, triggers, bin_dir, logs) {
        Ok(t) => r.floor = Some(t),
        Err(e) => r.errors.push(MeasureError {
            measure: "trigger latency",
            error: format!("floor: {e:#}"),
        }),
    }
    r
}

/// Holds pipeline-bridge to its target.
fn check_targets(r: &PipelineResult) -> Vec<TargetCheck> {
    vec![check_bound(
        &r.name,
        format!("trigger p99 < {TRIGGER_P99_MAX_MS} ms ({CONCURRENT_TRIGGERS} in flight)"),
        r.plain.as_ref().map(|t| t.load.latency_ms.p99),
        Some(TRIGGER_P99_MAX_MS),
        "ms",
        Bound::Max,
    )]
}

/// The section as printed under the table.
fn render(r: &PipelineResult) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{} (triggers over a fake Kubernetes API answering at once, {CONCURRENT_TRIGGERS} in flight):\n",
        r.name
    );
    for (label, t) in [
        ("no lock (1 API call)", &r.plain),
        ("a lock each (3 API calls)", &r.locked),
        ("no lock, thread per connection", &r.plain_threads),
        ("floor: one HTTP call per event", &r.floor),
    ] {
        let value = match t {
            Some(t) => format!(
                "p50 {:.2} / p99 {:.2} ms, {:.0}/s   ({} events; CPU per event: function {:.3} \
                 ms, its backend {:.3} ms)",
                t.load.latency_ms.p50,
                t.load.latency_ms.p99,
                t.load.per_sec,
                t.load.events,
                t.function_cpu_ms,
                t.fake_api_cpu_ms
            ),
            None => "ERR".to_string(),
        };
        let _ = writeln!(out, "  {label:<32}{value}");
    }
    if let (Some(t), Some(floor)) = (&r.plain, &r.floor) {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let _ = writeln!(
            out,
            "  {:<32}p50 {:.2}x / p99 {:.2}x, function CPU per event {:.2}x",
            "no lock x floor",
            ratio(t.load.latency_ms.p50, floor.load.latency_ms.p50),
            ratio(t.load.latency_ms.p99, floor.load.latency_ms.p99),
            ratio(t.function_cpu_ms, floor.function_cpu_ms),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The section.

/// The pipeline-bridge section.
#[derive(Debug)]
pub struct PipelineSection {
    settings: RunSettings,
    function: Option<Function>,
    result: PipelineResult,
}

impl PipelineSection {
    /// Measures pipeline-bridge when `BENCH_ONLY` lets it run.
    pub fn new(settings: &RunSettings, catalog: &[Function]) -> Self {
        let function = catalog
            .iter()
            .find(|f| f.name == PIPELINE_BRIDGE && settings.wants(f.name))
            .cloned();
        Self {
            settings: settings.clone(),
            function,
            result: PipelineResult::default(),
        }
    }
}

impl Section for PipelineSection {
    fn key(&self) -> &'static str {
        "pipeline_bridge"
    }

    fn selected(&self) -> bool {
        self.function.is_some()
    }

    fn functions(&self) -> Vec<&Function> {
        self.function.iter().collect()
    }

    fn binaries(&self, bin_dir: &Path) -> Vec<std::path::PathBuf> {
        vec![bin_dir.join("forward-floor")]
    }

    fn run(&mut self, ctx: &mut Context<'_>) {
        if let Some(f) = &self.function {
            let endpoints = ctx.endpoints();
            self.result = run(
                f,
                &endpoints,
                self.settings.events,
                ctx.bin_dir(),
                &ctx.logs,
            );
        }
    }

    fn render(&self) -> Option<String> {
        (!self.result.name.is_empty()).then(|| render(&self.result))
    }

    fn checks(&self) -> Vec<TargetCheck> {
        if self.result.name.is_empty() {
            Vec::new()
        } else {
            check_targets(&self.result)
        }
    }

    fn notes(&self) -> Vec<String> {
        if self.function.is_none() {
            return Vec::new();
        }
        let settings = &self.settings;
        vec![format!(
            "pipeline-bridge: KUBECONFIG pointing at fake-kube (testkit's fake API server as a \
             separate process on one thread: answers like the API server, keeps every object in \
             memory; answering at once, or after {} ms for RSS@100), catalog {}; no NATS_URL. \
             Trigger latency: {} triggers after {} warm-up over {} keep-alive connections driven \
             from one client thread (epoll; the reference line: a blocking client thread each), \
             every trigger a new request_id (a new Job; with a lock, a new Lease too). Floor: \
             forward-floor (axum + handler-kit's HTTP client, one POST per event) in front of an \
             echo-floor, same events and load.",
            settings.hold_ms,
            fixtures::catalog_path(&settings.bin_dir).display(),
            settings.events,
            settings.warmup_events,
            CONCURRENT_TRIGGERS
        )]
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
