//! LLM client for OpenAI-compatible chat completions (`POST {url}/v1/chat/completions`).
//!
//! vLLM, llama.cpp, Ollama, TGI and the hosted APIs all speak this dialect, so one client
//! covers them. Two ways to call it:
//! - [`LlmClient::complete`] waits for the whole answer (one guarded call, like the TTS client);
//! - [`LlmClient::stream`] returns as soon as the server has accepted the request and hands back
//!   an [`LlmStream`] of [`Delta`]s parsed from the server-sent events.
//!
//! A stream can run far longer than any sensible per-call timeout, so it is guarded differently:
//! the backend's timeout covers only the wait for the response headers, and afterwards an *idle*
//! timeout bounds the gap between two chunks. A server that stalls mid-answer is thereby caught
//! within seconds, while a long answer that keeps flowing is never cut off. The stream holds its
//! concurrency slot (a [`Lease`]) until it ends, and reports to the circuit breaker how it ended.
//!
//! Nor is a stream's length bounded by the server alone: the whole stream is read under
//! `LLM_MAX_STREAM_BYTES` and each event under `LLM_MAX_EVENT_BYTES`, so a server that sends
//! one endless line, or tokens without end, fails the stream instead of growing memory.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use handler_kit::HandlerError;
use handler_kit::config::ConfigReader;
use handler_kit::http::{BodyError, CappedBody, check, read_json};
use handler_kit::resilience::{Backend, BackendConfig, CallError, Lease};

/// Configuration of the LLM backend.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// `LLM_URL` (required): base URL of the server, without `/v1`, e.g. `http://vllm:8000`;
    /// requests go to `{url}/v1/chat/completions`.
    pub url: String,
    /// `LLM_MODEL` (default `default`): the `model` sent with every request; servers hosting a
    /// single model usually ignore it.
    pub model: String,
    /// `LLM_API_KEY` (optional): sent as `Authorization: Bearer`, for hosted APIs and gateways.
    pub api_key: Option<String>,
    /// `LLM_IDLE_TIMEOUT_MS` (default 30000): the longest gap between two chunks of a stream
    /// before it counts as stalled; the first token of a long prompt may take a while.
    pub idle_timeout: Duration,
    /// `LLM_MAX_STREAM_BYTES` (default 16 MiB): the most a streamed answer may send in all.
    /// vLLM's event for one token is 248 bytes (id, model name, one choice), so 16 MiB is
    /// 67,000 tokens, more than the context of the models served; the stream is read piece by
    /// piece, so this bounds the answer's text and the time a runaway stream holds its slot.
    pub max_stream_bytes: usize,
    /// `LLM_MAX_EVENT_BYTES` (default 64 KiB): the longest event (its lines together) of a
    /// stream. A token's event is about 250 bytes, one with 20 `logprobs` alternatives a few
    /// KiB; without this, one line without an end would be buffered whole.
    pub max_event_bytes: usize,
    /// `LLM_TIMEOUT_MS` (default 30000: for streams, only until the response headers arrive),
    /// `LLM_CONCURRENCY` (default 32: streams hold a slot for their whole length),
    /// `LLM_QUEUE_TIMEOUT_MS`, `LLM_BREAKER_*`, and `LLM_MAX_RESPONSE_BYTES` (default 1 MiB):
    /// the largest whole (not streamed) answer, which is held in memory to be parsed; 32,000
    /// tokens of text are about 128 KiB, or 6 times that with every character `\u`-escaped.
    pub backend: BackendConfig,
}

impl LlmConfig {
    /// Reads the `LLM_*` variables.
    pub fn read(r: &mut ConfigReader) -> Self {
        Self {
            url: r.http_url("LLM_URL", "base URL of the OpenAI-compatible LLM server"),
            model: r.string("LLM_MODEL", "default"),
            api_key: r.optional("LLM_API_KEY"),
            idle_timeout: r.millis("LLM_IDLE_TIMEOUT_MS", 30_000),
            max_stream_bytes: r.positive("LLM_MAX_STREAM_BYTES", 16 * 1024 * 1024),
            max_event_bytes: r.positive("LLM_MAX_EVENT_BYTES", 64 * 1024),
            backend: BackendConfig::read(
                r,
                "LLM",
                BackendConfig {
                    timeout: Duration::from_secs(30),
                    concurrency: 32,
                    ..BackendConfig::default()
                },
            ),
        }
    }
}

