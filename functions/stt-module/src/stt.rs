//! Speech-to-text client: OpenAI-compatible `POST /v1/audio/transcriptions`.
//!
//! Whisper servers (OpenAI, faster-whisper-server, whisper.cpp's server, vLLM) all take a WAV
//! as multipart form data and answer `{"text": ...}`. Sending a whole recording is wasteful:
//! backends spend time on every second they get, and Whisper invents words in long silences.
//! So [`SttClient::transcribe_recording`] first brings the audio to 16 kHz mono, finds the
//! utterances with the VAD ([`crate::vad`]), and sends only those, a few at a time, putting the
//! texts back together in order.
//!
//! A recording is read where it lies in the request ([`audio_field`]) and decoded, downmixed,
//! resampled and segmented in one pass ([`audio::Downmix`]): besides the request body,
//! a request holds only its 16 kHz audio (32 KB per second, at most 19.2 MB at the default
//! `STT_MAX_AUDIO_MS`) and the segments in flight to the backend.

use std::borrow::Cow;

use cloudevents::event::Data;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::vad::{Segmenter, Span, VAD_RATE, VadConfig};
use audio::{AudioBytes, AudioReader, Downmix, encode_pcm16, format_tag};
use handler_kit::config::ConfigReader;
use handler_kit::event::{DataFormat, MAX_DATA_DEPTH};
use handler_kit::resilience::{Backend, BackendConfig, CallError};
use handler_kit::{CloudEvent, HandlerError};

/// How much of a file is read to find its `fmt ` chunk: headers put it first, after at most a
/// few small chunks.
const HEAD_BYTES: usize = 64 * 1024;

/// The `audio` field of an event's data, borrowed from the data it lies in (see
/// [`AudioBytes`]); a missing field is no audio.
///
/// Call it after the request was decoded with [`CloudEvent::data`], its `audio` field typed
/// `serde::de::IgnoredAny`: that checks the data's shape and nesting, with the extractor's
/// limits, without copying the audio, and this reads the one field again in place.
pub fn audio_field(event: &CloudEvent) -> Result<AudioBytes<'_>, HandlerError> {
    #[derive(Deserialize)]
    struct Field<'a> {
        #[serde(borrow, default)]
        audio: AudioBytes<'a>,
    }
    let invalid = |e: &dyn std::fmt::Display| HandlerError::InvalidPayload(e.to_string());
    let field: Field<'_> = match (event.data_format()?, event.event().data()) {
        (_, None) => return Err(HandlerError::InvalidPayload("the event has no data".into())),
        (DataFormat::Msgpack, Some(Data::Binary(bytes))) => {
            let mut decoder = rmp_serde::Deserializer::from_read_ref(bytes.as_slice());
            decoder.set_max_depth(MAX_DATA_DEPTH + 1);
            Field::deserialize(&mut decoder).map_err(|e| invalid(&e))?
        }
        (DataFormat::Msgpack, Some(_)) => {
            return Err(HandlerError::InvalidPayload(
                "datacontenttype is msgpack but data is not binary (use data_base64)".into(),
            ));
        }
        (DataFormat::Json, Some(Data::Json(value))) => {
            Field::deserialize(value).map_err(|e| invalid(&e))?
        }
        (DataFormat::Json, Some(Data::Binary(bytes))) => {
            serde_json::from_slice(bytes).map_err(|e| invalid(&e))?
        }
        (DataFormat::Json, Some(Data::String(text))) => {
            serde_json::from_str(text).map_err(|e| invalid(&e))?
        }
    };
    Ok(field.audio)
}

