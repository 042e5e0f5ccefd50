//! One message's life: POST it, keep it alive while the sink works, then ack, term or retry.
//!
//! Every message ends in exactly one of: acked after a 2xx (the reply published first when
//! there is one), dead-lettered then terminated, or handed back to JetStream for later. The DLQ
//! publish is acknowledged by JetStream before the message is terminated, so a dead letter is
//! never lost between the two.
//!
//! | the sink | the source | counts against `MAX_DELIVER` |
//! |---|---|---|
//! | 2xx | ack (200: publish the reply first) | - |
//! | 400, 401, 403, 413, 415, 422, other 4xx | dead-letter at once | - |
//! | 500, 502, 504, 404, 408, 409; no answer within `SINK_TIMEOUT_MS`; a body cut off | nak with exponential backoff (or `Retry-After`) | yes |
//! | 503, 429; connection refused or reset; no answer before the headers | shut the gate to the sink ([`crate::gate`]), nak with its delay | no |
//! | reply not stored within `REPLY_TIMEOUT_MS` | shut the gate, nak | no |
//! | id, reply subject or headers that cannot be carried | dead-letter at once | - |
//! | older than `RETRY_TIMEOUT` when it would be retried | dead-letter | - |
//! | shutdown | nak, no delay | no |
//!
//! Failed attempts are counted in the ledger ([`crate::budget`]), so the count survives a
//! restart and moves with the message to another replica.
//!
//! A message of an ordered subject is never nak'ed except at shutdown: a retry (of the sink,
//! the reply publish or the DLQ publish) waits in place, kept alive, so the next message of
//! its subject cannot overtake it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use handler_kit::delivery::{Disposition, disposition, parse_retry_after};
use handler_kit::nats::PublishError;
use opentelemetry::KeyValue;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::backoff;
use crate::event::{self, Position};

/// How a delivery attempt ended, as seen by the source.
#[derive(Debug)]
enum Attempt {
    /// The sink answered.
    Answered {
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        headers: reqwest::header::HeaderMap,
        /// The body, at most NATS' `max_payload` + 1 bytes: more could never be published.
        body: bytes::Bytes,
        /// The body went on past `body` (its reading was stopped there).
        cut: bool,
    },
    /// The request never reached a sink that took it: refused, reset or closed before the
    /// headers of an answer (a restarting or overloaded function).
    Unreached(String),
    /// Sent, but no whole answer: `SINK_TIMEOUT_MS` passed, or the body broke off.
    Lost(String),
}

/// How a message left the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked, or dead-lettered and terminated: done for good.
    Done,
    /// Nak'ed: JetStream delivers it again later (shutdown, or a retry without ordering).
    HandedBack,
}

/// Why a message is tried again.
struct Retry {
    delay: Duration,
    detail: String,
    /// `retried` (a failed attempt) or `held_off` (backpressure).
    outcome: &'static str,
}

/// One message being delivered: what every step needs (the message, where the stream keeps
/// it, the shared state, its failures so far), so each step takes this and what differs.
struct Delivery<'a> {
    shared: &'a Shared,
    msg: &'a jetstream::Message,
    position: Position,
    /// The event id, for logs and the reply's dedup id.
    id: String,
    ordered: bool,
    cancel: &'a CancellationToken,
    /// Failed attempts so far, this delivery's included.
    failures: u32,
    /// JetStream's delivery count (attempts, hand-backs and redeliveries after a crash).
    delivered: i64,
}