/// One message of a conversation, as the chat completions API spells it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// Token counts the server reports for one completion.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
// Some servers leave out a count (often `total_tokens`); zero beats rejecting the answer.
#[serde(default)]
pub struct Usage {
    /// Tokens in the prompt (all messages).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

/// What to ask the model.
#[derive(Debug, Clone, Default)]
pub struct CompletionRequest {
    /// The conversation so far, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature; the server's default when `None`.
    pub temperature: Option<f32>,
    /// Upper bound on generated tokens; the server's default when `None`.
    pub max_tokens: Option<u32>,
}

/// A whole answer from [`LlmClient::complete`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// The assistant's text.
    pub text: String,
    /// Token counts, when the server reports them.
    pub usage: Option<Usage>,
}

/// One item of an [`LlmStream`].
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// The next piece of the answer's text (never empty).
    Text(String),
    /// Token counts for the whole completion; comes after the last text (once, unless the
    /// server is set to report running counts).
    Usage(Usage),
}

/// A guarded client for an OpenAI-compatible chat completions server.
#[derive(Debug, Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    config: LlmConfig,
    backend: Backend,
}

impl LlmClient {
    /// A client for `config`, sharing `http` with the function's other clients.
    pub fn new(http: reqwest::Client, config: LlmConfig) -> Self {
        let backend = Backend::new("llm", config.backend.clone());
        Self {
            http,
            config,
            backend,
        }
    }

