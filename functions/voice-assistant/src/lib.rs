//! voice-assistant: speech in, speech out.
//!
//! `ai.voice.request {request_id?, audio, language?, voice?, speaker_id?, ...chat options}`:
//! the audio is transcribed (the same VAD + STT code as stt-module), the transcript goes through
//! the chat pipeline (the same as chat-handler), and as the LLM streams, each finished sentence
//! is synthesized and its audio published, in order, to `ai.voice.response.stream.{request_id}`
//! (`{request_id, seq, audio, text, done}`; the last message has empty `audio` and `done: true`).
//! Time to first audio is the figure that matters: the first sentence is spoken while the LLM
//! is still writing the rest.
//!
//! The reply `ai.voice.response {request_id, transcript, response, audio, sources, timings_ms
//! {stt, ttft, first_audio, total}}` is also published to `ai.voice.response.{request_id}`;
//! there, audio over NATS' max payload is replaced by `audio_subject`, the stream that already
//! carries it.
//!
//! # Layout
//! - [`Config`], [`State`], [`app`].
//! - `handle`: one event; `SentenceFeed`: LLM deltas -> sentences; `speak_in_order`: sentences
//!   -> TTS (bounded parallelism, order kept) -> the audio stream.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audio::{AudioBytes, Wav};
use axum::Router;
use axum::extract::State as Extract;
use axum::routing::post;
use chat_handler::rag::{Chat, ChatConfig, ChatRequest, DeltaSink, SourceDoc};
use futures::StreamExt as _;
use handler_kit::config::{BaseConfig, ConfigReader};
use handler_kit::event::bytes_field;
use handler_kit::nats::{Nats, subject};
use handler_kit::serve::{Health, function_router};
use handler_kit::{CloudEvent, HandlerError, Reply};
use serde::{Deserialize, Serialize};
use stt_module::stt::{SttClient, SttConfig, audio_field};
use tokio::sync::mpsc;
use tts_module::stream::{AudioReply, AudioStream};
use tts_module::text::SentenceBuffer;
use tts_module::tts::{Speech, TtsClient, TtsConfig};

/// The CloudEvent type this function accepts.
pub const REQUEST_TYPE: &str = "ai.voice.request";
/// The CloudEvent type of its replies.
pub const RESPONSE_TYPE: &str = "ai.voice.response";

/// voice-assistant's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shared settings (`MAX_BODY_BYTES` default 32 MiB for audio, ...).
    pub base: BaseConfig,
    /// Speech to text (`STT_*`, VAD settings included).
    pub stt: SttConfig,
    /// The chat pipeline (`CHAT_*`, `LLM_*`, `EMBED_*`, `RERANK_*`, `MILVUS_*`).
    pub chat: ChatConfig,
    /// Text to speech (`TTS_*`).
    pub tts: TtsConfig,
    /// `VOICE_MAX_SENTENCE_CHARS` (default 300): longer sentences are spoken in pieces.
    pub max_sentence_chars: usize,
    /// `VOICE_TTS_PARALLELISM` (default 2): sentences synthesized at once.
    pub tts_parallelism: usize,
    /// `VOICE_REPLY_SUBJECT` (default `ai.voice.response.{request_id}`).
    pub reply_subject: String,
    /// `VOICE_STREAM_SUBJECT` (default `ai.voice.response.stream.{request_id}`).
    pub stream_subject: String,
}

impl Config {
    /// Reads every variable; problems are collected by `r`.
    pub fn read(r: &mut ConfigReader) -> Self {
        Self {
            base: BaseConfig::read(r, "voice-assistant", 32 * 1024 * 1024),
            stt: SttConfig::read(r),
            chat: ChatConfig::read(r),
            tts: TtsConfig::read(r),
            max_sentence_chars: r.positive("VOICE_MAX_SENTENCE_CHARS", 300),
            tts_parallelism: r.positive("VOICE_TTS_PARALLELISM", 2),
            reply_subject: r.string("VOICE_REPLY_SUBJECT", "ai.voice.response.{request_id}"),
            stream_subject: r.string(
                "VOICE_STREAM_SUBJECT",
                "ai.voice.response.stream.{request_id}",
            ),
        }
    }
}

/// Shared by every request.
#[derive(Debug, Clone)]
pub struct State {
    config: Arc<Config>,
    stt: SttClient,
    chat: Chat,
    tts: TtsClient,
    nats: Nats,
    health: Arc<Health>,
}

impl State {
    /// Builds clients; NATS connects in the background so this never waits on the network.
    pub async fn new(config: Config) -> Result<Self, HandlerError> {
        let http = handler_kit::http::client(Duration::from_secs(5))?;
        let nats = Nats::connect(config.base.nats.as_ref(), "voice-assistant").await?;
        Ok(Self {
            stt: SttClient::new(http.clone(), config.stt.clone()),
            chat: Chat::new(http.clone(), config.chat.clone()),
            tts: TtsClient::new(http, config.tts.clone()),
            config: Arc::new(config),
            nats,
            health: Health::new(),
        })
    }

