//! Hostile sinks: an answer is read only as far as it could ever be used.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testkit::nats_server::NatsServer;

use crate::support::{Source, dead_letters, drained, publish_numbered};

/// A sink whose 200 answers with a CloudEvent body that never ends, counting what it sent.
fn endless_sink(sent: Arc<AtomicUsize>) -> (u16, std::thread::JoinHandle<()>) {
    let port = testkit::nats_server::free_port().expect("port");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind");
            let _ = ready_tx.send(());
            let app = axum::Router::new().route(
                "/",
                axum::routing::post(move || {
                    let sent = sent.clone();
                    async move {
                        let chunk = bytes::Bytes::from(vec![b'a'; 64 * 1024]);
                        let body = futures::stream::repeat_with(move || {
                            sent.fetch_add(chunk.len(), Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(chunk.clone())
                        });
                        axum::response::Response::builder()
                            .header("ce-specversion", "1.0")
                            .header("ce-id", "endless.reply")
                            .header("ce-source", "/sink")
                            .header("ce-type", "test.reply")
                            .header("content-type", "application/octet-stream")
                            .body(axum::body::Body::from_stream(body))
                            .expect("response")
                    }
                }),
            );
            let _ = axum::serve(listener, app).await;
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("sink listening");
    (port, thread)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_reply_is_read_up_to_nats_max_payload_and_no_further() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sent = Arc::new(AtomicUsize::new(0));
    let (port, _sink) = endless_sink(sent.clone());
    let source = Source::start(
        &nats.url(),
        &format!("http://127.0.0.1:{port}"),
        &[("REPLY_SUBJECT", "replies.{subject}")],
    );
    source.ready().await;
    let mut replies = client.subscribe("replies.>").await.expect("subscribe");
    let before = peak_rss_kib();
    publish_numbered(&client, 3, |_| "work.endless".into()).await;
    assert!(drained(&client, Duration::from_secs(30)).await);
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    let sent_mib = sent.load(Ordering::SeqCst) / (1024 * 1024);
    eprintln!("endless replies: sink sent {sent_mib} MiB, peak RSS grew {grown_mib} MiB");
    // The reply could never be published (1 MiB max payload): acked as reply_too_large,
    // after reading about 1 MiB of each, not the whole stream.
    assert!(dead_letters(&client).await.is_empty());
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut replies)
        )
        .await
        .is_err(),
        "a cut reply was published"
    );
    assert!(grown_mib < 24, "peak RSS grew {grown_mib} MiB");
    // What the sink could push into loopback socket buffers before the source hung up.
    assert!(sent_mib < 64, "the sink sent {sent_mib} MiB");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_subject_naming_the_jetstream_api_is_refused_and_the_victim_keeps_its_messages() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    let victim = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "VICTIM".into(),
            subjects: vec!["victim.>".into()],
            ..Default::default()
        })
        .await
        .expect("victim stream");
    for i in 0..50 {
        js.publish(format!("victim.{i}"), "x".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let sink = crate::support::Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), &[]);
    source.ready().await;
    for (id, reply) in [
        ("purge", "$JS.API.STREAM.PURGE.VICTIM"),
        ("loop", "work.again"),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        headers.insert("testreply", "yes");
        headers.insert("reply-subject", reply);
        // A plain header named like a core attribute must not forge the event's id.
        headers.insert("id", "forged");
        js.publish_with_headers("work.hostile", headers, "x".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    assert!(drained(&client, Duration::from_secs(20)).await);
    let mut victim = victim;
    assert_eq!(
        victim.info().await.expect("info").state.messages,
        50,
        "the reply purged an unrelated stream"
    );
    let dlq = dead_letters(&client).await;
    assert_eq!(dlq.len(), 2, "both refused");
    for m in &dlq {
        let reason = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Dlq-Reason"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert!(reason.contains("refused"), "{reason}");
    }
    // Refused before the POST: the sink never saw them.
    assert!(sink.log().is_empty(), "{:?}", sink.log());
    source.stop().await;

    // The forged id: a plain message with an `id` header keeps the mapped id.
    let source = Source::start(&nats.url(), &sink.url(), &[]);
    source.ready().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "real-id");
    headers.insert("id", "forged");
    headers.insert("source", "/forged");
    js.publish_with_headers("work.forged", headers, "x".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert!(drained(&client, Duration::from_secs(20)).await);
    let log = sink.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].id, "real-id");
    assert_eq!(
        log[0]
            .headers
            .get("ce-source")
            .and_then(|v| v.to_str().ok()),
        Some("/nats/WORK")
    );
    source.stop().await;
}
