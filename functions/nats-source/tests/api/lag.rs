//! The consumer's lag on the source's own `/metrics`: a backlog shows as pending and
//! unacknowledged messages with the age of the oldest, and goes back to zero once drained.

use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::nats_server::NatsServer;

use crate::support::{Sink, Source, drained, eventually, publish_numbered};

/// The value of the series `name{stream="WORK",consumer="worker"}` in the exposition text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| l.contains(r#"consumer="worker""#) && l.contains(r#"stream="WORK""#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_shows_as_pending_and_oldest_age_and_clears_when_drained() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    // Two in flight at 150 ms each: 40 messages take about three seconds to drain.
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::from_millis(150));
    let source = Source::start(
        &nats.url(),
        &sink.url(),
        &[("MAX_IN_FLIGHT", "2"), ("LAG_INTERVAL_MS", "100")],
    );
    source.ready().await;
    let published = Instant::now();
    publish_numbered(&client, 40, |i| format!("work.{i}")).await;

    // A backlog: the messages wait (pending) or are in the sink (ack pending), and the oldest
    // has been waiting for a while.
    let backlog = eventually(Duration::from_secs(10), || async {
        let text = handler_kit::telemetry::render_prometheus();
        let pending = gauge(&text, "source_consumer_pending")?;
        let ack_pending = gauge(&text, "source_consumer_ack_pending")?;
        let age = gauge(&text, "source_oldest_unacked_age_seconds")?;
        (pending >= 10.0 && ack_pending >= 1.0 && age >= 0.3).then_some((pending, ack_pending, age))
    })
    .await;
    let (pending, ack_pending, age) = backlog.expect("the lag gauges never showed the backlog");
    assert!(pending + ack_pending <= 40.0, "{pending} + {ack_pending}");
    assert!(
        age <= published.elapsed().as_secs_f64() + 1.0,
        "age {age} s is older than the messages"
    );

    assert!(
        drained(&client, Duration::from_secs(30)).await,
        "not drained"
    );
    let cleared = eventually(Duration::from_secs(5), || async {
        let text = handler_kit::telemetry::render_prometheus();
        let values = [
            gauge(&text, "source_consumer_pending")?,
            gauge(&text, "source_consumer_ack_pending")?,
            gauge(&text, "source_oldest_unacked_age_seconds")?,
        ];
        (values == [0.0, 0.0, 0.0]).then_some(())
    })
    .await;
    assert!(
        cleared.is_some(),
        "the gauges did not clear: {}",
        handler_kit::telemetry::render_prometheus()
    );
    assert_eq!(
        gauge(&handler_kit::telemetry::render_prometheus(), "source_ready"),
        Some(1.0)
    );
    assert_eq!(sink.log().iter().filter(|r| r.status == 200).count(), 40);
    source.stop().await;
}
