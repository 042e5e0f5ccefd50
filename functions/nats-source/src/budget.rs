//! A message's retry budget: its failed attempts, counted where every replica sees them.
//!
//! JetStream counts deliveries, not failures: a hand-back at shutdown, a redelivery after a
//! replica was killed, a deferral in an ordered subject and a hand-back while the sink's gate
//! is shut all count, and none of them is the message's fault. So the source keeps its own
//! count of the attempts the sink took and failed (500, 502, 504, a timeout after the request
//! was sent), in a JetStream key-value bucket keyed by stream sequence:
//!
//! - written only when an attempt fails, so the happy path costs nothing;
//! - read only on a redelivery (JetStream's delivery count above 1);
//! - removed when the message is settled; entries also expire after `RETRY_TIMEOUT`, past
//!   which the message is dead-lettered by age anyway.
//!
//! A restart, a scale-down or another replica taking the message therefore keeps its count.
//! The bucket has as many replicas as the stream. If it cannot be opened or created (no
//! permission, say), the source falls back to JetStream's delivery count and says so at start.
//! A read or write that fails (a leader election in the bucket's stream) errs on the side of
//! another try, which `RETRY_TIMEOUT` still bounds.

use std::time::Duration;

use async_nats::jetstream::{self, kv};

/// How long one ledger read or write may take before the source goes on without it.
const LEDGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Where failed attempts are counted.
#[derive(Debug)]
pub(crate) enum Ledger {
    /// The key-value bucket.
    Bucket(Box<kv::Store>),
    /// No bucket: JetStream's delivery count, which also counts deliveries that were not
    /// attempts.
    Deliveries,
}

impl Ledger {
    /// Opens `bucket`, creating it with the stream's replica count when it does not exist.
    pub(crate) async fn open(
        js: &jetstream::Context,
        bucket: &str,
        stream: &str,
        ttl: Duration,
    ) -> Self {
        if let Ok(store) = js.get_key_value(bucket).await {
            return Self::Bucket(Box::new(store));
        }
        let replicas = match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map_or(1, |i| i.config.num_replicas.max(1)),
            Err(_) => 1,
        };
        let created = js
            .create_key_value(kv::Config {
                bucket: bucket.to_string(),
                description: format!("nats-source: failed attempts per message of {stream}"),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(store) => Self::Bucket(Box::new(store)),
            // Another replica created it first.
            Err(create) => match js.get_key_value(bucket).await {
                Ok(store) => Self::Bucket(Box::new(store)),
                Err(_) => {
                    tracing::warn!(bucket, error = %create, "no retry ledger: counting JetStream deliveries instead (a restart or a shut gate then uses up retries)");
                    Self::Deliveries
                }
            },
        }
    }

    /// Failed attempts so far of the message at `sequence`, delivered `delivered` times.
    pub(crate) async fn failures(&self, sequence: u64, delivered: i64) -> u32 {
        if delivered <= 1 {
            return 0;
        }
        let store = match self {
            Self::Deliveries => return u32::try_from(delivered - 1).unwrap_or(u32::MAX),
            Self::Bucket(store) => store,
        };
        match tokio::time::timeout(LEDGER_TIMEOUT, store.get(sequence.to_string())).await {
            Ok(Ok(Some(value))) => std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            Ok(Ok(None)) => 0,
            Ok(Err(e)) => {
                tracing::warn!(sequence, error = %e, "retry ledger unreadable, counting from 0");
                0
            }
            Err(_) => {
                tracing::warn!(sequence, "retry ledger did not answer, counting from 0");
                0
            }
        }
    }

    /// Records that the message at `sequence` has now failed `failures` times.
    pub(crate) async fn record(&self, sequence: u64, failures: u32) {
        let Self::Bucket(store) = self else { return };
        let put = store.put(sequence.to_string(), failures.to_string().into());
        match tokio::time::timeout(LEDGER_TIMEOUT, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(sequence, error = %e, "failed attempt not recorded"),
            Err(_) => tracing::warn!(sequence, "failed attempt not recorded in time"),
        }
    }

    /// Forgets the message at `sequence` (settled), if it had failed before.
    pub(crate) async fn forget(&self, sequence: u64, failures: u32) {
        let Self::Bucket(store) = self else { return };
        if failures == 0 {
            return;
        }
        // Best effort: the entry expires by itself.
        let _ = tokio::time::timeout(LEDGER_TIMEOUT, store.purge(sequence.to_string())).await;
    }
}

/// The bucket name for a stream and consumer: only what bucket names allow.
pub(crate) fn bucket_name(stream: &str, consumer: &str) -> String {
    format!("{stream}_{consumer}_attempts")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_keep_to_the_allowed_characters() {
        assert_eq!(
            bucket_name("AI_TTS", "tts-module"),
            "AI_TTS_tts-module_attempts"
        );
        assert_eq!(bucket_name("A.B", "c d"), "A_B_c_d_attempts");
    }
}