    /// The backend's name in errors, logs and metrics: `llm`.
    pub fn name(&self) -> &'static str {
        self.backend.name()
    }

    /// Asks for a completion and waits for all of it.
    pub async fn complete(&self, req: &CompletionRequest) -> Result<Completion, HandlerError> {
        let request = self.request(req, false);
        let limit = self.config.backend.max_response_bytes;
        self.backend
            .call(async move {
                let response = check(request.send().await).await?;
                let answer: CompletionAnswer = read_json(response, limit).await?;
                let choice = answer
                    .choices
                    .into_iter()
                    .next()
                    .ok_or_else(|| CallError::Transient("answered without choices".into()))?;
                Ok(Completion {
                    text: choice.message.and_then(|m| m.content).unwrap_or_default(),
                    usage: answer.usage,
                })
            })
            .await
    }

    /// Asks for a streamed completion. Returns once the server has answered 200 with its
    /// headers; the text then arrives through [`LlmStream::next`].
    pub async fn stream(&self, req: &CompletionRequest) -> Result<LlmStream, HandlerError> {
        let request = self
            .request(req, true)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let limit = self.config.max_stream_bytes;
        let (body, lease) = self
            .backend
            .open(async move { Ok(CappedBody::new(check(request.send().await).await?, limit)?) })
            .await?;
        Ok(LlmStream {
            body: Some(body),
            lease: Some(lease),
            decoder: SseDecoder::new(self.config.max_event_bytes),
            pending: VecDeque::new(),
            error: None,
            finished: false,
            idle_timeout: self.config.idle_timeout,
            backend: self.backend.name(),
        })
    }

    fn request(&self, req: &CompletionRequest, stream: bool) -> reqwest::RequestBuilder {
        let body = ChatBody {
            model: &self.config.model,
            messages: &req.messages,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
            temperature: req.temperature,
            max_tokens: req.max_tokens,
        };
        let request = self
            .http
            .post(format!("{}/v1/chat/completions", self.config.url))
            .json(&body);
        match &self.config.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

/// An answer arriving as server-sent events; see [`LlmClient::stream`].
///
/// Dropping it before the end closes the HTTP connection, which is how the server learns that
/// nobody is listening any more and stops generating.
pub struct LlmStream {
    /// The response body, read under `LLM_MAX_STREAM_BYTES`; `None` once the stream has
    /// ended, well or badly.
    body: Option<CappedBody>,
    /// The concurrency slot, finished (and reported to the breaker) when the stream ends.
    lease: Option<Lease>,
    decoder: SseDecoder,
    /// Deltas parsed but not yet handed out.
    pending: VecDeque<Delta>,
    /// The error that ended the stream, handed out after the deltas that preceded it.
    error: Option<HandlerError>,
    /// A choice carried a `finish_reason`: the answer is complete even without `[DONE]`.
    finished: bool,
    idle_timeout: Duration,
    backend: &'static str,
}

impl std::fmt::Debug for LlmStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmStream")
            .field("backend", &self.backend)
            .field("open", &self.body.is_some())
            .field("pending", &self.pending)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// What one event of the stream means for the stream as a whole.
enum Flow {
    Continue,
    /// `data: [DONE]`: the server is finished.
    Done,
}

impl LlmStream {
    /// The next delta; `None` once the server sent `data: [DONE]`, or closed the stream cleanly
    /// after a choice finished.
    ///
    /// A gap longer than the idle timeout yields [`HandlerError::Timeout`]; a broken or garbled
    /// stream yields [`HandlerError::Backend`]. Either ends the stream and counts against the
    /// backend's circuit breaker; a clean end counts as a success.
    pub async fn next(&mut self) -> Option<Result<Delta, HandlerError>> {
        loop {
            if let Some(delta) = self.pending.pop_front() {
                return Some(Ok(delta));
            }
            if let Some(error) = self.error.take() {
                return Some(Err(error));
            }
            let body = self.body.as_mut()?;
            match tokio::time::timeout(self.idle_timeout, body.chunk()).await {
                Err(_) => {
                    let error = HandlerError::Timeout {
                        backend: self.backend,
                        after: self.idle_timeout,
                    };
                    self.fail(error);
                }
                Ok(Err(BodyError::Broken(detail))) => {
                    self.fail_with(format!("stream broke: {detail}"));
                }
                Ok(Err(BodyError::TooLarge { limit })) => self.fail_with(format!(
                    "the stream passed {limit} bytes (LLM_MAX_STREAM_BYTES)"
                )),
                Ok(Ok(Some(chunk))) => {
                    let mut events = Vec::new();
                    let decoded = self.decoder.push(&chunk, &mut events);
                    self.consume(events, decoded);
                }
                Ok(Ok(None)) => {
                    let mut events = Vec::new();
                    let decoded = self.decoder.finish(&mut events);
                    self.consume(events, decoded);
                    if self.body.is_some() {
                        if self.finished {
                            self.end(true);
                        } else {
                            self.fail_with("stream ended before [DONE] or a finish_reason".into());
                        }
                    }
                }
            }
        }
    }

    /// Turns decoded events into deltas; stops at `[DONE]` or at the first bad event.
    fn consume(&mut self, events: Vec<String>, decoded: Result<(), String>) {
        for data in &events {
            match self.event(data) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Done) => {
                    self.end(true);
                    return;
                }
                Err(detail) => {
                    self.fail_with(detail);
                    return;
                }
            }
        }
        if let Err(detail) = decoded {
            self.fail_with(detail);
        }
    }

    /// Interprets one event's `data`.
    fn event(&mut self, data: &str) -> Result<Flow, String> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(Flow::Continue);
        }
        if data == "[DONE]" {
            return Ok(Flow::Done);
        }
        let chunk: StreamChunk = serde_json::from_str(data)
            .map_err(|e| format!("garbled stream event ({e}): {}", snippet(data)))?;
        if let Some(error) = chunk.error {
            return Err(format!("stream reported an error: {}", error_text(&error)));
        }
        if let Some(choice) = chunk.choices.into_iter().flatten().next() {
            if let Some(text) = choice.delta.and_then(|d| d.content)
                && !text.is_empty()
            {
                self.pending.push_back(Delta::Text(text));
            }
            self.finished |= choice.finish_reason.is_some();
        }
        if let Some(usage) = chunk.usage {
            self.pending.push_back(Delta::Usage(usage));
        }
        Ok(Flow::Continue)
    }

    fn fail_with(&mut self, detail: String) {
        let error = HandlerError::Backend {
            backend: self.backend,
            detail,
        };
        self.fail(error);
    }

    fn fail(&mut self, error: HandlerError) {
        self.error = Some(error);
        self.end(false);
    }

    /// Closes the connection and reports the outcome once.
    fn end(&mut self, ok: bool) {
        self.body = None;
        if let Some(lease) = self.lease.take() {
            if ok {
                lease.succeeded();
            } else {
                lease.failed();
            }
        }
    }
}

