//! Ordered audio on a NATS subject: `{request_id, seq, audio, text?, done}` messages.
//!
//! Consumers play audio as it arrives, so every message is a playable WAV on its own, and
//! none is larger than the server's `max_payload`: long audio is cut into several messages
//! on frame boundaries. `seq` counts messages from 0; `done` marks the last. Each message's
//! `Nats-Msg-Id` is `{request_id}.{seq}`, so a redelivered event publishing the same stream
//! again is deduplicated by a JetStream stream.
//!
//! Pieces go out as they are ready, through one [`Outbox`]: none waits for its PubAck, and
//! [`AudioStream::publish_reply`] waits for all of them and the reply together.

use serde::Serialize;

use audio::Wav;
use handler_kit::HandlerError;
use handler_kit::event::bytes_field;
use handler_kit::nats::{Nats, Outbox};

/// Room for the msgpack envelope (ids, keys, numbers, a sentence) around the audio bytes.
pub const ENVELOPE_ROOM: usize = 4 * 1024;

#[derive(Debug, Serialize)]
struct AudioChunk<'a> {
    request_id: &'a str,
    seq: u64,
    #[serde(with = "bytes_field")]
    audio: &'a [u8],
    /// The text this audio speaks (on the first piece of a sentence), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    done: bool,
}

/// A reply that carries audio, which may be too large for one NATS message.
pub trait AudioReply: Serialize {
    /// The reply's audio bytes.
    fn audio_mut(&mut self) -> &mut Vec<u8>;
    /// Where the audio is instead, when it is not inline.
    fn audio_subject_mut(&mut self) -> &mut Option<String>;
}

/// Publishes audio in order to one subject.
#[derive(Debug)]
pub struct AudioStream<'a> {
    nats: &'a Nats,
    outbox: Outbox<'a>,
    max_payload: usize,
    subject: String,
    request_id: String,
    seq: u64,
}

impl<'a> AudioStream<'a> {
    /// A stream to `subject`; `max_payload` from [`Nats::max_payload`].
    pub fn new(nats: &'a Nats, max_payload: usize, subject: String, request_id: &str) -> Self {
        Self {
            nats,
            outbox: nats.outbox(),
            max_payload,
            subject,
            request_id: request_id.to_string(),
            seq: 0,
        }
    }

    /// The subject messages go to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Whether `audio_bytes` of audio fit in one message with its envelope.
    pub fn fits(&self, audio_bytes: usize) -> bool {
        audio_bytes + ENVELOPE_ROOM <= self.max_payload
    }

    /// Publishes `reply` to `subject` with `Nats-Msg-Id` `msg_id`, then waits until it and
    /// every piece of the stream are kept (stored by a stream, or flushed). When its audio
    /// does not fit in one message it goes without it, pointing to this stream's subject
    /// instead: the caller has put the audio there. `reply` is left as it was.
    pub async fn publish_reply<R: AudioReply>(
        &mut self,
        subject: String,
        msg_id: &str,
        reply: &mut R,
    ) -> Result<(), HandlerError> {
        if self.fits(reply.audio_mut().len()) {
            self.outbox.publish(subject, &*reply, Some(msg_id)).await?;
        } else {
            let audio = std::mem::take(reply.audio_mut());
            *reply.audio_subject_mut() = Some(self.subject.clone());
            let published = self.outbox.publish(subject, &*reply, Some(msg_id)).await;
            *reply.audio_mut() = audio;
            *reply.audio_subject_mut() = None;
            published?;
        }
        self.outbox.kept().await
    }

    /// Messages published so far.
    pub fn published(&self) -> usize {
        usize::try_from(self.seq).unwrap_or(usize::MAX)
    }

    /// Ends a stream whose last piece was sent without `last`: a message with empty `audio`
    /// and `done: true` (used when the end is only known after the audio, as when speech is
    /// synthesized while an LLM is still writing).
    pub async fn end(&mut self) -> Result<(), HandlerError> {
        if !self.nats.is_enabled() {
            return Ok(());
        }
        let chunk = AudioChunk {
            request_id: &self.request_id,
            seq: self.seq,
            audio: &[],
            text: None,
            done: true,
        };
        self.outbox
            .publish_chunk(
                self.subject.clone(),
                &self.request_id,
                &mut self.seq,
                &chunk,
            )
            .await
    }

    /// Publishes `wav` (cut to fit), with `text` on its first piece; `last` marks the end.
    pub async fn send(
        &mut self,
        wav: &Wav,
        text: Option<&str>,
        last: bool,
    ) -> Result<(), HandlerError> {
        if !self.nats.is_enabled() {
            return Ok(());
        }
        let pieces = wav
            .split(self.max_payload.saturating_sub(ENVELOPE_ROOM))
            .map_err(|e| HandlerError::Internal(format!("splitting WAV: {e}")))?;
        let count = pieces.len();
        for (i, audio) in pieces.iter().enumerate() {
            let chunk = AudioChunk {
                request_id: &self.request_id,
                seq: self.seq,
                audio,
                text: if i == 0 { text } else { None },
                done: last && i + 1 == count,
            };
            self.outbox
                .publish_chunk(
                    self.subject.clone(),
                    &self.request_id,
                    &mut self.seq,
                    &chunk,
                )
                .await?;
        }
        Ok(())
    }
}
