//! Publishing to a replicated stream while its leader is killed (a 3-node cluster).

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use handler_kit::nats::{Nats, Publisher};
use testkit::nats_server::NatsCluster;

/// Longer than one Raft election after a leader is killed (followers wait 4 to 9 s).
const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn publishes_and_an_outbox_go_on_through_the_election_when_the_stream_leader_is_killed() {
    let mut cluster = NatsCluster::start(3).await.expect("cluster");
    let nats = Nats::connect(Some(&crate::config(&cluster.urls())), "cluster-test")
        .await
        .expect("a list of every node");
    nats.max_payload().await.expect("connected");
    let client = nats.client().expect("enabled").clone();
    jetstream::new(client.clone())
        .create_stream(stream::Config {
            name: "REPLIES".into(),
            subjects: vec!["replies.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("R3 stream");
    let leader = cluster.stream_leader("REPLIES").await.expect("a leader");
    let publisher = Publisher::new(client);

    // One message after another, each waited for...
    let replies = 60;
    let publishing = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        for i in 0..replies {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("reply-{i}").as_str());
            let started = Instant::now();
            publisher
                .publish(
                    "replies.one",
                    headers,
                    Bytes::from(format!("{i}")),
                    DEADLINE,
                )
                .await
                .unwrap_or_else(|e| panic!("reply {i}: {e}"));
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    });
    // ...and a function's stream chunks, sent without waiting and kept together.
    let chunks = 100;
    let mut outbox = nats.outbox();
    for seq in 0..chunks {
        if seq == 30 {
            cluster.kill(leader);
        }
        outbox
            .publish("replies.stream".into(), &seq, Some(&format!("chunk-{seq}")))
            .await
            .expect("sent or held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    // `kept` retries for PUBLISH_DEADLINE, which is meant to outlast the election.
    outbox.kept().await.expect("every chunk kept");
    let kept_after = started.elapsed();

    let slowest = publishing.await.expect("every reply kept");
    eprintln!("slowest reply across the election: {slowest:?}; outbox kept after {kept_after:?}");
    let survivor = (leader + 1) % cluster.len();
    let live = async_nats::connect(cluster.url(survivor))
        .await
        .expect("client");
    let mut stream = jetstream::new(live)
        .get_stream("REPLIES")
        .await
        .expect("stream");
    let stored = stream.info().await.expect("info").state.messages;
    assert_eq!(stored, replies + chunks, "each once");
}
