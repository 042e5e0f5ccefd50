//! What the targets share: the text form of a request, one runtime, sending to a router.
//!
//! A request is written the way it looks on the wire, so seeds are readable and libFuzzer's
//! mutations stay meaningful: `name: value` lines, a blank line, then the body. Lines whose name
//! starts with `:` are instructions to the harness (`:path: /webhooks/github`, `:status: 503`),
//! not headers. Lines that are not valid headers are dropped, as hyper would refuse them before
//! any handler ran; `content-length` is always the body's real length for the same reason.

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use handler_kit::CloudEvent;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

/// An input split into harness instructions, headers and a body.
#[derive(Debug, Default)]
pub struct Raw {
    /// `:name: value` lines, in order.
    pub pseudo: Vec<(String, String)>,
    /// The valid header lines.
    pub headers: HeaderMap,
    /// Everything after the first blank line.
    pub body: Vec<u8>,
}

impl Raw {
    /// Splits `data` at its first blank line (`\n\n`); without one, all of it is the head.
    pub fn parse(data: &[u8]) -> Self {
        let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
            Some(at) => (&data[..at], &data[at + 2..]),
            None => (data, &[][..]),
        };
        let mut raw = Self {
            body: body.to_vec(),
            ..Self::default()
        };
        for line in head.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b":") {
                let text = String::from_utf8_lossy(rest);
                let (name, value) = text.split_once(':').unwrap_or((&text, ""));
                raw.pseudo
                    .push((name.trim().to_string(), value.trim().to_string()));
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let name = line[..colon].trim_ascii();
            let value = line[colon + 1..].trim_ascii();
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                raw.headers.append(name, value);
            }
        }
        raw.headers.remove(header::CONTENT_LENGTH);
        raw.headers.remove(header::TRANSFER_ENCODING);
        raw
    }

    /// The value of the instruction `name`, if given.
    pub fn pseudo(&self, name: &str) -> Option<&str> {
        self.pseudo
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A POST of the headers and body to `:path` (or `default_path`).
    pub fn request(&self, default_path: &str) -> Request<Body> {
        let path = self
            .pseudo("path")
            .filter(|p| p.starts_with('/') && p.parse::<axum::http::Uri>().is_ok())
            .unwrap_or(default_path);
        let mut request = Request::post(path)
            .body(Body::from(self.body.clone()))
            .unwrap_or_else(|_| Request::new(Body::from(self.body.clone())));
        *request.headers_mut() = self.headers.clone();
        request
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        request
    }
}

/// The one runtime every target runs on: current-thread, so a fuzz run uses one core.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    })
}

/// A function's answer.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: bytes::Bytes,
}

/// Sends `request` to `app` in process and reads the whole answer.
pub async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_else(|e| panic!("the answer's body broke off: {e}"));
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// What must hold for any answer of a function to any request: never a 500 (the event source
/// would retry a hostile event until its attempts run out, and a 500 means a bug), and a 200
/// that is a CloudEvent parses as one.
pub fn check_answer(answer: &Answer) {
    assert_ne!(
        answer.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a hostile request got a 500: {}",
        String::from_utf8_lossy(&answer.body)
    );
    let is_event = answer.headers.contains_key("ce-id")
        || answer
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/cloudevents+json"));
    if answer.status == StatusCode::OK
        && is_event
        && let Err(e) = CloudEvent::parse(&answer.headers, answer.body.to_vec())
    {
        panic!("the reply is not a CloudEvent: {e}");
    }
}

/// A small deterministic generator: chunk sizes and synthetic noise that depend on the input only.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
