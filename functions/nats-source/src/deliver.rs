//! One message's life: POST it, keep it alive while the sink works, then ack, term or retry.
//!
//! Every message ends in exactly one of: acked after a 2xx (the reply published first when
//! there is one), dead-lettered then terminated (4xx, or retries exhausted), or nak'ed for
//! redelivery (retryable failure, or shutdown). The DLQ publish is acknowledged by JetStream
//! before the message is terminated, so a dead letter is never lost between the two.
//!
//! A message of an ordered subject is never nak'ed except at shutdown: a retryable failure (of
//! the sink, the reply publish or the DLQ publish) is retried in place, kept alive, so the next
//! message of its subject cannot overtake it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use handler_kit::delivery::{Disposition, disposition, parse_retry_after};
use opentelemetry::KeyValue;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::event::{self, Position};

/// How a delivery attempt ended, as seen by the source.
#[derive(Debug)]
enum Attempt {
    /// The sink answered.
    Answered {
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        headers: reqwest::header::HeaderMap,
        body: bytes::Bytes,
    },
    /// No answer: connection refused, reset, timeout.
    Failed(String),
}

/// How a message left the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked, or dead-lettered and terminated: done for good.
    Done,
    /// Nak'ed: JetStream delivers it again later (shutdown, or a retry without ordering).
    HandedBack,
}

/// What to do after one attempt.
enum Next {
    Settled(Settled),
    /// A retryable failure (sink, or publishing the reply).
    Retry {
        after: Option<Duration>,
        detail: String,
    },
}

/// Delivers `msg` until it is settled (or shutdown cancels it, which naks it). `discount` is
/// how many of JetStream's deliveries were not attempts (hand-backs for lack of room in an
/// ordered subject), so they do not count against `MAX_DELIVER`.
pub(crate) async fn deliver(
    shared: Arc<Shared>,
    msg: jetstream::Message,
    cancel: CancellationToken,
    discount: i64,
) -> Settled {
    let config = &shared.config;
    let Ok(info) = msg.info() else {
        tracing::warn!(subject = %msg.subject, "message without JetStream metadata, terminating");
        let _ = msg.ack_with(AckKind::Term).await;
        return Settled::Done;
    };
    let position = Position {
        stream: info.stream.to_string(),
        sequence: info.stream_sequence,
        published: info.published,
    };
    let ordered = config.is_ordered(msg.subject.as_str());
    let mut deliveries = (info.delivered - discount).max(1);
    let outbound = event::to_http(config, &msg, &position);
    let m = &shared.metrics;
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            a = keep_alive(&msg, shared.ack_wait, post(&shared, &outbound)) => a,
            () = cancel.cancelled() => return hand_back(&shared, &msg).await,
        };
        m.sink_duration.record(started.elapsed().as_secs_f64(), &[]);
        let (action, detail) = match &attempt {
            Attempt::Answered {
                status,
                retry_after,
                ..
            } => (disposition(*status, *retry_after), format!("HTTP {status}")),
            Attempt::Failed(e) => (Disposition::Retry { after: None }, e.clone()),
        };
        let next = match action {
            Disposition::Ack { reply } => {
                let published = match (reply, &attempt) {
                    (true, Attempt::Answered { headers, body, .. }) => {
                        let publish =
                            publish_reply(&shared, &msg, &outbound.id, headers, body.clone());
                        tokio::select! {
                            p = keep_alive(&msg, shared.ack_wait, publish) => p,
                            // A reply stored meanwhile is deduplicated on redelivery.
                            () = cancel.cancelled() => return hand_back(&shared, &msg).await,
                        }
                    }
                    _ => Ok(()),
                };
                match published {
                    Ok(()) => {
                        let _ = msg.ack().await;
                        m.settled.add(1, &[KeyValue::new("outcome", "delivered")]);
                        record_latency(&shared, &position);
                        Next::Settled(Settled::Done)
                    }
                    // Never ack without the reply: retried (POSTed again; the reply's
                    // Nats-Msg-Id keeps a stream from storing it twice).
                    Err(e) => Next::Retry {
                        after: None,
                        detail: format!("reply not published: {e}"),
                    },
                }
            }
            Disposition::Reject => Next::Settled(
                dead_letter_or_hold(
                    &shared,
                    &msg,
                    &position,
                    &outbound.id,
                    deliveries,
                    &detail,
                    &attempt,
                    ordered,
                    &cancel,
                )
                .await,
            ),
            Disposition::Retry { after } => Next::Retry { after, detail },
        };
        let (after, detail) = match next {
            Next::Settled(settled) => return settled,
            Next::Retry { after, detail } => (after, detail),
        };
        if deliveries >= config.max_deliver {
            let reason = format!("{detail}; gave up after {deliveries} deliveries");
            return dead_letter_or_hold(
                &shared,
                &msg,
                &position,
                &outbound.id,
                deliveries,
                &reason,
                &attempt,
                ordered,
                &cancel,
            )
            .await;
        }
        tracing::debug!(id = %outbound.id, deliveries, %detail, "retryable failure");
        if !ordered {
            retry_later(&shared, &msg, deliveries, after).await;
            return Settled::HandedBack;
        }
        // Per-subject order: wait here, holding the message (kept alive), so nothing
        // overtakes it; the wait counts as a delivery.
        m.settled.add(1, &[KeyValue::new("outcome", "retried")]);
        let wait = backoff(&shared, deliveries, after);
        tokio::select! {
            _ = keep_alive(&msg, shared.ack_wait, tokio::time::sleep(wait)) => {}
            () = cancel.cancelled() => return hand_back(&shared, &msg).await,
        }
        deliveries += 1;
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

