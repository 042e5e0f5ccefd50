//! `forward-floor`: `echo-floor` plus one backend call per event, the floor of a function that
//! makes one HTTP call before it answers (pipeline-bridge's trigger without a lock). `bench`
//! measures it under the same 100-in-flight load as pipeline-bridge's triggers.
//!
//! Every `POST /` is first POSTed (its body and CloudEvents headers) to `ECHO_FORWARD_URL` on
//! handler-kit's HTTP client (a kept-alive connection pool, as the functions use), then
//! answered like `echo-floor` does; 502 when the call fails or answers other than 2xx.

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bench::floor;

#[tokio::main]
async fn main() -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, floor::port()?)).await?;
    let url = std::env::var("ECHO_FORWARD_URL")
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ECHO_FORWARD_URL is not set"))?;
    let client = handler_kit::http::client(Duration::from_secs(3))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let app = Router::new()
        .route(
            "/",
            post(move |headers: HeaderMap, body: Bytes| {
                let (client, url) = (client.clone(), url.clone());
                async move { forward(&client, &url, headers, body).await }
            }),
        )
        .route("/readyz", get(|| async { "ready" }));
    axum::serve(listener, app).await
}

async fn forward(client: &reqwest::Client, url: &str, headers: HeaderMap, body: Bytes) -> Response {
    let mut request = client.post(url).body(body.clone());
    for name in [
        "ce-id",
        "ce-specversion",
        "ce-type",
        "ce-source",
        "content-type",
    ] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value.clone());
        }
    }
    let passed = match request.send().await {
        Ok(answer) if answer.status().is_success() => answer.bytes().await.is_ok(),
        _ => false,
    };
    if !passed {
        return (StatusCode::BAD_GATEWAY, "forward failed").into_response();
    }
    floor::echo(None, headers, body).await
}
