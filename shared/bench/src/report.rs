//! The printed report and `target/bench/results.json`, made from the sections through the
//! [`Section`] interface alone.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::harness::error::{Context as _, Result};
use serde::Serialize;

use crate::harness::results::{Bound, TargetCheck};
use crate::harness::section::Section;
use crate::harness::stats::mib;

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

/// What the sections' results add up to.
#[derive(Debug)]
pub struct Outcome {
    /// Every target check, in section order.
    pub targets: Vec<TargetCheck>,
    /// Whether every target passed.
    pub all_targets_pass: bool,
    /// Whether every measurement succeeded.
    pub all_measured: bool,
}

impl Outcome {
    /// Checks the targets of `sections`.
    pub fn of(sections: &[Box<dyn Section>]) -> Self {
        let targets: Vec<TargetCheck> = sections.iter().flat_map(|s| s.checks()).collect();
        Self {
            all_targets_pass: targets.iter().all(|t| t.pass),
            all_measured: sections.iter().all(|s| s.errors().is_empty()),
            targets,
        }
    }

    /// The last line's verdict.
    pub fn verdict(&self) -> &'static str {
        match (self.all_measured, self.all_targets_pass) {
            (false, _) => "some measurements FAILED",
            (true, true) => "all targets PASS",
            (true, false) => "some targets FAIL",
        }
    }

    /// 1 when a measurement failed, or when a target failed and `strict`; else 0.
    pub fn exit_code(&self, strict: bool) -> ExitCode {
        if !self.all_measured || (strict && !self.all_targets_pass) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// The report as printed: every section's block, the targets, the notes and the errors.
pub fn text(sections: &[Box<dyn Section>], outcome: &Outcome) -> String {
    let mut out = String::new();
    for block in sections.iter().filter_map(|s| s.render()) {
        out.push('\n');
        out.push_str(&block);
    }
    out.push_str("\ntargets (functions only; the floor is the reference):\n");
    out.push_str(&target_lines(&outcome.targets));
    out.push_str("\nnotes:\n");
    for line in sections.iter().flat_map(|s| s.notes()) {
        let _ = writeln!(out, "  {line}");
    }
    for line in sections.iter().flat_map(|s| s.errors()) {
        let _ = writeln!(out, "ERROR {line}");
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

/// Writes `results.json`: the time, `machine`, `settings`, every section's result under its
/// key, the targets and the verdicts.
pub fn write_results(
    path: &Path,
    machine: &Machine,
    settings: &impl Serialize,
    sections: &[Box<dyn Section>],
    outcome: &Outcome,
) -> Result<()> {
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut entries = vec![
        ("unix_time", serde_json::to_string_pretty(&unix_time)?),
        ("machine", serde_json::to_string_pretty(machine)?),
        ("settings", serde_json::to_string_pretty(settings)?),
    ];
    for s in sections {
        entries.push((s.key(), s.result_json()?));
    }
    entries.push(("targets", serde_json::to_string_pretty(&outcome.targets)?));
    entries.push((
        "all_targets_pass",
        serde_json::to_string_pretty(&outcome.all_targets_pass)?,
    ));
    entries.push((
        "all_measured",
        serde_json::to_string_pretty(&outcome.all_measured)?,
    ));
    std::fs::write(path, pretty_object(&entries)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// A JSON object of already pretty-printed values, laid out as `serde_json::to_string_pretty`
/// lays out a struct of them (each value indented one level deeper): the sections' results
/// keep their field order, which a `serde_json::Value` would sort.
fn pretty_object(entries: &[(&str, String)]) -> serde_json::Result<String> {
    let mut out = String::from("{\n");
    for (i, (key, value)) in entries.iter().enumerate() {
        let comma = if i + 1 < entries.len() { "," } else { "" };
        let _ = writeln!(
            out,
            "  {}: {}{comma}",
            serde_json::to_string(key)?,
            value.replace('\n', "\n  ")
        );
    }
    out.push('}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_object_lays_out_like_serde_json() {
        #[derive(Serialize)]
        struct Inner {
            b: Vec<u32>,
            a: Option<f64>,
            e: Vec<u32>,
        }
        #[derive(Serialize)]
        struct Outer {
            z: u64,
            inner: Inner,
            list: Vec<Inner>,
        }
        let inner = || Inner {
            b: vec![1, 2],
            a: Some(0.5),
            e: vec![],
        };
        let whole = Outer {
            z: 7,
            inner: inner(),
            list: vec![inner(), inner()],
        };
        let entries = [
            ("z", serde_json::to_string_pretty(&whole.z).unwrap()),
            ("inner", serde_json::to_string_pretty(&whole.inner).unwrap()),
            ("list", serde_json::to_string_pretty(&whole.list).unwrap()),
        ];
        assert_eq!(
            pretty_object(&entries).unwrap(),
            serde_json::to_string_pretty(&whole).unwrap()
        );
    }
}