/// Delivers `msg` until it is settled (or shutdown cancels it, which naks it).
pub(crate) async fn deliver(
    shared: Arc<Shared>,
    msg: &jetstream::Message,
    cancel: CancellationToken,
) -> Settled {
    let config = &shared.config;
    let Ok(info) = msg.info() else {
        tracing::warn!(subject = %msg.subject, "message without JetStream metadata, terminating");
        let _ = msg.ack_with(AckKind::Term).await;
        return Settled::Done;
    };
    let ordered = config.is_ordered(msg.subject.as_str());
    let mut d = Delivery::new(&shared, msg, &info, ordered, &cancel);
    if !d.ordered
        && let Some(left) = shared.gate.shut_for()
    {
        // Pulled before the gate shut: not an attempt, back it goes.
        return d.hand_back_after(backoff::spread(left), "held_off").await;
    }
    let checked = event::to_http(config, msg, &d.position)
        .and_then(|o| event::reply_subject(config, msg).map(|reply| (o, reply)));
    let (outbound, reply_to) = match checked {
        Ok(checked) => checked,
        Err(poison) => return d.dead_letter_or_hold(&poison.to_string(), None).await,
    };
    d.id.clone_from(&outbound.id);
    d.failures = shared
        .ledger
        .failures(d.position.sequence, d.delivered)
        .await;
    let m = &shared.metrics;
    loop {
        if d.ordered
            && let Some(left) = shared.gate.shut_for()
            && d.wait_in_place(left).await.is_err()
        {
            return d.hand_back().await;
        }
        let started = Instant::now();
        let attempt = tokio::select! {
            a = keep_alive(msg, shared.ack_wait, post(&shared, &outbound)) => a,
            () = cancel.cancelled() => return d.hand_back().await,
        };
        m.sink_duration.record(started.elapsed().as_secs_f64(), &[]);
        let retry = match judge(&attempt) {
            (Disposition::Ack { reply }, _) => {
                shared.gate.answered();
                let published = match (reply, &attempt, &reply_to) {
                    (
                        true,
                        Attempt::Answered {
                            headers, body, cut, ..
                        },
                        Some(subject),
                    ) => {
                        let reply = Reply {
                            subject,
                            id: &outbound.id,
                            headers,
                            body: body.clone(),
                            cut: *cut,
                        };
                        let publish = publish_reply(&shared, reply);
                        tokio::select! {
                            p = keep_alive(msg, shared.ack_wait, publish) => p,
                            // A reply stored meanwhile is deduplicated on redelivery.
                            () = cancel.cancelled() => return d.hand_back().await,
                        }
                    }
                    _ => Ok(()),
                };
                // Never ack without the reply. The retry POSTs again; the reply's Nats-Msg-Id
                // keeps a stream from storing it twice.
                match published {
                    Ok(()) => return d.delivered().await,
                    // The reply path is down, which is no fault of the message: hold the
                    // source back as for backpressure.
                    Err(ReplyFailure::Unavailable(e)) => Retry {
                        delay: backoff::spread(shared.gate.backpressure(None)),
                        detail: format!("reply not published: {e}"),
                        outcome: "held_off",
                    },
                    Err(ReplyFailure::Refused(e)) => {
                        match d
                            .failed(format!("reply refused: {e}"), None, &attempt)
                            .await
                        {
                            Ok(retry) => retry,
                            Err(settled) => return settled,
                        }
                    }
                }
            }
            (Disposition::Reject, detail) => {
                shared.gate.answered();
                return d.dead_letter_or_hold(&detail, Some(&attempt)).await;
            }
            (Disposition::Retry { after }, detail) => {
                if matches!(attempt, Attempt::Answered { .. }) {
                    shared.gate.answered();
                }
                match d.failed(detail, after, &attempt).await {
                    Ok(retry) => retry,
                    Err(settled) => return settled,
                }
            }
            (Disposition::Backpressure { after }, detail) => Retry {
                delay: backoff::spread(shared.gate.backpressure(after)),
                detail,
                outcome: "held_off",
            },
        };
        if d.age() >= config.retry_timeout {
            let reason = format!(
                "{}; older than RETRY_TIMEOUT ({:?})",
                retry.detail, config.retry_timeout
            );
            return d.dead_letter_or_hold(&reason, Some(&attempt)).await;
        }
        tracing::debug!(id = %d.id, failures = d.failures, detail = %retry.detail, "tried again later");
        if !d.ordered {
            return d.hand_back_after(retry.delay, retry.outcome).await;
        }
        // Per-subject order: wait here, holding the message (kept alive), so nothing
        // overtakes it.
        m.settled.add(1, &[KeyValue::new("outcome", retry.outcome)]);
        if d.wait_in_place(retry.delay).await.is_err() {
            return d.hand_back().await;
        }
    }
}

/// The source's reading of an attempt: what the contract says, and a line for the reason.
fn judge(attempt: &Attempt) -> (Disposition, String) {
    match attempt {
        Attempt::Answered {
            status,
            retry_after,
            ..
        } => (disposition(*status, *retry_after), format!("HTTP {status}")),
        Attempt::Unreached(e) => (Disposition::Backpressure { after: None }, e.clone()),
        Attempt::Lost(e) => (Disposition::Retry { after: None }, e.clone()),
    }
}

impl<'a> Delivery<'a> {
    /// `msg`, read from its JetStream metadata `info`, before any attempt.
    fn new(
        shared: &'a Shared,
        msg: &'a jetstream::Message,
        info: &jetstream::message::Info<'_>,
        ordered: bool,
        cancel: &'a CancellationToken,
    ) -> Self {
        Self {
            shared,
            msg,
            position: Position {
                stream: info.stream.to_string(),
                sequence: info.stream_sequence,
                published: info.published,
            },
            id: format!("{}:{}", info.stream, info.stream_sequence),
            ordered,
            cancel,
            failures: 0,
            delivered: info.delivered,
        }
    }

