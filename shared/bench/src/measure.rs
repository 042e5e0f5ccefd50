//! The measurements, one process (or one start) at a time. Every wait has a deadline and every
//! child is a [`Proc`], killed when it goes out of scope.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde::Serialize;

use crate::functions::{Endpoints, Function, InFlightProbe};
use crate::http::{Conn, Request, Response, exchange};
use crate::proc::{Proc, command, free_port};
use crate::stats::{Summary, mib};

/// Pause between cold-start attempts (connection refused, or no answer yet).
pub(crate) const POLL: Duration = Duration::from_micros(100);
/// Longest a process may take to answer its first event or `/readyz`.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(5);
/// Longest one request may wait for its answer in the load measurements.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one events/s run (warm-up or measured) may take.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between the event and the idle RSS reading.
pub(crate) const IDLE_SETTLE: Duration = Duration::from_millis(300);
/// Events sent before events/s is measured.
pub const WARMUP_EVENTS: usize = 100;

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub(crate) fn log_path(logs: &Path, name: &str) -> PathBuf {
    logs.join(format!("{name}.log"))
}

/// Size in bytes of the function's binary.
pub fn binary_size(f: &Function) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(&f.binary)
        .with_context(|| format!("{} not found", f.binary.display()))?
        .len())
}

/// An `inference-sim` process on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct Backend {
    _proc: Proc,
    /// Its base URL.
    pub url: String,
}

impl Backend {
    /// Where it listens.
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        addr_of(&self.url)
    }
}

/// The socket address of an `http://127.0.0.1:PORT` base URL.
pub fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    url.strip_prefix("http://")
        .and_then(|a| a.trim_end_matches('/').parse().ok())
        .with_context(|| format!("{url:?} is not http://IP:PORT"))
}