/// Configuration of the transcription backend and of how recordings are cut.
#[derive(Debug, Clone)]
pub struct SttConfig {
    /// `STT_URL` (required): base URL of the server; requests go to
    /// `{url}/v1/audio/transcriptions`.
    pub url: String,
    /// `STT_MODEL` (default `whisper-1`): the `model` form field.
    pub model: String,
    /// `STT_API_KEY` (optional): sent as `Authorization: Bearer`, for hosted APIs.
    pub api_key: Option<String>,
    /// `STT_PARALLELISM` (default 4): utterances of one recording transcribed at once; bounds
    /// what one request can take of the backend, whose overall limit is `STT_CONCURRENCY`.
    pub parallelism: usize,
    /// `STT_MAX_AUDIO_MS` (default 600000): longer recordings are refused (422) before any
    /// work, so one upload cannot hold the backend for an hour.
    pub max_audio_ms: u64,
    /// `STT_VAD_*`, `STT_MAX_UTTERANCE_MS`: how recordings are cut into utterances.
    pub vad: VadConfig,
    /// `STT_TIMEOUT_MS` (default 60000), `STT_CONCURRENCY` (default 8),
    /// `STT_QUEUE_TIMEOUT_MS`, `STT_BREAKER_*`: the guard around each backend call; and
    /// `STT_MAX_RESPONSE_BYTES` (default 256 KiB): the largest answer. One utterance's
    /// `{"text"}` is a few hundred bytes (a minute of fast speech is about 1 KiB of text);
    /// the rest is room for servers that add timings.
    pub backend: BackendConfig,
}

impl SttConfig {
    /// Reads the `STT_*` variables.
    pub fn read(r: &mut ConfigReader) -> Self {
        let max_audio_ms = r.positive("STT_MAX_AUDIO_MS", 600_000);
        Self {
            url: r.http_url("STT_URL", "base URL of the speech-to-text server"),
            model: r.string("STT_MODEL", "whisper-1"),
            api_key: r.optional("STT_API_KEY"),
            parallelism: r.positive("STT_PARALLELISM", 4),
            max_audio_ms: max_audio_ms as u64,
            vad: VadConfig::read(r),
            backend: BackendConfig::read(
                r,
                "STT",
                BackendConfig {
                    timeout: std::time::Duration::from_secs(60),
                    concurrency: 8,
                    max_response_bytes: 256 * 1024,
                    ..BackendConfig::default()
                },
            ),
        }
    }
}

/// One transcribed utterance.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TranscriptSegment {
    /// Start in ms from the beginning of the recording (leading padding included).
    pub start_ms: u64,
    /// End in ms (trailing padding included).
    pub end_ms: u64,
    /// What the backend heard; may be empty (a cough the VAD took for speech).
    pub text: String,
}

/// A recording's transcript.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Transcript {
    /// The segments' texts joined by one space, empty ones skipped.
    pub text: String,
    /// One per utterance found, in order.
    pub segments: Vec<TranscriptSegment>,
    /// Length of the recording in ms.
    pub audio_ms: u64,
    /// Length of the audio sent for transcription (the segments' total) in ms.
    pub speech_ms: u64,
    /// WAV bytes sent to the backend: what the VAD saved shows against the input's size.
    #[serde(skip)]
    pub forwarded_bytes: usize,
}

/// The JSON a transcription server answers with (`response_format=json`).
#[derive(Deserialize)]
struct Transcription {
    text: String,
}

/// A guarded transcription client.
#[derive(Debug, Clone)]
pub struct SttClient {
    http: reqwest::Client,
    config: SttConfig,
    backend: Backend,
}