    /// How long ago the stream stored the message.
    fn age(&self) -> Duration {
        chrono::Utc::now()
            .signed_duration_since(self.position.published)
            .to_std()
            .unwrap_or_default()
    }

    /// Counts a failed attempt: the retry to make, or (`Err`) how the message was settled
    /// because its budget ran out.
    async fn failed(
        &mut self,
        detail: String,
        after: Option<Duration>,
        attempt: &Attempt,
    ) -> Result<Retry, Settled> {
        let config = &self.shared.config;
        self.failures = self.failures.saturating_add(1);
        if i64::from(self.failures) >= config.max_deliver {
            let reason = format!("{detail}; gave up after {} failed attempts", self.failures);
            return Err(self.dead_letter_or_hold(&reason, Some(attempt)).await);
        }
        self.shared
            .ledger
            .record(self.position.sequence, self.failures)
            .await;
        Ok(Retry {
            delay: config.backoff().retry(self.failures, after),
            detail,
            outcome: "retried",
        })
    }

    /// Acks a delivered message and forgets its failed attempts.
    async fn delivered(&self) -> Settled {
        let _ = self.msg.ack().await;
        self.shared
            .ledger
            .forget(self.position.sequence, self.failures)
            .await;
        self.shared
            .metrics
            .settled
            .add(1, &[KeyValue::new("outcome", "delivered")]);
        record_latency(self.shared, &self.position);
        Settled::Done
    }

    /// Shutdown: hand the message back now rather than after ack-wait.
    async fn hand_back(&self) -> Settled {
        hand_back(self.shared, self.msg).await
    }

    /// Naks the message for redelivery after `delay`.
    async fn hand_back_after(&self, delay: Duration, outcome: &'static str) -> Settled {
        let _ = self.msg.ack_with(AckKind::Nak(Some(delay))).await;
        self.shared
            .metrics
            .settled
            .add(1, &[KeyValue::new("outcome", outcome)]);
        Settled::HandedBack
    }

    /// Waits `delay` holding the message ([`keep_alive`]); Err when shutdown cut it short.
    async fn wait_in_place(&self, delay: Duration) -> Result<(), ()> {
        tokio::select! {
            () = keep_alive(self.msg, self.shared.ack_wait, tokio::time::sleep(delay)) => Ok(()),
            () = self.cancel.cancelled() => Err(()),
        }
    }

    /// Dead-letters the message. If the DLQ publish fails, an unordered message is nak'ed for
    /// a later try; an ordered one is held (kept alive) and the publish retried in place, so
    /// the next message of its subject cannot overtake it.
    async fn dead_letter_or_hold(&self, reason: &str, attempt: Option<&Attempt>) -> Settled {
        let held = self.shared.config.backoff().max();
        loop {
            let Err(e) = self.dead_letter(reason, attempt).await else {
                self.shared
                    .ledger
                    .forget(self.position.sequence, self.failures)
                    .await;
                return Settled::Done;
            };
            // No stream took it: keep the message rather than lose it.
            tracing::error!(id = %self.id, error = %e, "dead-letter publish failed; message kept");
            if !self.ordered {
                return self.hand_back_after(held, "held_off").await;
            }
            if self.wait_in_place(held).await.is_err() {
                return self.hand_back().await;
            }
        }
    }

