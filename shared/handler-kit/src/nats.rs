//! A lazily connected NATS client that publishes MessagePack, and the [`Publisher`] beneath it
//! that keeps what it publishes.
//!
//! Connecting never blocks start-up: the client is created with retry-on-initial-connect, so
//! the HTTP port is serving while NATS comes up. [`Nats::max_payload`], which a function calls
//! before spending backend time, waits for the *first* connection (at most
//! [`FIRST_CONNECT_WAIT`]) and fails fast with a retryable 503 while the connection is lost, so
//! no work is wasted on an answer that cannot be delivered.
//!
//! A publish returns once its message is kept: stored by a JetStream stream (its PubAck) when
//! one stores the subject, else written and flushed to the server. Failures that pass (a
//! JetStream leader election, a reconnect, a lost PubAck) are retried under the same
//! `Nats-Msg-Id` until [`PUBLISH_DEADLINE`]; then the publish fails with a retryable 503 and
//! the source redelivers the event. [`Outbox`] sends a function's stream chunks without
//! waiting for each, and waits for all of them once, before the function answers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishError as JetStreamPublishError,
    PublishErrorKind as JetStreamPublishErrorKind, RequestError, RequestErrorKind,
};
use async_nats::jetstream::publish::PublishAck;
use futures::FutureExt as _;
use opentelemetry::propagation::{Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::HandlerError;
use crate::event::DataFormat;

mod auth;

pub use auth::{CREDENTIAL_VARS, NatsConfig, TLS_VARS};

/// How long [`Nats::max_payload`] waits for the very first connection before giving up with
/// 503.
pub const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(3);

/// How long a function's publish (or an [`Outbox::kept`]) may retry before it fails with 503.
/// A stream whose leader was killed waits for a new one: the followers wait 4 to 9 s (Raft's
/// election timeout in nats-server) before they elect, and a publish stalled 4.6 to 7.6 s when
/// the leader of an R3 stream was killed (six runs, 3 nodes on loopback, 2026-12). Fifteen
/// seconds rides out one election with room for a second round; a restarted server is back
/// within a second.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(15);

/// NATS' default `max_payload`, used until the server has told us its own.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Room left for headers and framing when deciding what fits in one message.
const HEADER_ROOM: usize = 4 * 1024;

/// A NATS connection, or nothing when `NATS_URL` is unset.
#[derive(Debug, Clone, Default)]
pub struct Nats {
    publisher: Option<Publisher>,
    /// Becomes true at the first successful connection and stays true.
    ever_connected: Option<watch::Receiver<bool>>,
    /// Why the last connection attempt failed (`authorization violation`, ...), cleared when
    /// one succeeds: the 503 of a publish that cannot be made says it.
    last_failure: Arc<Mutex<Option<String>>>,
}

impl Nats {
    /// Starts connecting to `config`'s servers in the background (or does nothing when
    /// `config` is `None`: `NATS_URL` is unset), with its credential and TLS.
    pub async fn connect(config: Option<&NatsConfig>, name: &str) -> Result<Self, HandlerError> {
        let Some(config) = config else {
            return Ok(Self::default());
        };
        let (connected_tx, connected_rx) = watch::channel(false);
        let last_failure = Arc::new(Mutex::new(None));
        let failure = last_failure.clone();
        // 0 until the first connection: a function that never reaches NATS is seen as down.
        let connected = &crate::telemetry::metrics().nats_connected;
        connected.record(0, &[]);
        let client = config
            .connect_options(name)
            .event_callback(move |event| {
                match &event {
                    async_nats::Event::Connected => {
                        connected_tx.send_replace(true);
                        *failure.lock().expect("last failure") = None;
                        crate::telemetry::metrics().nats_connected.record(1, &[]);
                        tracing::info!("nats connected");
                    }
                    async_nats::Event::Disconnected => {
                        crate::telemetry::metrics().nats_connected.record(0, &[]);
                        tracing::warn!(event = %event, "nats connection event");
                    }
                    async_nats::Event::ClientError(async_nats::ClientError::Other(why)) => {
                        *failure.lock().expect("last failure") = Some(why.clone());
                        tracing::warn!(event = %event, "nats connection event");
                    }
                    other => tracing::warn!(event = %other, "nats connection event"),
                }
                async {}
            })
            .retry_on_initial_connect()
            .connect(config.servers())
            .await
            .map_err(|e| HandlerError::Internal(format!("NATS_URL {}: {e}", config.shown_url())))?;
        tracing::debug!(
            servers = %config.shown_url(),
            credential = config.credential_kind(),
            "nats configured"
        );
        Ok(Self {
            publisher: Some(Publisher::new(client)),
            ever_connected: Some(connected_rx),
            last_failure,
        })
    }

    /// Whether publishing is configured.
    pub fn is_enabled(&self) -> bool {
        self.publisher.is_some()
    }

    /// The underlying client, for JetStream and subscriptions.
    pub fn client(&self) -> Option<&async_nats::Client> {
        self.publisher.as_ref().map(Publisher::client)
    }

    /// The largest payload one message may carry (minus room for headers), once connected.
    ///
    /// The server announces its limit when the connection is made, so this waits for the
    /// first connection, and fails while the connection is lost; call it before doing work
    /// whose output must fit, and a NATS outage is reported before the work is wasted.
    pub async fn max_payload(&self) -> Result<usize, HandlerError> {
        if let Some(publisher) = &self.publisher {
            self.ready(publisher.client()).await?;
        }
        Ok(self.known_max_payload())
    }

    /// The server's limit as last announced (NATS' default before the first connection), minus
    /// room for headers.
    fn known_max_payload(&self) -> usize {
        let server = self
            .client()
            .map_or(DEFAULT_MAX_PAYLOAD, async_nats::Client::max_payload);
        let max = if server == 0 {
            DEFAULT_MAX_PAYLOAD
        } else {
            server
        };
        max.saturating_sub(HEADER_ROOM)
    }

    /// Publishes `payload` as MessagePack to `subject`, and returns once it is kept: stored by
    /// the JetStream stream that stores `subject` (its PubAck), else flushed to the server.
    ///
    /// `msg_id` becomes `Nats-Msg-Id`, which a JetStream stream uses to drop duplicates: a
    /// retry of this publish, or a redelivered event publishing the same message again. The
    /// current trace context travels in `traceparent`. A payload over the server's limit is
    /// refused here, before it could fail on the wire. Retries until [`PUBLISH_DEADLINE`], then
    /// fails with 503.
    pub async fn publish<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
        msg_id: Option<&str>,
    ) -> Result<(), HandlerError> {
        let Some(publisher) = &self.publisher else {
            return Ok(());
        };
        let message = self.message(subject, payload, msg_id)?;
        publisher
            .keep(&message, Need::Kept, Instant::now() + PUBLISH_DEADLINE)
            .await
            .map_err(handler_error)?;
        crate::telemetry::metrics().published.add(1, &[]);
        Ok(())
    }

    /// Like [`Self::publish`], but the message must be stored by a stream: returns its PubAck
    /// (within `timeout`, retrying meanwhile). Fails without NATS, when no stream stores
    /// `subject`, or on no PubAck in time, so the caller knows the message is not kept.
    pub async fn publish_stored<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
        msg_id: Option<&str>,
        timeout: Duration,
    ) -> Result<PublishAck, HandlerError> {
        let publisher = self
            .publisher
            .as_ref()
            .ok_or_else(|| unavailable("NATS_URL is not set"))?;
        let message = self.message(subject, payload, msg_id)?;
        let ack = publisher
            .stored(&message, Instant::now() + timeout)
            .await
            .map_err(handler_error)?;
        crate::telemetry::metrics().published.add(1, &[]);
        Ok(ack)
    }

    /// Publishes several messages without waiting for each; [`Outbox::kept`] waits for all.
    pub fn outbox(&self) -> Outbox<'_> {
        Outbox {
            nats: self,
            held: VecDeque::new(),
            held_bytes: 0,
            unflushed: None,
        }
    }

    /// A message's MessagePack body and headers (`Content-Type`, `Nats-Msg-Id`, trace
    /// context), refused when it exceeds the server's limit.
    fn message<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
        msg_id: Option<&str>,
    ) -> Result<Message, HandlerError> {
        let max = self.known_max_payload();
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
        Ok(Message {
            subject,
            headers,
            payload: bytes.into(),
        })
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
            return Err(unavailable(&self.because("could not connect")));
        }
        Err(unavailable(&self.because("connection lost")))
    }

    /// `what`, with the reason of the last failed connection attempt when there is one
    /// (`could not connect: authorization violation`).
    fn because(&self, what: &str) -> String {
        match self.last_failure.lock().expect("last failure").as_deref() {
            Some(why) => format!("{what}: {why}"),
            None => what.to_string(),
        }
    }
}

