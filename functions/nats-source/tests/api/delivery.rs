//! The delivery contract at volume, per-subject ordering, pass-through, and replies.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use testkit::nats_server::NatsServer;

use crate::support::{Sink, Source, dead_letters, drained, hash, publish_numbered};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_with_failures_lose_nothing() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    // 1% poison (always 400); every other answer is a 500 one time in five, attempt by attempt.
    let sink = Sink::start(
        Arc::new(|id: &str, attempt| {
            let i: usize = id.trim_start_matches("m-").parse().unwrap_or(1);
            if i.is_multiple_of(100) {
                400
            } else if hash(id, attempt).is_multiple_of(5) {
                500
            } else {
                200
            }
        }),
        Duration::ZERO,
    );
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("MAX_IN_FLIGHT", "256"), ("MAX_DELIVER", "30")],
    );
    source.ready().await;
    publish_numbered(&client, 10_000, |i| format!("work.n{}", i % 7)).await;
    assert!(
        drained(&client, Duration::from_secs(120)).await,
        "messages left pending"
    );

    let log = sink.log();
    let ok: HashSet<&str> = log
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.id.as_str())
        .collect();
    let retried = log.iter().filter(|r| r.status == 500).count();
    assert!(
        retried > 1000,
        "only {retried} 500s: the failure path was not exercised"
    );
    for i in (0..10_000).filter(|i| i % 100 != 0) {
        assert!(
            ok.contains(format!("m-{i}").as_str()),
            "m-{i} never delivered successfully"
        );
    }
    let poison_calls: HashMap<&str, usize> =
        log.iter()
            .filter(|r| r.status == 400)
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r.id.as_str()).or_default() += 1;
                m
            });
    assert_eq!(poison_calls.len(), 100);
    assert!(poison_calls.values().all(|&n| n == 1), "a 400 was retried");

    let dlq = dead_letters(&client).await;
    let ids: Vec<String> = dlq
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        ids.len(),
        100,
        "each poison message exactly once in the DLQ"
    );
    assert_eq!(unique.len(), 100);
    let sample = &dlq[0];
    let headers = sample.headers.as_ref().expect("headers");
    assert!(
        headers
            .get("Dlq-Reason")
            .is_some_and(|r| r.as_str().contains("400"))
    );
    assert_eq!(headers.get("Dlq-Deliveries").map(|v| v.as_str()), Some("1"));
    assert!(sample.subject.starts_with("dlq.WORK.work.n"));
    let original: usize = String::from_utf8_lossy(&sample.payload)
        .parse()
        .expect("original payload");
    assert_eq!(original % 100, 0);
    source.stop().await;
}

#[tokio::test]
async fn retries_run_out_into_the_dlq_with_the_reason() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 500), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), &[("MAX_DELIVER", "3")]);
    source.ready().await;
    publish_numbered(&client, 1, |_| "work.a".into()).await;
    assert!(drained(&client, Duration::from_secs(20)).await);
    assert_eq!(sink.log().len(), 3, "exactly MAX_DELIVER attempts");
    let dlq = dead_letters(&client).await;
    assert_eq!(dlq.len(), 1);
    let reason = dlq[0]
        .headers
        .as_ref()
        .and_then(|h| h.get("Dlq-Reason"))
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("500") && reason.contains("3 failed attempts"),
        "{reason}"
    );
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_by_subject_keeps_each_subject_in_stream_order() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(
        Arc::new(|id: &str, attempt| {
            if hash(id, attempt).is_multiple_of(4) {
                500
            } else {
                200
            }
        }),
        Duration::from_millis(2),
    );
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[
            ("ORDERING", "subject"),
            ("MAX_IN_FLIGHT", "64"),
            ("MAX_DELIVER", "30"),
        ],
    );
    source.ready().await;
    publish_numbered(&client, 400, |i| format!("work.s{}", i % 8)).await;
    assert!(drained(&client, Duration::from_secs(60)).await);

    let mut last: HashMap<String, usize> = HashMap::new();
    for r in sink.log().iter().filter(|r| r.status == 200) {
        let i: usize = r.id.trim_start_matches("m-").parse().expect("numbered");
        if let Some(prev) = last.insert(r.subject.clone(), i) {
            assert!(i > prev, "{} delivered {i} after {prev}", r.subject);
        }
    }
    assert_eq!(last.len(), 8);
    assert_eq!(
        sink.same_subject_overlaps(),
        0,
        "two messages of one subject were in flight at once"
    );
    assert!(
        sink.max_concurrent() > 1,
        "subjects did not run concurrently"
    );
    source.stop().await;
}

