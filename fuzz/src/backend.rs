//! A local HTTP server that answers every request with the current input: the backend side of
//! the client targets (SSE, Milvus, rerank, embeddings), so the clients' own parsing runs on
//! exactly the bytes a hostile or broken backend could send, through their public API.
//!
//! The answer is written like a request ([`crate::common::Raw`]): `:status: 503` and header
//! lines, a blank line, the body. `:cuts: N` sends the body in pieces of 1 to N bytes (a seeded
//! split), so decoders see it broken at arbitrary points, as the network may.

use std::sync::{Mutex, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::serve::ListenerExt as _;
use bytes::Bytes;

use crate::common::{Raw, XorShift, runtime};

/// What the server answers next.
#[derive(Debug, Clone)]
pub struct Canned {
    /// 200 to 599 (an informational status is not a final answer).
    pub status: StatusCode,
    /// The answer's headers.
    pub headers: HeaderMap,
    /// The body, in the pieces it is sent in.
    pub chunks: Vec<Bytes>,
}

impl Canned {
    /// The answer `raw` describes, in one piece unless it says `:cuts:`.
    pub fn from_raw(raw: &Raw) -> Self {
        let status = raw
            .pseudo("status")
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        let body = Bytes::from(raw.body.clone());
        Self {
            status,
            headers: raw.headers.clone(),
            chunks: vec![body],
        }
    }

    /// The same answer with the body in pieces of 1 to `max` bytes, split by `seed`.
    pub fn cut(&self, seed: u64, max: u64) -> Self {
        let body: Vec<u8> = self.chunks.iter().flat_map(|c| c.to_vec()).collect();
        let mut rng = XorShift(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let n = (rng.below(max) as usize + 1).min(body.len() - at);
            chunks.push(Bytes::copy_from_slice(&body[at..at + n]));
            at += n;
        }
        Self {
            chunks,
            ..self.clone()
        }
    }
}

static CANNED: Mutex<Option<Canned>> = Mutex::new(None);

/// Makes `canned` the answer to every request from now on.
pub fn answer_with(canned: Canned) {
    *CANNED.lock().unwrap_or_else(|e| e.into_inner()) = Some(canned);
}

async fn answer() -> Response {
    let canned = CANNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| Canned {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            chunks: Vec::new(),
        });
    let pieces = canned.chunks.into_iter().map(Ok::<_, std::io::Error>);
    let mut response = Response::new(Body::from_stream(futures::stream::iter(pieces)));
    *response.status_mut() = canned.status;
    *response.headers_mut() = canned.headers;
    response
}

/// The server's base URL (`http://127.0.0.1:{port}`), started on first use.
pub fn url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let listener = runtime()
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local address: {e}"));
        let app = Router::new().fallback(answer);
        runtime().spawn(async move {
            // Small writes go out at once: the answers come in many small pieces, and Nagle's
            // algorithm against delayed ACKs would hold each for up to 40 ms.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    })
}

/// Backend limits for a client under fuzz: a breaker that never opens (every garbled answer
/// counts as a failure, and an open breaker would stop the answers from being read at all).
pub fn env(prefix: &str, url: &str) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}_URL"), url.to_string()),
        (format!("{prefix}_BREAKER_FAILURES"), "1000000000".into()),
        (format!("{prefix}_TIMEOUT_MS"), "5000".into()),
    ]
}