/// The messages one event publishes, sent as they come and waited for together.
///
/// [`Self::publish`] sends at once (in order, on the one connection) without waiting for the
/// PubAck or a flush, so a function streaming many chunks pays one round trip for all of them
/// at [`Self::kept`], not one per chunk. Call `kept` before answering: only then is every
/// message stored or flushed. Dropped without it, messages already sent are still delivered,
/// but nothing says so.
///
/// A message whose try failed is sent again at `kept`, and later ones wait behind it, so a
/// stream can hold a chunk after the one that follows it only when a PubAck was lost; the
/// chunks' `seq` is their order.
#[derive(Debug)]
pub struct Outbox<'a> {
    nats: &'a Nats,
    /// Sent to a stream and not yet acknowledged, or not sent yet; oldest first.
    held: VecDeque<Sent>,
    held_bytes: usize,
    /// The subject of the first core publish that awaits the flush.
    unflushed: Option<String>,
}

/// Messages held for their PubAck at most; past it a publish waits for the oldest. With
/// [`MAX_HELD_BYTES`], it bounds what one event keeps for retries; a chat answer streams
/// a few hundred small chunks, and their PubAcks arrive while the model writes.
const MAX_HELD_MESSAGES: usize = 1024;

/// Payload bytes held for their PubAck at most: eight full-size (1 MiB) audio chunks.
const MAX_HELD_BYTES: usize = 8 * DEFAULT_MAX_PAYLOAD;

