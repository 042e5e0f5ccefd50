//! Webhook bodies from strangers: nothing is read without a secret and a signature header, a
//! body is read under the cap, and only a few at once. Each body here is a stream that counts
//! the bytes the function pulls from it, so "not read" is measured, not assumed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;

use crate::support::{Answer, Harness, assert_error, send, sign};

const MIB: usize = 1024 * 1024;
/// What hyper hands over at a time is at most ~408 KiB; 64 KiB keeps the sums readable.
const CHUNK: usize = 64 * 1024;

/// Bytes pulled from bodies, and the most pulled at once by bodies not yet dropped.
#[derive(Debug, Default)]
struct Pulled {
    total: AtomicUsize,
    held: AtomicUsize,
    peak_held: AtomicUsize,
    readers: AtomicUsize,
    peak_readers: AtomicUsize,
}

impl Pulled {
    fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

/// One body's share of [`Pulled`], given back when the function drops the body.
struct Reader {
    pulled: Arc<Pulled>,
    mine: usize,
}

impl Reader {
    fn pull(&mut self, bytes: usize) {
        let p = &self.pulled;
        if self.mine == 0 {
            let readers = p.readers.fetch_add(1, Ordering::SeqCst) + 1;
            p.peak_readers.fetch_max(readers, Ordering::SeqCst);
        }
        self.mine += bytes;
        p.total.fetch_add(bytes, Ordering::SeqCst);
        let held = p.held.fetch_add(bytes, Ordering::SeqCst) + bytes;
        p.peak_held.fetch_max(held, Ordering::SeqCst);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.pulled.held.fetch_sub(self.mine, Ordering::SeqCst);
        if self.mine > 0 {
            self.pulled.readers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A body of `size` bytes in [`CHUNK`]s, each made only when polled and counted in `pulled`;
/// it yields to the scheduler between chunks, as a body arriving over a socket does.
fn counted(size: usize, pulled: &Arc<Pulled>) -> Body {
    let reader = Reader {
        pulled: pulled.clone(),
        mine: 0,
    };
    let chunks = futures::stream::unfold((reader, 0), move |(mut reader, sent)| async move {
        if sent >= size {
            return None;
        }
        tokio::task::yield_now().await;
        let len = CHUNK.min(size - sent);
        reader.pull(len);
        Some((
            Ok::<_, std::io::Error>(Bytes::from(vec![b' '; len])),
            (reader, sent + len),
        ))
    });
    Body::from_stream(chunks)
}

/// A body that sends one chunk, then whatever `more` delivers, and ends when `more` closes.
fn dribbled(pulled: &Arc<Pulled>) -> (Body, tokio::sync::mpsc::Sender<Bytes>) {
    let (more, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let reader = Reader {
        pulled: pulled.clone(),
        mine: 0,
    };
    let first = Some(Bytes::from_static(b"{\"ref\":"));
    let chunks = futures::stream::unfold(
        (reader, rx, first),
        |(mut reader, mut rx, first)| async move {
            let chunk = match first {
                Some(chunk) => chunk,
                None => rx.recv().await?,
            };
            reader.pull(chunk.len());
            Some((Ok::<_, std::io::Error>(chunk), (reader, rx, None)))
        },
    );
    (Body::from_stream(chunks), more)
}

/// A GitHub webhook request with `headers` and `body`.
fn github(headers: &[(&str, String)], body: Body) -> http::Request<Body> {
    let mut request = http::Request::post("/webhooks/github")
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "r-1");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(body).expect("request")
}

/// A well-formed signature header that matches no body here.
fn forged() -> (&'static str, String) {
    ("x-hub-signature-256", format!("sha256={}", "ab".repeat(32)))
}

/// A correctly signed `ping` (starts nothing, so it needs neither the cluster nor NATS).
fn ping(pulled: &Arc<Pulled>) -> http::Request<Body> {
    let body = b"{\"zen\":\"Keep it logically awesome.\"}";
    let mut request = github(
        &[(
            "x-hub-signature-256",
            format!("sha256={}", sign("github-secret", body)),
        )],
        Body::empty(),
    );
    let reader = Reader {
        pulled: pulled.clone(),
        mine: 0,
    };
    *request.body_mut() = Body::from_stream(futures::stream::once(async move {
        let mut reader = reader;
        reader.pull(body.len());
        Ok::<_, std::io::Error>(Bytes::from_static(body))
    }));
    request
        .headers_mut()
        .insert("x-github-event", http::HeaderValue::from_static("ping"));
    request
}

/// The [`ping`] was read, verified and accepted.
fn assert_ping_answered(answer: &Answer) {
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["ignored"], "\"ping\" events start nothing");
}

/// `expected` of the paused clock passed since `started` (timers fire on the millisecond).
fn assert_took(started: tokio::time::Instant, expected: Duration) {
    let took = started.elapsed();
    assert!(
        took >= expected && took < expected + Duration::from_millis(10),
        "{took:?}, not {expected:?}"
    );
}

/// An instance without NATS (no delivery records needed) and with `extra` settings.
async fn instance(extra: &[(&str, &str)]) -> Harness {
    let mut env = vec![("NATS_URL", "")];
    env.extend_from_slice(extra);
    Harness::start_with(&env).await
}

/// Runs `request` in its own task, so several can be in flight at once.
fn spawn(h: &Harness, request: http::Request<Body>) -> tokio::task::JoinHandle<Answer> {
    let app = h.app.clone();
    tokio::spawn(async move { send(&app, request).await })
}

/// Lets the spawned requests run until `done` holds (the clock is paused: no time passes).
async fn until(done: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the requests never got there");
}

#[tokio::test]
async fn an_unsigned_post_of_five_mib_is_401_without_a_byte_of_its_body_read() {
    let h = instance(&[]).await;
    let pulled = Arc::new(Pulled::default());
    let answer = h.send(github(&[], counted(5 * MIB, &pulled))).await;
    assert_error(&answer, 401, "unauthorized");
    assert_eq!(pulled.total(), 0);
    // A header that cannot be an HMAC-SHA256 is refused unread as well.
    let short = ("x-hub-signature-256", "sha256=abcd".to_string());
    let answer = h.send(github(&[short], counted(5 * MIB, &pulled))).await;
    assert_error(&answer, 401, "unauthorized");
    assert_eq!(pulled.total(), 0);
}

#[tokio::test]
async fn a_provider_without_a_secret_is_401_without_a_byte_of_its_body_read() {
    let h = instance(&[("GITHUB_WEBHOOK_SECRET", "")]).await;
    let pulled = Arc::new(Pulled::default());
    let answer = h.send(github(&[forged()], counted(5 * MIB, &pulled))).await;
    assert_error(&answer, 401, "unauthorized");
    assert!(
        answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no secret configured"),
        "{}",
        answer.json()
    );
    assert_eq!(pulled.total(), 0);
}

#[tokio::test]
async fn a_signed_body_over_the_cap_is_413_having_read_at_most_the_cap_and_one_chunk() {
    let cap = 256 * 1024;
    let h = instance(&[
        ("PIPELINE_WEBHOOK_MAX_BODY_BYTES", "262144"),
        ("PIPELINE_WEBHOOK_MAX_READS", "1"),
    ])
    .await;
    let pulled = Arc::new(Pulled::default());
    let answer = h.send(github(&[forged()], counted(5 * MIB, &pulled))).await;
    assert_error(&answer, 413, "payload_too_large");
    assert_eq!(
        pulled.total(),
        cap + CHUNK,
        "the cap, then the chunk that crossed it"
    );
    // A declared length over the cap is refused before the body is polled.
    let pulled = Arc::new(Pulled::default());
    let mut declared = github(&[forged()], counted(5 * MIB, &pulled));
    declared.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(5 * MIB),
    );
    assert_error(&h.send(declared).await, 413, "payload_too_large");
    assert_eq!(pulled.total(), 0);
    // Neither kept the only read slot.
    let pulled = Arc::new(Pulled::default());
    let answer = h.send(ping(&pulled)).await;
    assert_ping_answered(&answer);
}

#[tokio::test]
async fn twenty_parallel_unsigned_posts_of_five_mib_are_all_401_and_read_nothing() {
    let h = instance(&[]).await;
    let pulled = Arc::new(Pulled::default());
    let answers =
        futures::future::join_all((0..20).map(|_| h.send(github(&[], counted(5 * MIB, &pulled)))))
            .await;
    for answer in &answers {
        assert_error(answer, 401, "unauthorized");
    }
    assert_eq!(pulled.total(), 0, "of 100 MiB offered");
}

#[tokio::test]
async fn twenty_parallel_forged_posts_of_five_mib_are_read_four_at_a_time_and_only_to_the_cap() {
    // The defaults: a 4 MiB cap, 4 reads at once. The clock is paused so that however slow
    // the machine, no read outlasts the 2 s wait; the bodies interleave all the same.
    let h = instance(&[]).await;
    tokio::time::pause();
    let pulled = Arc::new(Pulled::default());
    let answers = futures::future::join_all(
        (0..20).map(|_| h.send(github(&[forged()], counted(5 * MIB, &pulled)))),
    )
    .await;
    for answer in &answers {
        assert_error(answer, 413, "payload_too_large");
    }
    let peak_readers = pulled.peak_readers.load(Ordering::SeqCst);
    let peak_held = pulled.peak_held.load(Ordering::SeqCst);
    assert_eq!(peak_readers, 4, "bodies being read at once");
    assert!(
        peak_held <= 4 * (4 * MIB + CHUNK),
        "at most four capped bodies held at once: {peak_held} bytes"
    );
    assert_eq!(pulled.total(), 20 * (4 * MIB + CHUNK));
}

/// Forged webhooks whose bodies dribble in, each holding a read slot until released.
struct Holders {
    more: Vec<tokio::sync::mpsc::Sender<Bytes>>,
    answers: Vec<tokio::task::JoinHandle<Answer>>,
}

impl Holders {
    /// `n` of them, returned once each holds a slot (its body is being read).
    async fn take(h: &Harness, n: usize) -> Self {
        let slow = Arc::new(Pulled::default());
        let (mut more, mut answers) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (body, sender) = dribbled(&slow);
            more.push(sender);
            answers.push(spawn(h, github(&[forged()], body)));
        }
        until(|| slow.readers.load(Ordering::SeqCst) == n).await;
        Self { more, answers }
    }

