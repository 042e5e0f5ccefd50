//! Results, the targets they are held to, the printed table and the JSON file.

use std::fmt::Write as _;

use serde::Serialize;

use crate::chat::{ChatResult, Stages, Ttft};
use crate::measure::{Held, Idle, Throughput};
use crate::source::{SourceResult, SourceSettings};
use crate::stats::Summary;

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
/// Slowest nats-source drain of a backlog into a sink that answers at once, msgs/s.
pub const SOURCE_MIN_MSGS_PER_SEC: f64 = 10_000.0;
/// Largest idle RSS of nats-source, MiB.
pub const SOURCE_IDLE_RSS_MAX_MIB: f64 = 10.0;

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

/// A measurement that failed.
#[derive(Debug, Clone, Serialize)]
pub struct MeasureError {
    /// Which one (see [`measures`]).
    pub measure: &'static str,
    /// Why, with its cause chain.
    pub error: String,
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
    pub fn fail(&mut self, measure: &'static str, error: &anyhow::Error) {
        self.errors.push(MeasureError {
            measure,
            error: format!("{error:#}"),
        });
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

/// Which side of its limit a value must stay on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// `value <= limit`.
    Max,
    /// `value >= limit`.
    Min,
}

/// One target checked for one function.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// The function.
    pub function: String,
    /// What is checked, e.g. `idle RSS <= 8 MiB`.
    pub target: String,
    /// The measured value (None: not measured).
    pub value: Option<f64>,
    /// The limit it is held to (None: no floor to derive it from).
    pub limit: Option<f64>,
    /// Unit of both.
    pub unit: &'static str,
    /// Whether the limit is a maximum or a minimum.
    pub bound: Bound,
    /// Whether it passes; a missing value fails.
    pub pass: bool,
}

fn check(
    function: &str,
    target: String,
    value: Option<f64>,
    limit: Option<f64>,
    unit: &'static str,
) -> TargetCheck {
    check_bound(function, target, value, limit, unit, Bound::Max)
}

pub(crate) fn check_bound(
    function: &str,
    target: String,
    value: Option<f64>,
    limit: Option<f64>,
    unit: &'static str,
    bound: Bound,
) -> TargetCheck {
    let pass = match (value, limit, bound) {
        (Some(v), Some(l), Bound::Max) => v <= l,
        (Some(v), Some(l), Bound::Min) => v >= l,
        _ => false,
    };
    TargetCheck {
        function: function.to_string(),
        target,
        value,
        limit,
        unit,
        bound,
        pass,
    }
}

/// Holds nats-source to its targets.
pub fn check_source_targets(r: &SourceResult) -> Vec<TargetCheck> {
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
        check(
            &r.name,
            format!("idle RSS <= {SOURCE_IDLE_RSS_MAX_MIB} MiB"),
            r.idle.map(|i| i.rss_mib),
            Some(SOURCE_IDLE_RSS_MAX_MIB),
            "MiB",
        ),
    ]
}

/// Holds every function (not the floor) to the targets.
pub fn check_targets(results: &[FunctionResult]) -> Vec<TargetCheck> {
    let floor_cold = results.iter().find(|r| r.floor).and_then(|r| r.cold_p50());
    let mut checks = Vec::new();
    for r in results.iter().filter(|r| !r.floor) {
        let n = r.name.as_str();
        checks.push(check(
            n,
            format!("binary <= {BINARY_MAX_MIB} MiB"),
            r.binary_mib,
            Some(BINARY_MAX_MIB),
            "MiB",
        ));
        checks.push(check(
            n,
            format!("cold start p50 <= {COLD_START_MAX_X_FLOOR}x floor"),
            r.cold_p50(),
            floor_cold.map(|f| f * COLD_START_MAX_X_FLOOR),
            "ms",
        ));
        checks.push(check(
            n,
            format!("cold start p50 <= {COLD_START_MAX_MS} ms"),
            r.cold_p50(),
            Some(COLD_START_MAX_MS),
            "ms",
        ));
        checks.push(check(
            n,
            format!("idle RSS <= {IDLE_RSS_MAX_MIB} MiB"),
            r.idle_mib(),
            Some(IDLE_RSS_MAX_MIB),
            "MiB",
        ));
        checks.push(check(
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

/// One PASS/FAIL line per target.
pub fn target_lines(checks: &[TargetCheck]) -> String {
    let mut out = String::new();
    for c in checks {
        let value = c.value.map_or_else(
            || "not measured".to_string(),
            |v| format!("{v:.2} {}", c.unit),
        );
        let limit = c.limit.map_or_else(
            || "limit: no floor".to_string(),
            |l| match c.bound {
                Bound::Max => format!("limit {l:.2} {}", c.unit),
                Bound::Min => format!("at least {l:.2} {}", c.unit),
            },
        );
        let _ = writeln!(
            out,
            "  {}  {:<17}{:<38}{:>14}  ({})",
            if c.pass { "PASS" } else { "FAIL" },
            c.function,
            c.target,
            value,
            limit
        );
    }
    out
}

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
pub fn chat_section(r: &ChatResult, settings: &crate::Settings) -> String {
    use crate::chat::measures::*;
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
        Some(a) => {
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
                    h.rss_mib, h.events, settings.stream_token_delay_ms
                )
            },
        ),
    );
    row("Milvus mock searches", r.milvus_searches.to_string());
    out
}

/// The nats-source section of the report.
pub fn source_section(r: &SourceResult, s: &SourceSettings) -> String {
    use crate::source::measures::*;
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
        Some(d) => {
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
                    r.dead_letters
                        .map_or_else(|| "?".to_string(), |n| n.to_string())
                ),
            );
        }
        None => row("msgs/s (backlog drain)", or_err(r.failed(DRAIN))),
    }
    out
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