impl Outbox<'_> {
    /// Sends chunk number `*seq` of request `request_id`'s stream, then counts it: its
    /// `Nats-Msg-Id` is `{request_id}.{seq}`, the same on a redelivery, so a JetStream stream
    /// drops the copy.
    pub async fn publish_chunk<T: Serialize>(
        &mut self,
        subject: String,
        request_id: &str,
        seq: &mut u64,
        chunk: &T,
    ) -> Result<(), HandlerError> {
        let msg_id = format!("{request_id}.{seq}");
        self.publish(subject, chunk, Some(&msg_id)).await?;
        *seq += 1;
        Ok(())
    }

    /// Sends `payload` as MessagePack to `subject` (headers as [`Nats::publish`]) without
    /// waiting for it to be kept, unless too many messages already wait for their PubAck.
    pub async fn publish<T: Serialize>(
        &mut self,
        subject: String,
        payload: &T,
        msg_id: Option<&str>,
    ) -> Result<(), HandlerError> {
        let Some(publisher) = &self.nats.publisher else {
            return Ok(());
        };
        let message = self.nats.message(subject, payload, msg_id)?;
        self.collect_acks().map_err(handler_error)?;
        while self.held.len() >= MAX_HELD_MESSAGES || self.held_bytes >= MAX_HELD_BYTES {
            let oldest = self.pop().expect("held messages");
            publisher
                .settle(oldest, Instant::now() + PUBLISH_DEADLINE)
                .await
                .map_err(handler_error)?;
        }
        let subject = message.subject.clone();
        let sent = if self.held.iter().any(|s| matches!(s, Sent::Unsent(_))) {
            // Behind a message that is to be sent again: keep the order.
            Sent::Unsent(message)
        } else {
            publisher.send(message).await.map_err(handler_error)?
        };
        match sent {
            Sent::Buffered => {
                self.unflushed.get_or_insert(subject);
            }
            held => {
                self.held_bytes += held.len();
                self.held.push_back(held);
            }
        }
        crate::telemetry::metrics().published.add(1, &[]);
        Ok(())
    }

    /// Waits until every message published through this outbox is kept (stored, or flushed),
    /// sending again those whose try failed, until [`PUBLISH_DEADLINE`]; then 503.
    pub async fn kept(&mut self) -> Result<(), HandlerError> {
        let Some(publisher) = &self.nats.publisher else {
            return Ok(());
        };
        let until = Instant::now() + PUBLISH_DEADLINE;
        let held = std::mem::take(&mut self.held).into();
        self.held_bytes = 0;
        publisher
            .settle_all(held, until)
            .await
            .map_err(handler_error)?;
        if let Some(subject) = self.unflushed.take() {
            publisher
                .flush_by(subject, until)
                .await
                .map_err(handler_error)?;
        }
        Ok(())
    }

    /// Drops the oldest messages whose PubAck has come, so their payloads are not held.
    fn collect_acks(&mut self) -> Result<(), PublishError> {
        let Some(publisher) = &self.nats.publisher else {
            return Ok(());
        };
        loop {
            let answered = match self.held.front_mut() {
                Some(Sent::Acking(_, ack, _)) => ack.as_mut().now_or_never(),
                _ => None,
            };
            let Some(answered) = answered else {
                return Ok(());
            };
            let Some(Sent::Acking(message, ..)) = self.pop() else {
                return Ok(());
            };
            if let Err(e) = answered {
                if let Failure::Final(e) = publisher.failure(&message, &e) {
                    return Err(e);
                }
                // Sent again at `kept`, and what follows waits behind it.
                self.held_bytes += message.payload.len();
                self.held.push_front(Sent::Unsent(message));
                return Ok(());
            }
        }
    }

    fn pop(&mut self) -> Option<Sent> {
        let sent = self.held.pop_front()?;
        self.held_bytes -= sent.len();
        Some(sent)
    }
}

