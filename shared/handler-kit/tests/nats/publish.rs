//! `Publisher` and the functions' `Nats` on one real nats-server: stored once, flushed, kept
//! across a restart of the server.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use handler_kit::nats::{Kept, Nats, PublishError, Publisher};
use testkit::nats_server::NatsServer;

use crate::next_message;

const DEADLINE: Duration = Duration::from_secs(10);

fn with_id(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers
}

/// A file-backed stream `REPLIES` on `replies.>`.
async fn replies_stream(client: &async_nats::Client) -> stream::Stream {
    jetstream::new(client.clone())
        .create_stream(stream::Config {
            name: "REPLIES".into(),
            subjects: vec!["replies.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream")
}

/// A function's `Nats` on `server`, connected.
async fn functions_nats(server: &NatsServer) -> Nats {
    let nats = Nats::connect(Some(&crate::config(&server.url())), "publish-test")
        .await
        .expect("connect");
    nats.max_payload().await.expect("connected");
    nats
}

async fn stored_messages(client: &async_nats::Client) -> u64 {
    let mut stream = jetstream::new(client.clone())
        .get_stream("REPLIES")
        .await
        .expect("stream");
    stream.info().await.expect("info").state.messages
}

#[tokio::test]
async fn a_reply_published_twice_under_one_msg_id_is_stored_once() {
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    replies_stream(&client).await;
    let publisher = Publisher::new(client.clone());

    let publish = || {
        publisher.publish(
            "replies.r-1",
            with_id("r-1.reply"),
            Bytes::from("a"),
            DEADLINE,
        )
    };

    let first = publish().await.expect("stored");
    let again = publish().await.expect("stored");

    assert_eq!(first, Kept::Stored { duplicate: false });
    assert_eq!(again, Kept::Stored { duplicate: true });
    assert_eq!(stored_messages(&client).await, 1);
}

#[tokio::test]
async fn a_subject_no_stream_stores_is_flushed_to_its_subscriber() {
    let nats = NatsServer::start().await.expect("nats-server");
    let watcher = nats.client().await.expect("client");
    let mut sub = watcher.subscribe("plain.r-2").await.expect("sub");
    watcher.flush().await.expect("flush");
    let publisher = Publisher::new(nats.client().await.expect("client"));

    let kept = publisher
        .publish("plain.r-2", with_id("r-2"), Bytes::from("hello"), DEADLINE)
        .await
        .expect("flushed");

    assert_eq!(kept, Kept::Flushed);
    let msg = next_message(&mut sub).await;
    assert_eq!(msg.payload, "hello");
}

#[tokio::test]
async fn publish_stored_to_a_subject_no_stream_stores_is_an_error() {
    let nats = NatsServer::start().await.expect("nats-server");
    let publisher = Publisher::new(nats.client().await.expect("client"));

    let result = publisher
        .publish_stored("dlq.nowhere", with_id("d-1"), Bytes::from("x"), DEADLINE)
        .await;

    assert!(
        matches!(&result, Err(PublishError::NoStream { subject }) if subject == "dlq.nowhere"),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_publish_while_the_server_restarts_is_stored_once_it_is_back() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    replies_stream(&client).await;
    let publisher = Publisher::new(client.clone());
    // The stream lookup is remembered: the try after the restart goes straight to JetStream.
    publisher
        .publish("replies.r-3", with_id("r-3.0"), Bytes::from("0"), DEADLINE)
        .await
        .expect("stored before");

    nats.kill();
    let publishing = tokio::spawn({
        let publisher = publisher.clone();
        async move {
            publisher
                .publish("replies.r-3", with_id("r-3.1"), Bytes::from("1"), DEADLINE)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!publishing.is_finished(), "waits while the server is down");
    nats.restart().await.expect("restart");

    let kept = publishing
        .await
        .expect("task")
        .expect("kept within the deadline");
    assert!(matches!(kept, Kept::Stored { .. }), "{kept:?}");
    assert_eq!(stored_messages(&client).await, 2);
    let again = publisher
        .publish("replies.r-3", with_id("r-3.1"), Bytes::from("1"), DEADLINE)
        .await
        .expect("stored");
    assert_eq!(again, Kept::Stored { duplicate: true });
}

#[tokio::test]
async fn a_deadline_that_passes_while_the_server_is_down_fails_saying_why() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    let publisher = Publisher::new(client.clone());
    nats.kill();
    while client.connection_state() == async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let result = publisher
        .publish(
            "plain.r-4",
            with_id("r-4"),
            Bytes::from("x"),
            Duration::from_millis(300),
        )
        .await;

    let Err(e @ PublishError::TimedOut { .. }) = result else {
        panic!("{result:?}");
    };
    assert!(e.to_string().contains("not connected"), "{e}");
}

#[tokio::test]
async fn an_outbox_keeps_every_chunk_and_the_reply_once_kept_returns() {
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    replies_stream(&client).await;
    let mut plain = client.subscribe("plain.r-5").await.expect("sub");
    client.flush().await.expect("flush");
    let functions = functions_nats(&nats).await;

    let mut outbox = functions.outbox();
    for seq in 0..200 {
        outbox
            .publish(
                "replies.r-5.stream".into(),
                &seq,
                Some(&format!("r-5.{seq}")),
            )
            .await
            .expect("sent");
    }
    outbox
        .publish("plain.r-5".into(), &"reply", Some("r-5.reply"))
        .await
        .expect("sent");
    outbox.kept().await.expect("kept");

    assert_eq!(stored_messages(&client).await, 200);
    let reply = next_message(&mut plain).await;
    let body: String = rmp_serde::from_slice(&reply.payload).expect("msgpack");
    assert_eq!(body, "reply");
}

#[tokio::test]
async fn chunks_sent_while_the_server_dies_are_each_stored_once_after_it_is_back() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    replies_stream(&client).await;
    let functions = functions_nats(&nats).await;

    let mut outbox = functions.outbox();
    for seq in 0..100 {
        if seq == 50 {
            // Some of the first half are stored with their PubAck lost, some not sent at all.
            nats.kill();
        }
        outbox
            .publish(
                "replies.r-6.stream".into(),
                &seq,
                Some(&format!("r-6.{seq}")),
            )
            .await
            .expect("sent or held");
    }
    let kept = tokio::join!(outbox.kept(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.restart().await.expect("restart");
    })
    .0;

    kept.expect("kept once the server is back");
    assert_eq!(stored_messages(&client).await, 100);
}

/// `handler_nats_connected` (what the operators' NATS alert reads) follows the connection:
/// 1 once connected, 0 while the server is gone, 1 again when it is back.
#[tokio::test]
async fn the_connected_gauge_follows_the_connection() {
    let mut server = NatsServer::start().await.expect("nats");
    let nats = functions_nats(&server).await;
    nats.max_payload().await.expect("connected");
    let gauge = || {
        handler_kit::telemetry::render_prometheus()
            .lines()
            .find(|l| l.starts_with("handler_nats_connected "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let reads = |want: u64| async move {
        testkit::cloudevent::eventually(Duration::from_secs(15), || async {
            (gauge() == Some(want)).then_some(())
        })
        .await
        .is_some()
    };
    assert!(reads(1).await, "not 1 once connected: {:?}", gauge());
    server.kill();
    assert!(reads(0).await, "not 0 with the server gone: {:?}", gauge());
    server.restart().await.expect("restart");
    assert!(reads(1).await, "not 1 after the reconnect: {:?}", gauge());
}
