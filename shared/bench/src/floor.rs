//! What the two floor binaries share: `PORT`, `ECHO_DELAY_MS` and the echo itself (see
//! `echo-floor` and `forward-floor`).

use std::io;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `PORT` (default 8080).
pub fn port() -> io::Result<u16> {
    match std::env::var("PORT") {
        Ok(raw) => raw
            .trim()
            .parse::<u16>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("PORT={raw:?}: {e}"))),
        Err(_) => Ok(8080),
    }
}

/// `ECHO_DELAY_MS`: how long every answer waits, if set.
pub fn delay() -> io::Result<Option<Duration>> {
    match std::env::var("ECHO_DELAY_MS") {
        Ok(raw) => Ok(Some(Duration::from_millis(raw.trim().parse().map_err(
            |e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("ECHO_DELAY_MS={raw:?}: {e}"),
                )
            },
        )?))),
        Err(_) => Ok(None),
    }
}

/// The binary-mode reply: the body echoed, `ce-id: <ce-id>.reply`; 400 without a `ce-id`.
pub async fn echo(delay: Option<Duration>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let reply_id = headers
        .get("ce-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|id| HeaderValue::from_str(&format!("{id}.reply")).ok());
    let Some(reply_id) = reply_id else {
        return (StatusCode::BAD_REQUEST, "missing or invalid ce-id").into_response();
    };
    let mut out = HeaderMap::new();
    out.insert("ce-specversion", HeaderValue::from_static("1.0"));
    out.insert("ce-id", reply_id);
    out.insert("ce-source", HeaderValue::from_static("echo-floor"));
    out.insert("ce-type", HeaderValue::from_static("echo.response"));
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        out.insert(header::CONTENT_TYPE, content_type.clone());
    }
    (out, body).into_response()
}