fn handler_error(e: PublishError) -> HandlerError {
    match e {
        PublishError::TooLarge { .. } => HandlerError::Internal(e.to_string()),
        other => unavailable(&other.to_string()),
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

/// How long one try waits for an answer (a stream lookup, a PubAck) before it counts as lost
/// and the message is sent again. A PubAck from a server on loopback took about 0.1 ms
/// (release build, one file-backed stream, 2026-12); two seconds leaves room for a loaded
/// cluster and still fits several tries into [`PUBLISH_DEADLINE`].
const TRY_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause after a first failed try; it doubles after each, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// The longest pause between tries.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// How often a publish looks whether a lost connection is back: a read of local state, so
/// often, and no message piles up in the client's queue meanwhile.
const CONNECTION_POLL: Duration = Duration::from_millis(20);

/// How long whether a stream stores a subject is remembered.
const STREAM_LOOKUP_TTL: Duration = Duration::from_secs(10);

/// Subjects remembered at most: reply subjects are per request, so the map is emptied when
/// it reaches this.
const STREAM_LOOKUP_CAPACITY: usize = 4096;

/// Publishes so the message is not lost once this returns Ok.
///
/// When a JetStream stream stores the subject (asked with `stream_by_subject`, the answer
/// remembered for 10 s), the message goes through JetStream and is kept
/// once its PubAck says so; otherwise it is a core publish, kept once flushed to the server
/// (core NATS delivers it to whoever subscribes, and keeps it nowhere). Failures that pass
/// are retried with a pause growing from 50 ms to 1 s, with the same headers, so the
/// `Nats-Msg-Id` makes the stream drop a copy an earlier try stored: a request or PubAck
/// that timed out, JetStream's "no responders" (503) while a stream elects a leader, a
/// lookup that timed out, a connection that is reconnecting. Give every message a
/// `Nats-Msg-Id`: without one, a retried message can be stored twice.
///
/// Cheap to clone; the clones share the client and what was learnt about streams.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    /// Subject -> (when asked, whether a stream stores it).
    streams: Arc<Mutex<HashMap<String, (Instant, bool)>>>,
}

/// How a message was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A stream stored it. `duplicate` when the stream already held a message with its
    /// `Nats-Msg-Id` (an earlier try's, or an earlier delivery's) and dropped this copy.
    Stored {
        /// Whether the stream had it already.
        duplicate: bool,
    },
    /// No stream stores the subject: published and flushed to the server.
    Flushed,
}

