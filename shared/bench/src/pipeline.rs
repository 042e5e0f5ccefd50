//! The pipeline-bridge section: triggers over a fake Kubernetes API.
//!
//! pipeline-bridge is in the generic list too ([`crate::functions`]), against a `fake-kube`
//! process (testkit's fake API server, answering at once; after [`crate::HOLD`] for the
//! 100-in-flight measurement) through a kubeconfig, with the catalog [`CATALOG`]. Here: trigger
//! latency with 100 triggers in flight at once (100 keep-alive connections, each sending its
//! next trigger as soon as the last is answered), every trigger a new `request_id`, so each
//! one creates a Job:
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
//! [`measure::load_evented`]), as a load generator does. The no-lock series is repeated with the
//! generic measurement's client, a blocking thread per connection, for reference: on two shared
//! cores its hundred threads' wake-ups and context switches show up in the latencies too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::functions::Function;
use crate::measure::{self, Throughput};
use crate::proc::{Proc, command, cpu_ticks};
use crate::report::{MeasureError, TargetCheck};
use crate::stats::Summary;

/// The target for a trigger's p99 with 100 in flight, ms.
pub const TRIGGER_P99_MAX_MS: f64 = 10.0;
/// Triggers in flight at once.
pub const CONCURRENT_TRIGGERS: usize = 100;
/// The catalog pipeline-bridge runs with in the bench.
pub const CATALOG: &str = r#"pipelines:
  bench:
    kind: job
    namespace: bench
    parameters:
      n: {pattern: "[a-z0-9-]{1,40}", default: "0"}
    job:
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: work
              image: busybox
              args: ["{{parameters.n}}"]
  bench-locked:
    kind: job
    namespace: bench
    lock: "bench-{{parameters.n}}"
    parameters:
      n: {pattern: "[a-z0-9-]{1,40}"}
    job:
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: work
              image: busybox
              args: ["{{parameters.n}}"]
"#;

/// The sample trigger: a new `request_id` per copy, no lock.
pub const TRIGGER_SAMPLE: &str =
    r#"{"request_id":"{id}","pipeline":"bench","parameters":{"n":"1"}}"#;
/// The same with a lock of its own per copy.
pub const LOCKED_SAMPLE: &str =
    r#"{"request_id":"{id}","pipeline":"bench-locked","parameters":{"n":"{id}"}}"#;

/// Where the bench writes [`CATALOG`] (under `target/bench`).
pub fn catalog_path(bin_dir: &Path) -> PathBuf {
    bin_dir
        .parent()
        .unwrap_or(Path::new("."))
        .join("bench")
        .join("pipeline-catalog.yaml")
}

