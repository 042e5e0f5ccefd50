//! The one outbound HTTP stack: reqwest on rustls (ring) with Mozilla's roots compiled in.
//!
//! Compiled-in roots mean the image needs no CA bundle (it is `FROM scratch`), and a single
//! TLS stack shared with the NATS client keeps the binary small.

use std::sync::Arc;
use std::time::Duration;

use crate::HandlerError;
use crate::resilience::CallError;

/// Makes *ring* the process-wide rustls provider, for clients that look it up there (reqwest
/// without a preconfigured TLS setup, the OTLP exporter). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client for backend calls. Per-call deadlines come from [`crate::resilience::Backend`].
pub fn client(connect_timeout: Duration) -> Result<reqwest::Client, HandlerError> {
    install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HandlerError::Internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("handler-kit/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| HandlerError::Internal(format!("HTTP client setup: {e}")))
}

/// Sorts a backend's answer: 2xx passes, 4xx is the request's fault, the rest is the backend's.
pub async fn check(
    response: reqwest::Result<reqwest::Response>,
) -> Result<reqwest::Response, CallError> {
    let response = response.map_err(|e| CallError::Transient(describe(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let snippet: String = body.chars().take(300).collect();
    let detail = format!("HTTP {status}: {snippet}");
    // 408 and 429 are the backend asking for time, not a verdict on the request.
    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
        Err(CallError::Rejected(detail))
    } else {
        Err(CallError::Transient(detail))
    }
}

/// A reqwest error with its cause chain, which is where "connection refused" lives.
pub fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
