//! The functions section: the table. For each function in
//! [`catalog::functions`] and for the floor (`echo-floor`, a minimal axum + tokio CloudEvents
//! echo built with the same release profile):
//!
//! 1. binary size of `target/release/<name>`;
//! 2. cold start: exec to the first CloudEvent answered 200, polled over a fresh connection
//!    every ~0.1 ms, `BENCH_STARTS` (default 21) starts after one warm-up, interleaved across
//!    binaries so drift on a noisy machine hits them alike;
//! 3. idle RSS: `VmRSS` 300 ms after one event;
//! 4. RSS with 100 events in flight (backend or floor holding them 2 s);
//! 5. events/s over 32 keep-alive connections, after a warm-up of 100 (where measured).

use std::fmt::Write as _;

use serde::Serialize;

use crate::harness::backends::HeldBackends;
use crate::harness::catalog;
use crate::harness::error::{Error, Result, err};
use crate::harness::function::{
    Endpoints, Function, HELD_EVENTS, HOLD, InFlightProbe, STREAM_TOKEN_DELAY,
};
use crate::harness::load::{Throughput, throughput};
use crate::harness::measure::{Held, Idle, binary_size, cold_start, idle_rss, rss_in_flight};
use crate::harness::results::{MeasureError, TargetCheck, check_max};
use crate::harness::section::{Context, RunSettings, Section};
use crate::harness::stats::{Summary, mib, ms};

/// Largest binary, MiB.
pub const BINARY_MAX_MIB: f64 = 6.0;
/// Slowest median cold start, ms.
pub const COLD_START_MAX_MS: f64 = 10.0;
/// Slowest median cold start as a multiple of the floor's.
pub const COLD_START_MAX_X_FLOOR: f64 = 2.0;
/// Largest idle RSS, MiB.
pub const IDLE_RSS_MAX_MIB: f64 = 8.0;
/// Largest RSS with 100 events in flight, MiB.
pub const HELD_RSS_MAX_MIB: f64 = 30.0;

/// Measurement names, as used in [`FunctionResult::errors`].
pub mod measures {
    /// Binary size.
    pub const BINARY: &str = "binary size";
    /// Cold start.
    pub const COLD_START: &str = "cold start";
    /// Idle RSS.
    pub const IDLE: &str = "idle RSS";
    /// RSS with 100 events in flight.
    pub const HELD: &str = "RSS@100";
    /// Events/s.
    pub const THROUGHPUT: &str = "events/s";
}

/// Everything measured for one binary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FunctionResult {
    /// Binary name.
    pub name: String,
    /// Whether this is the floor.
    pub floor: bool,
    /// Binary size in bytes.
    pub binary_bytes: Option<u64>,
    /// Binary size in MiB.
    pub binary_mib: Option<f64>,
    /// Cold starts summarised, ms.
    pub cold_start_ms: Option<Summary>,
    /// Every cold start, ms, in order.
    pub cold_start_samples_ms: Vec<f64>,
    /// Idle memory.
    pub idle: Option<Idle>,
    /// Memory with events held in flight.
    pub in_flight: Option<Held>,
    /// Events/s (when measured).
    pub throughput: Option<Throughput>,
    /// Failed measurements.
    pub errors: Vec<MeasureError>,
}

impl FunctionResult {
    /// An empty result for `name`.
    pub fn new(name: &str, floor: bool) -> Self {
        Self {
            name: name.to_string(),
            floor,
            ..Self::default()
        }
    }

    /// Records a failed measurement.
    pub fn fail(&mut self, measure: &'static str, error: &Error) {
        crate::harness::results::fail(&mut self.errors, measure, error);
    }

    /// Whether `measure` failed.
    pub fn failed(&self, measure: &str) -> bool {
        self.errors.iter().any(|e| e.measure == measure)
    }

    fn cold_p50(&self) -> Option<f64> {
        self.cold_start_ms.as_ref().map(|s| s.p50)
    }
    fn idle_mib(&self) -> Option<f64> {
        self.idle.map(|i| i.rss_mib)
    }
    fn held_mib(&self) -> Option<f64> {
        self.in_flight.as_ref().map(|h| h.rss_mib)
    }
    fn per_sec(&self) -> Option<f64> {
        self.throughput.as_ref().map(|t| t.per_sec)
    }
}

