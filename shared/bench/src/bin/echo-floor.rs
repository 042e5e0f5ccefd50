//! `echo-floor`: the smallest CloudEvents function on the functions' stack (axum 0.8 on a
//! multi-thread tokio runtime, same release profile). `bench` measures it next to every
//! function, so each number has a floor to be compared with on a noisy machine.
//!
//! - `POST /` (binary mode) answers 200 with the request body echoed and `ce-specversion: 1.0`,
//!   `ce-id: <request ce-id>.reply`, `ce-source: echo-floor`, `ce-type: echo.response`, and the
//!   request's `content-type`. Without a `ce-id` it answers 400.
//! - `GET /readyz` answers 200.
//!
//! It binds `0.0.0.0:$PORT` (default 8080) before anything else. With `ECHO_DELAY_MS` set, every
//! `POST /` waits that long before answering, so many events can be held in flight.

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

#[tokio::main]
async fn main() -> io::Result<()> {
    let port = match std::env::var("PORT") {
        Ok(raw) => raw.trim().parse::<u16>().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("PORT={raw:?}: {e}"))
        })?,
        Err(_) => 8080,
    };
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    let delay = match std::env::var("ECHO_DELAY_MS") {
        Ok(raw) => Some(Duration::from_millis(raw.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ECHO_DELAY_MS={raw:?}: {e}"),
            )
        })?)),
        Err(_) => None,
    };
    let app = Router::new()
        .route(
            "/",
            post(move |headers: HeaderMap, body: Bytes| echo(delay, headers, body)),
        )
        .route("/readyz", get(|| async { "ready" }));
    axum::serve(listener, app).await
}

async fn echo(delay: Option<Duration>, headers: HeaderMap, body: Bytes) -> Response {
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
