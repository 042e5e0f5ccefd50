//! The one outbound HTTP stack: reqwest on rustls (ring) with Mozilla's roots compiled in.
//!
//! Compiled-in roots mean the image needs no CA bundle (it is `FROM scratch`), and a single
//! TLS stack shared with the NATS client keeps the binary small.
//!
//! Backends are trusted to be well, not to be small: a misconfigured proxy, a wrong port or a
//! broken server can answer without end. So every answer is read through [`CappedBody`], chunk
//! by chunk under the backend's cap (`{PREFIX}_MAX_RESPONSE_BYTES`, see
//! [`crate::resilience::BackendConfig`]), and one over it is a failed call, never unbounded
//! growth. The body of a failed answer is only read for its first [`ERROR_BODY_BYTES`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::HandlerError;
use crate::delivery::parse_retry_after;
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

/// Sorts a backend's answer: 2xx passes; the rest is judged by [`verdict`], carrying the status
/// and the start of the body as the detail, and for [`CallError::Busy`] the backend's
/// `Retry-After`.
pub async fn check(
    response: reqwest::Result<reqwest::Response>,
) -> Result<reqwest::Response, CallError> {
    let response = response.map_err(|e| CallError::Transient(describe(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = parse_retry_after(response.headers().get(reqwest::header::RETRY_AFTER));
    let body = read_start(response, ERROR_BODY_BYTES).await;
    let detail = format!("HTTP {status}: {}", snippet(&body, 300));
    Err(match verdict(status) {
        Verdict::Transient => CallError::Transient(detail),
        Verdict::Busy => CallError::Busy {
            detail,
            retry_after,
        },
        Verdict::Rejected => CallError::Rejected(detail),
    })
}

/// How much of a failed answer's body is read: its detail keeps 300 characters (at most 1,200
/// bytes of UTF-8), and a Kubernetes `Status` refusing an invalid object, whose `message` and
/// `causes` name each bad field in about 150 bytes, still parses with a hundred of them. The
/// rest of the body is never read.
pub const ERROR_BODY_BYTES: usize = 16 * 1024;

/// Why an answer's body was not read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The body (or the length it declared) passed the cap: more than any sound answer.
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The connection failed mid-body.
    Broken(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { limit } => {
                write!(
                    f,
                    "answered more than {limit} bytes, over the cap on its answers"
                )
            }
            Self::Broken(detail) => write!(f, "answer broke off: {detail}"),
        }
    }
}

impl From<BodyError> for CallError {
    /// Either way the backend misbehaved: a failure that counts against its breaker (502).
    fn from(error: BodyError) -> Self {
        CallError::Transient(error.to_string())
    }
}

/// An answer's body, read chunk by chunk ([`reqwest::Response::chunk`]) under a cap.
///
/// A declared `Content-Length` over the cap is refused before a byte is read; a chunked body
/// fails at the first chunk that would pass it. So no more than the cap plus the chunk in hand
/// (what the HTTP stack read from the socket at once, tens of KiB) is ever held.
#[derive(Debug)]
pub struct CappedBody {
    response: reqwest::Response,
    limit: usize,
    read: usize,
}

impl CappedBody {
    /// Starts reading `response` under `limit` bytes.
    pub fn new(response: reqwest::Response, limit: usize) -> Result<Self, BodyError> {
        if response
            .content_length()
            .is_some_and(|declared| declared > limit as u64)
        {
            return Err(BodyError::TooLarge { limit });
        }
        Ok(Self {
            response,
            limit,
            read: 0,
        })
    }

    /// The next chunk; `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        let Some(chunk) = self
            .response
            .chunk()
            .await
            .map_err(|e| BodyError::Broken(describe(&e)))?
        else {
            return Ok(None);
        };
        self.read += chunk.len();
        if self.read > self.limit {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        Ok(Some(chunk))
    }

    /// The rest of the body in one piece.
    pub async fn read_all(mut self) -> Result<Bytes, BodyError> {
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }
}

/// A whole answer's body, at most `limit` bytes (see [`CappedBody`]).
pub async fn read_body(response: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    CappedBody::new(response, limit)?.read_all().await
}

/// A whole answer's body, at most `limit` bytes, parsed as JSON; garbage is a failed call
/// quoting the start of what came.
pub async fn read_json<T: DeserializeOwned>(
    response: reqwest::Response,
    limit: usize,
) -> Result<T, CallError> {
    let body = read_body(response, limit).await?;
    serde_json::from_slice(&body).map_err(|e| {
        CallError::Transient(format!(
            "answered with invalid JSON ({e}): {}",
            snippet(&body, 200)
        ))
    })
}

/// The first `limit` bytes of a body (fewer when it is shorter or breaks off), for an error's
/// detail; the rest is left unread, and the connection is closed rather than reused.
pub async fn read_start(mut response: reqwest::Response, limit: usize) -> Bytes {
    let mut start = Vec::new();
    while start.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - start.len();
                start.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    start.into()
}

/// The first `chars` characters of `body`, read as UTF-8 (bad sequences replaced).
pub fn snippet(body: &[u8], chars: usize) -> String {
    String::from_utf8_lossy(body).chars().take(chars).collect()
}

/// What a backend's non-2xx status says about the call, before any detail is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The backend or its deployment is unwell: [`CallError::Transient`].
    Transient,
    /// The backend is well but cannot take work now: [`CallError::Busy`].
    Busy,
    /// The backend judged this request and refused it: [`CallError::Rejected`], final.
    Rejected,
}