/// Holds every function (not the floor) to the targets.
pub fn check_targets(results: &[FunctionResult]) -> Vec<TargetCheck> {
    let floor_cold = results.iter().find(|r| r.floor).and_then(|r| r.cold_p50());
    let mut checks = Vec::new();
    for r in results.iter().filter(|r| !r.floor) {
        let n = r.name.as_str();
        checks.push(check_max(
            n,
            format!("binary <= {BINARY_MAX_MIB} MiB"),
            r.binary_mib,
            Some(BINARY_MAX_MIB),
            "MiB",
        ));
        checks.push(check_max(
            n,
            format!("cold start p50 <= {COLD_START_MAX_X_FLOOR}x floor"),
            r.cold_p50(),
            floor_cold.map(|f| f * COLD_START_MAX_X_FLOOR),
            "ms",
        ));
        checks.push(check_max(
            n,
            format!("cold start p50 <= {COLD_START_MAX_MS} ms"),
            r.cold_p50(),
            Some(COLD_START_MAX_MS),
            "ms",
        ));
        checks.push(check_max(
            n,
            format!("idle RSS <= {IDLE_RSS_MAX_MIB} MiB"),
            r.idle_mib(),
            Some(IDLE_RSS_MAX_MIB),
            "MiB",
        ));
        checks.push(check_max(
            n,
            format!("RSS with 100 in flight <= {HELD_RSS_MAX_MIB} MiB"),
            r.held_mib(),
            Some(HELD_RSS_MAX_MIB),
            "MiB",
        ));
    }
    checks
}

/// A value right-aligned in `width` with `prec` decimals; `ERR` when its measurement failed,
/// `-` when it was not measured.
fn cell(value: Option<f64>, failed: bool, width: usize, prec: usize) -> String {
    match value {
        Some(v) => format!("{v:>width$.prec$}"),
        None if failed => format!("{:>width$}", "ERR"),
        None => format!("{:>width$}", "-"),
    }
}

fn pair(a: Option<f64>, b: Option<f64>, failed: bool, width: usize) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:>width$}", format!("{a:.2} / {b:.2}")),
        _ => cell(None, failed, width, 0),
    }
}

fn ratio(value: Option<f64>, floor: Option<f64>, width: usize) -> String {
    match (value, floor) {
        (Some(v), Some(f)) if f > 0.0 => format!("{:>width$}", format!("{:.2}x", v / f)),
        _ => format!("{:>width$}", "-"),
    }
}

/// The results table: one row per binary, and under every function its ratios to the floor.
pub fn table(results: &[FunctionResult]) -> String {
    use measures::*;
    const W: [usize; 7] = [14, 12, 25, 15, 14, 11, 20];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w0$}{:>w1$}{:>w2$}{:>w3$}{:>w4$}{:>w5$}{:>w6$}",
        "function",
        "binary MiB",
        "cold start ms p50/p90",
        "idle RSS MiB",
        "RSS@100 MiB",
        "events/s",
        "event ms p50/p99",
        w0 = W[0],
        w1 = W[1],
        w2 = W[2],
        w3 = W[3],
        w4 = W[4],
        w5 = W[5],
        w6 = W[6],
    );
    let floor = results.iter().find(|r| r.floor);
    for r in results {
        let cold = r.cold_start_ms.as_ref();
        let lat = r.throughput.as_ref().map(|t| &t.latency_ms);
        let _ = writeln!(
            out,
            "{:<w0$}{}{}{}{}{}{}",
            r.name,
            cell(r.binary_mib, r.failed(BINARY), W[1], 2),
            pair(
                cold.map(|c| c.p50),
                cold.map(|c| c.p90),
                r.failed(COLD_START),
                W[2]
            ),
            cell(r.idle_mib(), r.failed(IDLE), W[3], 2),
            cell(r.held_mib(), r.failed(HELD), W[4], 2),
            cell(r.per_sec(), r.failed(THROUGHPUT), W[5], 0),
            pair(
                lat.map(|l| l.p50),
                lat.map(|l| l.p99),
                r.failed(THROUGHPUT),
                W[6]
            ),
            w0 = W[0],
        );
        if let (false, Some(fl)) = (r.floor, floor) {
            let fl_lat = fl.throughput.as_ref().map(|t| t.latency_ms.p50);
            let _ = writeln!(
                out,
                "{:<w0$}{}{}{}{}{}{}",
                "  x floor",
                ratio(r.binary_mib, fl.binary_mib, W[1]),
                ratio(r.cold_p50(), fl.cold_p50(), W[2]),
                ratio(r.idle_mib(), fl.idle_mib(), W[3]),
                ratio(r.held_mib(), fl.held_mib(), W[4]),
                ratio(r.per_sec(), fl.per_sec(), W[5]),
                ratio(lat.map(|l| l.p50), fl_lat, W[6]),
                w0 = W[0],
            );
        }
    }
    out
}

