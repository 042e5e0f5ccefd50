//! The consumer's lag as gauges, so an operator sees a backlog from the source's own
//! `/metrics` instead of querying NATS.
//!
//! Every `LAG_INTERVAL_MS` one `CONSUMER.INFO` request reads what JetStream counts for the
//! consumer: messages not yet delivered (`num_pending`) and delivered but not acknowledged
//! (`num_ack_pending`). Only while either is non-zero, a second request reads the oldest
//! unacknowledged message itself: the first message after the consumer's ack floor that
//! matches its filter (everything at or below the floor is acked, and the floor stops at the
//! first message that is not). Its stored time gives the age. So the cost is one or two API
//! calls per interval and per replica, never one per message. With several filter subjects
//! the next message of the whole stream is read; it is never younger than the oldest
//! unacknowledged one, so the age is at worst overstated.
//!
//! `source_ready` says what `/readyz` says. A failed refresh keeps the last values and counts `source_lag_refresh_errors`; the gauges
//! carry `stream` and `consumer` labels, so replicas of one source report the same series.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use handler_kit::serve::Health;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

struct Gauges {
    pending: Gauge<u64>,
    ack_pending: Gauge<u64>,
    redelivered: Gauge<u64>,
    oldest_age: Gauge<f64>,
    ready: Gauge<u64>,
    errors: Counter<u64>,
}

impl Gauges {
    fn new() -> Self {
        let meter = handler_kit::telemetry::meter("nats-source");
        Self {
            pending: meter
                .u64_gauge("source_consumer_pending")
                .with_description(
                    "Messages the consumer has not delivered yet (JetStream's num_pending)",
                )
                .build(),
            ack_pending: meter
                .u64_gauge("source_consumer_ack_pending")
                .with_description("Messages delivered and not acknowledged yet (num_ack_pending)")
                .build(),
            redelivered: meter
                .u64_gauge("source_consumer_redelivered")
                .with_description(
                    "Unacknowledged messages delivered more than once (num_redelivered)",
                )
                .build(),
            oldest_age: meter
                .f64_gauge("source_oldest_unacked_age_seconds")
                .with_description(
                    "Age of the oldest message not acknowledged yet; 0 when there is none",
                )
                .build(),
            ready: meter
                .u64_gauge("source_ready")
                .with_description(
                    "1 while the consumer is bound and messages are delivered (what /readyz says)",
                )
                .build(),
            errors: meter
                .u64_counter("source_lag_refresh_errors")
                .with_description("Lag refreshes that failed (the gauges keep their last values)")
                .build(),
        }
    }
}

/// What one refresh read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Not delivered yet.
    pub pending: u64,
    /// Delivered, not acknowledged.
    pub ack_pending: u64,
    /// Unacknowledged and delivered more than once.
    pub redelivered: u64,
    /// Seconds since the oldest unacknowledged message was stored; 0 without one.
    pub oldest_age_secs: f64,
}

/// Reads the consumer's lag once.
pub async fn read(
    jetstream: &jetstream::Context,
    config: &Config,
) -> Result<Lag, async_nats::Error> {
    let stream = jetstream.get_stream_no_info(&config.stream).await?;
    let info = stream.consumer_info(&config.consumer).await?;
    let pending = info.num_pending;
    let ack_pending = info.num_ack_pending as u64;
    let mut oldest_age_secs = 0.0;
    if pending > 0 || ack_pending > 0 {
        let filter = match info.config.filter_subjects.as_slice() {
            [] if info.config.filter_subject.is_empty() => ">".to_string(),
            [] => info.config.filter_subject.clone(),
            [one] => one.clone(),
            _ => ">".to_string(),
        };
        let oldest = stream
            .raw_message_builder()
            .sequence(info.ack_floor.stream_sequence + 1)
            .next_by_subject(filter)
            .send()
            .await?;
        let age = chrono::Utc::now().signed_duration_since(oldest.time);
        oldest_age_secs = age.to_std().map_or(0.0, |d| d.as_secs_f64());
    }
    Ok(Lag {
        pending,
        ack_pending,
        redelivered: info.num_redelivered as u64,
        oldest_age_secs,
    })
}

/// Refreshes the gauges every `config.lag_interval` until `shutdown`, with `health`'s
/// readiness beside them: a source that is up but not ready while its consumer has lag is
/// what an operator must hear about.
pub async fn watch(
    jetstream: jetstream::Context,
    config: Config,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let gauges = Gauges::new();
    let labels = [
        KeyValue::new("stream", config.stream.clone()),
        KeyValue::new("consumer", config.consumer.clone()),
    ];
    let mut tick = tokio::time::interval(config.lag_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        gauges.ready.record(u64::from(health.is_ready()), &labels);
        // A slow answer must not stack refreshes: one at a time, each bounded.
        match tokio::time::timeout(Duration::from_secs(10), read(&jetstream, &config)).await {
            Ok(Ok(lag)) => {
                gauges.pending.record(lag.pending, &labels);
                gauges.ack_pending.record(lag.ack_pending, &labels);
                gauges.redelivered.record(lag.redelivered, &labels);
                gauges.oldest_age.record(lag.oldest_age_secs, &labels);
            }
            Ok(Err(e)) => {
                gauges.errors.add(1, &labels);
                tracing::debug!(error = %e, "lag refresh failed");
            }
            Err(_) => {
                gauges.errors.add(1, &labels);
                tracing::debug!("lag refresh timed out");
            }
        }
    }
}
