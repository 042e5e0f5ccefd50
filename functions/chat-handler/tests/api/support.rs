//! Mock backends (wiremock, plus raw TCP servers where a connection's fate matters) and the app.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub use testkit::cloudevent::{assert_error, event, eventually, send};

/// One wiremock server per backend.
pub struct Backends {
    pub llm: MockServer,
    pub embed: MockServer,
    pub rerank: MockServer,
    pub milvus: MockServer,
}

impl Backends {
    pub async fn start() -> Self {
        Self {
            llm: MockServer::start().await,
            embed: MockServer::start().await,
            rerank: MockServer::start().await,
            milvus: MockServer::start().await,
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LLM_URL".into(), self.llm.uri()),
            ("EMBED_URL".into(), self.embed.uri()),
            ("RERANK_URL".into(), self.rerank.uri()),
            ("MILVUS_URL".into(), self.milvus.uri()),
        ]
    }

    /// Embeddings answering `[0.1, 0.2, 0.3]` for any input.
    pub async fn embeddings(&self) {
        Mock::given(method("POST"))
            .and(path("/v1/embeddings"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": "m"
            })))
            .mount(&self.embed)
            .await;
    }

    /// Milvus v2 search on `collection` answering `hits`.
    pub async fn milvus_hits(&self, collection: &str, hits: Value) {
        Mock::given(method("POST"))
            .and(path("/v2/vectordb/entities/search"))
            .and(body_partial_json(json!({"collectionName": collection})))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"code": 0, "data": hits})),
            )
            .mount(&self.milvus)
            .await;
    }

    /// TEI rerank answering `ranking` ([{index, score}]).
    pub async fn rerank(&self, ranking: Value) {
        Mock::given(method("POST"))
            .and(path("/rerank"))
            .respond_with(ResponseTemplate::new(200).set_body_json(ranking))
            .mount(&self.rerank)
            .await;
    }

    /// A streaming LLM answering `tokens`, after `delay`.
    pub async fn llm_tokens(&self, tokens: &[&str], delay: Duration) {
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(sse(tokens))
                    .set_delay(delay),
            )
            .mount(&self.llm)
            .await;
    }

    /// Asserts that no backend received a request.
    pub async fn assert_untouched(&self) {
        for server in [&self.llm, &self.embed, &self.milvus, &self.rerank] {
            let calls = server
                .received_requests()
                .await
                .expect("wiremock records requests");
            assert!(calls.is_empty(), "a backend was called: {calls:?}");
        }
    }

    /// Bodies of the requests the LLM received.
    pub async fn llm_requests(&self) -> Vec<Value> {
        self.llm
            .received_requests()
            .await
            .expect("wiremock records requests")
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap_or_default())
            .collect()
    }
}

/// An OpenAI streaming body for `tokens`, with usage and `[DONE]`.
pub fn sse(tokens: &[&str]) -> String {
    let mut body = String::new();
    for t in tokens {
        let chunk = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]});
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    let stop = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    body.push_str(&format!("data: {stop}\n\n"));
    let usage = json!({"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": tokens.len(), "total_tokens": 11 + tokens.len()}});
    body.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
    body
}

/// The function with the given backends and extra variables.
pub async fn app(env: &[(String, String)], extra: &[(&str, &str)]) -> Router {
    let mut vars: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    vars.extend(env.iter().cloned());
    let config =
        handler_kit::config::load(&vars, chat_handler::Config::read).expect("valid config");
    chat_handler::app(chat_handler::State::new(config).await.expect("state"))
}

pub fn chat(data: Value) -> http::Request<Body> {
    event("ai.chat.request").json(&data).binary()
}

/// A raw LLM that sends response headers and `first` SSE text, then either stalls (noticing
/// when the client hangs up) or sends `then` and closes.
pub struct RawLlm {
    pub url: String,
    pub connections: Arc<AtomicUsize>,
    pub hung_up: Arc<AtomicBool>,
}

impl RawLlm {
    pub async fn start(first: String, then: Option<String>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let connections = Arc::new(AtomicUsize::new(0));
        let hung_up = Arc::new(AtomicBool::new(false));
        let (c, h) = (connections.clone(), hung_up.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (first, then, h) = (first.clone(), then.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut seen = Vec::new();
                    // Read the request head and body (small JSON), enough to answer.
                    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(chunk(&first).as_bytes()).await;
                    let _ = socket.flush().await;
                    if let Some(then) = then {
                        let _ = socket.write_all(chunk(&then).as_bytes()).await;
                        let _ = socket.write_all(b"0\r\n\r\n").await;
                        return;
                    }
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                h.store(true, Ordering::SeqCst);
                                return;
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        Self {
            url,
            connections,
            hung_up,
        }
    }
}

/// The SSE text of one token event.
pub fn sse_token(token: &str) -> String {
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": token}}]});
    format!("data: {chunk}\n\n")
}