/// Why a message is not known to be kept.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Every try failed in a way that passes (the last reason given) until the deadline.
    #[error("{subject}: not kept after {tries} tries in {waited:?}; last: {last}")]
    TimedOut {
        /// Where the message was to go.
        subject: String,
        /// Tries made (none when the connection never came back).
        tries: u32,
        /// From the first try to giving up.
        waited: Duration,
        /// The last failure.
        last: String,
    },
    /// The message must be stored ([`Publisher::publish_stored`]) and no stream stores the
    /// subject.
    #[error("no JetStream stream stores {subject}")]
    NoStream {
        /// Where the message was to go.
        subject: String,
    },
    /// The message is larger than the server takes; no retry makes it smaller.
    #[error("{subject}: {size} byte message exceeds the server's max payload {max}")]
    TooLarge {
        /// Where the message was to go.
        subject: String,
        /// Payload bytes.
        size: usize,
        /// The server's `max_payload`.
        max: usize,
    },
    /// The server refused the message for good (an expected last sequence that does not
    /// match, a subject it does not accept, a stream limit).
    #[error("{subject}: refused: {reason}")]
    Refused {
        /// Where the message was to go.
        subject: String,
        /// The server's reason.
        reason: String,
    },
    /// The client is closed (drained); nothing it holds is sent any more.
    #[error("the NATS connection is closed")]
    Closed,
}

/// What keeping a message came to.
enum Outcome {
    Stored(PublishAck),
    Flushed,
}

impl Outcome {
    fn kept(&self) -> Kept {
        match self {
            Self::Stored(ack) => Kept::Stored {
                duplicate: ack.duplicate,
            },
            Self::Flushed => Kept::Flushed,
        }
    }
}

/// How a try failed.
enum Failure {
    /// Worth another try: the reason.
    Transient(String),
    /// No try can help.
    Final(PublishError),
}

/// Whether a message may be kept by a flush, or must be stored by a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Kept,
    Stored,
}

/// A message as it goes on the wire, kept for its retries.
#[derive(Debug)]
struct Message {
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
}

impl Message {
    fn new(subject: &str, headers: async_nats::HeaderMap, payload: bytes::Bytes) -> Self {
        Self {
            subject: subject.to_string(),
            headers,
            payload,
        }
    }
}

type AckFuture = std::pin::Pin<
    Box<dyn Future<Output = Result<PublishAck, JetStreamPublishError>> + Send + 'static>,
>;

/// A message on its way, not yet known to be kept.
enum Sent {
    /// Sent to a stream on the client's n-th connection: its PubAck is awaited there.
    Acking(Message, AckFuture, u64),
    /// Published to core NATS, in the client's buffer: a flush sends it.
    Buffered,
    /// Not sent (its try failed, or it waits behind one that did): sent again when settled.
    Unsent(Message),
}

impl Sent {
    fn subject(&self) -> Option<&str> {
        match self {
            Self::Acking(message, ..) | Self::Unsent(message) => Some(&message.subject),
            Self::Buffered => None,
        }
    }

    /// Payload bytes held for a retry.
    fn len(&self) -> usize {
        match self {
            Self::Acking(message, ..) | Self::Unsent(message) => message.payload.len(),
            Self::Buffered => 0,
        }
    }
}

