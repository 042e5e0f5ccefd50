//! Load drivers: events over many keep-alive connections, from a blocking client thread per
//! connection ([`load`]) or from one epoll loop ([`load_evented`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Error, Result, ensure, err};
use serde::Serialize;

use super::function::{Endpoints, Function};
use super::http::{Conn, Request};
use super::measure::{REQUEST_TIMEOUT, START_DEADLINE, start_ready};
use super::stats::Summary;

/// Longest one events/s run (warm-up or measured) may take.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);
/// Events sent before events/s is measured.
pub const WARMUP_EVENTS: usize = 100;

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
) -> Result<Throughput> {
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
pub fn load(
    f: &Function,
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    tag: &str,
) -> Result<(Vec<Duration>, Duration)> {
    let next = AtomicUsize::new(0);
    let ready = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let deadline = Instant::now() + LOAD_DEADLINE;
    let worker = || -> Result<Vec<Duration>> {
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
        let joined = join_clients(handles, total);
        let wall = started.elapsed();
        if let Some(e) = spawn_error {
            return Err(Error::from(e).context("starting client threads"));
        }
        let latencies = joined?;
        ensure!(
            latencies.len() == total,
            "{} of {total} events answered",
            latencies.len()
        );
        Ok((latencies, wall))
    })
}

/// Joins client threads that each return their samples: every sample, in thread order, or the
/// first error (a thread that panicked is one).
pub fn join_clients<T>(
    handles: Vec<thread::ScopedJoinHandle<'_, Result<Vec<T>>>>,
    capacity: usize,
) -> Result<Vec<T>> {
    let mut all = Vec::with_capacity(capacity);
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(samples)) => all.extend(samples),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(err!("client thread panicked"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// Like [`load`], but every connection is driven from one client thread (a current-thread
/// tokio runtime: one epoll loop), as a load generator does: with 100 connections on two shared
/// cores, a blocking thread per connection adds its own wake-up delays and context switches to
/// the latencies it measures. Answers must carry a `Content-Length` (the functions' replies
/// do).
pub fn load_evented(
    f: &Function,
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    tag: &str,
) -> Result<(Vec<Duration>, Duration)> {
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
                        return Ok::<_, Error>(latencies);
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
async fn read_answer(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<u16> {
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
