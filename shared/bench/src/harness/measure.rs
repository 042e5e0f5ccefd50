//! Starting one process and measuring it: cold start, readiness, idle RSS and RSS with events
//! held in flight. Every wait has a deadline and every child is a [`Proc`], killed when it goes
//! out of scope.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Result, bail, ensure};
use serde::Serialize;

use super::function::{Endpoints, Function, InFlightProbe, set_var};
use super::http::{Conn, Request, Response, exchange};
use super::metrics::{IN_FLIGHT, Metrics};
use super::proc::{Proc, command, free_port};
use super::stats::mib;

/// Pause between cold-start attempts (connection refused, or no answer yet).
pub const POLL: Duration = Duration::from_micros(100);
/// Longest a process may take to answer its first event or `/readyz`.
pub const START_DEADLINE: Duration = Duration::from_secs(5);
/// Longest one request may wait for its answer in the load measurements.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between the event and the idle RSS reading.
pub const IDLE_SETTLE: Duration = Duration::from_millis(300);

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Where the output of the child called `name` goes.
pub fn log_path(logs: &Path, name: &str) -> PathBuf {
    logs.join(format!("{name}.log"))
}

/// Size in bytes of the function's binary.
pub fn binary_size(f: &Function) -> Result<u64> {
    Ok(std::fs::metadata(&f.binary)
        .with_context(|| format!("{} not found", f.binary.display()))?
        .len())
}

/// Polls `GET path` until it answers 200.
pub fn wait_for(proc: &mut Proc, addr: SocketAddr, path: &str) -> Result<()> {
    let started = Instant::now();
    let request = Request::get(addr, path);
    let mut last = String::from("no attempt");
    while started.elapsed() < START_DEADLINE {
        match exchange(addr, &request, Duration::from_secs(1)) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status),
            Err(e) => last = e.to_string(),
        }
        proc.check_alive()?;
        thread::sleep(Duration::from_millis(1));
    }
    bail!("GET {path} on {addr}: no 200 within {START_DEADLINE:?} (last: {last})")
}

