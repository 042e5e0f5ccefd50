//! A recording sink, a source runner, and stream helpers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use handler_kit::serve::Health;
use tokio_util::sync::CancellationToken;

pub use testkit::cloudevent::eventually;

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub subject: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    /// When the request arrived, in seconds since the epoch.
    pub received_at: f64,
}

/// Decides the sink's answer from (event id, attempt number for that id starting at 1).
pub type Behaviour = Arc<dyn Fn(&str, usize) -> u16 + Send + Sync>;

#[derive(Clone)]
struct SinkState {
    behaviour: Behaviour,
    log: Arc<Mutex<Vec<Received>>>,
    attempts: Arc<Mutex<HashMap<String, usize>>>,
    delay: Duration,
    per_subject_busy: Arc<Mutex<HashMap<String, usize>>>,
    overlaps: Arc<AtomicUsize>,
    concurrent: Arc<AtomicUsize>,
    max_concurrent: Arc<AtomicUsize>,
    /// Seconds sent as `Retry-After` with every 503 and 429 (0: none).
    retry_after: Arc<AtomicUsize>,
}

/// A test sink on its own runtime thread: stopping it closes every connection, like a crash.
pub struct Sink {
    pub port: u16,
    state: SinkState,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    pub fn start(behaviour: Behaviour, delay: Duration) -> Self {
        let state = SinkState {
            behaviour,
            log: Arc::default(),
            attempts: Arc::default(),
            delay,
            per_subject_busy: Arc::default(),
            overlaps: Arc::default(),
            concurrent: Arc::default(),
            max_concurrent: Arc::default(),
            retry_after: Arc::default(),
        };
        let port = testkit::nats_server::free_port().expect("port");
        let mut sink = Self {
            port,
            state,
            stop: None,
            thread: None,
        };
        sink.restart();
        sink
    }