    /// Publishes the dead letter (stored in the DLQ stream: PubAck) and only then terminates
    /// the message. Err: the publish failed, the message is untouched.
    async fn dead_letter(&self, reason: &str, attempt: Option<&Attempt>) -> Result<(), String> {
        let (shared, msg, position) = (self.shared, self.msg, &self.position);
        let config = &shared.config;
        let subject = config
            .dlq_subject
            .replace("{stream}", &config.stream)
            .replace("{subject}", msg.subject.as_str());
        let mut headers = dead_letter_headers(msg.headers.as_ref());
        // One dead letter per message even if this runs twice (e.g. the term below is lost).
        // The stream position, not the event id: ids are unique only per source, and may be
        // missing.
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq:{}:{}", position.stream, position.sequence).as_str(),
        );
        headers.insert("Dlq-Reason", header_text(reason, 512).as_str());
        headers.insert("Dlq-Failed-Attempts", self.failures.to_string().as_str());
        headers.insert("Dlq-Deliveries", self.delivered.to_string().as_str());
        headers.insert("Dlq-Original-Subject", msg.subject.as_str());
        headers.insert("Dlq-Original-Stream", position.stream.as_str());
        headers.insert(
            "Dlq-Original-Sequence",
            position.sequence.to_string().as_str(),
        );
        if let Some(Attempt::Answered { body, .. }) = attempt {
            // The function's JSON error says why; keep a bounded copy.
            let detail = header_text(&String::from_utf8_lossy(body), 512);
            headers.insert("Dlq-Response", detail.as_str());
        }
        shared
            .publisher
            .publish_stored(&subject, headers, msg.payload.clone(), config.reply_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let _ = msg.ack_with(AckKind::Term).await;
        shared
            .metrics
            .settled
            .add(1, &[KeyValue::new("outcome", "dead_lettered")]);
        tracing::warn!(id = %self.id, %subject, reason, "dead-lettered");
        Ok(())
    }
}

/// Shutdown: hand the message back now rather than after ack-wait.
pub(crate) async fn hand_back(shared: &Shared, msg: &jetstream::Message) -> Settled {
    let _ = msg.ack_with(AckKind::Nak(None)).await;
    shared
        .metrics
        .settled
        .add(1, &[KeyValue::new("outcome", "shutdown")]);
    Settled::HandedBack
}

/// A delivery that panicked: the message is poison for this source (the same input would
/// panic again), so it is dead-lettered with the panic's message, never left unsettled.
pub(crate) async fn after_panic(shared: &Shared, msg: &jetstream::Message, panic: &str) -> Settled {
    shared
        .metrics
        .settled
        .add(1, &[KeyValue::new("outcome", "panicked")]);
    tracing::error!(subject = %msg.subject, panic, "delivery panicked");
    let Ok(info) = msg.info() else {
        let _ = msg.ack_with(AckKind::Term).await;
        return Settled::Done;
    };
    let cancel = CancellationToken::new();
    let d = Delivery::new(shared, msg, &info, false, &cancel);
    d.dead_letter_or_hold(&format!("delivery panicked: {panic}"), None)
        .await
}

async fn post(shared: &Shared, outbound: &event::Outbound) -> Attempt {
    let request = shared
        .http
        .post(shared.sink.clone())
        .headers(outbound.headers.clone())
        .body(outbound.body.clone())
        .timeout(shared.config.sink_timeout);
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let retry_after =
                parse_retry_after(response.headers().get(reqwest::header::RETRY_AFTER));
            let headers = response.headers().clone();
            // NATS' limit + 1: enough to know a reply cannot be published, never more.
            let limit = shared.publisher.client().max_payload().max(1024) + 1;
            match read_capped(response, limit).await {
                Ok((body, cut)) => Attempt::Answered {
                    status,
                    retry_after,
                    headers,
                    body,
                    cut,
                },
                // Headers came, the body did not: the sink took the event and failed.
                Err(e) => Attempt::Lost(handler_kit::http::describe(&e)),
            }
        }
        // SINK_TIMEOUT_MS passed after the request was sent (a connect timeout is a connect
        // error first): the sink may have worked on it, so it counts.
        Err(e) if e.is_timeout() && !e.is_connect() => {
            Attempt::Lost(handler_kit::http::describe(&e))
        }
        // Refused, reset, closed before an answer: nobody took the event.
        Err(e) => Attempt::Unreached(handler_kit::http::describe(&e)),
    }
}

/// Reads at most `limit` bytes of a body, chunk by chunk: a sink answering more is cut off
/// there (the connection is dropped), not buffered whole. Returns the bytes and whether the
/// body went on.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(bytes::Bytes, bool), reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok((bytes::Bytes::new(), true));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok((body.freeze(), true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), false))
}

/// Runs `work` while the message stays this source's: every third of its ack wait (no more
/// often than every 100 ms) JetStream is told the message is in progress.
///
/// The one way the source holds a message longer than a moment, whatever it waits for: the
/// sink's answer, the reply's PubAck, a retry waiting in place, or (ordered subjects) the
/// message before it in its line. Without it JetStream redelivers the message once its ack
/// wait runs out, to this replica or another, and the sink gets it twice, or an ordered
/// subject out of order. A third, so one lost progress ack still leaves time for the next;
/// 100 ms apart at least, so a tiny ack wait does not flood the server.
pub(crate) async fn keep_alive<T>(
    msg: &jetstream::Message,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
        }
    }
}