#[tokio::test]
async fn cloudevents_pass_through_and_replies_are_published_once() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), &[]);
    source.ready().await;
    let mut replies = client.subscribe("replies.>").await.expect("sub");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client.clone());

    let mut binary = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bin-1"),
        ("ce-source", "/producer"),
        ("ce-type", "producer.thing"),
        ("content-type", "application/json"),
        ("reply-subject", "replies.bin"),
        ("ce-testreply", "yes"),
    ] {
        binary.insert(k, v);
    }
    js.publish_with_headers("work.binary", binary, r#"{"a":1}"#.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let structured = r#"{"specversion":"1.0","id":"st-1","source":"/producer","type":"producer.other","data":{"b":2}}"#;
    js.publish("work.structured", structured.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert!(drained(&client, Duration::from_secs(20)).await);

    let log = sink.log();
    let bin = log
        .iter()
        .find(|r| r.id == "bin-1")
        .expect("binary event delivered");
    assert_eq!(
        bin.headers.get("ce-type").and_then(|v| v.to_str().ok()),
        Some("producer.thing")
    );
    assert_eq!(
        bin.headers.get("ce-source").and_then(|v| v.to_str().ok()),
        Some("/producer")
    );
    assert_eq!(&bin.body[..], br#"{"a":1}"#);
    let st = log
        .iter()
        .find(|r| r.id == "st-1")
        .expect("structured event delivered");
    assert_eq!(
        st.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/cloudevents+json")
    );
    assert_eq!(&st.body[..], structured.as_bytes());

    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("reply")
        .expect("open");
    assert_eq!(reply.subject.as_str(), "replies.bin");
    let h = reply.headers.expect("headers");
    assert_eq!(h.get("ce-type").map(|v| v.as_str()), Some("test.reply"));
    assert_eq!(
        h.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("bin-1.reply")
    );
    assert_eq!(&reply.payload[..], br#"{"ok":true}"#);
    source.stop().await;
}

#[tokio::test]
async fn a_reply_over_max_payload_is_skipped_not_retried() {
    let nats = testkit::nats_server::NatsServer::start_with(testkit::nats_server::NatsOptions {
        max_payload: Some(8 * 1024),
        ..Default::default()
    })
    .await
    .expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("REPLY_SUBJECT", "replies.{subject}")],
    );
    source.ready().await;
    let mut replies = client.subscribe("replies.>").await.expect("sub");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("testreply", "big");
    headers.insert("Nats-Msg-Id", "big-1");
    js.publish_with_headers("work.big", headers, "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("testreply", "yes");
    headers.insert("Nats-Msg-Id", "small-1");
    js.publish_with_headers("work.small", headers, "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert!(drained(&client, Duration::from_secs(20)).await);
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("reply")
        .expect("open");
    assert_eq!(reply.subject.as_str(), "replies.work.small");
    let attempts = sink.log().iter().filter(|r| r.id == "big-1").count();
    assert_eq!(attempts, 1, "the oversized reply made the source retry");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_with_a_short_ack_wait_gets_every_message_exactly_once() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    // Each POST takes 200 ms and only 4 run at once (with pulls of up to 64), so the backlog
    // takes ~5 s, five ack waits: a message held anywhere without in-progress acks would be
    // redelivered while its first copy still waits, and reach the sink twice.
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::from_millis(200));
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[
            ("MAX_IN_FLIGHT", "4"),
            ("FETCH_BATCH", "64"),
            ("ACK_WAIT_MS", "1000"),
            ("MAX_DELIVER", "2"),
        ],
    );
    source.ready().await;
    publish_numbered(&client, 100, |i| format!("work.slow{}", i % 5)).await;
    assert!(
        drained(&client, Duration::from_secs(60)).await,
        "messages left pending"
    );

    let mut calls: HashMap<String, usize> = HashMap::new();
    for r in sink.log() {
        assert_eq!(r.status, 200);
        *calls.entry(r.id).or_default() += 1;
    }
    assert_eq!(calls.len(), 100, "a message never reached the sink");
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert!(
        sink.max_concurrent() <= 4,
        "more than MAX_IN_FLIGHT in the sink"
    );
    let js = async_nats::jetstream::new(client.clone());
    let info = js
        .get_stream("WORK")
        .await
        .expect("stream")
        .consumer_info("worker")
        .await
        .expect("consumer")
        .clone();
    assert_eq!(info.num_redelivered, 0, "JetStream redelivered messages");
    assert!(
        dead_letters(&client).await.is_empty(),
        "nothing fails, nothing is dead-lettered"
    );
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_refused_by_its_stream_is_retried_until_stored() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    // A full stream that discards new messages refuses the reply (a core publish would be
    // dropped silently and the message acked anyway).
    let replies = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "REPLIES".into(),
            subjects: vec!["replies.>".into()],
            max_messages: 1,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .expect("replies stream");
    js.publish("replies.filler", "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    // A full discard-new stream is retried within REPLY_TIMEOUT_MS (it may drain), then the
    // message is handed back: keep that short here.
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("MAX_DELIVER", "1000"), ("REPLY_TIMEOUT_MS", "300")],
    );
    source.ready().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("testreply", "yes");
    headers.insert("reply-subject", "replies.r1");
    headers.insert("Nats-Msg-Id", "r-1");
    js.publish_with_headers("work.r", headers, "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let retried = crate::support::eventually(Duration::from_secs(20), || async {
        (sink.log().len() >= 3).then_some(())
    })
    .await;
    assert!(
        retried.is_some(),
        "a refused reply did not make the source retry"
    );
    let js_info = js.get_stream("WORK").await.expect("stream");
    let pending = js_info
        .consumer_info("worker")
        .await
        .expect("consumer")
        .num_ack_pending;
    assert_eq!(pending, 1, "the message was acked without its reply");

    replies.purge().await.expect("purge");
    assert!(
        drained(&client, Duration::from_secs(20)).await,
        "never acked"
    );
    let stored = js
        .get_stream("REPLIES")
        .await
        .expect("replies")
        .get_last_raw_message_by_subject("replies.r1")
        .await
        .expect("the reply was stored");
    assert_eq!(
        stored.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("r-1.reply")
    );
    let mut info = js.get_stream("REPLIES").await.expect("replies");
    assert_eq!(
        info.info().await.expect("info").state.messages,
        1,
        "stored once"
    );
    assert!(dead_letters(&client).await.is_empty());
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_ordered_subject_neither_starves_the_others_nor_loses_its_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    // m-0..m-29 are work.stuck, answered 500 until released; the rest, on three other
    // subjects, get a 500 one time in four.
    let released = Arc::new(AtomicBool::new(false));
    let release = released.clone();
    let sink = Sink::start(
        Arc::new(move |id: &str, attempt| {
            let i: usize = id.trim_start_matches("m-").parse().expect("numbered");
            let failed = if i < 30 {
                !release.load(Ordering::SeqCst)
            } else {
                hash(id, attempt).is_multiple_of(4)
            };
            if failed { 500 } else { 200 }
        }),
        Duration::from_millis(2),
    );
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[
            ("ORDERING", "subject"),
            ("MAX_IN_FLIGHT", "8"),
            ("MAX_IN_FLIGHT_PER_SUBJECT", "2"),
            ("MAX_DELIVER", "100000"),
        ],
    );
    source.ready().await;
    publish_numbered(&client, 90, |i| {
        if i < 30 {
            "work.stuck".into()
        } else {
            format!("work.free{}", i % 3)
        }
    })
    .await;

    let others_done = crate::support::eventually(Duration::from_secs(30), || async {
        let ok: HashSet<String> = sink
            .log()
            .into_iter()
            .filter(|r| r.status == 200)
            .map(|r| r.id)
            .collect();
        (30..90)
            .all(|i| ok.contains(&format!("m-{i}")))
            .then_some(())
    })
    .await;
    assert!(
        others_done.is_some(),
        "the stuck subject starved the others"
    );
    released.store(true, Ordering::SeqCst);
    assert!(
        drained(&client, Duration::from_secs(60)).await,
        "messages left pending"
    );

    let log = sink.log();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut ok: HashMap<String, usize> = HashMap::new();
    for r in log.iter().filter(|r| r.status == 200) {
        let i: usize = r.id.trim_start_matches("m-").parse().expect("numbered");
        if let Some(prev) = last.insert(r.subject.clone(), i) {
            assert!(i > prev, "{} delivered {i} after {prev}", r.subject);
        }
        *ok.entry(r.id.clone()).or_default() += 1;
    }
    assert_eq!(ok.len(), 90, "every message delivered");
    assert!(ok.values().all(|&n| n == 1), "a message succeeded twice");
    assert_eq!(
        sink.same_subject_overlaps(),
        0,
        "two messages of one subject were in flight at once"
    );
    assert!(dead_letters(&client).await.is_empty());
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_message_whose_reply_is_refused_is_retried_before_the_next() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    let replies = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "REPLIES".into(),
            subjects: vec!["replies.>".into()],
            max_messages: 1,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .expect("replies stream");
    js.publish("replies.filler", "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[
            ("ORDERING", "subject"),
            ("MAX_DELIVER", "1000"),
            ("REPLY_TIMEOUT_MS", "300"),
        ],
    );
    source.ready().await;
    // m-0 wants a reply the full stream refuses; m-1 on the same subject must wait for it.
    for (id, reply) in [("m-0", true), ("m-1", false)] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        if reply {
            headers.insert("testreply", "yes");
            headers.insert("reply-subject", "replies.o1");
        }
        js.publish_with_headers("work.o", headers, "x".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let retried = crate::support::eventually(Duration::from_secs(20), || async {
        (sink.log().iter().filter(|r| r.id == "m-0").count() >= 3).then_some(())
    })
    .await;
    assert!(retried.is_some(), "the refused reply was not retried");
    replies.purge().await.expect("purge");
    assert!(drained(&client, Duration::from_secs(20)).await);
    let order: Vec<String> = sink.log().into_iter().map(|r| r.id).collect();
    let first_m1 = order
        .iter()
        .position(|id| id == "m-1")
        .expect("m-1 delivered");
    assert!(
        order[first_m1..].iter().all(|id| id == "m-1"),
        "m-1 overtook m-0: {order:?}"
    );
    source.stop().await;
}