    /// Ends one body; its forged signature fails and its slot is free.
    fn release_one(&mut self) {
        self.more.pop();
    }

    /// Ends every body: each was answered 401.
    async fn finish(mut self) {
        self.more.clear();
        for answer in self.answers {
            assert_error(&answer.await.expect("holder"), 401, "unauthorized");
        }
    }
}

#[tokio::test]
async fn with_every_read_slot_taken_a_webhook_waits_for_one_and_is_then_read() {
    let h = instance(&[("PIPELINE_WEBHOOK_MAX_READS", "2")]).await;
    tokio::time::pause();
    let mut holders = Holders::take(&h, 2).await;
    let waiting = Arc::new(Pulled::default());
    let waiter = spawn(&h, ping(&waiting));
    // Half the read wait (2 s): still waiting, its body untouched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    assert_eq!(waiting.total(), 0);
    // One slow body ends: its slot goes to the waiting webhook, which is read and answered.
    holders.release_one();
    assert_ping_answered(&waiter.await.expect("waiter"));
    holders.finish().await;
}

#[tokio::test]
async fn a_webhook_that_finds_no_read_slot_within_the_wait_is_503_with_retry_after() {
    let h = instance(&[("PIPELINE_WEBHOOK_MAX_READS", "1")]).await;
    tokio::time::pause();
    let holders = Holders::take(&h, 1).await;
    let started = tokio::time::Instant::now();
    let waiting = Arc::new(Pulled::default());
    let answer = h.send(ping(&waiting)).await;
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "2");
    assert_took(started, Duration::from_secs(2));
    assert_eq!(waiting.total(), 0);
    holders.finish().await;
}