/// Dead-letters the message. If the DLQ publish fails, an unordered message is nak'ed for a
/// later try; an ordered one is held (kept alive) and the publish retried in place, so the
/// next message of its subject cannot overtake it.
#[allow(clippy::too_many_arguments)]
async fn dead_letter_or_hold(
    shared: &Shared,
    msg: &jetstream::Message,
    position: &Position,
    id: &str,
    deliveries: i64,
    reason: &str,
    attempt: &Attempt,
    ordered: bool,
    cancel: &CancellationToken,
) -> Settled {
    loop {
        let Err(e) = dead_letter(shared, msg, position, id, deliveries, reason, attempt).await
        else {
            return Settled::Done;
        };
        // No stream took it: keep the message rather than lose it.
        tracing::error!(id, error = %e, "dead-letter publish failed; message kept");
        if !ordered {
            let _ = msg
                .ack_with(AckKind::Nak(Some(shared.config.backoff_max)))
                .await;
            return Settled::HandedBack;
        }
        let wait = tokio::time::sleep(shared.config.backoff_max);
        tokio::select! {
            () = keep_alive(msg, shared.ack_wait, wait) => {}
            () = cancel.cancelled() => return hand_back(shared, msg).await,
        }
    }
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
            match response.bytes().await {
                Ok(body) => Attempt::Answered {
                    status,
                    retry_after,
                    headers,
                    body,
                },
                Err(e) => Attempt::Failed(handler_kit::http::describe(&e)),
            }
        }
        Err(e) => Attempt::Failed(handler_kit::http::describe(&e)),
    }
}

/// Runs `work` while telling JetStream every third of ack-wait that the message is in progress.
async fn keep_alive<T>(
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

/// Exponential backoff with equal jitter, or the sink's `Retry-After` (capped) with a little.
fn backoff(shared: &Shared, deliveries: i64, retry_after: Option<Duration>) -> Duration {
    let config = &shared.config;
    let base = match retry_after {
        Some(after) => after.min(config.backoff_max),
        None => {
            let exp = u32::try_from(deliveries.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
            config
                .backoff_base
                .saturating_mul(1 << exp)
                .min(config.backoff_max)
        }
    };
    // Equal jitter for computed delays spreads a burst of failures; Retry-After is respected
    // as a floor with up to 10% added.
    let jitter = if retry_after.is_some() {
        base.mul_f64(fastrand::f64() * 0.1)
    } else {
        base.mul_f64(fastrand::f64() * 0.5)
    };
    if retry_after.is_some() {
        base + jitter
    } else {
        base / 2 + jitter
    }
}

async fn retry_later(
    shared: &Shared,
    msg: &jetstream::Message,
    deliveries: i64,
    after: Option<Duration>,
) {
    let delay = backoff(shared, deliveries, after);
    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
    shared
        .metrics
        .settled
        .add(1, &[KeyValue::new("outcome", "retried")]);
}

async fn publish_reply(
    shared: &Shared,
    msg: &jetstream::Message,
    id: &str,
    headers: &reqwest::header::HeaderMap,
    body: bytes::Bytes,
) -> Result<(), String> {
    let Some(subject) = event::reply_subject(&shared.config, msg) else {
        return Ok(());
    };
    if body.is_empty() {
        return Ok(());
    }
    let (nats_headers, payload) = event::reply_message(headers, body, id);
    let max = shared.client.server_info().max_payload;
    if max > 0 && payload.len() + 4096 > max {
        // The event was handled; retrying cannot make the reply smaller. Functions whose
        // replies can be large (audio) publish them in pieces themselves.
        tracing::warn!(id, %subject, bytes = payload.len(), max, "reply exceeds NATS max payload, not published");
        shared
            .metrics
            .settled
            .add(1, &[KeyValue::new("outcome", "reply_too_large")]);
        return Ok(());
    }
    let timeout = shared.config.reply_timeout;
    let publish = async {
        if captured_by_stream(shared, &subject).await? {
            // Stored only once JetStream says so; there, Nats-Msg-Id dedupes a retry's copy.
            let ack = shared
                .jetstream
                .publish_with_headers(subject.clone(), nats_headers, payload)
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| {
                // Maybe the stream is gone: look again next time.
                forget_stream(shared, &subject);
                format!("not stored: {e}")
            })
        } else {
            shared
                .client
                .publish_with_headers(subject.clone(), nats_headers, payload)
                .await
                .map_err(|e| e.to_string())?;
            shared.client.flush().await.map_err(|e| e.to_string())
        }
    };
    tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| format!("no confirmation within {timeout:?}"))?
}