/// The table: every function next to the floor.
#[derive(Debug)]
pub struct FunctionsSection {
    settings: RunSettings,
    subjects: Vec<Function>,
    results: Vec<FunctionResult>,
}

impl FunctionsSection {
    /// The floor and the functions of `catalog` that `settings` wants.
    pub fn new(settings: &RunSettings, catalog: &[Function]) -> Self {
        let mut subjects = vec![catalog::floor(&settings.bin_dir)];
        subjects.extend(catalog.iter().filter(|f| settings.wants(f.name)).cloned());
        let results = subjects
            .iter()
            .map(|f| FunctionResult::new(f.name, f.floor))
            .collect();
        Self {
            settings: settings.clone(),
            subjects,
            results,
        }
    }

    /// Binary sizes, then cold starts interleaved across binaries.
    fn sizes_and_cold_starts(&mut self, normal: &Endpoints, ctx: &Context<'_>) {
        for (f, r) in self.subjects.iter().zip(&mut self.results) {
            match binary_size(f) {
                Ok(bytes) => {
                    r.binary_bytes = Some(bytes);
                    r.binary_mib = Some(mib(bytes));
                }
                Err(e) => r.fail(measures::BINARY, &e),
            }
        }
        eprintln!(
            "bench: cold starts, {} per binary after 1 warm-up, interleaved",
            self.settings.starts
        );
        let mut samples = vec![Vec::new(); self.subjects.len()];
        for round in 0..=self.settings.starts {
            for (i, f) in self.subjects.iter().enumerate() {
                if self.results[i].failed(measures::COLD_START) {
                    continue;
                }
                match cold_start(f, normal, &ctx.logs) {
                    Ok(d) if round > 0 => samples[i].push(d),
                    Ok(_) => {}
                    Err(e) => self.results[i].fail(measures::COLD_START, &e),
                }
            }
        }
        for (r, s) in self.results.iter_mut().zip(&samples) {
            if !r.failed(measures::COLD_START) {
                r.cold_start_ms = Summary::of(s);
                r.cold_start_samples_ms = s.iter().copied().map(ms).collect();
            }
        }
    }

    /// Idle RSS, RSS with events held in flight and events/s, one function after the other.
    fn memory_and_rate(
        &mut self,
        normal: &Endpoints,
        held: Result<&Endpoints, &Error>,
        ctx: &mut Context<'_>,
    ) {
        let s = &self.settings;
        for (f, r) in self.subjects.iter().zip(&mut self.results) {
            eprintln!("bench: {}: idle RSS", f.name);
            match idle_rss(f, normal, &ctx.logs) {
                Ok(idle) => r.idle = Some(idle),
                Err(e) => r.fail(measures::IDLE, &e),
            }
            eprintln!("bench: {}: RSS with {HELD_EVENTS} in flight", f.name);
            let measured = match held {
                Ok(held) => rss_in_flight(f, held, HOLD, HELD_EVENTS, &ctx.logs),
                Err(e) => Err(err!("{e:#}").context("starting the held backends")),
            };
            match measured {
                Ok(h) => {
                    ctx.record_held(f.name, h.clone());
                    r.in_flight = Some(h);
                }
                Err(e) => r.fail(measures::HELD, &e),
            }
            if f.events_per_sec {
                eprintln!(
                    "bench: {}: events/s ({} events, {} connections)",
                    f.name, s.events, s.concurrency
                );
                match throughput(f, normal, s.events, s.concurrency, &ctx.logs) {
                    Ok(t) => r.throughput = Some(t),
                    Err(e) => r.fail(measures::THROUGHPUT, &e),
                }
            }
        }
    }
}

