//! wiremock helpers for the backends functions call.

use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockGuard, MockServer, ResponseTemplate};

/// A Coqui-style `GET /api/tts` answering `wav` after `delay`, for as long as the guard lives.
pub async fn coqui_tts(server: &MockServer, wav: Vec<u8>, delay: Duration) -> MockGuard {
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(wav)
                .set_delay(delay),
        )
        .mount_as_scoped(server)
        .await
}

/// A Coqui-style `GET /api/tts` answering `status` with `body`, for as long as the guard lives.
pub async fn coqui_tts_failing(server: &MockServer, status: u16, body: &str) -> MockGuard {
    Mock::given(method("GET"))
        .and(path("/api/tts"))
        .respond_with(ResponseTemplate::new(status).set_body_string(body))
        .mount_as_scoped(server)
        .await
}