#[tokio::test]
async fn a_body_still_arriving_after_ten_seconds_is_408_and_gives_its_slot_back() {
    let h = instance(&[("PIPELINE_WEBHOOK_MAX_READS", "1")]).await;
    tokio::time::pause();
    let slow = Arc::new(Pulled::default());
    let (body, _more) = dribbled(&slow);
    let started = tokio::time::Instant::now();
    let answer = h.send(github(&[forged()], body)).await;
    assert_error(&answer, 408, "body_incomplete");
    assert_took(started, Duration::from_secs(10));
    let answer = h.send(ping(&Arc::new(Pulled::default()))).await;
    assert_ping_answered(&answer);
}

#[tokio::test]
async fn the_renamed_cap_variable_and_zero_read_slots_are_reported_at_start() {
    let h = instance(&[]).await;
    let mut env = crate::support::base_env(&h.kube, &h.kfp, &h.nats, &h.dir);
    env.push(("PIPELINE_WEBHOOK_MAX_BYTES".into(), "1048576".into()));
    env.push(("PIPELINE_WEBHOOK_MAX_READS".into(), "0".into()));
    let problems = handler_kit::config::load(&env, pipeline_bridge::Config::read)
        .expect_err("refused")
        .0;
    assert_eq!(
        problems,
        [
            "PIPELINE_WEBHOOK_MAX_BYTES is now PIPELINE_WEBHOOK_MAX_BODY_BYTES",
            "PIPELINE_WEBHOOK_MAX_READS must be at least 1",
        ]
    );
}