impl SttClient {
    /// A client for `config`, sharing `http` with the function's other clients.
    pub fn new(http: reqwest::Client, config: SttConfig) -> Self {
        let backend = Backend::new("stt", config.backend.clone());
        Self {
            http,
            config,
            backend,
        }
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &SttConfig {
        &self.config
    }

    /// One multipart request: `file` (the WAV, filename `audio.wav`, type `audio/wav`),
    /// `model`, `language` and `prompt` when given, `response_format=json`; returns the
    /// trimmed `text`.
    pub async fn transcribe(
        &self,
        wav: Vec<u8>,
        language: Option<&str>,
        prompt: Option<&str>,
    ) -> Result<String, HandlerError> {
        let file = reqwest::multipart::Part::bytes(wav)
            .file_name("audio.wav")
            .mime_str("audio/wav")
            .map_err(|e| HandlerError::Internal(format!("multipart part: {e}")))?;
        let mut form = reqwest::multipart::Form::new()
            .part("file", file)
            .text("model", self.config.model.clone())
            .text("response_format", "json");
        if let Some(language) = language {
            form = form.text("language", language.to_string());
        }
        if let Some(prompt) = prompt {
            form = form.text("prompt", prompt.to_string());
        }
        let mut request = self
            .http
            .post(format!("{}/v1/audio/transcriptions", self.config.url))
            .multipart(form);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let limit = self.config.backend.max_response_bytes;
        self.backend
            .call(async move {
                let response = handler_kit::http::check(request.send().await).await?;
                let body = handler_kit::http::read_body(response, limit).await?;
                let answer: Transcription = serde_json::from_slice(&body).map_err(|e| {
                    let snippet = handler_kit::http::snippet(&body, 200);
                    CallError::Transient(format!("answered with no transcription ({e}): {snippet}"))
                })?;
                Ok(answer.text.trim().to_string())
            })
            .await
    }

    /// Decodes any common WAV (PCM 8-32 bit int or float, mono or stereo, any rate) to 16 kHz
    /// mono. Not a WAV, truncated, an unsupported encoding (A-law, mu-law, ADPCM, ...),
    /// empty, or longer than `STT_MAX_AUDIO_MS`: [`HandlerError::Unprocessable`] saying which.
    pub fn prepare(&self, wav: &[u8]) -> Result<Vec<i16>, HandlerError> {
        self.prepare_audio(&AudioBytes::Raw(Cow::Borrowed(wav)))
    }

    /// [`Self::prepare`] for audio as it lies in a request.
    pub fn prepare_audio(&self, audio: &AudioBytes<'_>) -> Result<Vec<i16>, HandlerError> {
        let mut decoding = self.open(audio)?;
        while !decoding.step(self, usize::MAX)? {}
        decoding.finish(self)
    }

    /// Reads the header and refuses what is unreadable or too long before decoding anything.
    fn open<'a>(&self, audio: &'a AudioBytes<'_>) -> Result<Decoding<'a>, HandlerError> {
        let head = audio.head(HEAD_BYTES);
        let downmix = Downmix::new(audio.reader(), VAD_RATE).map_err(|e| match e {
            hound::Error::Unsupported => bad(format!(
                "unsupported WAV encoding{}: send PCM (8 to 32-bit integer) or 32-bit float",
                format_tag(&head)
                    .map(|tag| format!(" (format code {tag:#06x}, {})", tag_name(tag)))
                    .unwrap_or_default()
            )),
            other => bad(format!("not a valid WAV file: {other}")),
        })?;
        downmix.check(&head).map_err(bad)?;
        let spec = downmix.spec();
        // A header claiming more data than the file holds is truncated (or was written to a
        // pipe with a placeholder length): decoding says so, not "too long".
        let frames = downmix.declared_frames();
        let frame_bytes = u64::from(spec.channels) * u64::from(spec.bits_per_sample.div_ceil(8));
        let declared_fits = frames * frame_bytes <= audio.len() as u64;
        if declared_fits {
            self.check_length(frames * 1000 / u64::from(spec.sample_rate))?;
        }
        // The output's exact size, reserved once, when the header can be believed.
        let capacity = if declared_fits {
            usize::try_from(downmix.output_len(frames)).unwrap_or(0)
        } else {
            0
        };
        Ok(Decoding {
            downmix,
            samples: Vec::with_capacity(capacity),
        })
    }
    fn check_length(&self, ms: u64) -> Result<(), HandlerError> {
        if ms > self.config.max_audio_ms {
            return Err(HandlerError::Unprocessable(format!(
                "audio: the recording is {ms} ms long, over the limit of {} ms (STT_MAX_AUDIO_MS)",
                self.config.max_audio_ms
            )));
        }
        Ok(())
    }

    /// Transcribes one span of 16 kHz audio (encodes it as WAV, calls [`Self::transcribe`]).
    pub async fn transcribe_span(
        &self,
        samples_16k: &[i16],
        span: Span,
        language: Option<&str>,
        prompt: Option<&str>,
    ) -> Result<String, HandlerError> {
        if span.slice(samples_16k).is_empty() {
            return Err(HandlerError::Internal(format!(
                "{span:?} lies outside the {} ms of audio given",
                samples_16k.len() as u64 * 1000 / u64::from(VAD_RATE)
            )));
        }
        let wav = span_wav(samples_16k, span)?;
        self.transcribe(wav, language, prompt).await
    }

    /// The whole pipeline for a recording: [`Self::prepare`] and the VAD in one pass, then
    /// only the speech is sent, `STT_PARALLELISM` segments at a time, order kept. The first
    /// failure fails the recording (the calls still in flight are dropped).
    ///
    /// Decoding, resampling and VAD run in slices of one second of the recording's audio,
    /// yielding to the runtime between slices, so a long recording does not hold an async
    /// worker for long (measured in a debug build they take about 60 ms of CPU per minute of
    /// 44.1 kHz stereo, less in release). The audio stays borrowed from the request: moving
    /// the work to the blocking pool would need a copy of the whole recording.
    pub async fn transcribe_recording(
        &self,
        audio: &AudioBytes<'_>,
        language: Option<&str>,
        prompt: Option<&str>,
    ) -> Result<Transcript, HandlerError> {
        let mut decoding = self.open(audio)?;
        let vad = &self.config.vad;
        let slice = usize::try_from(decoding.downmix.spec().sample_rate).unwrap_or(usize::MAX);
        let mut segmenter = Segmenter::new();
        let mut spans = Vec::new();
        loop {
            let before = decoding.samples.len();
            let done = decoding.step(self, slice)?;
            spans.extend(segmenter.push(vad, &decoding.samples[before..]));
            if done {
                break;
            }
            tokio::task::yield_now().await;
        }
        spans.extend(segmenter.finish(vad));
        let samples = decoding.finish(self)?;
        tracing::debug!(
            utterances = spans.len(),
            audio_ms = samples.len() as u64 * 1000 / u64::from(VAD_RATE),
            "recording segmented"
        );
        let samples = &samples;
        let results: Vec<(Span, usize, String)> = futures::stream::iter(spans)
            .map(|span| async move {
                let wav = span_wav(samples, span)?;
                let bytes = wav.len();
                let text = self.transcribe(wav, language, prompt).await?;
                Ok::<_, HandlerError>((span, bytes, text))
            })
            .buffered(self.config.parallelism.max(1))
            .try_collect()
            .await?;
        let text = results
            .iter()
            .map(|(_, _, text)| text.as_str())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Transcript {
            text,
            audio_ms: samples.len() as u64 * 1000 / u64::from(VAD_RATE),
            speech_ms: results.iter().map(|(span, _, _)| span.duration_ms()).sum(),
            forwarded_bytes: results.iter().map(|(_, bytes, _)| bytes).sum(),
            segments: results
                .into_iter()
                .map(|(span, _, text)| TranscriptSegment {
                    start_ms: span.start_ms,
                    end_ms: span.end_ms,
                    text,
                })
                .collect(),
        })
    }
}

