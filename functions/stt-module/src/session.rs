//! Session streaming: chunks of one session, any replica, state in a NATS KV bucket.
//!
//! The state of a session (next expected `seq`, pending 16 kHz audio, the VAD segmenter) is one
//! MessagePack value under the session's key. Each chunk reads it, appends its audio, lets the
//! segmenter close utterances, transcribes and publishes them, drops audio no future utterance
//! can need, and writes the state back *only if the revision is still the one it read*. A
//! concurrent writer makes that write fail: the chunk is answered 409 and redelivered, and
//! then sees the other writer's state. Transcripts are published before the write, with
//! `Nats-Msg-Id` `{session_id}.{start_ms}` (where the utterance starts in the session, fixed
//! by the saved segmenter state), so a retried chunk's republish is dropped by a JetStream
//! stream (at least once, never lost). `utterance_seq` numbers every utterance the segmenter
//! closes, in order; one with no words is not published, so the numbers can skip.
//!
//! A chunk whose audio is rejected (422, dead-lettered) is recorded as skipped in its turn:
//! `next_seq` moves past it in the same revision-checked write, the segmenter is untouched,
//! and the session goes on with the next chunk.
//!
//! A chunk that never reaches this code (refused as unreadable or over the body cap before
//! its session is known, or lost with a session whose state expired) leaves a gap: later
//! chunks are answered 409 while the session waits for it, from the first such answer
//! (`gap_since_ms`, stored, so every replica counts the same wait) for `STT_SESSION_GAP_MS`.
//! Then the missing seqs count as lost, like rejected ones, and the waiting chunk goes on.
//! Skipped and lost seqs are reported in the next transcript published (`skipped_seqs`, as
//! inclusive ranges, and `skipped_total` for the session so far) and in each chunk's answer.

use std::sync::Arc;
use std::time::Duration;

use crate::vad::{Segmenter, Span, VAD_RATE};
use async_nats::jetstream::kv;
use audio::AudioBytes;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use handler_kit::HandlerError;
use handler_kit::event::bytes_field;
use handler_kit::nats::subject;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::{Config, State};

/// `ai.stt.chunk` data; the audio is read in place by `audio_field`.
#[derive(Debug, Deserialize)]
pub(crate) struct Chunk {
    session_id: String,
    seq: u64,
    #[allow(dead_code)] // optional; read by `audio_field`
    #[serde(default)]
    audio: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "final")]
    is_final: bool,
    language: Option<String>,
    prompt: Option<String>,
}

/// The most seq ranges a transcript lists as skipped; more are only counted.
const MAX_SKIPPED_RANGES: usize = 16;

/// What a session keeps between chunks. Missing fields load as their defaults, so a state
/// written before a field existed still loads during a rolling update.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Session {
    next_seq: u64,
    /// Utterances closed so far, with or without words.
    utterance_seq: u64,
    /// Session time (ms) of the first pending sample.
    offset_ms: u64,
    /// Pending 16 kHz mono audio, little-endian i16.
    #[serde(with = "bytes_field")]
    pending: Vec<u8>,
    segmenter: Segmenter,
    finished: bool,
    /// Wall-clock ms (Unix) when a later chunk first found `next_seq` missing; 0: no gap.
    gap_since_ms: u64,
    /// Seqs skipped (rejected or lost) in the session so far.
    skipped_total: u64,
    /// Skipped seq ranges (inclusive) not yet reported in a transcript.
    unreported: Vec<[u64; 2]>,
}

