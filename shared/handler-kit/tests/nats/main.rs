//! `handler_kit::nats` against real `nats-server` processes: logging in (each credential kind,
//! TLS, rotation), the server list of `NATS_URL`, and
//! publishing that keeps a message (stored with its PubAck, or flushed) across failures: a
//! server restart, and a stream leader killed in a 3-node cluster.

mod auth;
mod cluster;
mod publish;
mod servers;

use std::time::Duration;

use futures::StreamExt as _;
use handler_kit::nats::NatsConfig;

/// The configuration of `NATS_URL=url` alone.
fn config(url: &str) -> NatsConfig {
    NatsConfig::from_url(url).expect("a valid NATS_URL")
}

/// The next message on `sub`, within five seconds.
async fn next_message(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a message in time")
        .expect("subscription open")
}