/// The samples of `span` as a 16 kHz WAV file.
fn span_wav(samples_16k: &[i16], span: Span) -> Result<Vec<u8>, HandlerError> {
    encode_pcm16(span.slice(samples_16k), VAD_RATE)
        .map_err(|e| HandlerError::Internal(format!("encoding a segment as WAV: {e}")))
}

fn bad(what: String) -> HandlerError {
    HandlerError::Unprocessable(format!("audio: {what}"))
}

/// A recording being decoded to 16 kHz mono.
struct Decoding<'a> {
    downmix: Downmix<AudioReader<'a>>,
    samples: Vec<i16>,
}

impl Decoding<'_> {
    /// Decodes up to `frames` more frames; returns whether the end was reached. Stops with
    /// `STT_MAX_AUDIO_MS` exceeded as soon as it is, whatever the header said.
    fn step(&mut self, stt: &SttClient, frames: usize) -> Result<bool, HandlerError> {
        let done = self
            .downmix
            .read_into(&mut self.samples, frames)
            .map_err(bad)?;
        let rate = u64::from(self.downmix.spec().sample_rate);
        stt.check_length(self.downmix.frames_read() * 1000 / rate)?;
        Ok(done)
    }

    fn finish(self, stt: &SttClient) -> Result<Vec<i16>, HandlerError> {
        if self.downmix.frames_read() == 0 {
            return Err(bad("the recording is empty".into()));
        }
        let rate = u64::from(self.downmix.spec().sample_rate);
        stt.check_length(self.downmix.frames_read() * 1000 / rate)?;
        Ok(self.samples)
    }
}

