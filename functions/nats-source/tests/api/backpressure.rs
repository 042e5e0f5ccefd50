//! Backpressure, the retry budget and poison: a sink that cannot take work slows the whole
//! source down without using up retries; failed attempts are counted across restarts; a message
//! that cannot be carried is dead-lettered at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::nats_server::NatsServer;

use crate::support::{Sink, Source, dead_letters, drained, eventually, publish_numbered};

fn header(m: &async_nats::jetstream::Message, name: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_answering_503_with_retry_after_holds_the_source_back_without_using_retries() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let busy = Arc::new(AtomicBool::new(true));
    let answer = busy.clone();
    let sink = Sink::start(
        Arc::new(move |_: &str, _| {
            if answer.load(Ordering::SeqCst) {
                503
            } else {
                200
            }
        }),
        Duration::from_millis(5),
    );
    sink.set_retry_after(5);
    // Two failed attempts would dead-letter a message: none may be spent here.
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[
            ("MAX_DELIVER", "2"),
            ("MAX_IN_FLIGHT", "16"),
            // Retry-After is capped at the longest backoff.
            ("BACKOFF_MAX_MS", "10000"),
        ],
    );
    source.ready().await;
    publish_numbered(&client, 200, |i| format!("work.g{}", i % 4)).await;
    // The first 503 shuts the gate for 5 s; then one probe goes, and is refused again.
    let refusals = || -> Vec<f64> {
        sink.log()
            .iter()
            .filter(|r| r.status == 503)
            .map(|r| r.received_at)
            .collect()
    };
    let probed = eventually(Duration::from_secs(20), || async {
        let at = refusals();
        let first = *at.first()?;
        at.iter().any(|&t| t - first >= 4.9).then_some(())
    })
    .await;
    assert!(probed.is_some(), "no probe after the gate's time");
    busy.store(false, Ordering::SeqCst);
    assert!(
        drained(&client, Duration::from_secs(40)).await,
        "messages left pending"
    );
    let at = refusals();
    let first = at[0];
    // Nothing was sent while the gate was shut: the refusals are the burst in flight when
    // it shut, then probes, one per Retry-After.
    let shut = at
        .iter()
        .filter(|&&t| t - first > 0.5 && t - first < 4.9)
        .count();
    assert_eq!(shut, 0, "requests sent while the gate was shut: {at:?}");
    assert!(
        at.len() <= 16 + 3,
        "{} refusals: the source kept sending to a sink that said it was busy",
        at.len()
    );
    assert!(
        dead_letters(&client).await.is_empty(),
        "backpressure used up a message's retries"
    );
    let delivered: std::collections::HashSet<_> = sink
        .log()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(
        delivered.len(),
        200,
        "every message delivered once the sink took work"
    );
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_backpressure_and_delivery_resumes_when_the_sink_is_back() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    sink.kill();
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[
            ("MAX_DELIVER", "1"),
            ("BACKOFF_BASE_MS", "100"),
            ("BACKOFF_MAX_MS", "400"),
        ],
    );
    source.ready().await;
    publish_numbered(&client, 50, |_| "work.down".into()).await;
    // Down for a while: every try is refused, none may count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sink.restart();
    assert!(drained(&client, Duration::from_secs(30)).await);
    assert!(
        dead_letters(&client).await.is_empty(),
        "a refused connection was counted"
    );
    assert_eq!(sink.log().iter().filter(|r| r.status == 200).count(), 50);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_only_meets_backpressure_is_dead_lettered_past_retry_timeout() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 429), Duration::ZERO);
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("RETRY_TIMEOUT", "2s"), ("MAX_DELIVER", "1000")],
    );
    source.ready().await;
    let published = Instant::now();
    publish_numbered(&client, 1, |_| "work.old".into()).await;
    assert!(drained(&client, Duration::from_secs(20)).await);
    assert!(published.elapsed() >= Duration::from_secs(2));
    let dlq = dead_letters(&client).await;
    assert_eq!(dlq.len(), 1);
    let reason = header(&dlq[0], "Dlq-Reason");
    assert!(
        reason.contains("429") && reason.contains("older than RETRY_TIMEOUT"),
        "{reason}"
    );
    assert_eq!(header(&dlq[0], "Dlq-Failed-Attempts"), "0");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_counted_across_source_restarts() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    // Every other try is refused (backpressure: JetStream counts the delivery, the budget
    // must not), the rest fail (they count).
    let sink = Sink::start(
        Arc::new(|_: &str, attempt| if attempt % 2 == 0 { 503 } else { 500 }),
        Duration::ZERO,
    );
    let settings = [
        ("MAX_DELIVER", "4"),
        ("BACKOFF_BASE_MS", "300"),
        ("BACKOFF_MAX_MS", "300"),
    ];
    let attempts = || sink.log().iter().filter(|r| r.status == 500).count();
    // Two source lifetimes of at least one failed attempt each: a restart must not reset the
    // count.
    for seen in [1, 2] {
        let source = Source::start(&nats.url(), &sink.url(), &settings);
        source.ready().await;
        if seen == 1 {
            publish_numbered(&client, 1, |_| "work.budget".into()).await;
        }
        let reached = eventually(Duration::from_secs(10), || async {
            (attempts() >= seen).then_some(())
        })
        .await;
        assert!(reached.is_some(), "attempt {seen} never came");
        source.stop().await;
    }
    let source = Source::start(&nats.url(), &sink.url(), &settings);
    source.ready().await;
    assert!(drained(&client, Duration::from_secs(20)).await);
    let dlq = eventually(Duration::from_secs(5), || async {
        let d = dead_letters(&client).await;
        (!d.is_empty()).then_some(d)
    })
    .await
    .expect("dead-lettered");
    assert_eq!(attempts(), 4, "exactly MAX_DELIVER failed attempts in all");
    let refused = sink.log().iter().filter(|r| r.status == 503).count();
    assert_eq!(refused, 3, "a refusal between each failure");
    assert_eq!(header(&dlq[0], "Dlq-Failed-Attempts"), "4");
    let deliveries: i64 = header(&dlq[0], "Dlq-Deliveries").parse().expect("count");
    assert!(deliveries >= 7, "JetStream counted {deliveries} deliveries");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_reply_subjects_that_cannot_be_carried_are_dead_lettered_at_once() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), &[]);
    source.ready().await;
    let js = async_nats::jetstream::new(client.clone());
    let structured = |id: &str| {
        serde_json::json!({"specversion": "1.0", "id": id, "type": "t", "source": "/s"}).to_string()
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    for (subject, payload) in [
        ("work.p.newline", structured("a\nb")),
        ("work.p.cr", structured("a\rb")),
        ("work.p.nul", structured("a\0b")),
        ("work.p.long", structured(&"x".repeat(10 * 1024))),
    ] {
        js.publish_with_headers(subject, headers.clone(), payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let mut reply = async_nats::HeaderMap::new();
    reply.insert("reply-subject", "not a subject");
    js.publish_with_headers("work.p.reply", reply, "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // A good one behind them still goes.
    publish_numbered(&client, 1, |_| "work.p.good".into()).await;
    assert!(drained(&client, Duration::from_secs(20)).await);
    let dlq = dead_letters(&client).await;
    let mut subjects: Vec<String> = dlq
        .iter()
        .map(|m| header(m, "Dlq-Original-Subject"))
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "work.p.cr",
            "work.p.long",
            "work.p.newline",
            "work.p.nul",
            "work.p.reply"
        ],
        "each poison message exactly once"
    );
    for m in &dlq {
        let reason = header(m, "Dlq-Reason");
        assert!(
            reason.contains("cannot be carried") || reason.contains("not a valid NATS subject"),
            "{reason}"
        );
        assert_eq!(header(m, "Dlq-Failed-Attempts"), "0");
    }
    let log = sink.log();
    assert_eq!(log.len(), 1, "poison never reached the sink: {log:?}");
    assert_eq!(log[0].id, "m-0");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_url_takes_a_comma_separated_server_list() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    // The first server is down: the client moves on to the next.
    let closed = testkit::nats_server::free_port().expect("port");
    let list = format!("nats://127.0.0.1:{closed}, {}", nats.url());
    let source = Source::start(&list, &sink.url(), &[]);
    source.ready().await;
    publish_numbered(&client, 20, |_| "work.list".into()).await;
    assert!(drained(&client, Duration::from_secs(20)).await);
    assert_eq!(sink.log().iter().filter(|r| r.status == 200).count(), 20);
    source.stop().await;
}