/// Why a reply was not kept.
enum ReplyFailure {
    /// The reply path is down (no PubAck, no flush within `REPLY_TIMEOUT_MS`): no fault of
    /// the message.
    Unavailable(String),
    /// The server refused it for good (a stream limit, say): the message's attempt failed.
    Refused(String),
}

/// A 200's reply on its way to the reply subject.
struct Reply<'a> {
    subject: &'a str,
    /// The event's id (the reply's dedup id when the sink sent no `ce-id`).
    id: &'a str,
    headers: &'a reqwest::header::HeaderMap,
    body: bytes::Bytes,
    /// The sink's body was longer than NATS' limit and was not read to its end.
    cut: bool,
}

/// Publishes a 200's reply CloudEvent: stored when a stream stores the subject (PubAck),
/// else flushed, retried across leader elections within `REPLY_TIMEOUT_MS`.
async fn publish_reply(shared: &Shared, reply: Reply<'_>) -> Result<(), ReplyFailure> {
    let (subject, id) = (reply.subject, reply.id);
    let too_large = |size: usize, max: usize| {
        // The event was handled; retrying cannot make the reply smaller. Functions whose
        // replies can be large (audio) publish them in pieces themselves.
        tracing::warn!(id, %subject, bytes = size, max, "reply exceeds NATS max payload, not published");
        shared
            .metrics
            .settled
            .add(1, &[KeyValue::new("outcome", "reply_too_large")]);
        Ok(())
    };
    let max = shared.publisher.client().max_payload();
    if reply.cut {
        return too_large(reply.body.len(), max);
    }
    if reply.body.is_empty() {
        return Ok(());
    }
    let (nats_headers, payload) = event::reply_message(reply.headers, reply.body, id);
    let published = shared
        .publisher
        .publish(subject, nats_headers, payload, shared.config.reply_timeout)
        .await;
    match published {
        Ok(_) => Ok(()),
        Err(PublishError::TooLarge { size, max, .. }) => too_large(size, max),
        Err(e @ PublishError::Refused { .. }) => Err(ReplyFailure::Refused(e.to_string())),
        Err(e) => Err(ReplyFailure::Unavailable(e.to_string())),
    }
}

/// Free text made fit for a NATS header value: control characters (CR and LF would be
/// refused, the rest are unreadable) become spaces, and it is cut at `max` characters.
fn header_text(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The original headers for the dead letter, with JetStream's `Nats-*` control headers
/// (`Nats-Expected-Stream`, `Nats-Expected-Last-*`, `Nats-Rollup`, `Nats-TTL`, `Nats-Msg-Id`,
/// ...) renamed to `X-Original-Nats-*`: kept, they would make the DLQ stream reject or
/// deduplicate the dead letter, every time.
fn dead_letter_headers(original: Option<&async_nats::HeaderMap>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in original.into_iter().flat_map(async_nats::HeaderMap::iter) {
        let name: &str = name.as_ref();
        let renamed = name
            .get(..5)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
            .then(|| format!("X-Original-{name}"));
        for value in values {
            match &renamed {
                Some(renamed) => headers.append(renamed.as_str(), value.as_str()),
                None => headers.append(name, value.as_str()),
            }
        }
    }
    headers
}

fn record_latency(shared: &Shared, position: &Position) {
    let age = chrono::Utc::now().signed_duration_since(position.published);
    if let Ok(age) = age.to_std() {
        shared.metrics.end_to_end.record(age.as_secs_f64(), &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_carry_no_jetstream_control_headers() {
        let mut original = async_nats::HeaderMap::new();
        original.insert("Nats-Expected-Stream", "WORK");
        original.insert("nats-msg-id", "m-1");
        original.insert("Content-Type", "application/msgpack");
        let headers = dead_letter_headers(Some(&original));
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_ref()).collect();
        assert!(
            names
                .iter()
                .all(|n| !n.to_ascii_lowercase().starts_with("nats-")),
            "{names:?}"
        );
        let get = |n: &str| headers.get(n).map(|v| v.as_str().to_string());
        assert_eq!(
            get("X-Original-Nats-Expected-Stream").as_deref(),
            Some("WORK")
        );
        assert_eq!(get("X-Original-nats-msg-id").as_deref(), Some("m-1"));
        assert_eq!(get("Content-Type").as_deref(), Some("application/msgpack"));
    }

    #[test]
    fn reasons_become_valid_header_values() {
        assert_eq!(header_text("a\r\nb\0c", 100), "a  b c");
        assert_eq!(header_text(&"x".repeat(1000), 512).len(), 512);
    }
}