/// Splits a `text/event-stream` body into the `data` of each event, however the network
/// chunked it (the WHATWG rules: `\n`, `\r\n` or `\r` end a line, a blank line ends an event,
/// `:` opens a comment, several `data` lines join with `\n`), refusing an event longer than
/// its cap as soon as it passes it.
#[derive(Debug)]
struct SseDecoder {
    /// The line read so far (bytes: a chunk may end inside a UTF-8 sequence).
    line: Vec<u8>,
    /// The `data` of the event read so far.
    data: String,
    /// The event has a `data` field (an empty one still counts).
    has_data: bool,
    /// The last byte was `\r`: a `\n` right after it belongs to the same line break.
    after_cr: bool,
    /// The longest event: its current line and its `data` so far together.
    max_event: usize,
}

impl SseDecoder {
    fn new(max_event: usize) -> Self {
        Self {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            after_cr: false,
            max_event,
        }
    }

    /// Feeds `chunk`, appending the data of every event it completes to `events`.
    fn push(&mut self, chunk: &[u8], events: &mut Vec<String>) -> Result<(), String> {
        for &byte in chunk {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' => self.end_line(events)?,
                b'\r' => {
                    self.end_line(events)?;
                    self.after_cr = true;
                }
                _ => {
                    if self.line.len() + self.data.len() >= self.max_event {
                        return Err(format!(
                            "an event passed {} bytes (LLM_MAX_EVENT_BYTES)",
                            self.max_event
                        ));
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(())
    }

    /// At the end of the body: a last event without its blank line still counts (some servers
    /// end with `data: [DONE]\n`).
    fn finish(&mut self, events: &mut Vec<String>) -> Result<(), String> {
        if !self.line.is_empty() {
            self.end_line(events)?;
        }
        self.dispatch(events);
        Ok(())
    }

    fn end_line(&mut self, events: &mut Vec<String>) -> Result<(), String> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(events);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = String::from_utf8(line)
            .map_err(|e| format!("event stream is not UTF-8: {}", e.utf8_error()))?;
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        // `event`, `id` and `retry` mean nothing to a completion stream.
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
        Ok(())
    }

    fn dispatch(&mut self, events: &mut Vec<String>) {
        if std::mem::take(&mut self.has_data) {
            events.push(std::mem::take(&mut self.data));
        }
    }
}

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionAnswer {
    #[serde(default)]
    choices: Vec<AnswerChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct AnswerChoice {
    message: Option<ContentPart>,
}

#[derive(Deserialize)]
struct ContentPart {
    content: Option<String>,
}

#[derive(Deserialize)]
struct StreamChunk {
    /// `null` in the usage-only chunk of some servers, absent in others.
    choices: Option<Vec<StreamChoice>>,
    usage: Option<Usage>,
    /// vLLM and others report a failure mid-stream as `data: {"error": ...}`.
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    delta: Option<ContentPart>,
    finish_reason: Option<String>,
}

/// The message of an `error` value (`{"message": ..}` or a plain string).
fn error_text(error: &serde_json::Value) -> String {
    match error.get("message").and_then(|m| m.as_str()) {
        Some(message) => message.to_string(),
        None => snippet(&error.to_string()),
    }
}

fn snippet(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wiremock::matchers::{body_partial_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    fn client(url: &str, env: &[(&str, &str)]) -> LlmClient {
        let mut vars: Vec<(String, String)> = vec![("LLM_URL".into(), url.into())];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = handler_kit::config::load(&vars, LlmConfig::read).expect("valid config");
        LlmClient::new(
            handler_kit::http::client(Duration::from_secs(2)).expect("HTTP client"),
            config,
        )
    }

    fn request() -> CompletionRequest {
        CompletionRequest {
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "Hi?".into(),
                },
            ],
            temperature: Some(0.5),
            max_tokens: Some(64),
        }
    }

    fn sse(events: &[serde_json::Value]) -> String {
        let mut body = String::new();
        for event in events {
            body.push_str(&format!("data: {event}\n\n"));
        }
        body.push_str("data: [DONE]\n\n");
        body
    }

    fn text_chunk(text: &str) -> serde_json::Value {
        json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}], "usage": null})
    }

    async fn drain(stream: &mut LlmStream) -> (Vec<Delta>, Option<HandlerError>) {
        let mut deltas = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(delta) => deltas.push(delta),
                Err(e) => return (deltas, Some(e)),
            }
        }
        (deltas, None)
    }

    #[test]
    fn config_defaults_and_requirements() {
        let config = handler_kit::config::load(&[("LLM_URL", "http://llm:8000/")], LlmConfig::read)
            .expect("valid");
        assert_eq!(config.url, "http://llm:8000");
        assert_eq!(config.model, "default");
        assert_eq!(config.api_key, None);
        assert_eq!(config.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.backend.timeout, Duration::from_secs(30));
        assert_eq!(config.backend.concurrency, 32);
        let err =
            handler_kit::config::load(&[("LLM_MODEL", "m")], LlmConfig::read).expect_err("no url");
        assert!(err.0[0].contains("LLM_URL is required"), "{err}");
    }

    #[tokio::test]
    async fn complete_sends_the_request_and_parses_the_answer() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(header("authorization", "Bearer sk-test"))
            .and(body_partial_json(json!({
                "model": "llama",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi?"},
                ],
                "stream": false,
                "temperature": 0.5,
                "max_tokens": 64,
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "x",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
            })))
            .expect(1)
            .mount(&server)
            .await;
        let llm = client(
            &server.uri(),
            &[("LLM_MODEL", "llama"), ("LLM_API_KEY", "sk-test")],
        );
        assert_eq!(llm.name(), "llm");
        let completion = llm.complete(&request()).await.expect("completion");
        assert_eq!(completion.text, "Hello.");
        assert_eq!(
            completion.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 2,
                total_tokens: 14
            })
        );
    }

    #[tokio::test]
    async fn optional_fields_are_left_out_and_no_key_means_no_authorization() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "choices": [{"message": {"content": "ok"}}],
            })))
            .mount(&server)
            .await;
        let llm = client(&server.uri(), &[]);
        let completion = llm
            .complete(&CompletionRequest {
                messages: request().messages,
                ..CompletionRequest::default()
            })
            .await
            .expect("completion");
        assert_eq!(completion.text, "ok");
        assert_eq!(completion.usage, None);
        let received = &server.received_requests().await.expect("recorded")[0];
        assert!(!received.headers.contains_key("authorization"));
        let body: serde_json::Value = received.body_json().expect("json body");
        assert_eq!(body["model"], "default");
        assert!(body.get("temperature").is_none(), "{body}");
        assert!(body.get("max_tokens").is_none(), "{body}");
        assert!(body.get("stream_options").is_none(), "{body}");
    }

    #[tokio::test]
    async fn stream_parses_text_and_usage_until_done() {
        let server = MockServer::start().await;
        let body = format!(
            ": keep-alive comment\n\n{}",
            sse(&[
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
                text_chunk("Hel"),
                text_chunk("lo, "),
                text_chunk("wörld"),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
            ])
        );
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(header("accept", "text/event-stream"))
            .and(body_partial_json(json!({
                "model": "default",
                "stream": true,
                "stream_options": {"include_usage": true},
                "temperature": 0.5,
                "max_tokens": 64,
            })))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(body),
            )
            .expect(1)
            .mount(&server)
            .await;
        let llm = client(&server.uri(), &[]);
        let mut stream = llm.stream(&request()).await.expect("stream opens");
        let (deltas, error) = drain(&mut stream).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(
            deltas,
            vec![
                Delta::Text("Hel".into()),
                Delta::Text("lo, ".into()),
                Delta::Text("wörld".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 5,
                    completion_tokens: 3,
                    total_tokens: 8
                }),
            ]
        );
        // Finished streams stay finished.
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_closed_after_a_finish_reason_ends_cleanly_but_a_cut_one_fails() {
        let server = MockServer::start().await;
        let finished = format!(
            "data: {}\r\n\r\ndata: {}\r\n\r\n",
            text_chunk("Hi"),
            json!({"choices": [{"delta": {}, "finish_reason": "length"}]})
        );
        Mock::given(method("POST"))
            .and(body_partial_json(json!({"model": "finished"})))
            .respond_with(ResponseTemplate::new(200).set_body_string(finished))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(body_partial_json(json!({"model": "cut"})))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_string(format!("data: {}\n\n", text_chunk("Hi"))),
            )
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(body_partial_json(json!({"model": "garbled"})))
            .respond_with(ResponseTemplate::new(200).set_body_string(format!(
                "data: {}\n\ndata: {{\"choices\": [\n\n",
                text_chunk("Hi")
            )))
            .mount(&server)
            .await;

        let llm = client(&server.uri(), &[("LLM_MODEL", "finished")]);
        let (deltas, error) = drain(&mut llm.stream(&request()).await.expect("open")).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(deltas, vec![Delta::Text("Hi".into())]);

        let llm = client(&server.uri(), &[("LLM_MODEL", "cut")]);
        let (deltas, error) = drain(&mut llm.stream(&request()).await.expect("open")).await;
        assert_eq!(deltas, vec![Delta::Text("Hi".into())]);
        assert!(
            matches!(&error, Some(HandlerError::Backend { backend: "llm", detail }) if detail.contains("ended before")),
            "{error:?}"
        );

        let llm = client(&server.uri(), &[("LLM_MODEL", "garbled")]);
        let (deltas, error) = drain(&mut llm.stream(&request()).await.expect("open")).await;
        assert_eq!(deltas, vec![Delta::Text("Hi".into())]);
        assert!(
            matches!(&error, Some(HandlerError::Backend { detail, .. }) if detail.contains("garbled")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_error_event_mid_stream_is_a_backend_error() {
        let server = MockServer::start().await;
        let body = format!(
            "data: {}\n\ndata: {}\n\n",
            text_chunk("Hi"),
            json!({"error": {"message": "out of KV cache", "code": 500}})
        );
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(body))
            .mount(&server)
            .await;
        let llm = client(&server.uri(), &[]);
        let (_, error) = drain(&mut llm.stream(&request()).await.expect("open")).await;
        assert!(
            matches!(&error, Some(HandlerError::Backend { detail, .. }) if detail.contains("out of KV cache")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_endless_line_fails_the_stream_at_the_event_cap() {
        use testkit::endless::{EndlessAnswer, EndlessServer};
        let server = EndlessServer::start(EndlessAnswer::new(
            "text/event-stream",
            "data: {\"choices\": [{\"delta\": {\"content\": \"",
            "x".repeat(16 * 1024),
        ))
        .await
        .expect("server");
        let llm = client(
            &server.url(),
            &[
                ("LLM_MAX_EVENT_BYTES", "65536"),
                ("LLM_BREAKER_FAILURES", "1"),
            ],
        );
        let (deltas, error) = drain(&mut llm.stream(&request()).await.expect("open")).await;
        assert!(deltas.is_empty(), "{deltas:?}");
        assert!(
            matches!(&error, Some(HandlerError::Backend { backend: "llm", detail })
                if detail.contains("an event passed 65536 bytes (LLM_MAX_EVENT_BYTES)")),
            "{error:?}"
        );
        server.assert_hung_up_within(65536, "an endless line").await;
        // The broken stream counted against the breaker (one failure opens it here).
        let err = llm.stream(&request()).await.expect_err("breaker open");
        assert!(matches!(err, HandlerError::Unavailable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn tokens_without_end_fail_the_stream_at_the_stream_cap() {
        use testkit::endless::{EndlessAnswer, EndlessServer};
        let token = format!("data: {}\n\n", text_chunk("a"));
        let server = EndlessServer::start(EndlessAnswer::new(
            "text/event-stream",
            "",
            token.repeat(64),
        ))
        .await
        .expect("server");
        let cap = 256 * 1024;
        let llm = client(&server.url(), &[("LLM_MAX_STREAM_BYTES", &cap.to_string())]);
        let (deltas, error) = drain(&mut llm.stream(&request()).await.expect("open")).await;
        // Every whole event before the cap was handed out, then the stream failed.
        assert!(
            deltas.len() > cap / token.len() / 2,
            "{} deltas",
            deltas.len()
        );
        assert!(deltas.len() <= cap / token.len(), "{} deltas", deltas.len());
        assert!(
            matches!(&error, Some(HandlerError::Backend { detail, .. })
                if detail.contains("passed 262144 bytes (LLM_MAX_STREAM_BYTES)")),
            "{error:?}"
        );
        server
            .assert_hung_up_within(cap as u64, "endless tokens")
            .await;
    }

    #[tokio::test]
    async fn a_whole_answer_over_its_cap_is_a_backend_error() {
        use testkit::endless::{EndlessAnswer, EndlessServer};
        let server = EndlessServer::start(EndlessAnswer::new(
            "application/json",
            "{\"choices\": [{\"message\": {\"content\": \"",
            "y".repeat(16 * 1024),
        ))
        .await
        .expect("server");
        let llm = client(&server.url(), &[("LLM_MAX_RESPONSE_BYTES", "100000")]);
        let err = llm.complete(&request()).await.expect_err("over the cap");
        assert!(
            matches!(&err, HandlerError::Backend { detail, .. } if detail.contains("more than 100000 bytes")),
            "{err:?}"
        );
        server
            .assert_hung_up_within(100_000, "a whole answer")
            .await;
    }

    #[tokio::test]
    async fn server_errors_before_the_stream_count_against_the_breaker() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500).set_body_string("CUDA out of memory"))
            .mount(&server)
            .await;
        let llm = client(&server.uri(), &[("LLM_BREAKER_FAILURES", "2")]);
        for _ in 0..2 {
            let err = llm.stream(&request()).await.expect_err("500");
            assert!(
                matches!(&err, HandlerError::Backend { backend: "llm", detail } if detail.contains("500")),
                "{err:?}"
            );
        }
        // Two failures opened the breaker: the server is not even asked.
        let err = llm.stream(&request()).await.expect_err("open breaker");
        assert!(matches!(err, HandlerError::Unavailable { .. }), "{err:?}");
        assert_eq!(server.received_requests().await.expect("recorded").len(), 2);
    }

    #[tokio::test]
    async fn a_refused_request_is_rejected_and_leaves_the_breaker_closed() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(400).set_body_string("maximum context length exceeded"),
            )
            .mount(&server)
            .await;
        let llm = client(&server.uri(), &[("LLM_BREAKER_FAILURES", "1")]);
        for _ in 0..3 {
            let err = llm.stream(&request()).await.expect_err("400");
            assert!(
                matches!(&err, HandlerError::BackendRejected { detail, .. } if detail.contains("context length")),
                "{err:?}"
            );
        }
        let err = llm.complete(&request()).await.expect_err("400");
        assert!(
            matches!(err, HandlerError::BackendRejected { .. }),
            "{err:?}"
        );
    }

    /// A server that answers 200 with SSE headers and one event, then stalls until dropped.
    async fn stalling_server() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            // Read the request head (the body is small and arrives with it or just after).
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.expect("read");
                assert!(n > 0, "client closed early");
                request.extend_from_slice(&buf[..n]);
            }
            let event = format!("data: {}\n\n", text_chunk("Hel"));
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            socket.write_all(head.as_bytes()).await.expect("write");
            socket.write_all(chunk.as_bytes()).await.expect("write");
            socket.flush().await.expect("flush");
            // Stall, draining whatever else the client sends, until it hangs up.
            while let Ok(n) = socket.read(&mut buf).await
                && n > 0
            {}
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_stalled_stream_times_out_and_counts_as_a_failure() {
        let (url, server) = stalling_server().await;
        let llm = client(
            &url,
            &[
                ("LLM_IDLE_TIMEOUT_MS", "100"),
                ("LLM_BREAKER_FAILURES", "1"),
            ],
        );
        let mut stream = llm.stream(&request()).await.expect("open");
        assert_eq!(
            stream.next().await.expect("a delta").expect("ok"),
            Delta::Text("Hel".into())
        );
        let started = Instant::now();
        let err = stream.next().await.expect("an error").expect_err("timeout");
        assert!(
            matches!(err, HandlerError::Timeout { backend: "llm", after } if after == Duration::from_millis(100)),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(stream.next().await.is_none());
        // The connection is closed: the server task sees the hang-up and ends.
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server saw the hang-up")
            .expect("server task");
        // The stall counted against the breaker (one failure opens it here).
        let err = llm.stream(&request()).await.expect_err("breaker open");
        assert!(matches!(err, HandlerError::Unavailable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn dropping_a_stream_hangs_up_and_frees_its_slot() {
        let (url, server) = stalling_server().await;
        let llm = client(
            &url,
            &[("LLM_CONCURRENCY", "1"), ("LLM_QUEUE_TIMEOUT_MS", "50")],
        );
        let mut stream = llm.stream(&request()).await.expect("open");
        assert!(matches!(stream.next().await, Some(Ok(Delta::Text(_)))));
        drop(stream);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server saw the hang-up")
            .expect("server task");
        // The slot is free again (the next call fails to connect, not to get a slot).
        let err = llm.complete(&request()).await.expect_err("nobody listens");
        assert!(matches!(err, HandlerError::Backend { .. }), "{err:?}");
    }

    fn decode_in_pieces(body: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut decoder = SseDecoder::new(64 * 1024);
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
            decoder
                .push(&body[start..cut], &mut events)
                .expect("valid stream");
            start = cut;
        }
        decoder.finish(&mut events).expect("valid stream");
        events
    }

    #[test]
    fn sse_decoding_does_not_depend_on_chunk_boundaries() {
        let body = ": comment\n\ndata: {\"a\": \"ü\"}\r\n\r\nevent: x\nid: 7\ndata:first\ndata: second\n\n\
                    data\n\ndata: [DONE]\r\r"
            .as_bytes();
        let expected = vec![
            "{\"a\": \"ü\"}".to_string(),
            "first\nsecond".to_string(),
            String::new(),
            "[DONE]".to_string(),
        ];
        assert_eq!(decode_in_pieces(body, &[]), expected);
        for cut in 0..=body.len() {
            assert_eq!(decode_in_pieces(body, &[cut]), expected, "cut at {cut}");
        }
        let every_byte: Vec<usize> = (1..body.len()).collect();
        assert_eq!(decode_in_pieces(body, &every_byte), expected);
    }

    #[test]
    fn sse_decoding_keeps_a_last_event_without_its_blank_line() {
        assert_eq!(decode_in_pieces(b"data: [DONE]", &[]), vec!["[DONE]"]);
        assert_eq!(decode_in_pieces(b"data: a\n", &[]), vec!["a"]);
        assert!(decode_in_pieces(b": only a comment\n", &[]).is_empty());
    }

    #[test]
    fn an_event_of_many_data_lines_counts_them_all_against_its_cap() {
        // A line counts whole (`data: ` too), the event's data so far with it.
        let mut decoder = SseDecoder::new(24);
        let mut events = Vec::new();
        decoder
            .push(b"data: 0123456\n\ndata: 0123456789abcde\n\n", &mut events)
            .expect("each under the cap");
        assert_eq!(events, ["0123456", "0123456789abcde"]);
        let err = decoder
            .push(b"data: 01234\ndata: 56789\ndata: abcdefghijk", &mut events)
            .expect_err("over the cap together");
        assert!(err.contains("passed 24 bytes"), "{err}");
    }

    #[test]
    fn sse_decoding_rejects_invalid_utf8() {
        let mut decoder = SseDecoder::new(64 * 1024);
        let mut events = Vec::new();
        let err = decoder
            .push(b"data: \xff\xfe\n\n", &mut events)
            .expect_err("not UTF-8");
        assert!(err.contains("UTF-8"), "{err}");
    }
}