/// Starts `inference-sim` from `bin_dir` answering after `latency` (`SIM_LATENCY_MS`) and
/// streaming chat tokens `token_delay` apart (`SIM_TOKEN_DELAY_MS`), and waits for `/healthz`.
pub fn start_backend(
    bin_dir: &Path,
    latency: Duration,
    token_delay: Duration,
    logs: &Path,
    label: &str,
) -> anyhow::Result<Backend> {
    let binary = bin_dir.join("inference-sim");
    ensure!(binary.exists(), "{} not found", binary.display());
    let port = free_port()?;
    let log = log_path(logs, &format!("inference-sim-{label}"));
    let env = [
        (
            "SIM_LATENCY_MS".to_string(),
            latency.as_millis().to_string(),
        ),
        (
            "SIM_TOKEN_DELAY_MS".to_string(),
            token_delay.as_millis().to_string(),
        ),
    ];
    let mut cmd = command(&binary, &["--port".into(), port.to_string()], &env, &log)?;
    let mut proc = Proc::spawn(&mut cmd, "inference-sim", &log)?;
    wait_for(&mut proc, loopback(port), "/healthz")?;
    Ok(Backend {
        _proc: proc,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// Polls `GET path` until it answers 200.
pub(crate) fn wait_for(proc: &mut Proc, addr: SocketAddr, path: &str) -> anyhow::Result<()> {
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
pub fn cold_start(f: &Function, endpoints: &Endpoints, logs: &Path) -> anyhow::Result<Duration> {
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
) -> anyhow::Result<Running> {
    start_ready_with(f, f.environment(0, endpoints, hold), logs)
}

/// Starts `f` with `env` (its `PORT` replaced by a free port) and waits until `/readyz`
/// answers 200.
pub fn start_ready_with(
    f: &Function,
    mut env: Vec<(String, String)>,
    logs: &Path,
) -> anyhow::Result<Running> {
    let port = free_port()?;
    crate::functions::set_var(&mut env, "PORT", port.to_string());
    let log = log_path(logs, f.name);
    let mut cmd = command(&f.binary, &[], &env, &log)?;
    let mut proc = Proc::spawn(&mut cmd, f.name, &log)?;
    let addr = loopback(port);
    wait_for(&mut proc, addr, "/readyz")?;
    Ok(Running { proc, addr })
}

/// Sends one event on a fresh connection; it must be answered 200 with a binary-mode reply
/// whose `ce-id` is `<id>.reply`.
fn send_checked(f: &Function, addr: SocketAddr, id: &str) -> anyhow::Result<Response> {
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
pub fn idle_rss(f: &Function, endpoints: &Endpoints, logs: &Path) -> anyhow::Result<Idle> {
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
) -> anyhow::Result<Held> {
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
) -> anyhow::Result<(Vec<f64>, Option<f64>, Instant)> {
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
                let seen = in_flight(&String::from_utf8_lossy(&r.body));
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

/// The value of `handler_events_in_flight` in Prometheus text (summed over label sets).
pub fn in_flight(metrics: &str) -> Option<f64> {
    let mut total = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix("handler_events_in_flight") else {
            continue;
        };
        let rest = match rest.strip_prefix('{') {
            Some(labels) => labels.split_once('}').map_or("", |(_, r)| r),
            None => rest,
        };
        if !rest.starts_with(' ') {
            continue;
        }
        if let Ok(v) = rest.trim().parse::<f64>() {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Events/s over keep-alive connections.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Events measured (after the warm-up).
    pub events: usize,
    /// Connections, one client thread each.
    pub concurrency: usize,
    /// Wall time of the measured events, seconds.
    pub seconds: f64,
    /// Events per second.
    pub per_sec: f64,
    /// Latency of one event, ms.
    pub latency_ms: Summary,
}

/// Starts `f`, sends [`WARMUP_EVENTS`], then `events` over `concurrency` keep-alive
/// connections, every answer 200.
pub fn throughput(
    f: &Function,
    endpoints: &Endpoints,
    events: usize,
    concurrency: usize,
    logs: &Path,
) -> anyhow::Result<Throughput> {
    let mut running = start_ready(f, endpoints, None, logs)?;
    load(f, running.addr, WARMUP_EVENTS, concurrency, "warm").context("warm-up")?;
    let (latencies, wall) = load(f, running.addr, events, concurrency, "ev")?;
    running.proc.check_alive()?;
    Ok(Throughput {
        events,
        concurrency,
        seconds: wall.as_secs_f64(),
        per_sec: events as f64 / wall.as_secs_f64(),
        latency_ms: Summary::of(&latencies).context("no events measured")?,
    })
}

/// Sends `total` events over `concurrency` connections; returns every latency and the wall
/// time from the moment all connections were open.
pub(crate) fn load(
    f: &Function,
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let next = AtomicUsize::new(0);
    let ready = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let deadline = Instant::now() + LOAD_DEADLINE;
    let worker = || -> anyhow::Result<Vec<Duration>> {
        let conn = Conn::connect(addr, REQUEST_TIMEOUT);
        ready.fetch_add(1, Ordering::SeqCst);
        while !go.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_micros(50));
        }
        let mut conn = conn?;
        let mut latencies = Vec::with_capacity(total / concurrency.max(1) + 1);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= total || abort.load(Ordering::Relaxed) {
                return Ok(latencies);
            }
            ensure!(
                Instant::now() < deadline,
                "not done within {LOAD_DEADLINE:?}"
            );
            let request = f.event.request(addr, &format!("bench-{tag}-{i}"), true);
            let sent = Instant::now();
            let r = conn.send(&request)?;
            latencies.push(sent.elapsed());
            ensure!(
                r.status == 200,
                "HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    };
    thread::scope(|s| {
        let worker = &worker;
        let abort = &abort;
        let mut handles = Vec::with_capacity(concurrency);
        let mut spawn_error = None;
        for _ in 0..concurrency {
            let spawned =
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || {
                        let result = worker();
                        if result.is_err() {
                            abort.store(true, Ordering::Relaxed);
                        }
                        result
                    });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let wait_started = Instant::now();
        while ready.load(Ordering::SeqCst) < handles.len()
            && wait_started.elapsed() < START_DEADLINE
        {
            thread::sleep(Duration::from_micros(100));
        }
        if spawn_error.is_some() {
            abort.store(true, Ordering::SeqCst);
        }
        let started = Instant::now();
        go.store(true, Ordering::SeqCst);
        let mut latencies = Vec::with_capacity(total);
        let mut first_error = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok(l)) => latencies.extend(l),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow!("client thread panicked"));
                }
            }
        }
        let wall = started.elapsed();
        if let Some(e) = spawn_error {
            return Err(anyhow!(e).context("starting client threads"));
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        ensure!(
            latencies.len() == total,
            "{} of {total} events answered",
            latencies.len()
        );
        Ok((latencies, wall))
    })
}

/// Like [`load`], but every connection is driven from one client thread (a current-thread
/// tokio runtime: one epoll loop), as a load generator does: with 100 connections on two shared
/// cores, a blocking thread per connection adds its own wake-up delays and context switches to
/// the latencies it measures. Answers must carry a `Content-Length` (the functions' replies
/// do).
pub(crate) fn load_evented(
    f: &Function,
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt as _;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("client runtime")?;
    let requests: Arc<Vec<Request>> = Arc::new(
        (0..total)
            .map(|i| f.event.request(addr, &format!("bench-{tag}-{i}"), true))
            .collect(),
    );
    runtime.block_on(async move {
        let mut conns = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let stream =
                tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .context("connect timed out")??;
            stream.set_nodelay(true)?;
            conns.push(stream);
        }
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for mut stream in conns {
            let (next, requests) = (next.clone(), requests.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let mut buf = Vec::with_capacity(4096);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(request) = requests.get(i) else {
                        return anyhow::Ok(latencies);
                    };
                    let sent = Instant::now();
                    let status = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        stream.write_all(request.as_bytes()).await?;
                        read_answer(&mut stream, &mut buf).await
                    })
                    .await
                    .context("no answer in time")??;
                    latencies.push(sent.elapsed());
                    ensure!(
                        status == 200,
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&buf)
                    );
                }
            });
        }
        let mut latencies = Vec::with_capacity(total);
        while let Some(done) = tasks.join_next().await {
            latencies.extend(done.context("client task")??);
        }
        let wall = started.elapsed();
        ensure!(
            latencies.len() == total,
            "{} of {total} events answered",
            latencies.len()
        );
        Ok((latencies, wall))
    })
}

/// Reads one response with a `Content-Length` from `stream`; returns its status, the body in
/// `buf`.
async fn read_answer(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    use tokio::io::AsyncReadExt as _;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        ensure!(buf.len() < 64 * 1024, "response head too long");
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed before the response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("no Content-Length")?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    ensure!(buf.len() == head_end + length, "more than one response");
    buf.drain(..head_end);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_gauge() {
        let text = "# HELP handler_events_in_flight Events being handled\n\
                    # TYPE handler_events_in_flight gauge\n\
                    handler_events_in_flight 100\n\
                    handler_events_in_flight_other 7\n";
        assert_eq!(in_flight(text), Some(100.0));
        assert_eq!(
            in_flight("handler_events_in_flight{a=\"b\"} 3\n"),
            Some(3.0)
        );
        assert_eq!(in_flight("# TYPE handler_events_in_flight gauge\n"), None);
    }
}
