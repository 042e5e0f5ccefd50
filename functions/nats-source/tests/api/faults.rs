//! Outages: the sink restarting, nats-server restarting, readiness, and shutdown with work in flight.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use testkit::nats_server::NatsServer;

use crate::support::{Sink, Source, drained, eventually, publish_numbered};

fn delivered(sink: &Sink) -> HashSet<String> {
    sink.log()
        .into_iter()
        .filter(|r| r.status == 200)
        .map(|r| r.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_killed_and_restarted_mid_run_loses_nothing() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let mut sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::from_millis(1));
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("MAX_DELIVER", "1000"), ("MAX_IN_FLIGHT", "32")],
    );
    source.ready().await;
    publish_numbered(&client, 2000, |i| format!("work.k{}", i % 3)).await;
    let some = eventually(Duration::from_secs(30), || async {
        (delivered(&sink).len() >= 300).then_some(())
    })
    .await;
    assert!(some.is_some());
    sink.kill();
    // While it is down, deliveries fail and are retried; then it comes back on the same port.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sink.restart();
    assert!(
        drained(&client, Duration::from_secs(60)).await,
        "messages left pending"
    );
    let got = delivered(&sink);
    for i in 0..2000 {
        assert!(got.contains(&format!("m-{i}")), "m-{i} lost");
    }
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_run_loses_nothing() {
    let mut nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::from_millis(1));
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("MAX_DELIVER", "1000"), ("MAX_IN_FLIGHT", "32")],
    );
    source.ready().await;
    publish_numbered(&client, 2000, |i| format!("work.r{}", i % 3)).await;
    let some = eventually(Duration::from_secs(30), || async {
        (delivered(&sink).len() >= 300).then_some(())
    })
    .await;
    assert!(some.is_some());
    nats.restart().await.expect("restart with the same store");
    assert!(
        drained(&client, Duration::from_secs(90)).await,
        "messages left pending after restart"
    );
    let got = delivered(&sink);
    for i in 0..2000 {
        assert!(got.contains(&format!("m-{i}")), "m-{i} lost");
    }
    source.stop().await;
}

#[tokio::test]
async fn not_ready_until_the_consumer_exists() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    // Bind mode: the stream is declared elsewhere (NACK in a cluster), not by the source.
    let source = Source::start(&nats.url(), &sink.url(), &[("CREATE", "false")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!source.health.is_ready(), "ready without a consumer");
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "WORK".into(),
            subjects: vec!["work.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("worker".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    source.ready().await;
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_deliveries_before_returning() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::from_millis(800));
    let source = Source::start(&nats.url(), &sink.url(), &[("MAX_IN_FLIGHT", "4")]);
    source.ready().await;
    publish_numbered(&client, 4, |i| format!("work.d{i}")).await;
    // Wait until the deliveries are in the sink, then stop.
    let js = async_nats::jetstream::new(client.clone());
    let in_flight = eventually(Duration::from_secs(5), || async {
        let stream = js.get_stream("WORK").await.ok()?;
        (stream.consumer_info("worker").await.ok()?.num_ack_pending == 4).then_some(())
    })
    .await;
    assert!(in_flight.is_some());
    source.stop().await;
    assert_eq!(sink.log().iter().filter(|r| r.status == 200).count(), 4);
    assert!(
        drained(&client, Duration::from_secs(5)).await,
        "in-flight messages were not acked"
    );
}

#[tokio::test]
async fn the_binary_reports_readiness_and_exits_cleanly_on_sigterm() {
    let nats = NatsServer::start().await.expect("nats");
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let port = testkit::nats_server::free_port().expect("port");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nats-source"))
        .env_clear()
        .env("PORT", port.to_string())
        .env("NATS_URL", nats.url())
        .env("K_SINK", sink.url())
        .env("STREAM", "WORK")
        .env("CONSUMER", "worker")
        .env("SUBJECTS", "work.>")
        .env("CREATE", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-source");
    let http = handler_kit::http::client(Duration::from_secs(2)).expect("client");
    let ready = eventually(Duration::from_secs(10), || async {
        let r = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "never ready");
    let client = nats.client().await.expect("client");
    publish_numbered(&client, 10, |i| format!("work.b{i}")).await;
    assert!(drained(&client, Duration::from_secs(10)).await);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exited = eventually(Duration::from_secs(10), || {
        let status = child.try_wait().expect("wait");
        async move { status }
    })
    .await
    .expect("exited after SIGTERM");
    assert!(exited.success(), "{exited}");
}

#[test]
fn missing_configuration_exits_64_listing_every_problem() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nats-source"))
        .env_clear()
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for v in ["NATS_URL", "K_SINK", "STREAM", "CONSUMER"] {
        assert!(stderr.contains(v), "{v} not reported: {stderr}");
    }
}
