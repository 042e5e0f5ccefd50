//! Calls to an OpenAI-compatible LLM made the way chat-handler and voice-assistant make them,
//! timed by the bench itself ("direct" calls, next to the function's own).

use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Result, ensure};
use serde_json::{Value, json};

use super::http::Peer;

/// chat-handler's default system prompt (`CHAT_SYSTEM_PROMPT` unset), for the direct calls.
const SYSTEM_PROMPT: &str = "You are a helpful assistant. Answer from the numbered \
context when it is relevant and cite it as [n]; if the context does not contain the answer, \
say so briefly and answer from general knowledge.";
/// `LLM_MODEL` / `EMBED_MODEL` default.
pub const MODEL: &str = "default";

/// Times the first content delta of a server-sent-events completion as it is read.
#[derive(Default)]
pub struct FirstToken {
    pending: Vec<u8>,
    /// When the first content delta was read.
    pub at: Option<Instant>,
}

impl FirstToken {
    /// Feeds the next piece of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        let now = Instant::now();
        if self.at.is_some() {
            return;
        }
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            if text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .any(|data| has_content(data.trim()))
            {
                self.at = Some(now);
                return;
            }
        }
    }
}

/// Whether an SSE `data` payload carries a non-empty `choices[0].delta.content`.
fn has_content(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|v| {
        v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    })
}

/// The completion request chat-handler sends for `message` with `docs` (text, source) as
/// numbered context.
pub fn completion_body(message: &str, docs: &[(String, Option<String>)]) -> Value {
    let mut system = SYSTEM_PROMPT.to_string();
    if !docs.is_empty() {
        system.push_str("\n\nContext:\n");
        for (i, (text, source)) in docs.iter().enumerate() {
            let origin = source
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            system.push_str(&format!("[{}] {}{}\n", i + 1, text.trim(), origin));
        }
    }
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": message},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Streams a completion to `[DONE]`: (first content delta, whole stream), both from before
/// the request was written.
pub fn stream_completion(peer: &mut Peer, body: &Value) -> Result<(Duration, Duration)> {
    let mut first = FirstToken::default();
    let (r, started, took) =
        peer.post_json("/v1/chat/completions", body, &mut |b| first.feed(b))?;
    ensure!(
        r.body.windows(12).any(|w| w == b"data: [DONE]"),
        "the completion stream did not end with [DONE]"
    );
    let at = first
        .at
        .context("the completion stream carried no content")?;
    Ok((at.saturating_duration_since(started), took))
}

/// Streams a completion to `[DONE]`: (the answer's text, the whole stream's time from before
/// the request was written).
pub fn stream_completion_text(peer: &mut Peer, body: &Value) -> Result<(String, Duration)> {
    let (r, _, took) = peer.post_json("/v1/chat/completions", body, &mut |_| {})?;
    let mut text = String::new();
    let mut done = false;
    for data in String::from_utf8_lossy(&r.body)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
    {
        if data == "[DONE]" {
            done = true;
        } else if let Ok(v) = serde_json::from_str::<Value>(data)
            && let Some(t) = v["choices"][0]["delta"]["content"].as_str()
        {
            text.push_str(t);
        }
    }
    ensure!(done, "the completion stream did not end with [DONE]");
    ensure!(!text.is_empty(), "the completion stream carried no content");
    Ok((text, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_token_waits_for_content() {
        let mut f = FirstToken::default();
        f.feed(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"cho");
        assert!(f.at.is_none());
        f.feed(b"ices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n");
        assert!(f.at.is_some());
    }

    #[test]
    fn completion_body_numbers_the_context() {
        let body = completion_body("q", &[("a ".into(), Some("s".into())), ("b".into(), None)]);
        let system = body["messages"][0]["content"].as_str().unwrap();
        assert!(
            system.ends_with("\n\nContext:\n[1] a (s)\n[2] b\n"),
            "{system}"
        );
        assert_eq!(body["messages"][1]["content"], "q");
    }
}