impl fmt::Debug for Sent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Acking(message, ..) => write!(f, "Acking({})", message.subject),
            Self::Buffered => write!(f, "Buffered"),
            Self::Unsent(message) => write!(f, "Unsent({})", message.subject),
        }
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("state", &self.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher on `client` (connected or still connecting).
    pub fn new(client: async_nats::Client) -> Self {
        let jetstream = async_nats::jetstream::ContextBuilder::new()
            .timeout(TRY_TIMEOUT)
            .build(client.clone());
        Self {
            client,
            jetstream,
            streams: Arc::default(),
        }
    }

    /// The client it publishes on.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Publishes `payload` with `headers` to `subject` and returns once it is kept: stored by
    /// the stream that stores `subject` (its PubAck), else published and flushed. Retries what
    /// passes (see [`Publisher`]) until `deadline` has passed, then fails.
    pub async fn publish(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
        deadline: Duration,
    ) -> Result<Kept, PublishError> {
        let message = Message::new(subject, headers, payload);
        self.keep(&message, Need::Kept, Instant::now() + deadline)
            .await
            .map(|outcome| outcome.kept())
    }

    /// Like [`Self::publish`], but `subject` must be stored by a stream (a dead-letter queue,
    /// a deferred request): no stream is an error, not a flush.
    pub async fn publish_stored(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
        deadline: Duration,
    ) -> Result<PublishAck, PublishError> {
        let message = Message::new(subject, headers, payload);
        self.stored(&message, Instant::now() + deadline).await
    }

    async fn stored(&self, message: &Message, until: Instant) -> Result<PublishAck, PublishError> {
        match self.keep(message, Need::Stored, until).await? {
            Outcome::Stored(ack) => Ok(ack),
            Outcome::Flushed => Err(PublishError::NoStream {
                subject: message.subject.clone(),
            }),
        }
    }

    /// Tries until `message` is kept or `until` has passed.
    async fn keep(
        &self,
        message: &Message,
        need: Need,
        until: Instant,
    ) -> Result<Outcome, PublishError> {
        let started = Instant::now();
        let mut tries = 0;
        let mut pause = FIRST_PAUSE;
        let mut last = String::from("not connected");
        loop {
            if self.connected_by(until).await {
                tries += 1;
                let tried = tokio::time::timeout_at(until, self.try_keep(message, need)).await;
                match tried {
                    Ok(Ok(outcome)) => return Ok(outcome),
                    Ok(Err(Failure::Final(e))) => return Err(e),
                    Ok(Err(Failure::Transient(why))) => last = why,
                    Err(_) => last = "no answer before the deadline".to_string(),
                }
                tracing::debug!(subject = %message.subject, tries, reason = %last, "publish try failed");
            }
            let next = Instant::now() + pause;
            if next >= until {
                return Err(PublishError::TimedOut {
                    subject: message.subject.clone(),
                    tries,
                    waited: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep_until(next).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// One try: through JetStream to its PubAck, or a core publish and a flush.
    async fn try_keep(&self, message: &Message, need: Need) -> Result<Outcome, Failure> {
        if self
            .unless_disconnected(self.stream_stores(&message.subject))
            .await??
        {
            let ack = self.send_to_stream(message).await?;
            let ack = self
                .unless_disconnected(ack)
                .await?
                .map_err(|e| self.failure(message, &e))?;
            return Ok(Outcome::Stored(ack));
        }
        if need == Need::Stored {
            return Err(Failure::Final(PublishError::NoStream {
                subject: message.subject.clone(),
            }));
        }
        self.publish_core(message).await?;
        self.flush().await.map_err(Failure::Final)?;
        Ok(Outcome::Flushed)
    }

    /// Sends `message` without waiting for it to be kept: one try, whose failure leaves it
    /// [`Sent::Unsent`] for [`Self::settle`].
    async fn send(&self, message: Message) -> Result<Sent, PublishError> {
        if self.client.connection_state() != State::Connected {
            return Ok(Sent::Unsent(message));
        }
        let connection = self.connection();
        let sent = match self.stream_stores(&message.subject).await {
            Ok(true) => self.send_to_stream(&message).await.map(Some),
            Ok(false) => self.publish_core(&message).await.map(|()| None),
            Err(failure) => Err(failure),
        };
        match sent {
            Ok(Some(ack)) => Ok(Sent::Acking(message, ack, connection)),
            Ok(None) => Ok(Sent::Buffered),
            Err(Failure::Final(e)) => Err(e),
            Err(Failure::Transient(_)) => Ok(Sent::Unsent(message)),
        }
    }

    /// Waits until a sent message is kept, sending it again (as [`Self::publish`]) when its
    /// try failed, until `until`.
    async fn settle(&self, sent: Sent, until: Instant) -> Result<(), PublishError> {
        self.settle_all(vec![sent], until).await
    }

    /// Waits until every sent message is kept: first for all their PubAcks at once (so lost
    /// ones cost one [`TRY_TIMEOUT`], not one each), then sends again, in order, those whose
    /// try failed; until `until`.
    async fn settle_all(&self, sent: Vec<Sent>, until: Instant) -> Result<(), PublishError> {
        let started = Instant::now();
        let first = sent
            .iter()
            .find_map(Sent::subject)
            .unwrap_or_default()
            .to_string();
        let answers = futures::future::join_all(sent.into_iter().map(|s| self.answer(s)));
        let answers =
            tokio::time::timeout_at(until, answers)
                .await
                .map_err(|_| PublishError::TimedOut {
                    subject: first,
                    tries: 1,
                    waited: started.elapsed(),
                    last: "no PubAck".to_string(),
                })?;
        for answer in answers {
            if let Some(message) = answer? {
                self.keep(&message, Need::Kept, until).await?;
            }
        }
        Ok(())
    }

    /// What became of a sent message: kept (`None`), or to be sent again.
    async fn answer(&self, sent: Sent) -> Result<Option<Message>, PublishError> {
        let (message, ack, connection) = match sent {
            Sent::Acking(message, ack, connection) => (message, ack, connection),
            Sent::Unsent(message) => return Ok(Some(message)),
            Sent::Buffered => return Ok(None),
        };
        if connection != self.connection() {
            // Sent on a connection since lost: its PubAck, if any, went with it.
            return Ok(Some(message));
        }
        match self.unless_disconnected(ack).await {
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => match self.failure(&message, &e) {
                Failure::Final(e) => Err(e),
                Failure::Transient(why) => {
                    tracing::debug!(subject = %message.subject, reason = %why, "sending again");
                    Ok(Some(message))
                }
            },
            Err(_) => Ok(Some(message)),
        }
    }

    /// How many times the client has connected: a message sent on an earlier connection
    /// cannot be answered any more.
    fn connection(&self) -> u64 {
        self.client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flushes core publishes (the first went to `subject`), waiting until `until`.
    async fn flush_by(&self, subject: String, until: Instant) -> Result<(), PublishError> {
        let started = Instant::now();
        match tokio::time::timeout_at(until, self.flush()).await {
            Ok(flushed) => flushed,
            Err(_) => Err(PublishError::TimedOut {
                subject,
                tries: 1,
                waited: started.elapsed(),
                last: "not flushed (not connected)".to_string(),
            }),
        }
    }

    /// Sends `message` through JetStream; the future is its PubAck.
    async fn send_to_stream(&self, message: &Message) -> Result<AckFuture, Failure> {
        self.jetstream
            .publish_with_headers(
                message.subject.clone(),
                message.headers.clone(),
                message.payload.clone(),
            )
            .await
            .map(IntoFuture::into_future)
            .map_err(|e| self.failure(message, &e))
    }

    async fn publish_core(&self, message: &Message) -> Result<(), Failure> {
        use async_nats::client::PublishErrorKind as K;
        self.client
            .publish_with_headers(
                message.subject.clone(),
                message.headers.clone(),
                message.payload.clone(),
            )
            .await
            .map_err(|e| match e.kind() {
                K::MaxPayloadExceeded => Failure::Final(self.too_large(message)),
                K::InvalidSubject => Failure::Final(PublishError::Refused {
                    subject: message.subject.clone(),
                    reason: e.to_string(),
                }),
                K::Send => Failure::Final(PublishError::Closed),
            })
    }

    /// Writes what the client holds to the server. While reconnecting this waits for the
    /// connection: the buffered messages go out on it.
    async fn flush(&self) -> Result<(), PublishError> {
        self.client.flush().await.map_err(|_| PublishError::Closed)
    }

    /// Whether a stream stores `subject`: remembered, else asked of the server.
    async fn stream_stores(&self, subject: &str) -> Result<bool, Failure> {
        if let Some(&(at, stored)) = self.streams.lock().expect("stream lookups").get(subject)
            && at.elapsed() < STREAM_LOOKUP_TTL
        {
            return Ok(stored);
        }
        let stored = match self.jetstream.stream_by_subject(subject).await {
            Ok(_) => true,
            Err(e) => match e.kind() {
                GetStreamByNameErrorKind::NotFound => false,
                // No server answers the JetStream API: JetStream is off, so nothing stores it.
                _ if request_kind(&e) == Some(RequestErrorKind::NoResponders) => false,
                GetStreamByNameErrorKind::InvalidSubject => {
                    return Err(Failure::Final(PublishError::Refused {
                        subject: subject.to_string(),
                        reason: "invalid subject".to_string(),
                    }));
                }
                _ => return Err(Failure::Transient(format!("stream lookup: {e}"))),
            },
        };
        let mut streams = self.streams.lock().expect("stream lookups");
        if streams.len() >= STREAM_LOOKUP_CAPACITY {
            streams.clear();
        }
        streams.insert(subject.to_string(), (Instant::now(), stored));
        Ok(stored)
    }

    /// What a failed JetStream publish means for the next try.
    fn failure(&self, message: &Message, e: &JetStreamPublishError) -> Failure {
        use JetStreamPublishErrorKind as K;
        let subject = message.subject.as_str();
        let refused = || {
            Failure::Final(PublishError::Refused {
                subject: subject.to_string(),
                reason: e.to_string(),
            })
        };
        match e.kind() {
            K::TimedOut => Failure::Transient(format!("no PubAck within {TRY_TIMEOUT:?}")),
            K::BrokenPipe => Failure::Transient("connection lost before the PubAck".to_string()),
            K::StreamNotFound => {
                // "No responders": the stream has no leader (an election), or is gone; ask
                // again which it is on the next try.
                self.streams.lock().expect("stream lookups").remove(subject);
                Failure::Transient("no responders (stream without a leader)".to_string())
            }
            K::MaxAckPending => Failure::Transient(e.to_string()),
            K::MaxPayloadExceeded => Failure::Final(self.too_large(message)),
            K::WrongLastMessageId | K::WrongLastSequence => refused(),
            K::Other => match source::<async_nats::jetstream::Error>(e) {
                // 503: JetStream is there but cannot take it now (no quorum, a meta election).
                Some(api) if api.code() == 503 => Failure::Transient(api.to_string()),
                Some(_) => refused(),
                // Not the server's answer: the request could not be made or read.
                None => Failure::Transient(e.to_string()),
            },
        }
    }

    fn too_large(&self, message: &Message) -> PublishError {
        PublishError::TooLarge {
            subject: message.subject.clone(),
            size: message.payload.len(),
            max: self.client.max_payload(),
        }
    }

    /// `answer`, unless the connection drops first: an answer due on the old connection is
    /// lost with it, so the try fails at once, and the next goes out when the client is back
    /// instead of after [`TRY_TIMEOUT`].
    async fn unless_disconnected<T>(&self, answer: impl Future<Output = T>) -> Result<T, Failure> {
        tokio::select! {
            biased;
            out = answer => Ok(out),
            () = async {
                while self.client.connection_state() == State::Connected {
                    tokio::time::sleep(CONNECTION_POLL).await;
                }
            } => Err(Failure::Transient("connection lost before the answer".to_string())),
        }
    }

    /// Whether the client is connected, waiting for it until `until` when it is not.
    async fn connected_by(&self, until: Instant) -> bool {
        loop {
            if self.client.connection_state() == State::Connected {
                return true;
            }
            if Instant::now() + CONNECTION_POLL >= until {
                return false;
            }
            tokio::time::sleep(CONNECTION_POLL).await;
        }
    }
}

/// The first error of type `T` among `e`'s sources.
fn source<'e, T: std::error::Error + 'static>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut next = e.source();
    while let Some(cause) = next {
        if let Some(found) = cause.downcast_ref::<T>() {
            return Some(found);
        }
        next = cause.source();
    }
    None
}

/// The kind of the JetStream API request beneath a failed stream lookup.
fn request_kind(e: &(dyn std::error::Error + 'static)) -> Option<RequestErrorKind> {
    source::<RequestError>(e).map(RequestError::kind)
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
