//! Text-to-speech client: Coqui's `/api/tts` or the OpenAI-style `/v1/audio/speech`.
//!
//! Both answer with a WAV file for one piece of text. The client returns it parsed, so a
//! backend that answers with something other than audio is caught here, at the boundary.

use audio::Wav;
use handler_kit::HandlerError;
use handler_kit::config::ConfigReader;
use handler_kit::resilience::{Backend, BackendConfig, CallError};

/// Which HTTP API the TTS server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtsApi {
    /// Coqui TTS server: `GET /api/tts?text=&speaker_id=&language_id=`.
    Coqui,
    /// OpenAI-compatible: `POST /v1/audio/speech {model, input, voice, response_format}`.
    OpenAi,
}

/// Configuration of the TTS backend.
#[derive(Debug, Clone)]
pub struct TtsConfig {
    /// `TTS_URL` (required): base URL of the TTS server, e.g. `http://coqui:5002`.
    pub url: String,
    /// `TTS_API` (default `coqui`): `coqui` or `openai`.
    pub api: TtsApi,
    /// `TTS_MODEL` (default `tts-1`): model name sent to OpenAI-style servers.
    pub model: String,
    /// `TTS_VOICE` (optional): voice (OpenAI) or speaker id (Coqui) when a request names none.
    pub default_voice: Option<String>,
    /// `TTS_LANGUAGE` (optional): language id when a request names none (multilingual Coqui).
    pub default_language: Option<String>,
    /// `TTS_TIMEOUT_MS`, `TTS_CONCURRENCY`, `TTS_QUEUE_TIMEOUT_MS`, `TTS_BREAKER_*`, and
    /// `TTS_MAX_RESPONSE_BYTES` (default 16 MiB): the largest WAV taken for one piece. A piece
    /// is at most `TTS_MAX_CHUNK_CHARS` (default 300) characters, about 20 s of speech at 15
    /// characters a second; 16 MiB holds 43 s of 48 kHz stereo 32-bit float, the largest
    /// common WAV, so twice that.
    pub backend: BackendConfig,
}

impl TtsConfig {
    /// Reads the `TTS_*` variables.
    pub fn read(r: &mut ConfigReader) -> Self {
        let api = match r.choice("TTS_API", "coqui", &["coqui", "openai"]).as_str() {
            "openai" => TtsApi::OpenAi,
            _ => TtsApi::Coqui,
        };
        Self {
            url: r.http_url("TTS_URL", "base URL of the TTS server"),
            api,
            model: r.string("TTS_MODEL", "tts-1"),
            default_voice: r.optional("TTS_VOICE"),
            default_language: r.optional("TTS_LANGUAGE"),
            backend: BackendConfig::read(
                r,
                "TTS",
                BackendConfig {
                    max_response_bytes: 16 * 1024 * 1024,
                    ..BackendConfig::default()
                },
            ),
        }
    }
}

/// What to say and how.
#[derive(Debug, Clone, Default)]
pub struct Speech<'a> {
    /// The text of one piece (a sentence or a few).
    pub text: &'a str,
    /// Voice name (OpenAI) or speaker (Coqui).
    pub voice: Option<&'a str>,
    /// Coqui speaker id; takes precedence over `voice` for Coqui.
    pub speaker_id: Option<&'a str>,
    /// Language id for multilingual models.
    pub language: Option<&'a str>,
}

/// A guarded TTS client.
#[derive(Debug, Clone)]
pub struct TtsClient {
    http: reqwest::Client,
    config: TtsConfig,
    backend: Backend,
}

impl TtsClient {
    /// A client for `config`, sharing `http` with the function's other clients.
    pub fn new(http: reqwest::Client, config: TtsConfig) -> Self {
        let backend = Backend::new("tts", config.backend.clone());
        Self {
            http,
            config,
            backend,
        }
    }

    /// Synthesizes one piece of text.
    pub async fn synthesize(&self, speech: &Speech<'_>) -> Result<Wav, HandlerError> {
        let config = &self.config;
        let voice = speech.voice.or(config.default_voice.as_deref());
        let language = speech.language.or(config.default_language.as_deref());
        let request = match config.api {
            TtsApi::Coqui => {
                let mut query = vec![("text", speech.text)];
                if let Some(speaker) = speech.speaker_id.or(voice) {
                    query.push(("speaker_id", speaker));
                }
                if let Some(language) = language {
                    query.push(("language_id", language));
                }
                self.http
                    .get(format!("{}/api/tts", config.url))
                    .query(&query)
            }
            TtsApi::OpenAi => self
                .http
                .post(format!("{}/v1/audio/speech", config.url))
                .json(&serde_json::json!({
                    "model": config.model,
                    "input": speech.text,
                    "voice": voice.unwrap_or("alloy"),
                    "response_format": "wav",
                })),
        };
        let limit = config.backend.max_response_bytes;
        self.backend
            .call(async move {
                let response = handler_kit::http::check(request.send().await).await?;
                let bytes = handler_kit::http::read_body(response, limit).await?;
                Wav::parse(&bytes).map_err(|e| CallError::Transient(format!("answered with {e}")))
            })
            .await
    }
}