impl Session {
    /// Records seqs `first..=last` as skipped.
    fn skip(&mut self, first: u64, last: u64) {
        self.skipped_total += last - first + 1;
        if let Some(range) = self.unreported.last_mut().filter(|r| r[1] + 1 == first) {
            range[1] = last;
        } else if self.unreported.len() < MAX_SKIPPED_RANGES {
            self.unreported.push([first, last]);
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ai.stt.transcript.{session_id}` messages.
#[derive(Debug, Serialize)]
struct Transcript<'a> {
    session_id: &'a str,
    utterance_seq: u64,
    text: &'a str,
    start_ms: u64,
    end_ms: u64,
    /// Seqs skipped since the previous transcript (rejected audio, or lost to the gap
    /// timeout), as inclusive ranges; at most 16, the rest only counted in `skipped_total`.
    skipped_seqs: &'a [[u64; 2]],
    /// Seqs skipped in the session so far.
    skipped_total: u64,
}

/// The answer to a chunk (202: nothing to reply; transcripts go to NATS).
#[derive(Debug, Serialize)]
pub(crate) struct Accepted {
    session_id: String,
    seq: u64,
    duplicate: bool,
    utterances: u64,
    /// Seqs skipped in the session so far (rejected or lost).
    skipped_total: u64,
}

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        (StatusCode::ACCEPTED, Json(self)).into_response()
    }
}

/// The KV bucket, opened (or created) on first use.
#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    bucket: String,
    ttl: Duration,
    gap: Duration,
    store: Arc<OnceCell<kv::Store>>,
}

impl Sessions {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            bucket: config.session_bucket.clone(),
            ttl: config.session_ttl,
            gap: config.session_gap,
            store: Arc::default(),
        }
    }

    async fn store(&self, client: &async_nats::Client) -> Result<&kv::Store, HandlerError> {
        self.store
            .get_or_try_init(|| async {
                handler_kit::nats::open_or_create_kv(client, &self.bucket, self.ttl)
                    .await
                    .map_err(|e| unavailable(&e))
            })
            .await
    }
}

fn unavailable(reason: &str) -> HandlerError {
    HandlerError::Unavailable {
        backend: "nats-kv",
        reason: reason.to_string(),
        retry_after: Duration::from_secs(2),
    }
}

fn valid_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn samples_from(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn bytes_from(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

const SAMPLES_PER_MS: u64 = VAD_RATE as u64 / 1000;

pub(crate) async fn handle_chunk(
    state: &State,
    chunk: Chunk,
    audio: AudioBytes<'_>,
) -> Result<Accepted, HandlerError> {
    if !valid_session_id(&chunk.session_id) {
        return Err(HandlerError::Unprocessable(
            "session_id must be 1-128 letters, digits, '-' or '_'".into(),
        ));
    }
    let Some(client) = state.nats.client() else {
        return Err(HandlerError::Unprocessable(
            "session streaming keeps state in NATS, and NATS_URL is not set".into(),
        ));
    };
    state.nats.max_payload().await?;
    // Decode before touching shared state: bad audio is the chunk's fault alone. It is still
    // answered with its 4xx, but only after its seq is recorded as skipped below: otherwise the
    // session would wait for it forever and every later chunk would get 409 until the TTL.
    let decoded = if audio.is_empty() && chunk.is_final {
        Ok(Vec::new())
    } else {
        state.stt.prepare_audio(&audio)
    };
    drop(audio);
    let (samples, rejected) = match decoded {
        Ok(samples) => (samples, None),
        Err(e) if e.class().is_retryable() => return Err(e),
        Err(e) => (Vec::new(), Some(e)),
    };
    let store = state.sessions.store(client).await?;
    let key = chunk.session_id.as_str();
    let entry = store
        .entry(key)
        .await
        .map_err(|e| unavailable(&e.to_string()))?;
    let (mut session, revision) = match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let session: Session = rmp_serde::from_slice(&e.value).map_err(|err| {
                HandlerError::Internal(format!("session state unreadable: {err}"))
            })?;
            (session, Some(e.revision))
        }
        _ => (Session::default(), None),
    };
    let accepted = |duplicate, s: &Session| Accepted {
        session_id: chunk.session_id.clone(),
        seq: chunk.seq,
        duplicate,
        utterances: s.utterance_seq,
        skipped_total: s.skipped_total,
    };
    if chunk.seq < session.next_seq || session.finished {
        // A redelivery: of a skipped chunk, its error again; else the duplicate is ignored.
        return match rejected {
            Some(e) => Err(e),
            None => Ok(accepted(true, &session)),
        };
    }
    // Even a rejected chunk waits for its predecessor: it can only be skipped in its turn.
    if chunk.seq > session.next_seq {
        let now = now_ms();
        if session.gap_since_ms == 0 {
            // The wait starts now, for every replica: stored before the 409.
            session.gap_since_ms = now.max(1);
            write(store, key, &session, revision).await?;
        }
        let waited = Duration::from_millis(now.saturating_sub(session.gap_since_ms));
        if waited < state.sessions.gap {
            return Err(HandlerError::Conflict(format!(
                "session {} expects seq {} before {} (waiting {} ms of STT_SESSION_GAP_MS={})",
                chunk.session_id,
                session.next_seq,
                chunk.seq,
                waited.as_millis(),
                state.sessions.gap.as_millis()
            )));
        }
        tracing::warn!(
            session_id = key,
            lost_from = session.next_seq,
            lost_to = chunk.seq - 1,
            "chunks never arrived within STT_SESSION_GAP_MS: counted as lost"
        );
        session.skip(session.next_seq, chunk.seq - 1);
        session.next_seq = chunk.seq;
    }
    session.gap_since_ms = 0;
    if rejected.is_some() {
        session.skip(chunk.seq, chunk.seq);
    }

    let vad = &state.stt.config().vad;
    let mut pending = samples_from(&session.pending);
    pending.extend_from_slice(&samples);
    // A skipped chunk adds no audio and leaves the segmenter as it was; a skipped final chunk
    // still ends the session (its last utterance is transcribed).
    let mut spans = if rejected.is_some() {
        Vec::new()
    } else {
        session.segmenter.push(vad, &samples)
    };
    if chunk.is_final {
        spans.extend(session.segmenter.finish(vad));
    }
    let transcript_subject = subject(&state.config.transcript_subject, &[("session_id", key)]);
    // Sent as they are transcribed; one wait for all of them before the state is written.
    let mut transcripts = state.nats.outbox();
    for span in spans {
        // Every utterance gets a number, even one with no words (not published), so a retried
        // chunk numbers its utterances the same way whatever the backend answered.
        let utterance_seq = session.utterance_seq;
        session.utterance_seq += 1;
        let relative = Span {
            start_ms: span.start_ms.saturating_sub(session.offset_ms),
            end_ms: span.end_ms.saturating_sub(session.offset_ms),
        };
        let text = state
            .stt
            .transcribe_span(
                &pending,
                relative,
                chunk.language.as_deref(),
                chunk.prompt.as_deref(),
            )
            .await?;
        if text.is_empty() {
            continue;
        }
        let message = Transcript {
            session_id: key,
            utterance_seq,
            text: &text,
            start_ms: span.start_ms,
            end_ms: span.end_ms,
            skipped_seqs: &session.unreported,
            skipped_total: session.skipped_total,
        };
        // Named by where the utterance starts in the session, which the segmenter's saved state
        // fixes: a retry of this chunk republishes each utterance under the same id, so the
        // stream's dedupe drops copies and never a different utterance.
        let msg_id = format!("{key}.{}", span.start_ms);
        transcripts
            .publish(transcript_subject.clone(), &message, Some(&msg_id))
            .await?;
        session.unreported.clear();
    }
    transcripts.kept().await?;

    // Keep only audio a future utterance can still need.
    let keep_from = session.segmenter.keep_from_ms(vad).max(session.offset_ms);
    let drop = usize::try_from((keep_from - session.offset_ms) * SAMPLES_PER_MS)
        .unwrap_or(usize::MAX)
        .min(pending.len());
    pending.drain(..drop);
    session.offset_ms += drop as u64 / SAMPLES_PER_MS;
    session.pending = bytes_from(&pending);
    session.next_seq = chunk.seq + 1;
    if chunk.is_final {
        // A tombstone, not a delete: a redelivered chunk of a finished session is still a duplicate.
        session.finished = true;
        session.pending.clear();
    }
    write(store, key, &session, revision).await?;
    match rejected {
        Some(e) => Err(e),
        None => Ok(accepted(false, &session)),
    }
}

/// Writes `session` under `key` if the revision is still `revision` (or, with none, if the
/// key does not exist yet); another writer in between is a 409, so the chunk is retried.
async fn write(
    store: &kv::Store,
    key: &str,
    session: &Session,
    revision: Option<u64>,
) -> Result<(), HandlerError> {
    let value: bytes::Bytes = rmp_serde::to_vec_named(session)
        .map_err(|e| HandlerError::Internal(e.to_string()))?
        .into();
    match revision {
        Some(rev) => store
            .update(key, value, rev)
            .await
            .map(|_| ())
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    HandlerError::Conflict("session changed by another replica".into())
                } else {
                    unavailable(&e.to_string())
                }
            }),
        None => store.create(key, value).await.map(|_| ()).map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists {
                HandlerError::Conflict("session created by another replica".into())
            } else {
                unavailable(&e.to_string())
            }
        }),
    }
}
