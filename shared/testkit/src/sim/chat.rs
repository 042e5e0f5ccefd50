//! `POST /v1/chat/completions`, OpenAI-compatible, streaming and not.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, SimConfig, count_tokens, fnv1a, parse_json};

/// OpenAI responses carry a creation time; a fixed one keeps output bytes stable.
const CREATED: u64 = 1_704_067_200;
const DEFAULT_MODEL: &str = "inference-sim";

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: Option<u64>,
    /// The newer OpenAI name for `max_tokens`.
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

/// The plain text of a message's `content`: a string, or the `text` of each part
/// of a multi-part content array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Numbers of context lines such as `[2] some passage`, ascending and unique, so
/// retrieval-augmented callers see citations they can check against their context.
fn cited_numbers<'a>(prompts: impl Iterator<Item = &'a str>) -> BTreeSet<u64> {
    prompts
        .flat_map(str::lines)
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('[')?;
            let (number, _) = rest.split_once(']')?;
            number.parse().ok()
        })
        .collect()
}

/// The full simulated answer before any `max_tokens` truncation.
fn answer(messages: &[(String, String)]) -> String {
    let last_user = messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map_or("", |(_, text)| text.as_str());
    let prompts = messages
        .iter()
        .filter(|(role, _)| role == "system" || role == "user")
        .map(|(_, text)| text.as_str());
    let mut answer = format!("Simulated answer: {last_user}");
    for number in cited_numbers(prompts) {
        answer.push_str(&format!(" [{number}]"));
    }
    answer
}

/// Splits text into word tokens that concatenate back to the whitespace-normalized
/// text, each after the first carrying its leading space as OpenAI tokens do.
fn tokenize(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, word)| {
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

pub(super) async fn completions(
    State(config): State<SimConfig>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_json(&body)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let limit = request.max_completion_tokens.or(request.max_tokens);
    if limit == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    let model = request
        .model
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    let messages: Vec<(String, String)> = request
        .messages
        .iter()
        .map(|message| (message.role.clone(), content_text(&message.content)))
        .collect();

    let mut tokens = tokenize(&answer(&messages));
    let mut finish_reason = "stop";
    if let Some(limit) = limit.and_then(|l| usize::try_from(l).ok())
        && tokens.len() > limit
    {
        tokens.truncate(limit);
        finish_reason = "length";
    }
    let content = tokens.concat();
    let prompt_tokens = messages
        .iter()
        .map(|(_, text)| count_tokens(text))
        .sum::<usize>();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens.len(),
        "total_tokens": prompt_tokens + tokens.len(),
    });
    let id = format!(
        "chatcmpl-sim-{:016x}",
        fnv1a(format!("{model}\n{content}").as_bytes())
    );

    if !request.stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": content },
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        });
        return Ok(Json(body).into_response());
    }

    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": choices,
            "usage": usage,
        })
    };
    let mut events: Vec<(Duration, Value)> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let delta = if i == 0 {
                json!({ "role": "assistant", "content": token })
            } else {
                json!({ "content": token })
            };
            let choices =
                json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": null }]);
            (config.token_delay, chunk(choices, Value::Null))
        })
        .collect();
    events.push((
        Duration::ZERO,
        chunk(
            json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason }]),
            Value::Null,
        ),
    ));
    // Like OpenAI with `stream_options.include_usage`: empty choices, then usage.
    events.push((Duration::ZERO, chunk(json!([]), usage)));

    let mut frames: Vec<(Duration, Bytes)> = events
        .into_iter()
        .map(|(delay, event)| (delay, Bytes::from(format!("data: {event}\n\n"))))
        .collect();
    frames.push((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));

    let stream = futures::stream::iter(frames).then(|(delay, frame)| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, Infallible>(frame)
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