fn tag_name(tag: u16) -> &'static str {
    match tag {
        0x0002 => "Microsoft ADPCM",
        0x0006 => "A-law",
        0x0007 => "mu-law",
        0x0011 => "IMA ADPCM",
        0x0055 => "MP3",
        0xfffe => "extensible with an unsupported subformat",
        _ => "not PCM",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test, with its location
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

    use super::*;
    use audio::Wav;
    use handler_kit::config::load;

    fn raw(bytes: &[u8]) -> AudioBytes<'_> {
        AudioBytes::Raw(Cow::Borrowed(bytes))
    }

    fn client(url: &str, api_key: Option<&str>) -> SttClient {
        let mut env = vec![("STT_URL", url.to_string())];
        if let Some(key) = api_key {
            env.push(("STT_API_KEY", key.to_string()));
        }
        let config = load(&env, SttConfig::read).unwrap();
        SttClient::new(
            handler_kit::http::client(Duration::from_secs(2)).unwrap(),
            config,
        )
    }

    /// One part of a multipart/form-data body.
    #[derive(Debug)]
    struct Field {
        name: String,
        filename: Option<String>,
        content_type: Option<String>,
        data: Vec<u8>,
    }

    /// The parts of a multipart request, parsed by hand so the test checks the wire format.
    fn fields(request: &Request) -> Vec<Field> {
        let content_type = request.headers["content-type"].to_str().unwrap();
        let boundary = content_type.split("boundary=").nth(1).unwrap();
        let delimiter = format!("--{boundary}");
        let body = &request.body;
        let find = |needle: &[u8], from: usize| {
            body[from..]
                .windows(needle.len())
                .position(|w| w == needle)
                .map(|p| p + from)
                .unwrap()
        };
        let mut out = Vec::new();
        let mut at = find(delimiter.as_bytes(), 0) + delimiter.len();
        // Each part: CRLF, headers, CRLF CRLF, data, CRLF, delimiter; the last delimiter ends "--".
        while body[at..].starts_with(b"\r\n") {
            let head_end = find(b"\r\n\r\n", at);
            let head = String::from_utf8(body[at + 2..head_end].to_vec()).unwrap();
            let next = find(delimiter.as_bytes(), head_end);
            let quoted = |key: &str| {
                let start = head.find(&format!("; {key}=\""))? + key.len() + 4;
                Some(head[start..].split('"').next()?.to_string())
            };
            let content_type = head.split("\r\n").find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim().to_string())
            });
            out.push(Field {
                name: quoted("name").unwrap(),
                filename: quoted("filename"),
                content_type,
                data: body[head_end + 4..next - 2].to_vec(),
            });
            at = next + delimiter.len();
        }
        out
    }

    fn field<'a>(fields: &'a [Field], name: &str) -> &'a Field {
        fields
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no field {name} in {fields:?}"))
    }

    #[tokio::test]
    async fn a_request_carries_every_field_and_the_key() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/audio/transcriptions"))
            .and(header("authorization", "Bearer sekret"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "text": "  hello there \n"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let stt = client(&server.uri(), Some("sekret"));
        let wav = encode_pcm16(&[0, 1, 2, 3], 16_000).unwrap();
        let text = stt
            .transcribe(wav.clone(), Some("en"), Some("Names: Ada."))
            .await
            .unwrap();
        assert_eq!(text, "hello there");

        let requests = server.received_requests().await.unwrap();
        let f = fields(&requests[0]);
        let text_of = |name: &str| String::from_utf8(field(&f, name).data.clone()).unwrap();
        assert_eq!(text_of("model"), "whisper-1");
        assert_eq!(text_of("language"), "en");
        assert_eq!(text_of("prompt"), "Names: Ada.");
        assert_eq!(text_of("response_format"), "json");
        let file = field(&f, "file");
        assert_eq!(file.filename.as_deref(), Some("audio.wav"));
        assert_eq!(file.content_type.as_deref(), Some("audio/wav"));
        assert_eq!(file.data, wav);
        assert_eq!(Wav::parse(&file.data).unwrap().frames(), 4);
    }

    #[tokio::test]
    async fn optional_fields_and_key_are_left_out_when_unset() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"text": ""})))
            .mount(&server)
            .await;
        let stt = client(&server.uri(), None);
        let wav = encode_pcm16(&[0; 160], 16_000).unwrap();
        assert_eq!(stt.transcribe(wav, None, None).await.unwrap(), "");
        let requests = server.received_requests().await.unwrap();
        assert!(requests[0].headers.get("authorization").is_none());
        let f = fields(&requests[0]);
        let mut names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["file", "model", "response_format"]);
    }

    #[tokio::test]
    async fn backend_answers_are_sorted() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(400).set_body_string("bad language"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string("<html>oops</html>"))
            .mount(&server)
            .await;
        let stt = client(&server.uri(), None);
        let wav = || encode_pcm16(&[0; 160], 16_000).unwrap();
        let rejected = stt.transcribe(wav(), Some("xx"), None).await.unwrap_err();
        assert!(
            matches!(rejected, HandlerError::BackendRejected { .. }),
            "{rejected:?}"
        );
        let garbage = stt.transcribe(wav(), None, None).await.unwrap_err();
        assert!(
            matches!(garbage, HandlerError::Backend { .. }),
            "{garbage:?}"
        );
    }

    /// Names the segment it was sent by its length, and answers the first requests last, so
    /// later segments finish first and only an order-keeping client gets the text right.
    struct SlowFirst {
        arrivals: AtomicUsize,
    }

    impl Respond for SlowFirst {
        fn respond(&self, request: &Request) -> ResponseTemplate {
            let n = self.arrivals.fetch_add(1, Ordering::SeqCst) as u64;
            let wav = Wav::parse(&field(&fields(request), "file").data).unwrap();
            let text = format!("utterance of {} ms", wav.duration_ms());
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "text": text }))
                .set_delay(Duration::from_millis(200u64.saturating_sub(n * 80)))
        }
    }

    #[tokio::test]
    async fn only_speech_is_forwarded_one_request_per_utterance_in_order() {
        for name in ["two-utterances-16k.wav", "three-utterances-44k-stereo.wav"] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(SlowFirst {
                    arrivals: AtomicUsize::new(0),
                })
                .mount(&server)
                .await;
            let stt = client(&server.uri(), None);
            let input = testkit::fixtures::speech(name);
            let transcript = stt
                .transcribe_recording(&raw(&input), None, None)
                .await
                .unwrap();

            let known = testkit::fixtures::speech_boundaries(name);
            let requests = server.received_requests().await.unwrap();
            assert_eq!(
                requests.len(),
                known.len(),
                "{name}: one request per utterance"
            );
            assert_eq!(transcript.segments.len(), known.len(), "{transcript:?}");
            let expected: Vec<String> = transcript
                .segments
                .iter()
                .map(|s| format!("utterance of {} ms", s.end_ms - s.start_ms))
                .collect();
            let got: Vec<&str> = transcript
                .segments
                .iter()
                .map(|s| s.text.as_str())
                .collect();
            assert_eq!(
                got, expected,
                "{name}: texts must follow the segments' order"
            );
            assert_eq!(transcript.text, expected.join(" "));

            // Only speech left: what was sent is the speech plus its padding, give or take the
            // VAD's tolerance, and the bytes are exactly those WAVs.
            let padding = u64::from(stt.config().vad.padding_ms);
            let speech: u64 = known.iter().map(|(start, end)| end - start).sum();
            let n = known.len() as u64;
            let most = speech + n * (2 * padding + 2 * 300);
            assert!(transcript.speech_ms <= most, "{name}: {transcript:?}");
            assert!(
                transcript.speech_ms + 2 * 300 * n >= speech,
                "{name}: {transcript:?}"
            );
            let received: usize = requests
                .iter()
                .map(|r| field(&fields(r), "file").data.len())
                .sum();
            assert_eq!(received, transcript.forwarded_bytes);
            // As 16 kHz 16-bit mono (44-byte header each): nothing but the segments.
            assert_eq!(
                received as u64,
                transcript.speech_ms * 32 + n * 44,
                "{name}: {transcript:?}"
            );
            let whole_16k = transcript.audio_ms as usize * 32 + 44;
            assert!(
                received * 10 < whole_16k * 8,
                "{name}: sent {received} bytes, the whole recording at 16 kHz is {whole_16k}"
            );
        }
    }

    #[tokio::test]
    async fn silence_costs_no_request() {
        let server = MockServer::start().await;
        let stt = client(&server.uri(), None);
        let transcript = stt
            .transcribe_recording(&raw(&testkit::wav::silence_wav(3000, 22_050)), None, None)
            .await
            .unwrap();
        assert_eq!(transcript.text, "");
        assert!(transcript.segments.is_empty());
        assert_eq!((transcript.audio_ms, transcript.speech_ms), (3000, 0));
        assert_eq!(transcript.forwarded_bytes, 0);
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_span_is_sent_as_its_own_wav() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"text": "hi"})),
            )
            .mount(&server)
            .await;
        let stt = client(&server.uri(), None);
        let samples: Vec<i16> = (0..32_000).map(|i| (i % 300) as i16).collect();
        let span = Span {
            start_ms: 500,
            end_ms: 1250,
        };
        let text = stt
            .transcribe_span(&samples, span, None, None)
            .await
            .unwrap();
        assert_eq!(text, "hi");
        let requests = server.received_requests().await.unwrap();
        let sent = Wav::parse(&field(&fields(&requests[0]), "file").data).unwrap();
        assert_eq!(sent.sample_rate(), VAD_RATE);
        assert_eq!(sent.to_mono_i16(), &samples[8_000..20_000]);

        let outside = Span {
            start_ms: 5000,
            end_ms: 6000,
        };
        let err = stt.transcribe_span(&samples, outside, None, None).await;
        assert!(matches!(err, Err(HandlerError::Internal(_))), "{err:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_first_failure_fails_the_recording() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .mount(&server)
            .await;
        let stt = client(&server.uri(), None);
        let input = testkit::fixtures::speech("two-utterances-16k.wav");
        let err = stt
            .transcribe_recording(&raw(&input), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, HandlerError::Backend { .. }), "{err:?}");
    }

    fn wav_of(
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<&mut std::io::Cursor<Vec<u8>>>),
    ) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        {
            let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
            write(&mut w);
            w.finalize().unwrap();
        }
        out.into_inner()
    }

    #[test]
    fn float_and_24_bit_stereo_decode() {
        let stt = client("http://stt.invalid", None);
        let float = wav_of(
            hound::WavSpec {
                channels: 2,
                sample_rate: 48_000,
                bits_per_sample: 32,
                sample_format: hound::SampleFormat::Float,
            },
            |w| {
                for _ in 0..4800 {
                    w.write_sample(0.5f32).unwrap();
                    w.write_sample(0.25f32).unwrap();
                }
            },
        );
        let samples = stt.prepare(&float).unwrap();
        assert_eq!(samples.len(), 1600);
        assert!(
            samples.iter().all(|&s| (12_280..=12_290).contains(&s)),
            "{:?}",
            &samples[..4]
        );
        let int24 = wav_of(
            hound::WavSpec {
                channels: 1,
                sample_rate: 8_000,
                bits_per_sample: 24,
                sample_format: hound::SampleFormat::Int,
            },
            |w| {
                for _ in 0..800 {
                    w.write_sample(-(1i32 << 22)).unwrap();
                }
            },
        );
        let samples = stt.prepare(&int24).unwrap();
        assert_eq!(samples.len(), 1600);
        assert!(samples.iter().all(|&s| s == -(1 << 14)));
    }

    fn unprocessable(result: Result<Vec<i16>, HandlerError>) -> String {
        match result {
            Err(HandlerError::Unprocessable(message)) => message,
            other => panic!("expected Unprocessable, got {other:?}"),
        }
    }

    #[test]
    fn bad_audio_is_unprocessable_with_a_reason() {
        let stt = client("http://stt.invalid", None);
        let message = unprocessable(stt.prepare(b"ID3\x03 this is an mp3"));
        assert!(message.contains("not a valid WAV"), "{message}");

        let good = testkit::fixtures::speech("two-utterances-16k.wav");
        let message = unprocessable(stt.prepare(&good[..good.len() / 2 + 1]));
        assert!(message.contains("truncated"), "{message}");
        // A placeholder length (as written to a pipe) is truncation, not "too long".
        let mut placeholder = good.clone();
        assert_eq!(&placeholder[36..40], b"data");
        placeholder[40..44].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        let message = unprocessable(stt.prepare(&placeholder));
        assert!(message.contains("truncated"), "{message}");

        // The same file relabelled as A-law (format code 6) and as mu-law (7).
        for (tag, name) in [(6u8, "A-law"), (7, "mu-law"), (2, "ADPCM")] {
            let mut relabelled = good.clone();
            assert_eq!(&relabelled[12..16], b"fmt ");
            relabelled[20] = tag;
            let message = unprocessable(stt.prepare(&relabelled));
            assert!(message.contains("unsupported WAV encoding"), "{message}");
            assert!(message.contains(name), "{message}");
        }

        let empty = encode_pcm16(&[], 16_000).unwrap();
        let message = unprocessable(stt.prepare(&empty));
        assert!(message.contains("empty"), "{message}");
    }

    #[tokio::test]
    async fn too_long_audio_is_refused_before_any_call() {
        let server = MockServer::start().await;
        let config = load(
            &[
                ("STT_URL", server.uri().as_str()),
                ("STT_MAX_AUDIO_MS", "5000"),
            ],
            SttConfig::read,
        )
        .unwrap();
        let stt = SttClient::new(
            handler_kit::http::client(Duration::from_secs(1)).unwrap(),
            config,
        );
        let input = testkit::fixtures::speech("two-utterances-16k.wav");
        let err = stt
            .transcribe_recording(&raw(&input), None, None)
            .await
            .unwrap_err();
        let HandlerError::Unprocessable(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("STT_MAX_AUDIO_MS"), "{message}");
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[test]
    fn config_defaults_and_problems() {
        let config = load(&[("STT_URL", "http://whisper:8000/")], SttConfig::read).unwrap();
        assert_eq!(config.url, "http://whisper:8000");
        assert_eq!(config.model, "whisper-1");
        assert_eq!(config.api_key, None);
        assert_eq!(config.parallelism, 4);
        assert_eq!(config.max_audio_ms, 600_000);
        assert_eq!(config.backend.timeout, Duration::from_secs(60));
        assert_eq!(config.backend.concurrency, 8);
        assert_eq!(config.vad.mode, 2);
        let err = load(
            &[("STT_PARALLELISM", "0"), ("STT_VAD_MODE", "9")],
            SttConfig::read,
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }
}
