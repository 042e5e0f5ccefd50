//! The interface every section implements, the settings all of them share, and the
//! [`Context`] a run hands them: where binaries and logs are, and the shared backends.

use std::path::{Path, PathBuf};

use crate::harness::error::{Context as _, Result, ensure};
use serde::Serialize;
use tokio::runtime::Runtime;

use super::backends::Backends;
use super::function::{Endpoints, Function, HELD_EVENTS, HOLD, KUBE, STREAM_TOKEN_DELAY};
use super::load::WARMUP_EVENTS;
use super::measure::Held;
use super::results::TargetCheck;

/// A part of the benchmark: what it measures, its result, the targets it is held to and how it
/// is printed. The report renders every section through this interface alone.
pub trait Section {
    /// The key of its result in `results.json`.
    fn key(&self) -> &'static str;

    /// Whether `BENCH_ONLY` lets it run.
    fn selected(&self) -> bool;

    /// The functions it starts: their binaries must exist, and their placeholders decide which
    /// shared backends start.
    fn functions(&self) -> Vec<&Function>;

    /// Other binaries it starts.
    fn binaries(&self, _bin_dir: &Path) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Whether it calls the shared backends; they are stopped before a section that does not.
    fn uses_backends(&self) -> bool {
        true
    }

    /// Measures. Failures are recorded in the result, never returned.
    fn run(&mut self, ctx: &mut Context<'_>);

    /// Its block of the printed report; `None` when there is nothing to print.
    fn render(&self) -> Option<String>;

    /// Its targets, checked.
    fn checks(&self) -> Vec<TargetCheck> {
        Vec::new()
    }

    /// How it was measured, one line each, for the notes under the report.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Its failed measurements, one line each (`<what> <measure>: <error>`).
    fn errors(&self) -> Vec<String>;

    /// Its result as pretty-printed JSON.
    fn result_json(&self) -> serde_json::Result<String>;
}

/// `name` as a count above 0, `default` when unset or empty.
pub fn env_count(name: &str, default: usize) -> Result<usize> {
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

/// The settings every section shares, from `BENCH_*` variables.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    /// Cold starts measured per binary (after one warm-up; `BENCH_STARTS`, 21).
    pub starts: usize,
    /// Events measured for events/s (`BENCH_EVENTS`, 2000).
    pub events: usize,
    /// Keep-alive connections for events/s (`BENCH_CONCURRENCY`, 32).
    pub concurrency: usize,
    /// Events sent before events/s is measured.
    pub warmup_events: usize,
    /// Events held in flight for the RSS measurement.
    pub held_events: usize,
    /// How long they are held, ms.
    pub hold_ms: u64,
    /// Exit 1 when a target fails (`BENCH_STRICT=1`).
    pub strict: bool,
    /// `BENCH_ONLY`: measure only these (comma-separated names; the floor always runs).
    pub only: Option<Vec<String>>,
    /// Where the binaries are (`BENCH_BIN_DIR`, default: the `bench` executable's directory).
    pub bin_dir: PathBuf,
    /// How the backends run.
    pub backend: &'static str,
    /// `SIM_TOKEN_DELAY_MS` of the streaming simulator.
    pub stream_token_delay_ms: u64,
}

impl RunSettings {
    /// Reads the variables.
    pub fn from_env() -> Result<Self> {
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
            warmup_events: WARMUP_EVENTS,
            held_events: HELD_EVENTS,
            hold_ms: u64::try_from(HOLD.as_millis()).unwrap_or(u64::MAX),
            strict: std::env::var("BENCH_STRICT").is_ok_and(|v| v.trim() == "1"),
            only: std::env::var("BENCH_ONLY")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|n| n.trim().to_string()).collect()),
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

/// What a run hands its sections.
#[derive(Debug)]
pub struct Context<'a> {
    /// The shared settings.
    pub settings: &'a RunSettings,
    /// The nats-server binary.
    pub nats_server: PathBuf,
    /// Where child output goes (`target/bench/logs`).
    pub logs: PathBuf,
    backends: Option<Backends>,
    held: Vec<(String, Held)>,
}

impl<'a> Context<'a> {
    /// Checks that every binary the selected `sections` start exists, creates the log
    /// directory and starts the shared backends.
    pub fn start(
        settings: &'a RunSettings,
        nats_server: PathBuf,
        sections: &[Box<dyn Section>],
    ) -> Result<Self> {
        let bin_dir = &settings.bin_dir;
        let selected = || sections.iter().filter(|s| s.selected());
        let functions: Vec<&Function> = selected().flat_map(|s| s.functions()).collect();
        let mut wanted: Vec<PathBuf> = functions.iter().map(|f| f.binary.clone()).collect();
        wanted.sort();
        wanted.dedup();
        if functions.iter().any(|f| f.needs_backend()) {
            wanted.push(bin_dir.join("inference-sim"));
        }
        if functions.iter().any(|f| f.uses(KUBE)) {
            wanted.push(bin_dir.join("fake-kube"));
        }
        wanted.extend(selected().flat_map(|s| s.binaries(bin_dir)));
        wanted.push(nats_server.clone());
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
        let logs = settings.out_dir().join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let backends = Backends::start(&functions, bin_dir, &logs)?;
        Ok(Self {
            settings,
            nats_server,
            logs,
            backends: Some(backends),
            held: Vec::new(),
        })
    }

    /// Where the binaries are.
    pub fn bin_dir(&self) -> &Path {
        &self.settings.bin_dir
    }

    /// Where the placeholders point outside the 100-in-flight measurement (nowhere once the
    /// backends are stopped).
    pub fn endpoints(&self) -> Endpoints {
        self.backends
            .as_ref()
            .map_or_else(Endpoints::default, Backends::endpoints)
    }

    /// The shared backends, while they run.
    pub fn backends(&self) -> Result<&Backends> {
        self.backends
            .as_ref()
            .context("the shared backends are stopped")
    }

    /// The runtime for in-process mocks and NATS clients, while the backends run.
    pub fn rt(&self) -> Result<&Runtime> {
        Ok(self.backends()?.rt())
    }

    /// Stops the shared backends.
    pub fn stop_backends(&mut self) {
        self.backends = None;
    }

    /// Records `function`'s RSS with events held in flight, for later sections.
    pub fn record_held(&mut self, function: &str, held: Held) {
        self.held.push((function.to_string(), held));
    }

    /// `function`'s RSS with events held in flight, if an earlier section measured it.
    pub fn held(&self, function: &str) -> Option<&Held> {
        self.held
            .iter()
            .find(|(name, _)| name == function)
            .map(|(_, h)| h)
    }
}
