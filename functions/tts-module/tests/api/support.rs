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

/// The real `tts-module` binary, started with only `env`, killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Process {
    /// Starts the binary on a free port and waits until `/readyz` answers 200.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let port = testkit::nats_server::free_port().expect("port");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tts-module"))
            .env_clear()
            .env("PORT", port.to_string())
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tts-module");
        let process = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: handler_kit::http::client(Duration::from_secs(5)).expect("client"),
        };
        let up = eventually(Duration::from_secs(10), || async {
            let r = process
                .http
                .get(format!("{}/readyz", process.base))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        assert!(up.is_some(), "tts-module never became ready");
        process
    }

    /// A binary-mode POST of `event` to the process.
    pub fn post(&self, event: testkit::cloudevent::EventBuilder) -> reqwest::RequestBuilder {
        let (headers, body) = event.binary_parts();
        let mut request = self.http.post(&self.base).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