impl Section for FunctionsSection {
    fn key(&self) -> &'static str {
        "results"
    }

    fn selected(&self) -> bool {
        true
    }

    fn functions(&self) -> Vec<&Function> {
        self.subjects.iter().collect()
    }

    fn run(&mut self, ctx: &mut Context<'_>) {
        let normal = ctx.endpoints();
        self.sizes_and_cold_starts(&normal, ctx);
        let functions: Vec<&Function> = self.subjects.iter().collect();
        let held = HeldBackends::start(
            &functions,
            HOLD,
            STREAM_TOKEN_DELAY,
            ctx.bin_dir(),
            &ctx.logs,
        );
        let held_endpoints = held.as_ref().map(|b| b.endpoints(&normal));
        self.memory_and_rate(&normal, held_endpoints.as_ref().map_err(|e| *e), ctx);
    }

    fn render(&self) -> Option<String> {
        Some(table(&self.results))
    }

    fn checks(&self) -> Vec<TargetCheck> {
        check_targets(&self.results)
    }

    fn notes(&self) -> Vec<String> {
        let s = &self.settings;
        let mut out = Vec::new();
        out.push("MiB = 1,048,576 bytes; binaries are target/release/<name> as built (stripped by the release profile).".into());
        out.push(
        "functions are built one at a time (`just build`), as the image builds them, so dev tools' \
         dependency features are not unified into them; the image targets musl, so its size differs slightly."
            .into(),
    );
        out.push(format!(
        "cold start: exec to the first CloudEvent answered 200 (fresh TCP connection per attempt, \
         hand-written HTTP/1.1, retried every ~0.1 ms); {} starts per binary after 1 warm-up, \
         interleaved, a fresh port each.",
        s.starts
    ));
        for f in self.subjects.iter().filter(|f| f.needs_backend()) {
            out.push(format!(
                "{}: its first answer includes {} over loopback (all answering at once).",
                f.name, f.backend_work
            ));
        }
        out.push(format!("backends: {}.", s.backend));
        out.push(
            "idle RSS: VmRSS 300 ms after /readyz answered and one event was answered.".into(),
        );
        let holds: Vec<String> = self
            .subjects
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
                    InFlightProbe::Metrics => {
                        "sampled once handler_events_in_flight reached it".to_string()
                    }
                    InFlightProbe::Settle(d) => {
                        format!("sampled {} ms after all were sent", d.as_millis())
                    }
                };
                format!("{} with {} ({how})", f.name, env.join(" "))
            })
            .collect();
        out.push(format!(
            "RSS@100: max of 4 VmRSS samples 50 ms apart with {} events in flight on as many \
         connections, held ~{} ms (<slow sim>: inference-sim SIM_LATENCY_MS={}; \
         <streaming sim>: SIM_TOKEN_DELAY_MS={}, tokens streamed one every {} ms); every one \
         answered 200 after the samples. {}.",
            s.held_events,
            s.hold_ms,
            s.hold_ms,
            s.stream_token_delay_ms,
            s.stream_token_delay_ms,
            holds.join("; ")
        ));
        let no_rate: Vec<&str> = self
            .subjects
            .iter()
            .filter(|f| !f.events_per_sec)
            .map(|f| f.name)
            .collect();
        out.push(format!(
        "events/s: {} events after {} warm-up over {} keep-alive connections (one client thread \
         each), backend latency 0; event ms = one request's latency.{}",
        s.events,
        s.warmup_events,
        s.concurrency,
        if no_rate.is_empty() {
            String::new()
        } else {
            format!(
                " Not measured for {} (see its own section).",
                no_rate.join(", ")
            )
        }
    ));
        out
    }

    fn errors(&self) -> Vec<String> {
        self.results
            .iter()
            .flat_map(|r| {
                r.errors
                    .iter()
                    .map(|e| format!("{} {}: {}", r.name, e.measure, e.error))
            })
            .collect()
    }

    fn result_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&self.results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, floor: bool, cold: f64, idle: f64) -> FunctionResult {
        let mut r = FunctionResult::new(name, floor);
        r.binary_mib = Some(if floor { 1.0 } else { 4.0 });
        r.cold_start_ms = Some(Summary {
            p50: cold,
            p90: cold,
            p99: cold,
            min: cold,
            max: cold,
            count: 1,
        });
        r.idle = Some(Idle {
            rss_mib: idle,
            peak_mib: idle,
        });
        r
    }

    #[test]
    fn targets_use_the_floor_and_missing_values_fail() {
        let results = [
            result("floor", true, 2.0, 1.0),
            result("f", false, 5.0, 3.0),
        ];
        let checks = check_targets(&results);
        let by = |t: &str| checks.iter().find(|c| c.target.starts_with(t)).unwrap();
        assert!(by("binary").pass);
        assert!(!by("cold start p50 <= 2x").pass, "5 ms > 2 x 2 ms");
        assert!(by("cold start p50 <= 10").pass);
        assert!(by("idle").pass);
        assert!(!by("RSS with").pass, "not measured fails");
        let table = table(&results);
        assert!(table.contains("  x floor"), "{table}");
        assert!(table.contains("2.50x"), "{table}");
    }
}