/// Writes [`CATALOG`] and the max-body section's entry ([`crate::max_body::pipeline_entry`])
/// to [`catalog_path`].
pub fn write_catalog(bin_dir: &Path, max_body_bytes: usize) -> anyhow::Result<()> {
    let path = catalog_path(bin_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let entry =
        crate::max_body::pipeline_entry(crate::max_body::pipeline_parameters(max_body_bytes));
    std::fs::write(&path, format!("{CATALOG}{entry}"))
        .with_context(|| format!("writing {}", path.display()))
}

/// A `fake-kube` process and the kubeconfig pointing at it; killed when dropped.
#[derive(Debug)]
pub struct FakeKube {
    proc: Proc,
    _dir: tempfile::TempDir,
    /// The kubeconfig path.
    pub kubeconfig: String,
}

impl FakeKube {
    /// Starts `fake-kube` from `bin_dir` answering after `latency`; returns once its
    /// kubeconfig is written (after it listens).
    pub fn start(
        bin_dir: &Path,
        latency: Duration,
        logs: &Path,
        label: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a directory for the kubeconfig")?;
        let log = logs.join(format!("fake-kube-{label}.log"));
        let args = [
            dir.path().display().to_string(),
            latency.as_millis().to_string(),
        ];
        let mut cmd = command(&bin_dir.join("fake-kube"), &args, &[], &log)?;
        let mut proc = Proc::spawn(&mut cmd, "fake-kube", &log)?;
        let kubeconfig = dir.path().join("kubeconfig");
        let started = Instant::now();
        while !kubeconfig.is_file() {
            proc.check_alive()?;
            if started.elapsed() > measure::START_DEADLINE {
                bail!(
                    "fake-kube wrote no kubeconfig within {:?}",
                    measure::START_DEADLINE
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Self {
            proc,
            kubeconfig: kubeconfig.display().to_string(),
            _dir: dir,
        })
    }
}

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
    /// One client thread, an epoll loop ([`measure::load_evented`]).
    Evented,
    /// A blocking client thread per connection ([`measure::load`]).
    Threads,
}

/// One series: a fresh fake API and pipeline-bridge, a warm-up, then `triggers` timed.
fn series(
    f: &Function,
    endpoints: &crate::functions::Endpoints,
    triggers: usize,
    client: Client,
    bin_dir: &Path,
    logs: &Path,
) -> anyhow::Result<Triggers> {
    let kube = FakeKube::start(bin_dir, Duration::ZERO, logs, "triggers")?;
    let endpoints = crate::functions::Endpoints {
        kube: Some(kube.kubeconfig.clone()),
        ..endpoints.clone()
    };
    let mut running = measure::start_ready(f, &endpoints, None, logs)?;
    let load = match client {
        Client::Evented => measure::load_evented,
        Client::Threads => measure::load,
    };
    timed(f, &mut running, kube.proc.pid(), load, triggers)
}

/// A signature shared by [`measure::load`] and [`measure::load_evented`].
type Load = fn(
    &Function,
    std::net::SocketAddr,
    usize,
    usize,
    &str,
) -> anyhow::Result<(Vec<Duration>, Duration)>;

/// A warm-up, then `events` timed through `load` with [`CONCURRENT_TRIGGERS`] in flight,
/// with the CPU time `running` and its backend (`backend_pid`) used meanwhile.
fn timed(
    f: &Function,
    running: &mut measure::Running,
    backend_pid: u32,
    load: Load,
    events: usize,
) -> anyhow::Result<Triggers> {
    let n = CONCURRENT_TRIGGERS;
    load(f, running.addr, measure::WARMUP_EVENTS, n, "warm").context("warm-up")?;
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
fn floor_series(
    f: &Function,
    triggers: usize,
    bin_dir: &Path,
    logs: &Path,
) -> anyhow::Result<Triggers> {
    let backend_fn = crate::functions::floor(bin_dir);
    let backend = measure::start_ready_with(&backend_fn, Vec::new(), logs)?;
    let forward = Function {
        name: "forward-floor",
        binary: bin_dir.join("forward-floor"),
        ..f.clone()
    };
    let env = vec![(
        "ECHO_FORWARD_URL".to_string(),
        format!("http://{}/", backend.addr),
    )];
    let mut running = measure::start_ready_with(&forward, env, logs)?;
    timed(
        &forward,
        &mut running,
        backend.proc.pid(),
        measure::load_evented,
        triggers,
    )
}

/// Measures `f` (pipeline-bridge) against a fake API of its own per series.
pub fn run(
    f: &Function,
    endpoints: &crate::functions::Endpoints,
    triggers: usize,
    bin_dir: &Path,
    logs: &Path,
) -> PipelineResult {
    let mut r = PipelineResult {
        name: f.name.to_string(),
        ..PipelineResult::default()
    };
    let locked = Function {
        event: crate::functions::SampleEvent::json("ai.pipeline.trigger", LOCKED_SAMPLE),
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
pub fn check_targets(r: &PipelineResult) -> Vec<TargetCheck> {
    vec![crate::report::check_bound(
        &r.name,
        format!("trigger p99 < {TRIGGER_P99_MAX_MS} ms ({CONCURRENT_TRIGGERS} in flight)"),
        r.plain.as_ref().map(|t| t.load.latency_ms.p99),
        Some(TRIGGER_P99_MAX_MS),
        "ms",
        crate::report::Bound::Max,
    )]
}

/// The section as printed under the table.
pub fn section(r: &PipelineResult) -> String {
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