    /// Starts (again) on the same port, keeping the log.
    pub fn restart(&mut self) {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let state = self.state.clone();
        let port = self.port;
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = loop {
                    match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                };
                let _ = ready_tx.send(());
                let app = axum::Router::new()
                    .route("/", axum::routing::post(handle))
                    .with_state(state);
                let server = tokio::spawn(async move { axum::serve(listener, app).await });
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                server.abort();
            });
            // Dropping the runtime drops every connection task: clients see resets.
            rt.shutdown_background();
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("sink listening");
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
    }

    /// Stops abruptly: the port closes and open connections are cut.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> Vec<Received> {
        self.state.log.lock().expect("log").clone()
    }

    /// Times two requests of one subject were in the sink at once.
    pub fn same_subject_overlaps(&self) -> usize {
        self.state.overlaps.load(Ordering::SeqCst)
    }

    pub fn max_concurrent(&self) -> usize {
        self.state.max_concurrent.load(Ordering::SeqCst)
    }

    /// Sends `Retry-After: secs` with every 503 and 429 from now on (0: none).
    pub fn set_retry_after(&self, secs: usize) {
        self.state.retry_after.store(secs, Ordering::SeqCst);
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn handle(State(s): State<SinkState>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    let received_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (mut id, subject) = (header("ce-id"), header("ce-subject"));
    if header("content-type").starts_with("application/cloudevents+json") {
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        id = envelope["id"].as_str().unwrap_or_default().to_string();
    }
    let now = s.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_concurrent.fetch_max(now, Ordering::SeqCst);
    {
        let mut busy = s.per_subject_busy.lock().expect("busy");
        let n = busy.entry(subject.clone()).or_default();
        *n += 1;
        if *n > 1 {
            s.overlaps.fetch_add(1, Ordering::SeqCst);
        }
    }
    if !s.delay.is_zero() {
        tokio::time::sleep(s.delay).await;
    }
    let attempt = {
        let mut attempts = s.attempts.lock().expect("attempts");
        let n = attempts.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    let status = (s.behaviour)(&id, attempt);
    *s.per_subject_busy
        .lock()
        .expect("busy")
        .entry(subject.clone())
        .or_default() -= 1;
    s.concurrent.fetch_sub(1, Ordering::SeqCst);
    s.log.lock().expect("log").push(Received {
        id,
        subject,
        status,
        headers: headers.clone(),
        body,
        received_at,
    });
    let status = StatusCode::from_u16(status).expect("status");
    if status == StatusCode::OK && headers.contains_key("ce-testreply") {
        let reply_headers = [
            ("ce-specversion", "1.0".to_string()),
            ("ce-id", format!("{}.reply", header("ce-id"))),
            ("ce-source", "/sink".into()),
            ("ce-type", "test.reply".into()),
            ("content-type", "application/json".into()),
        ];
        // `ce-testreply: big` asks for a reply larger than the test server's max payload.
        let body = if header("ce-testreply") == "big" {
            format!("\"{}\"", "a".repeat(64 * 1024))
        } else {
            r#"{"ok":true}"#.to_string()
        };
        let mut response = (status, body).into_response();
        for (k, v) in reply_headers {
            response.headers_mut().insert(k, v.parse().expect("header"));
        }
        return response;
    }
    let mut response = (status, r#"{"error":"test","detail":"sink said so"}"#).into_response();
    let retry_after = s.retry_after.load(Ordering::SeqCst);
    if retry_after > 0 && matches!(status.as_u16(), 429 | 503) {
        response.headers_mut().insert(
            "retry-after",
            retry_after.to_string().parse().expect("header"),
        );
    }
    response
}

/// A running source; cancelled and drained on `stop`.
pub struct Source {
    pub health: Arc<Health>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Source {
    pub fn start(nats_url: &str, sink: &str, extra: &[(&str, &str)]) -> Self {
        let mut env = vec![
            ("NATS_URL", nats_url),
            ("K_SINK", sink),
            ("STREAM", "WORK"),
            ("CONSUMER", "worker"),
            ("SUBJECTS", "work.>"),
            ("CREATE", "true"),
            ("ACK_WAIT_MS", "5000"),
            ("BACKOFF_BASE_MS", "10"),
            ("BACKOFF_MAX_MS", "200"),
        ];
        // The first match wins, so test overrides go first.
        let mut merged: Vec<(&str, &str)> = extra.to_vec();
        merged.append(&mut env);
        let config = handler_kit::config::load(&merged, nats_source::Config::read).expect("config");
        let health = Health::starting();
        let shutdown = CancellationToken::new();
        let (h, s) = (health.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            nats_source::run(config, h, s).await.expect("source ran");
        });
        Self {
            health,
            shutdown,
            task,
        }
    }

    pub async fn ready(&self) {
        let ready = eventually(Duration::from_secs(10), || async {
            self.health.is_ready().then_some(())
        })
        .await;
        assert!(ready.is_some(), "source never bound its consumer");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("drained in time")
            .expect("task");
    }
}

/// Publishes `count` messages `work.{subject(i)}` with payload `i` and `Nats-Msg-Id` `m-{i}`.
pub async fn publish_numbered(
    client: &async_nats::Client,
    count: usize,
    subject: impl Fn(usize) -> String,
) {
    let js = async_nats::jetstream::new(client.clone());
    let mut acks = Vec::with_capacity(1000);
    for i in 0..count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("m-{i}").as_str());
        let ack = js
            .publish_with_headers(subject(i), headers, i.to_string().into())
            .await
            .expect("publish");
        acks.push(ack);
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.expect("stored");
            }
        }
    }
    for a in acks {
        a.await.expect("stored");
    }
}

/// Waits until the consumer has nothing pending and nothing unacknowledged.
pub async fn drained(client: &async_nats::Client, timeout: Duration) -> bool {
    let js = async_nats::jetstream::new(client.clone());
    eventually(timeout, || async {
        let stream = js.get_stream("WORK").await.ok()?;
        let info = stream.consumer_info("worker").await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await
    .is_some()
}

/// Every message in the DLQ stream, as (Nats-Msg-Id, headers).
pub async fn dead_letters(client: &async_nats::Client) -> Vec<async_nats::jetstream::Message> {
    use futures::StreamExt as _;
    let js = async_nats::jetstream::new(client.clone());
    let Ok(stream) = js.get_stream("WORK_DLQ").await else {
        return Vec::new();
    };
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .expect("dlq reader");
    let mut out = Vec::new();
    let mut batch = consumer
        .fetch()
        .max_messages(100_000)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .expect("fetch");
    while let Some(Ok(m)) = batch.next().await {
        out.push(m);
    }
    out
}

/// Cheap deterministic hash, so "fails 20% of the time" is reproducible.
pub fn hash(s: &str, n: usize) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes().chain(n.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
