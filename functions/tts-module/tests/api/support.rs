//! Building the function under test against mock or simulated backends.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

pub use testkit::cloudevent::{event, eventually};

/// The function's router with `TTS_URL` pointing at `tts_url` and any extra variables.
pub async fn app(tts_url: &str, extra: &[(&str, &str)]) -> Router {
    let mut env = vec![("TTS_URL", tts_url)];
    env.extend_from_slice(extra);
    let config = handler_kit::config::load(&env, tts_module::Config::read).expect("valid config");
    let state = tts_module::State::new(config).await.expect("state");
    tts_module::app(state)
}

/// The simulator as the TTS backend (Coqui API).
pub async fn simulator() -> String {
    let (addr, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("simulator");
    format!("http://{addr}")
}

/// An answer, fully read.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

pub async fn send(app: &Router, request: http::Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Asserts a JSON error answer of the given status and code; never a 5xx for bad input.
pub fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(
        answer.status,
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
}
