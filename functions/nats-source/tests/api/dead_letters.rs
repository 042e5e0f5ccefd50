//! Dead letters: one per message, whatever its event id, and never refused by the DLQ stream.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use testkit::nats_server::NatsServer;

use crate::support::{Sink, Source, dead_letters, drained};

fn header(m: &async_nats::jetstream::Message, name: &str) -> Option<String> {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.to_string())
}

async fn store(
    js: &async_nats::jetstream::Context,
    subject: &str,
    headers: &[(&str, &str)],
    payload: &str,
) -> u64 {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, *v);
    }
    js.publish_with_headers(subject.to_string(), map, payload.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

#[tokio::test]
async fn events_sharing_an_id_or_lacking_one_each_get_their_own_dead_letter() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 400), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), &[]);
    source.ready().await;
    let js = async_nats::jetstream::new(client.clone());
    // Ids are unique only per source: two producers may both send "evt-1".
    let mut sequences = Vec::new();
    for source_name in ["/producer-a", "/producer-b"] {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "evt-1"),
            ("ce-source", source_name),
            ("ce-type", "t"),
        ];
        sequences.push(store(&js, "work.same", &headers, "{}").await);
    }
    // Structured events without an id.
    for n in 0..2 {
        let body = format!(r#"{{"specversion":"1.0","source":"/p","type":"t","data":{n}}}"#);
        sequences.push(store(&js, "work.noid", &[], &body).await);
    }
    assert!(drained(&client, Duration::from_secs(20)).await);
    assert_eq!(sink.log().len(), 4, "each event posted once");

    let dlq = dead_letters(&client).await;
    let ids: HashSet<String> = dlq
        .iter()
        .map(|m| header(m, "Nats-Msg-Id").unwrap_or_default())
        .collect();
    let expected: HashSet<String> = sequences.iter().map(|s| format!("dlq:WORK:{s}")).collect();
    assert_eq!(
        ids, expected,
        "one dead letter per message, keyed by its stream position"
    );
    assert_eq!(dlq.len(), 4);
    source.stop().await;
}

#[tokio::test]
async fn a_message_with_jetstream_control_headers_still_reaches_the_dlq() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 422), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), &[]);
    source.ready().await;
    let js = async_nats::jetstream::new(client.clone());
    // Accepted by WORK; copied as they are onto the DLQ publish they would be refused there
    // (wrong stream, wrong last sequence) on every attempt.
    let sequence = store(
        &js,
        "work.guarded",
        &[
            ("Nats-Expected-Stream", "WORK"),
            ("Nats-Expected-Last-Sequence", "0"),
            ("Nats-Msg-Id", "guarded-1"),
            ("Content-Type", "application/json"),
        ],
        "{}",
    )
    .await;
    assert!(drained(&client, Duration::from_secs(20)).await);

    let dlq = dead_letters(&client).await;
    assert_eq!(dlq.len(), 1, "the dead letter was refused");
    let letter = &dlq[0];
    assert_eq!(
        header(letter, "Nats-Msg-Id").as_deref(),
        Some(format!("dlq:WORK:{sequence}").as_str())
    );
    assert!(header(letter, "Nats-Expected-Stream").is_none());
    assert_eq!(
        header(letter, "X-Original-Nats-Expected-Stream").as_deref(),
        Some("WORK")
    );
    assert_eq!(
        header(letter, "X-Original-Nats-Msg-Id").as_deref(),
        Some("guarded-1")
    );
    assert_eq!(
        header(letter, "Content-Type").as_deref(),
        Some("application/json")
    );
    assert!(header(letter, "Dlq-Reason").is_some_and(|r| r.contains("422")));
    source.stop().await;
}
