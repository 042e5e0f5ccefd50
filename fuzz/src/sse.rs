//! `sse`: the LLM client's server-sent-events decoder and stream handling, fed by a backend
//! answering the input ([`crate::backend`]), and its whole-answer (`complete`) parsing of the
//! same body.
//!
//! Invariants: the stream always ends (a `None`, or an error after which nothing follows),
//! text deltas are never empty, and the outcome (the deltas, then how it ended) is the same
//! whether the body arrives in one piece or cut at arbitrary points.

use std::sync::OnceLock;

use chat_handler::llm::{ChatMessage, CompletionRequest, Delta, LlmClient, LlmConfig};
use handler_kit::HandlerError;

use crate::backend::{self, Canned};
use crate::common::{Raw, runtime};

fn client() -> &'static LlmClient {
    static CLIENT: OnceLock<LlmClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut env = backend::env("LLM", backend::url());
        env.push(("LLM_IDLE_TIMEOUT_MS".into(), "5000".into()));
        let config = handler_kit::config::load(&env, LlmConfig::read)
            .unwrap_or_else(|e| panic!("llm config: {e}"));
        let _guard = runtime().enter();
        let http = handler_kit::http::client(std::time::Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("http client: {e}"));
        LlmClient::new(http, config)
    })
}

fn request() -> CompletionRequest {
    CompletionRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        temperature: None,
        max_tokens: None,
    }
}

/// How a stream went: its deltas, then the code of the error that ended it, if one did.
type Outcome = (Vec<Delta>, Option<&'static str>);

async fn drain(client: &LlmClient) -> Outcome {
    let mut stream = match client.stream(&request()).await {
        Ok(stream) => stream,
        Err(e) => return (Vec::new(), Some(e.code())),
    };
    let mut deltas = Vec::new();
    loop {
        match stream.next().await {
            None => return (deltas, None),
            Some(Ok(delta)) => {
                if let Delta::Text(text) = &delta {
                    assert!(!text.is_empty(), "an empty text delta");
                }
                deltas.push(delta);
            }
            Some(Err(e)) => {
                assert!(
                    stream.next().await.is_none(),
                    "the stream went on after its error {e}"
                );
                assert!(
                    !matches!(e, HandlerError::Internal(_)),
                    "an internal error from a backend's answer: {e}"
                );
                return (deltas, Some(e.code()));
            }
        }
    }
}

/// One input: the backend's answer (`:status:`, headers, blank line, body; `:cuts: N`).
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let whole = Canned::from_raw(&raw);
    let cuts = raw.pseudo("cuts").and_then(|c| c.parse::<u64>().ok());
    let client = client();
    runtime().block_on(async {
        backend::answer_with(whole.clone());
        let at_once = drain(client).await;
        if let Some(max) = cuts {
            backend::answer_with(whole.cut(max, max.clamp(1, 64)));
            let in_pieces = drain(client).await;
            assert_eq!(
                in_pieces, at_once,
                "the outcome depends on where the body was cut"
            );
        }
        backend::answer_with(whole);
        if let Err(e) = client.complete(&request()).await {
            assert!(
                !matches!(e, HandlerError::Internal(_)),
                "an internal error from a backend's answer: {e}"
            );
        }
    });
}
