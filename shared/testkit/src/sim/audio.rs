//! Audio endpoints: OpenAI-style transcription, and TTS in both the Coqui
//! (`/api/tts`) and OpenAI (`/v1/audio/speech`) styles.

use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Multipart, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, SimConfig, fnv1a, parse_json};
use crate::wav;

/// Synthesized speech never lasts less than this, so even one character yields
/// audio long enough for players and duration checks to notice.
const MIN_SPEECH_MS: u64 = 100;
/// Longer requests are refused instead of allocating unbounded audio.
const MAX_SPEECH_MS: u64 = 10 * 60 * 1000;

pub(super) async fn transcriptions(
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|err| {
        ApiError::bad_request(format!("expected a multipart/form-data body: {err}"))
    })?;
    let mut file: Option<Bytes> = None;
    let mut language: Option<String> = None;
    let mut response_format: Option<String> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|err| ApiError::bad_request(format!("malformed multipart body: {err}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        let value = field.bytes().await.map_err(|err| {
            ApiError::bad_request(format!("malformed multipart field {name:?}: {err}"))
        })?;
        match name.as_str() {
            "file" => file = Some(value),
            "language" => language = Some(String::from_utf8_lossy(&value).trim().to_owned()),
            "response_format" => {
                response_format = Some(String::from_utf8_lossy(&value).trim().to_owned())
            }
            // model, prompt, temperature, ...: accepted, and irrelevant to the simulation.
            _ => {}
        }
    }
    let file = file.ok_or_else(|| ApiError::bad_request("missing multipart field \"file\""))?;
    let info = wav::wav_info(&file).map_err(|err| {
        ApiError::bad_request(format!("file is not a WAV the simulator can read: {err:#}"))
    })?;

    let rate = u64::from(info.sample_rate);
    let duration_ms = (u64::from(info.frames) * 100 + rate / 2) / rate * 10;
    let text = format!("simulated transcript of {duration_ms} ms");
    let language = language
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "en".to_owned());
    match response_format
        .as_deref()
        .filter(|f| !f.is_empty())
        .unwrap_or("json")
    {
        "json" => Ok(Json(json!({ "text": text })).into_response()),
        "text" => Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()),
        "verbose_json" => {
            let duration = duration_ms as f64 / 1000.0;
            Ok(Json(json!({
                "task": "transcribe",
                "language": language,
                "duration": duration,
                "text": text,
                "segments": [{ "id": 0, "start": 0.0, "end": duration, "text": text }],
            }))
            .into_response())
        }
        other => Err(ApiError::bad_request(format!(
            "response_format {other:?} is not supported by the simulator; use json, text or verbose_json"
        ))),
    }
}

/// A WAV "speaking" `text`: a tone whose pitch identifies the text, lasting
/// `ms_per_char` per character divided by `speed`.
fn speak(config: SimConfig, text: &str, speed: f64) -> Result<Response, ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "text to synthesize must not be empty",
        ));
    }
    let chars = text.chars().count() as u64;
    let nominal_ms = chars.saturating_mul(u64::from(config.ms_per_char));
    let duration_ms = ((nominal_ms as f64 / speed).round() as u64).max(MIN_SPEECH_MS);
    if duration_ms > MAX_SPEECH_MS {
        return Err(ApiError::bad_request(format!(
            "text would synthesize to {duration_ms} ms, above the simulator's limit of {MAX_SPEECH_MS} ms"
        )));
    }
    let freq_hz = 200.0 + (fnv1a(text.as_bytes()) % 801) as f32;
    let duration_ms =
        u32::try_from(duration_ms).map_err(|_| ApiError::bad_request("text too long"))?;
    let audio = wav::sine_wav(duration_ms, config.sample_rate, freq_hz);
    Ok(([(header::CONTENT_TYPE, "audio/wav")], audio).into_response())
}

/// `speaker_id`, `language_id` and `style_wav` are accepted (serde ignores them):
/// the simulated voice depends on the text alone.
#[derive(Deserialize, Default)]
pub(super) struct CoquiParams {
    #[serde(default)]
    text: Option<String>,
}

/// Coqui's server reads `text` from a header first, then the query string, then a
/// form body; an empty value counts as absent.
pub(super) async fn coqui_tts(
    State(config): State<SimConfig>,
    headers: HeaderMap,
    query: Result<Query<CoquiParams>, QueryRejection>,
    form: Result<Form<CoquiParams>, FormRejection>,
) -> Result<Response, ApiError> {
    let query = query
        .map_err(|err| ApiError::bad_request(format!("malformed query string: {err}")))?
        .0;
    // A POST without a form body is fine: the parameters may all be in the query.
    let form = form.map(|Form(form)| form).unwrap_or_default();
    let text = headers
        .get("text")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .into_iter()
        .chain(query.text)
        .chain(form.text)
        .find(|text| !text.is_empty())
        .unwrap_or_default();
    speak(config, &text, 1.0)
}

#[derive(Deserialize)]
struct SpeechRequest {
    input: String,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    speed: Option<f64>,
}

pub(super) async fn openai_speech(
    State(config): State<SimConfig>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SpeechRequest = parse_json(&body)?;
    if let Some(format) = request.response_format.as_deref()
        && format != "wav"
    {
        return Err(ApiError::bad_request(format!(
            "response_format {format:?} is not supported by the simulator; use \"wav\""
        )));
    }
    let speed = request.speed.unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return Err(ApiError::bad_request("speed must be between 0.25 and 4.0"));
    }
    speak(config, &request.input, speed)
}
