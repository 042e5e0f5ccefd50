//! The app under test and helpers.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

pub use testkit::cloudevent::event;

pub async fn app(stt_url: &str, extra: &[(&str, &str)]) -> Router {
    let mut env: Vec<(&str, &str)> = extra.to_vec();
    env.push(("STT_URL", stt_url));
    let config = handler_kit::config::load(&env, stt_module::Config::read).expect("valid config");
    stt_module::app(stt_module::State::new(config).await.expect("state"))
}

pub async fn simulator() -> String {
    let (addr, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("sim");
    format!("http://{addr}")
}

pub struct Answer {
    pub status: u16,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(app: &Router, request: http::Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Answer {
        status: parts.status.as_u16(),
        body,
    }
}

pub fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(
        answer.status,
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["error"], code);
}