/// One cold start: from `spawn` (exec) to the first CloudEvent answered with 200, polled over
/// a fresh connection per attempt. The process is killed afterwards.
pub fn cold_start(f: &Function, endpoints: &Endpoints, logs: &Path) -> Result<Duration> {
    let port = free_port()?;
    let addr = loopback(port);
    let request = f.event.request(addr, "bench-cold", false);
    let log = log_path(logs, f.name);
    let mut cmd = command(&f.binary, &[], &f.environment(port, endpoints, None), &log)?;
    let started = Instant::now();
    let mut proc = Proc::spawn(&mut cmd, f.name, &log)?;
    let mut last = String::from("no attempt");
    loop {
        let left = START_DEADLINE.saturating_sub(started.elapsed());
        if left.is_zero() {
            bail!("no 200 answer within {START_DEADLINE:?} of exec (last: {last})");
        }
        match exchange(addr, &request, left) {
            Ok(r) if r.status == 200 => return Ok(started.elapsed()),
            Ok(r) => last = format!("HTTP {}: {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => last = e.to_string(),
        }
        proc.check_alive()?;
        thread::sleep(POLL);
    }
}

/// A started process that answers `/readyz`.
#[derive(Debug)]
pub struct Running {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Starts `f` on a free port and waits until `/readyz` answers 200. With `hold`, the
/// function's hold environment is added.
pub fn start_ready(
    f: &Function,
    endpoints: &Endpoints,
    hold: Option<Duration>,
    logs: &Path,
) -> Result<Running> {
    start_ready_with(f, f.environment(0, endpoints, hold), logs)
}

/// Starts `f` with `env` (its `PORT` replaced by a free port) and waits until `/readyz`
/// answers 200.
pub fn start_ready_with(
    f: &Function,
    mut env: Vec<(String, String)>,
    logs: &Path,
) -> Result<Running> {
    let port = free_port()?;
    set_var(&mut env, "PORT", port.to_string());
    let log = log_path(logs, f.name);
    let mut cmd = command(&f.binary, &[], &env, &log)?;
    let mut proc = Proc::spawn(&mut cmd, f.name, &log)?;
    let addr = loopback(port);
    wait_for(&mut proc, addr, "/readyz")?;
    Ok(Running { proc, addr })
}

/// Sends one event on a fresh connection; it must be answered 200 with a binary-mode reply
/// whose `ce-id` is `<id>.reply`.
fn send_checked(f: &Function, addr: SocketAddr, id: &str) -> Result<Response> {
    let r = exchange(addr, &f.event.request(addr, id, false), REQUEST_TIMEOUT)
        .with_context(|| format!("sending an event to {}", f.name))?;
    ensure!(
        r.status == 200,
        "{} answered HTTP {}: {}",
        f.name,
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let want = format!("{id}.reply");
    ensure!(
        r.header("ce-id") == Some(want.as_str()),
        "{}'s answer has ce-id {:?}, expected {want:?}",
        f.name,
        r.header("ce-id")
    );
    Ok(r)
}

/// Resident memory after start-up and one event.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Idle {
    /// `VmRSS` in MiB.
    pub rss_mib: f64,
    /// `VmHWM` (peak so far) in MiB.
    pub peak_mib: f64,
}

/// Starts `f`, waits for `/readyz`, sends one event, waits 300 ms, reads `VmRSS`.
pub fn idle_rss(f: &Function, endpoints: &Endpoints, logs: &Path) -> Result<Idle> {
    let mut running = start_ready(f, endpoints, None, logs)?;
    send_checked(f, running.addr, "bench-idle")?;
    thread::sleep(IDLE_SETTLE);
    running.proc.check_alive()?;
    Ok(Idle {
        rss_mib: mib(running.proc.rss_kib()? * 1024),
        peak_mib: mib(running.proc.hwm_kib()? * 1024),
    })
}

/// Resident memory while events are held in flight.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// Events held.
    pub events: usize,
    /// The largest `VmRSS` sample, MiB.
    pub rss_mib: f64,
    /// Every sample, MiB.
    pub samples_mib: Vec<f64>,
    /// `handler_events_in_flight` when the runner saw the count reached (functions only).
    pub in_flight_gauge: Option<f64>,
}

/// Starts `f` with its hold environment against `endpoints` (whose backends hold each event
/// about `hold`), opens `count` connections each sending one event, waits until all are in
/// flight, samples `VmRSS` four times 50 ms apart (max kept), then checks every event was
/// answered 200 after that.
pub fn rss_in_flight(
    f: &Function,
    endpoints: &Endpoints,
    hold: Duration,
    count: usize,
    logs: &Path,
) -> Result<Held> {
    let mut running = start_ready(f, endpoints, Some(hold), logs)?;
    let addr = running.addr;
    let written = AtomicUsize::new(0);
    let answer_timeout = hold + REQUEST_TIMEOUT;
    thread::scope(|s| {
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let written = &written;
            let request = f.event.request(addr, &format!("bench-hold-{i}"), false);
            let handle = thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(s, move || -> std::io::Result<(u16, Instant)> {
                    let mut conn = Conn::connect(addr, answer_timeout)?;
                    conn.write(&request)?;
                    written.fetch_add(1, Ordering::SeqCst);
                    let r = conn.read()?;
                    Ok((r.status, Instant::now()))
                })
                .context("starting a client thread")?;
            handles.push(handle);
        }
        let sampled = sample_held(f, &mut running, &written, count);
        let answers: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        let (samples, gauge, sampled_at) = sampled?;
        let mut failures = Vec::new();
        let mut early = 0;
        for answer in answers {
            match answer {
                Ok(Ok((200, at))) if at > sampled_at => {}
                Ok(Ok((200, _))) => early += 1,
                Ok(Ok((status, _))) => failures.push(format!("HTTP {status}")),
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(_) => failures.push("client thread panicked".into()),
            }
        }
        ensure!(
            failures.is_empty(),
            "{} of {count} held events failed (first: {})",
            failures.len(),
            failures[0]
        );
        ensure!(
            early == 0,
            "{early} of {count} events were answered before the RSS samples were taken"
        );
        let rss_mib = samples.iter().copied().fold(0.0, f64::max);
        Ok(Held {
            events: count,
            rss_mib,
            samples_mib: samples,
            in_flight_gauge: gauge,
        })
    })
}

/// Waits until `count` requests are written and in flight, then samples `VmRSS`.
fn sample_held(
    f: &Function,
    running: &mut Running,
    written: &AtomicUsize,
    count: usize,
) -> Result<(Vec<f64>, Option<f64>, Instant)> {
    let started = Instant::now();
    while written.load(Ordering::SeqCst) < count {
        ensure!(
            started.elapsed() < START_DEADLINE,
            "only {} of {count} events written within {START_DEADLINE:?}",
            written.load(Ordering::SeqCst)
        );
        running.proc.check_alive()?;
        thread::sleep(Duration::from_millis(1));
    }
    let mut gauge = None;
    match f.in_flight {
        InFlightProbe::Settle(d) => thread::sleep(d),
        InFlightProbe::Metrics => {
            let probe_started = Instant::now();
            let request = Request::get(running.addr, "/metrics");
            loop {
                let r = exchange(running.addr, &request, Duration::from_secs(1))?;
                ensure!(r.status == 200, "GET /metrics answered HTTP {}", r.status);
                let seen = Metrics::parse(&String::from_utf8_lossy(&r.body)).gauge(IN_FLIGHT);
                if seen.is_some_and(|v| v >= count as f64) {
                    gauge = seen;
                    break;
                }
                ensure!(
                    probe_started.elapsed() < Duration::from_secs(1),
                    "handler_events_in_flight is {seen:?}, not {count}, 1 s after all were sent"
                );
                thread::sleep(Duration::from_millis(5));
            }
            // Let the outbound calls those events make get under way too.
            thread::sleep(Duration::from_millis(100));
        }
    }
    let mut samples = Vec::with_capacity(4);
    for i in 0..4 {
        if i > 0 {
            thread::sleep(Duration::from_millis(50));
        }
        samples.push(mib(running.proc.rss_kib()? * 1024));
    }
    Ok((samples, gauge, Instant::now()))
}