/// How long whether a subject is captured by a stream is remembered.
const STREAM_LOOKUP_TTL: Duration = Duration::from_secs(10);

/// Whether a JetStream stream stores `subject` (asked of the server, remembered for a while).
async fn captured_by_stream(shared: &Shared, subject: &str) -> Result<bool, String> {
    if let Some((at, captured)) = shared
        .reply_streams
        .lock()
        .expect("reply streams lock")
        .get(subject)
        && at.elapsed() < STREAM_LOOKUP_TTL
    {
        return Ok(*captured);
    }
    use async_nats::jetstream::context::GetStreamByNameErrorKind as K;
    let captured = match shared.jetstream.stream_by_subject(subject).await {
        Ok(_) => true,
        Err(e) if e.kind() == K::NotFound => false,
        Err(e) => return Err(format!("stream lookup: {e}")),
    };
    let mut cache = shared.reply_streams.lock().expect("reply streams lock");
    if cache.len() >= 4096 {
        // Per-request reply subjects: keep the map bounded.
        cache.clear();
    }
    cache.insert(subject.to_string(), (Instant::now(), captured));
    Ok(captured)
}

fn forget_stream(shared: &Shared, subject: &str) {
    shared
        .reply_streams
        .lock()
        .expect("reply streams lock")
        .remove(subject);
}

async fn dead_letter(
    shared: &Shared,
    msg: &jetstream::Message,
    position: &Position,
    id: &str,
    deliveries: i64,
    reason: &str,
    attempt: &Attempt,
) -> Result<(), String> {
    let config = &shared.config;
    let subject = config
        .dlq_subject
        .replace("{stream}", &config.stream)
        .replace("{subject}", msg.subject.as_str());
    let mut headers = dead_letter_headers(msg.headers.as_ref());
    // One dead letter per message even if this runs twice (e.g. the term below is lost). The
    // stream position, not the event id: ids are unique only per source, and may be missing.
    headers.insert(
        "Nats-Msg-Id",
        format!("dlq:{}:{}", position.stream, position.sequence).as_str(),
    );
    headers.insert("Dlq-Reason", reason);
    headers.insert("Dlq-Deliveries", deliveries.to_string().as_str());
    headers.insert("Dlq-Original-Subject", msg.subject.as_str());
    if let Attempt::Answered { body, .. } = attempt {
        // The function's JSON error says why; keep a bounded copy.
        let detail: String = String::from_utf8_lossy(body).chars().take(512).collect();
        headers.insert("Dlq-Response", detail.replace(['\r', '\n'], " ").as_str());
    }
    let published = match shared
        .jetstream
        .publish_with_headers(subject.clone(), headers, msg.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    published?;
    let _ = msg.ack_with(AckKind::Term).await;
    shared
        .metrics
        .settled
        .add(1, &[KeyValue::new("outcome", "dead_lettered")]);
    tracing::warn!(id, %subject, reason, "dead-lettered");
    Ok(())
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
}