    /// Readiness, shared with the server so draining shows on `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }
}

handler_kit::function!("voice-assistant");

/// The function's router: `POST /` plus the standard endpoints.
pub fn app(state: State) -> Router {
    let limit = state.config.base.max_body_bytes;
    let health = state.health.clone();
    let events = Router::new().route("/", post(handle)).with_state(state);
    function_router(events, health, limit)
}

/// `ai.voice.request` data: audio, voice options, and every chat option. The audio is checked
/// here and read in place, where it lies in the event, by [`audio_field`].
#[derive(Debug, Deserialize)]
struct VoiceRequest {
    #[allow(dead_code)] // required; read by `audio_field`
    audio: serde::de::IgnoredAny,
    language: Option<String>,
    voice: Option<String>,
    speaker_id: Option<String>,
    #[serde(flatten)]
    chat: ChatRequest,
}

/// Milliseconds per stage.
#[derive(Debug, Default, Serialize)]
struct Timings {
    stt: u64,
    ttft: u64,
    first_audio: u64,
    total: u64,
}

/// `ai.voice.response` data.
#[derive(Debug, Serialize)]
struct VoiceResponse {
    request_id: String,
    transcript: String,
    response: String,
    #[serde(with = "bytes_field", skip_serializing_if = "Vec::is_empty")]
    audio: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_subject: Option<String>,
    sources: Vec<SourceDoc>,
    timings_ms: Timings,
}

impl AudioReply for VoiceResponse {
    fn audio_mut(&mut self) -> &mut Vec<u8> {
        &mut self.audio
    }

