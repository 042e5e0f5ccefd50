//! A lazily connected NATS client that publishes MessagePack.
//!
//! Connecting never blocks start-up: the client is created with retry-on-initial-connect, so
//! the HTTP port is serving while NATS comes up. The first event after a cold start usually
//! arrives before that connection is up, so a publish waits for the *first* connection (at most
//! [`FIRST_CONNECT_WAIT`]). Once connected, a lost connection is an outage: publishing fails
//! fast with a retryable 503 instead of buffering silently, so the source redelivers later.

use std::time::Duration;

use async_nats::connection::State;
use opentelemetry::propagation::{Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::Serialize;
use tokio::sync::watch;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::HandlerError;
use crate::event::DataFormat;

/// How long a publish waits for the very first connection before giving up with 503.
pub const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(3);

/// NATS' default `max_payload`, used until the server has told us its own.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Room left for headers and framing when deciding what fits in one message.
const HEADER_ROOM: usize = 4 * 1024;

/// A NATS connection, or nothing when `NATS_URL` is unset.
#[derive(Debug, Clone, Default)]
pub struct Nats {
    client: Option<async_nats::Client>,
    /// Becomes true at the first successful connection and stays true.
    ever_connected: Option<watch::Receiver<bool>>,
}

impl Nats {
    /// Starts connecting to `url` in the background (or does nothing when `url` is `None`).
    /// `url` is `NATS_URL`: one server or a comma-separated list of them ([`servers`]).
    pub async fn connect(url: Option<&str>, name: &str) -> Result<Self, HandlerError> {
        let Some(url) = url else {
            return Ok(Self::default());
        };
        let (connected_tx, connected_rx) = watch::channel(false);
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    connected_tx.send_replace(true);
                }
                match &event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::warn!(event = %other, "nats connection event"),
                }
                async {}
            })
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(servers(url).map_err(HandlerError::Internal)?)
            .await
            .map_err(|e| HandlerError::Internal(format!("NATS_URL {}: {e}", redact(url))))?;
        Ok(Self {
            client: Some(client),
            ever_connected: Some(connected_rx),
        })
    }

    /// Whether publishing is configured.
    pub fn is_enabled(&self) -> bool {
        self.client.is_some()
    }

    /// The underlying client, for JetStream and subscriptions.
    pub fn client(&self) -> Option<&async_nats::Client> {
        self.client.as_ref()
    }

    /// The largest payload one message may carry (minus room for headers), once connected.
    ///
    /// The server announces its limit when the connection is made, so this waits for the
    /// connection like a publish does; call it before doing work whose output must fit, and a
    /// NATS outage is reported before the work is wasted.
    pub async fn max_payload(&self) -> Result<usize, HandlerError> {
        let Some(client) = &self.client else {
            return Ok(DEFAULT_MAX_PAYLOAD - HEADER_ROOM);
        };
        self.ready(client).await?;
        let server = client.max_payload();
        let max = if server == 0 {
            DEFAULT_MAX_PAYLOAD
        } else {
            server
        };
        Ok(max.saturating_sub(HEADER_ROOM))
    }

    /// Publishes `payload` as MessagePack to `subject`.
    ///
    /// `msg_id` becomes `Nats-Msg-Id`, which a JetStream stream uses to drop duplicates
    /// when a redelivered event publishes the same message again. The current trace context
    /// travels in `traceparent`. A payload over the server's limit is refused here, before it
    /// could fail on the wire.
    pub async fn publish<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
        msg_id: Option<&str>,
    ) -> Result<(), HandlerError> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let (headers, bytes) = self.message(&subject, payload, msg_id).await?;
        client
            .publish_with_headers(subject, headers, bytes)
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        crate::telemetry::metrics().published.add(1, &[]);
        Ok(())
    }

    /// Like [`Self::publish`], through JetStream: returns once a stream has stored the message
    /// (its `PubAck`, within `timeout`). Fails without NATS, when no stream takes `subject`, or
    /// on no answer in time, so the caller knows the message is not kept.
    pub async fn publish_stored<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
        msg_id: Option<&str>,
        timeout: Duration,
    ) -> Result<async_nats::jetstream::publish::PublishAck, HandlerError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| unavailable("NATS_URL is not set"))?;
        let (headers, bytes) = self.message(&subject, payload, msg_id).await?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let ack = tokio::time::timeout(timeout, async {
            jetstream
                .publish_with_headers(subject, headers, bytes)
                .await
                .map_err(|e| unavailable(&e.to_string()))?
                .await
                .map_err(|e| unavailable(&e.to_string()))
        })
        .await
        .map_err(|_| unavailable(&format!("no PubAck within {timeout:?}")))??;
        crate::telemetry::metrics().published.add(1, &[]);
        Ok(ack)
    }

    /// A message's MessagePack body and headers (`Content-Type`, `Nats-Msg-Id`, trace
    /// context), refused when it exceeds the server's limit.
    async fn message<T: Serialize>(
        &self,
        subject: &str,
        payload: &T,
        msg_id: Option<&str>,
    ) -> Result<(async_nats::HeaderMap, bytes::Bytes), HandlerError> {
        let max = self.max_payload().await?;
        let bytes = DataFormat::Msgpack.encode(payload)?;
        if bytes.len() > max {
            return Err(HandlerError::Internal(format!(
                "{} byte message for {subject} exceeds NATS max payload {max}",
                bytes.len()
            )));
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", DataFormat::Msgpack.content_type());
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        TraceContextPropagator::new().inject_context(
            &tracing::Span::current().context(),
            &mut NatsHeaders(&mut headers),
        );
        Ok((headers, bytes.into()))
    }

    /// Ok when connected; during the first connection, waits for it (bounded).
    async fn ready(&self, client: &async_nats::Client) -> Result<(), HandlerError> {
        if client.connection_state() == State::Connected {
            return Ok(());
        }
        if let Some(rx) = self.ever_connected.as_ref().filter(|rx| !*rx.borrow()) {
            let mut rx = rx.clone();
            let first = tokio::time::timeout(FIRST_CONNECT_WAIT, rx.wait_for(|c| *c)).await;
            if matches!(first, Ok(Ok(_))) && client.connection_state() == State::Connected {
                return Ok(());
            }
            return Err(unavailable("could not connect"));
        }
        Err(unavailable("connection lost"))
    }

    /// Waits until everything published so far has been written to the server.
    pub async fn flush(&self) -> Result<(), HandlerError> {
        match &self.client {
            Some(client) => client
                .flush()
                .await
                .map_err(|e| unavailable(&e.to_string())),
            None => Ok(()),
        }
    }
}

