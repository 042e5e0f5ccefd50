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

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use bench::floor;

#[tokio::main]
async fn main() -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, floor::port()?)).await?;
    let delay = floor::delay()?;
    let app = Router::new()
        .route(
            "/",
            post(move |headers: HeaderMap, body: Bytes| floor::echo(delay, headers, body)),
        )
        .route("/readyz", get(|| async { "ready" }));
    axum::serve(listener, app).await
}
