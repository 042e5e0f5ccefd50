//! CloudEvent requests for tests, in binary or structured mode, with JSON or MessagePack data.

use axum::body::Body;
use base64::Engine as _;
use http::Request;
use serde::Serialize;

/// Builds one CloudEvent request.
#[derive(Debug, Clone)]
pub struct EventBuilder {
    ty: String,
    id: String,
    source: String,
    content_type: Option<String>,
    data: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Starts an event of type `ty` with id `test-1` and source `/test`.
pub fn event(ty: &str) -> EventBuilder {
    EventBuilder {
        ty: ty.into(),
        id: "test-1".into(),
        source: "/test".into(),
        content_type: None,
        data: Vec::new(),
        headers: Vec::new(),
    }
}

impl EventBuilder {
    /// Sets the `id`.
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.into();
        self
    }

    /// Adds an HTTP header (e.g. `traceparent`, `accept`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// JSON data.
    pub fn json(mut self, data: &impl Serialize) -> Self {
        self.content_type = Some("application/json".into());
        self.data = serde_json::to_vec(data).expect("serializable test data");
        self
    }

    /// MessagePack data (a map with field names, as producers send it).
    pub fn msgpack(mut self, data: &impl Serialize) -> Self {
        self.content_type = Some("application/msgpack".into());
        self.data = rmp_serde::to_vec_named(data).expect("serializable test data");
        self
    }

    /// Raw bytes with a content type.
    pub fn raw(mut self, content_type: &str, data: impl Into<Vec<u8>>) -> Self {
        self.content_type = Some(content_type.into());
        self.data = data.into();
        self
    }

    /// The `ce-*` headers and body of binary mode, without building a request.
    pub fn binary_parts(&self) -> (Vec<(String, String)>, Vec<u8>) {
        let mut headers = vec![
            ("ce-specversion".to_string(), "1.0".to_string()),
            ("ce-id".into(), self.id.clone()),
            ("ce-source".into(), self.source.clone()),
            ("ce-type".into(), self.ty.clone()),
        ];
        if let Some(ct) = &self.content_type {
            headers.push(("content-type".into(), ct.clone()));
        }
        headers.extend(self.headers.iter().cloned());
        (headers, self.data.clone())
    }

    /// The structured-mode JSON envelope.
    pub fn structured_body(&self) -> Vec<u8> {
        let mut envelope = serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.ty,
        });
        if let Some(ct) = &self.content_type {
            envelope["datacontenttype"] = ct.clone().into();
            if ct.contains("json") {
                envelope["data"] = serde_json::from_slice(&self.data).expect("JSON data");
            } else {
                envelope["data_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(&self.data)
                    .into();
            }
        }
        serde_json::to_vec(&envelope).expect("envelope")
    }

    /// A binary-mode request to `POST /`.
    pub fn binary(self) -> Request<Body> {
        let (headers, body) = self.binary_parts();
        let mut request = Request::post("/");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.body(Body::from(body)).expect("valid request")
    }

    /// A structured-mode request to `POST /`.
    pub fn structured(self) -> Request<Body> {
        let body = self.structured_body();
        let mut request = Request::post("/").header("content-type", "application/cloudevents+json");
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        request.body(Body::from(body)).expect("valid request")
    }
}

/// Serves `app` on a free loopback port; returns its base URL.
pub async fn serve(app: axum::Router) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

/// Polls `check` until it returns `Some` or `timeout` passes: wait on a condition, never sleep-and-hope.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A function's HTTP answer, read whole.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers (`ce-*` for a binary-mode reply).
    pub headers: http::HeaderMap,
    /// The body.
    pub body: bytes::Bytes,
}

impl Answer {
    /// The body as JSON; panics, quoting it, when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header's value, or `""`.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Calls `app` in process with `request` and reads the whole answer (30 s at most).
pub async fn send(app: &axum::Router, request: Request<Body>) -> Answer {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Asserts a JSON error answer `{"error": code, "detail": "..."}` of the given status.
pub fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(
        answer.status,
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
}
