//! The backends of the functions' targets: the inference simulator (testkit's local stand-in
//! for TTS, STT, LLM, embeddings and rerank) plus a Milvus stand-in that finds two documents,
//! on one loopback port. Quick settings (1 ms of speech per character at 8 kHz) keep a request
//! cheap; breakers never open, so every input reaches the code under test.

use std::sync::OnceLock;

use axum::Json;
use axum::routing::post;
use axum::serve::ListenerExt as _;
use serde_json::{Value, json};
use testkit::sim::SimConfig;

use crate::common::runtime;

async fn milvus_search() -> Json<Value> {
    Json(json!({"code": 0, "data": [
        {"id": 1, "distance": 0.9, "text": "NATS JetStream stores messages.", "source": "nats.md"},
        {"id": "b", "distance": 0.5, "text": "Knative scales to zero.", "source": "knative.md"}
    ]}))
}

/// The base URL of the backends, started on first use.
pub fn url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let config = SimConfig {
            sample_rate: 8000,
            embedding_dim: 8,
            ms_per_char: 1,
            ..SimConfig::default()
        };
        let app = testkit::sim::router(config)
            .route("/v2/vectordb/entities/search", post(milvus_search))
            .route("/v1/vector/search", post(milvus_search));
        let listener = runtime()
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local address: {e}"));
        runtime().spawn(async move {
            // Small writes go out at once: the answers come in many small pieces, and Nagle's
            // algorithm against delayed ACKs would hold each for up to 40 ms.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    })
}

/// The environment of a function under fuzz: every backend on [`url`], no NATS, breakers that
/// never open, and `extra`.
pub fn env(backends: &[&str], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let url = url();
    let mut env = vec![("EVENT_TIMEOUT_MS".to_string(), "10000".to_string())];
    for prefix in backends {
        env.push((format!("{prefix}_URL"), url.to_string()));
        env.push((format!("{prefix}_BREAKER_FAILURES"), "1000000000".into()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}