fn unavailable(reason: &str) -> HandlerError {
    HandlerError::Unavailable {
        backend: "nats",
        reason: reason.to_string(),
        retry_after: Duration::from_secs(2),
    }
}

struct NatsHeaders<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// The servers of `NATS_URL`: one URL, or several separated by commas
/// (`nats://a:4222,nats://b:4222`), as nats.go, nats-py and the `nats` CLI accept. Entries are
/// trimmed and empty ones skipped; the client picks among them and moves to the next when one
/// is down. An entry without a scheme is `nats://`, without a port `:4222`.
///
/// The error names the entry with its user and password (or token) hidden: the message ends
/// up in logs and in the start-up error, where credentials must not.
pub fn servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let entries: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        return Err("NATS_URL names no server".to_string());
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            entry.parse().map_err(|e| {
                format!(
                    "NATS_URL server {} of {} ({}): {e}",
                    i + 1,
                    entries.len(),
                    redact(entry)
                )
            })
        })
        .collect()
}

/// `url` with whatever precedes the last `@` of each entry's authority replaced by `***`
/// (`nats://***@host:4222`). The last `@` anywhere, not the one before the first `/`: a
/// password may hold a `/`, and hiding too much is the safe mistake.
fn redact(url: &str) -> String {
    url.split(',')
        .map(|entry| {
            let start = entry.find("://").map_or(0, |i| i + 3);
            match entry[start..].rfind('@') {
                Some(at) => format!("{}***{}", &entry[..start], &entry[start + at..]),
                None => entry.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Fills `{request_id}` (and other `{name}` placeholders) in a subject template.
///
/// Characters that would change the subject's meaning (`.`, `*`, `>`, whitespace) are replaced
/// with `_`, so a hostile id cannot publish outside its own subject.
pub fn subject(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in vars {
        let safe: String = value
            .chars()
            .map(|c| {
                if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        out = out.replace(&format!("{{{name}}}"), &safe);
    }
    out
}

/// Opens the JetStream key-value bucket `bucket`, creating it (file storage, one revision per
/// key, entries expiring after `ttl`) when it does not exist yet. Replicas starting together
/// race to create it; the loser opens the winner's. The error is the server's reason.
pub async fn open_or_create_kv(
    client: &async_nats::Client,
    bucket: &str,
    ttl: Duration,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let js = async_nats::jetstream::new(client.clone());
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: bucket.to_string(),
            history: 1,
            max_age: ttl,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another replica created it first.
        Err(_) => js.get_key_value(bucket).await.map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_nats_url_is_a_list_of_servers() {
        let list = servers(" nats://a:4222, ,b:4223,tls://c ,").expect("valid list");
        let urls: Vec<&str> = list
            .iter()
            .map(async_nats::ServerAddr::as_url_str)
            .collect();
        assert_eq!(urls, ["nats://a:4222", "nats://b:4223", "tls://c"]);
    }

    #[test]
    fn a_nats_url_without_a_server_is_refused() {
        assert!(servers("").is_err());
        assert!(servers(" , ").is_err());
    }

    #[test]
    fn a_malformed_server_is_named_without_its_credentials() {
        // The `/` in the password ends the authority early, so the parser sees a port "s3".
        let e = servers("nats://ok:4222,nats://alice:s3/cret@b:4222").expect_err("bad port");
        assert!(e.contains("server 2 of 2"), "{e}");
        assert!(e.contains("nats://***@b:4222"), "{e}");
        assert!(!e.contains("s3") && !e.contains("alice"), "{e}");
        let e = servers("t0ken@host:1:2").expect_err("two ports");
        assert!(!e.contains("t0ken"), "{e}");
    }

    #[test]
    fn redaction_hides_the_userinfo_of_every_entry() {
        assert_eq!(
            redact("nats://u:p@a:1,b:2,tok@c"),
            "nats://***@a:1,b:2,***@c"
        );
    }

    #[test]
    fn subject_templates_cannot_be_escaped() {
        assert_eq!(
            subject("ai.tts.response.{request_id}", &[("request_id", "r1")]),
            "ai.tts.response.r1"
        );
        assert_eq!(
            subject("a.{request_id}", &[("request_id", "x.>* y")]),
            "a.x____y"
        );
    }
}