    fn audio_subject_mut(&mut self) -> &mut Option<String> {
        &mut self.audio_subject
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn handle(Extract(state): Extract<State>, event: CloudEvent) -> Result<Reply, HandlerError> {
    event.expect_type(&[REQUEST_TYPE])?;
    let request: VoiceRequest = event.data()?;
    let audio = audio_field(&event)?;
    let request_id = event.request_id(request.chat.request_id.as_deref())?;
    let deadline = EventDeadline::starting_now(state.config.base.event_timeout);
    let response = answer(&state, request, &audio, request_id, deadline).await?;
    event.reply(RESPONSE_TYPE, &state.config.base.source, &response)
}

/// The event's one deadline (`EVENT_TIMEOUT_MS`), applied stage by stage inside [`answer`]
/// rather than around it, so that when it fires after audio was published the stream is still
/// ended and the failure made final (a retry would speak the answer twice).
#[derive(Debug, Clone, Copy)]
struct EventDeadline {
    at: tokio::time::Instant,
    budget: Duration,
}

impl EventDeadline {
    fn starting_now(budget: Duration) -> Self {
        Self {
            at: tokio::time::Instant::now() + budget,
            budget,
        }
    }

    /// Runs `work` until the deadline; past it, [`HandlerError::Deadline`] (retryable).
    async fn bound<T>(
        self,
        work: impl Future<Output = Result<T, HandlerError>>,
    ) -> Result<T, HandlerError> {
        tokio::time::timeout_at(self.at, work)
            .await
            .map_err(|_| HandlerError::Deadline(self.budget))?
    }
}

/// Makes a failure final once the listener heard part of the answer: a redelivery would
/// speak it again (the delivery contract's "a redelivery must never stream twice").
fn after_audio(published: usize, error: HandlerError) -> HandlerError {
    match error {
        e if published == 0 => e,
        e @ HandlerError::StreamInterrupted(_) => e,
        other => HandlerError::StreamInterrupted(other.to_string()),
    }
}

async fn answer(
    state: &State,
    request: VoiceRequest,
    audio: &AudioBytes<'_>,
    request_id: String,
    deadline: EventDeadline,
) -> Result<VoiceResponse, HandlerError> {
    let config = &state.config;
    let started = Instant::now();
    // Learn NATS' limit (and that NATS is up) before spending backend time.
    let max_payload = deadline.bound(state.nats.max_payload()).await?;

    let transcript = deadline
        .bound(
            state
                .stt
                .transcribe_recording(audio, request.language.as_deref(), None),
        )
        .await?;
    let stt_ms = ms(started.elapsed());
    if transcript.text.trim().is_empty() {
        return Err(HandlerError::Unprocessable(
            "no speech found in the audio".into(),
        ));
    }
    let mut chat_request = request.chat.clone();
    chat_request.message = transcript.text.clone();
    chat_request.validate(&config.chat)?;

    let stream_subject = subject(&config.stream_subject, &[("request_id", &request_id)]);
    let mut audio_stream = AudioStream::new(&state.nats, max_payload, stream_subject, &request_id);
    let (sentences_tx, sentences_rx) = mpsc::unbounded_channel();
    let mut feed = SentenceFeed {
        buffer: SentenceBuffer::new(config.max_sentence_chars),
        sentences: Some(sentences_tx),
    };
    let voice = VoiceOptions {
        voice: request.voice.clone(),
        speaker_id: request.speaker_id.clone(),
        language: request.language.clone(),
    };
    let chatting = async {
        let result = state
            .chat
            .answer(&chat_request, &request_id, &mut feed)
            .await;
        feed.close();
        result
    };
    let speaking = speak_in_order(state, sentences_rx, &mut audio_stream, &voice, started);
    // Either side failing stops the other: no speaking for a failed answer, no LLM tokens
    // nobody will hear. The deadline ends both the same way, through the branch below.
    let joined = deadline
        .bound(async { tokio::try_join!(chatting, speaking) })
        .await;
    let (chat, spoken) = match joined {
        Ok(both) => both,
        Err(e) => {
            if audio_stream.published() > 0 {
                // The listener already heard part of the answer: end the stream, and make the
                // failure final so a redelivery does not speak it twice.
                let _ = audio_stream.end().await;
            }
            return Err(after_audio(audio_stream.published(), e));
        }
    };
    // From here on the whole answer was heard: any failure is final (a retry would speak it
    // again), and the deadline still applies.
    let published = audio_stream.published();
    let reply = async {
        audio_stream.end().await?;
        let merged = Wav::concat(spoken.wavs).map_err(|e| HandlerError::Backend {
            backend: "tts",
            detail: e,
        })?;
        let audio = match merged {
            Some(wav) => wav
                .to_bytes()
                .map_err(|e| HandlerError::Internal(format!("encoding WAV: {e}")))?,
            None => Vec::new(),
        };
        let mut response = VoiceResponse {
            request_id: request_id.clone(),
            transcript: transcript.text,
            response: chat.response,
            audio,
            audio_subject: None,
            sources: chat.sources,
            timings_ms: Timings {
                stt: stt_ms,
                ttft: stt_ms + chat.timings_ms.ttft,
                first_audio: spoken.first_audio.map_or(0, ms),
                total: ms(started.elapsed()),
            },
        };
        if state.nats.is_enabled() {
            // Audio over the max payload is already on the stream, sentence by sentence: the
            // reply points there.
            let reply_subject = subject(&config.reply_subject, &[("request_id", &request_id)]);
            audio_stream
                .publish_reply(reply_subject, &format!("{request_id}.reply"), &mut response)
                .await?;
        }
        Ok(response)
    };
    deadline
        .bound(reply)
        .await
        .map_err(|e| after_audio(published, e))
}

/// Cuts the LLM's deltas into sentences and hands them to the speaking side.
///
/// Text is never what the listener gets: only audio is, and only once published. So the feed is
/// not "visible" to [`Chat::answer`], whose LLM errors stay retryable; [`answer`] makes them
/// final when [`AudioStream::published`] says something was heard.
struct SentenceFeed {
    buffer: SentenceBuffer,
    sentences: Option<mpsc::UnboundedSender<String>>,
}

impl SentenceFeed {
    /// The answer is complete: what is left is the last sentence; then the channel closes.
    fn close(&mut self) {
        if let Some(tx) = self.sentences.take() {
            for sentence in self.buffer.finish() {
                let _ = tx.send(sentence);
            }
        }
    }
}

impl DeltaSink for SentenceFeed {
    async fn delta(&mut self, text: &str) -> Result<(), HandlerError> {
        if let Some(tx) = &self.sentences {
            for sentence in self.buffer.push(text) {
                // The speaking side only stops early when it has failed; its error wins.
                let _ = tx.send(sentence);
            }
        }
        Ok(())
    }

    fn visible(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
struct VoiceOptions {
    voice: Option<String>,
    speaker_id: Option<String>,
    language: Option<String>,
}

struct Spoken {
    wavs: Vec<Wav>,
    first_audio: Option<Duration>,
}

/// Synthesizes sentences as they come, a few at a time, publishing each in order.
async fn speak_in_order(
    state: &State,
    sentences: mpsc::UnboundedReceiver<String>,
    stream: &mut AudioStream<'_>,
    voice: &VoiceOptions,
    started: Instant,
) -> Result<Spoken, HandlerError> {
    let incoming = futures::stream::unfold(sentences, |mut rx| async move {
        rx.recv().await.map(|s| (s, rx))
    });
    let audio = incoming
        .map(|text| {
            let (tts, voice) = (state.tts.clone(), voice.clone());
            async move {
                let speech = Speech {
                    text: &text,
                    voice: voice.voice.as_deref(),
                    speaker_id: voice.speaker_id.as_deref(),
                    language: voice.language.as_deref(),
                };
                let wav = tts.synthesize(&speech).await;
                (text, wav)
            }
        })
        .buffered(state.config.tts_parallelism);
    let mut audio = std::pin::pin!(audio);
    let mut spoken = Spoken {
        wavs: Vec::new(),
        first_audio: None,
    };
    while let Some((text, wav)) = audio.next().await {
        let wav = wav?;
        stream.send(&wav, Some(&text), false).await?;
        spoken.first_audio.get_or_insert_with(|| started.elapsed());
        spoken.wavs.push(wav);
    }
    Ok(spoken)
}
