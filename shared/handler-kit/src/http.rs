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
    client_with(connect_timeout, Tls::default())
}

/// Whom a client trusts and how it proves who it is, for a backend with a private CA or client
/// certificates (a Kubernetes API server from a kubeconfig or a service account).
#[derive(Default)]
pub struct Tls {
    /// Trusted CA certificates (DER); empty: the compiled-in Mozilla roots.
    pub roots: Vec<Vec<u8>>,
    /// A client certificate to present.
    pub identity: Option<Identity>,
}

/// A client certificate chain and its private key, both PEM.
pub struct Identity {
    /// The certificate, then any intermediates.
    pub certificates: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("roots", &self.roots.len())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// A client like [`client`] trusting and presenting what `tls` says.
pub fn client_with(connect_timeout: Duration, tls: Tls) -> Result<reqwest::Client, HandlerError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    install_crypto_provider();
    let setup = |e: &dyn std::fmt::Display| HandlerError::Internal(format!("TLS setup: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = if tls.roots.is_empty() {
        rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }
    } else {
        let mut store = rustls::RootCertStore::empty();
        for der in tls.roots {
            store
                .add(CertificateDer::from(der))
                .map_err(|e| setup(&format!("CA certificate: {e}")))?;
        }
        store
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&e))?
        .with_root_certificates(roots);
    let config = match tls.identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(&identity.certificates)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup(&format!("client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(&identity.key)
                .map_err(|e| setup(&format!("client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| setup(&format!("client certificate: {e}")))?
        }
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
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