/// The classification table for backend statuses.
///
/// The question is whose fault the answer is. Only a refusal that the *request* caused may be
/// final, because a final answer dead-letters the message, and a backend that refuses everyone
/// (a rotated API key, a model reloading) would otherwise dead-letter a whole backlog:
///
/// | status | verdict | why |
/// |---|---|---|
/// | 401, 403 | transient | credentials belong to the deployment, not to the request |
/// | 404 | transient | routes are fixed by our code; a model being (re)loaded answers 404 on its API |
/// | 408 | transient | the backend gave up waiting; the request was not judged |
/// | 429, 503 | busy | the backend asks for time: back-pressure, not a failed attempt |
/// | other 5xx | transient | the backend failed |
/// | 409 | rejected | see below |
/// | other 4xx (400, 413, 415, 422, ...) | rejected | the backend judged this request |
///
/// 409 is final: the backend is healthy and judged the request against its own state. None of
/// our calls race on shared backend state (inference, search, and KFP, whose runs are created
/// under names derived from the request after a lookup), so an identical retry meets the same
/// conflict, and retrying it as a failure would open the breaker on a healthy backend.
///
/// 1xx and 3xx are not answers a backend call should end with (redirects are followed): the
/// backend is misbehaving, so they are transient.
pub fn verdict(status: reqwest::StatusCode) -> Verdict {
    match status.as_u16() {
        401 | 403 | 404 | 408 => Verdict::Transient,
        429 | 503 => Verdict::Busy,
        400..=499 => Verdict::Rejected,
        _ => Verdict::Transient,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_the_request_caused_is_final() {
        let table = [
            (400, Verdict::Rejected),
            (401, Verdict::Transient),
            (403, Verdict::Transient),
            (404, Verdict::Transient),
            (408, Verdict::Transient),
            (409, Verdict::Rejected),
            (413, Verdict::Rejected),
            (415, Verdict::Rejected),
            (422, Verdict::Rejected),
            (429, Verdict::Busy),
            (500, Verdict::Transient),
            (501, Verdict::Transient),
            (502, Verdict::Transient),
            (503, Verdict::Busy),
            (504, Verdict::Transient),
            (304, Verdict::Transient),
        ];
        for (code, expected) in table {
            let status = reqwest::StatusCode::from_u16(code).expect("status");
            assert_eq!(verdict(status), expected, "{code}");
        }
    }

    use testkit::endless::{EndlessAnswer, EndlessServer};

    async fn get(url: &str) -> reqwest::Response {
        let http = client(Duration::from_secs(1)).expect("client");
        check(http.get(url).send().await).await.expect("200")
    }

    #[tokio::test]
    async fn an_answer_declaring_more_than_the_cap_is_refused_before_it_is_read() {
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::any};
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b'x'; 2048]))
            .mount(&server)
            .await;
        let err = read_body(get(&server.uri()).await, 1024)
            .await
            .expect_err("over the cap");
        assert_eq!(err, BodyError::TooLarge { limit: 1024 });
        let body = read_body(get(&server.uri()).await, 2048)
            .await
            .expect("at the cap");
        assert_eq!(body.len(), 2048);
    }

    #[tokio::test]
    async fn an_endless_answer_fails_at_the_cap_and_the_backend_sees_the_hang_up() {
        let server = EndlessServer::start(EndlessAnswer::new(
            "application/json",
            "[",
            "1.0, ".repeat(1000),
        ))
        .await
        .expect("server");
        let cap = 64 * 1024;
        let err = read_json::<Vec<f32>>(get(&server.url()).await, cap)
            .await
            .expect_err("over the cap");
        assert!(
            matches!(&err, CallError::Transient(detail) if detail.contains("more than 65536 bytes")),
            "{err:?}"
        );
        server
            .assert_hung_up_within(cap as u64, "an endless JSON answer")
            .await;
    }

    #[tokio::test]
    async fn an_endless_error_body_is_read_only_for_its_start() {
        let server = EndlessServer::start(
            EndlessAnswer::new("text/plain", "CUDA out of memory: ", "é".repeat(4096)).status(500),
        )
        .await
        .expect("server");
        let http = client(Duration::from_secs(1)).expect("client");
        let err = check(http.get(server.url()).send().await)
            .await
            .expect_err("500");
        let CallError::Transient(detail) = &err else {
            panic!("{err:?}");
        };
        assert!(detail.starts_with("HTTP 500 Internal Server Error: CUDA out of memory: éé"));
        assert_eq!(
            detail.chars().count(),
            "HTTP 500 Internal Server Error: ".len() + 300
        );
        server
            .assert_hung_up_within(ERROR_BODY_BYTES as u64, "an endless error body")
            .await;
    }

    #[tokio::test]
    async fn a_busy_backend_passes_on_when_to_come_back() {
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::any};
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(
                ResponseTemplate::new(503)
                    .insert_header("retry-after", "3")
                    .set_body_string("loading model"),
            )
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(429).set_body_string("slow down"))
            .mount(&server)
            .await;
        let http = client(Duration::from_secs(1)).expect("client");
        let first = check(http.get(server.uri()).send().await).await;
        assert!(
            matches!(&first, Err(CallError::Busy { detail, retry_after: Some(after) })
                if detail.contains("loading model") && *after == Duration::from_secs(3)),
            "{first:?}"
        );
        let second = check(http.get(server.uri()).send().await).await;
        assert!(
            matches!(
                &second,
                Err(CallError::Busy {
                    retry_after: None,
                    ..
                })
            ),
            "{second:?}"
        );
    }
}
