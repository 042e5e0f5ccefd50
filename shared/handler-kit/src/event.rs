//! CloudEvents over HTTP: a body-capped extractor and a responder that answers in kind.
//!
//! The body is read with a hard cap *before* anything parses it: an unbounded read of a chunked
//! body is a memory bomb, and answering it with a 500 would make the source redeliver it forever.
//! Both content modes are accepted (binary: `ce-*` headers; structured:
//! `application/cloudevents+json`). `data` is decoded by `datacontenttype`: MessagePack, JSON, or
//! handed over as raw bytes. The reply uses the request's mode and data format, so a msgpack
//! caller gets msgpack back and a curl user gets JSON, unless `Accept` asks for something else.
//!
//! Decoding trusts no count the data carries: nesting deeper than [`MAX_DATA_DEPTH`] is refused
//! before it is decoded (JSON) or as soon as it is reached (MessagePack), and a length prefix
//! (MessagePack's `dd ff ff ff ff` claims 4 Gi elements) sizes no allocation: the data runs
//! out first, and the answer is a 400.
//!
//! Request values that become NATS subject tokens, header values or KV keys (ids) are checked
//! by [`check_token`] where the request is decoded, before any work; [`CloudEvent::request_id`]
//! does it for the usual `request_id`-else-event-`id`.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use cloudevents::binding::http::to_event;
use cloudevents::event::{Data, EventBuilder, EventBuilderV10};
use cloudevents::{AttributesReader, Event};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::HandlerError;

/// Body cap for events, in bytes. Put in the request extensions by [`crate::serve::function_router`].
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Used when no [`BodyLimit`] is set: large enough for text events, small enough to be safe.
pub const DEFAULT_BODY_LIMIT: usize = 256 * 1024;

/// The longest request value, in bytes, that may become part of a NATS subject, a header value
/// (`Nats-Msg-Id`) or a JetStream KV key: in practice, ids.
///
/// Ids are short (a UUID is 36 bytes; the longest this product builds itself, pipeline-bridge's
/// `git-{delivery}-{pipeline}`, is at most 196), so 256 refuses no sane id. The cap protects the
/// NATS connection every event in flight on a replica shares: a subject carries the id plus its
/// template and suffixes (`.reply`), and nats-server limits a protocol line to 4096 bytes.
/// Measured on nats-server 2.15.1: publishing to a 6,016-byte subject is answered
/// `-ERR 'maximum control line exceeded'` and the connection is closed. JetStream also keeps
/// each `Nats-Msg-Id` of its duplicate window in memory.
pub const MAX_ID_LEN: usize = 256;

/// Checks a request value that will become a NATS subject token, a header value or a KV key:
/// not empty, at most [`MAX_ID_LEN`] bytes, and without control characters (CR or LF in a
/// header value makes the NATS client panic; NUL, tab and DEL have no place in an id either).
///
/// Call it where the request is decoded, before any work: such a request can never succeed,
/// so it is refused with a final 422 naming `field`, instead of failing half-way (a 500 the
/// source would retry until its attempts run out).
pub fn check_token(field: &str, value: &str) -> Result<(), HandlerError> {
    if value.is_empty() {
        return Err(HandlerError::Unprocessable(format!("{field} is empty")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(HandlerError::Unprocessable(format!(
            "{field} is {} bytes long; the limit is {MAX_ID_LEN}",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(HandlerError::Unprocessable(format!(
            "{field} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(())
}

/// The deepest nesting of arrays and maps (objects) accepted in event data, in either format.
///
/// Our own payloads nest at most 3 levels (a chat request's `history` of messages). The deepest
/// data a function takes is a Kubernetes object in a resource event, about 15 levels (a Job's
/// `managedFields` mirror its pod template's fields, `f:spec.f:template.f:spec.f:containers...`);
/// 64 leaves four times that. Decoding recurses once per level, so this also bounds the stack,
/// where the libraries' own limits are 128 levels (serde_json) and 1024 (rmp-serde).
pub const MAX_DATA_DEPTH: usize = 64;

/// How the CloudEvent was carried over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Attributes in `ce-*` headers, data as the body.
    Binary,
    /// The whole event as `application/cloudevents+json`.
    Structured,
}

/// How the event's `data` is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// `application/json` (and `*+json`).
    Json,
    /// `application/msgpack` (and `application/x-msgpack`, `application/vnd.msgpack`).
    Msgpack,
}

impl DataFormat {
    /// The `datacontenttype` this format is announced with.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Msgpack => "application/msgpack",
        }
    }

    /// The format named by a content type, `None` for anything else (raw bytes).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Some(Self::Msgpack)
            }
            "application/json" | "text/json" => Some(Self::Json),
            e if e.ends_with("+json") => Some(Self::Json),
            _ => None,
        }
    }

    /// Decodes `bytes` in this format, refusing (400) data nested deeper than
    /// [`MAX_DATA_DEPTH`]; trailing bytes after one MessagePack value are ignored.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, HandlerError> {
        let invalid = |e: &dyn std::fmt::Display| HandlerError::InvalidPayload(e.to_string());
        match self {
            Self::Json => {
                check_json_depth(bytes)?;
                serde_json::from_slice(bytes).map_err(|e| invalid(&e))
            }
            Self::Msgpack => {
                let mut decoder = rmp_serde::Deserializer::from_read_ref(bytes);
                // rmp-serde counts down from its limit and fails when it reaches zero.
                decoder.set_max_depth(MAX_DATA_DEPTH + 1);
                T::deserialize(&mut decoder).map_err(|e| match e {
                    rmp_serde::decode::Error::DepthLimitExceeded => too_deep(),
                    other => invalid(&other),
                })
            }
        }
    }

    /// Serializes a payload in this format (MessagePack as a map with field names).
    pub fn encode<T: Serialize>(self, payload: &T) -> Result<Vec<u8>, HandlerError> {
        match self {
            Self::Json => {
                serde_json::to_vec(payload).map_err(|e| HandlerError::Internal(e.to_string()))
            }
            Self::Msgpack => {
                rmp_serde::to_vec_named(payload).map_err(|e| HandlerError::Internal(e.to_string()))
            }
        }
    }
}

/// An incoming CloudEvent, its body already read under the cap and parsed.
#[derive(Debug, Clone)]
pub struct CloudEvent {
    event: Event,
    mode: Mode,
    reply_mode: Mode,
    reply_format: Option<DataFormat>,
}

impl CloudEvent {
    /// Parses a CloudEvent from headers and a body that was already read under the cap.
    pub fn parse(headers: &HeaderMap, body: Vec<u8>) -> Result<Self, HandlerError> {
        let event = to_event(headers, body).map_err(describe_parse_error)?;
        let mode = if event_is_structured(headers) {
            Mode::Structured
        } else {
            Mode::Binary
        };
        let (reply_mode, reply_format) = negotiate_reply(headers, mode);
        Ok(Self {
            event,
            mode,
            reply_mode,
            reply_format,
        })
    }

    /// The event's `id`.
    pub fn id(&self) -> &str {
        self.event.id()
    }

    /// The id a function names its outputs by (subjects, `Nats-Msg-Id`): the payload's
    /// `request_id` when it has one, else the event's `id`. Either is checked with
    /// [`check_token`], so a bad one is refused before any work.
    pub fn request_id(&self, given: Option<&str>) -> Result<String, HandlerError> {
        let (field, id) = match given {
            Some(id) => ("request_id", id),
            None => ("the event id (used as request_id)", self.id()),
        };
        check_token(field, id)?;
        Ok(id.to_string())
    }

    /// The event's `type`.
    pub fn ty(&self) -> &str {
        self.event.ty()
    }

    /// The event's `subject`, if any.
    pub fn subject(&self) -> Option<&str> {
        self.event.subject()
    }

    /// How the event arrived.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The underlying SDK event, for attributes and extensions not wrapped here.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The format of `data`, from `datacontenttype` (absent means JSON, as in structured mode).
    pub fn data_format(&self) -> Result<DataFormat, HandlerError> {
        match self.event.datacontenttype() {
            None => Ok(DataFormat::Json),
            Some(ct) => DataFormat::from_content_type(ct)
                .ok_or_else(|| HandlerError::UnsupportedMediaType(ct.to_string())),
        }
    }

    /// Checks the event's type, so a misrouted event is rejected rather than misread.
    pub fn expect_type(&self, accepted: &[&str]) -> Result<(), HandlerError> {
        if accepted.contains(&self.ty()) {
            Ok(())
        } else {
            Err(HandlerError::InvalidEvent(format!(
                "unexpected type {:?}; this function accepts {}",
                self.ty(),
                accepted.join(", ")
            )))
        }
    }

    /// Decodes `data` into the function's payload type according to `datacontenttype`, with
    /// [`DataFormat::decode`]'s limits.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let format = self.data_format()?;
        match (format, self.event.data()) {
            (_, None) => Err(HandlerError::InvalidPayload("the event has no data".into())),
            (DataFormat::Msgpack, Some(Data::Binary(bytes))) => format.decode(bytes),
            (DataFormat::Msgpack, Some(_)) => Err(HandlerError::InvalidPayload(
                "datacontenttype is msgpack but data is not binary (use data_base64)".into(),
            )),
            // A structured envelope's data, already parsed (under serde_json's 128 levels).
            (DataFormat::Json, Some(Data::Json(value))) => {
                if json_value_depth(value) > MAX_DATA_DEPTH {
                    return Err(too_deep());
                }
                T::deserialize(value).map_err(|e| HandlerError::InvalidPayload(e.to_string()))
            }
            (DataFormat::Json, Some(Data::Binary(bytes))) => format.decode(bytes),
            (DataFormat::Json, Some(Data::String(text))) => format.decode(text.as_bytes()),
        }
    }

    /// `data` as raw bytes, whatever its content type (e.g. `audio/wav` sent as the body).
    ///
    /// JSON data that arrived inside a structured envelope is returned as its JSON text.
    pub fn data_bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>, HandlerError> {
        use std::borrow::Cow;
        match self.event.data() {
            None => Err(HandlerError::InvalidPayload("the event has no data".into())),
            Some(Data::Binary(bytes)) => Ok(Cow::Borrowed(bytes)),
            Some(Data::String(text)) => Ok(Cow::Borrowed(text.as_bytes())),
            Some(Data::Json(value)) => Ok(Cow::Owned(value.to_string().into_bytes())),
        }
    }

    /// The format a reply will use: `Accept` if it named one, else the request's own.
    pub fn reply_format(&self) -> DataFormat {
        self.reply_format
            .or_else(|| self.data_format().ok())
            .unwrap_or(DataFormat::Json)
    }

    /// Builds the reply CloudEvent for this request, in the request's encoding.
    ///
    /// The reply's `id` is derived from the request's, so a redelivered event produces the same
    /// reply id and downstream deduplication (`Nats-Msg-Id`) can drop the second copy.
    pub fn reply<T: Serialize>(
        &self,
        ty: &str,
        source: &str,
        payload: &T,
    ) -> Result<Reply, HandlerError> {
        let format = self.reply_format();
        let id = format!("{}.reply", self.id());
        let time = chrono::Utc::now();
        let response = match self.reply_mode {
            Mode::Binary => {
                let body = format.encode(payload)?;
                let mut headers = HeaderMap::new();
                let mut set = |name: &'static str, value: &str| {
                    HeaderValue::from_str(value)
                        .map(|v| headers.insert(name, v))
                        .map_err(|_| {
                            HandlerError::Internal(format!("{name} is not a valid header"))
                        })
                };
                set("ce-specversion", "1.0")?;
                set("ce-id", &id)?;
                set("ce-source", source)?;
                set("ce-type", ty)?;
                set("ce-time", &time.to_rfc3339())?;
                set(header::CONTENT_TYPE.as_str(), format.content_type())?;
                (headers, body).into_response()
            }
            Mode::Structured => {
                let data = match format {
                    DataFormat::Json => Data::Json(
                        serde_json::to_value(payload)
                            .map_err(|e| HandlerError::Internal(e.to_string()))?,
                    ),
                    DataFormat::Msgpack => Data::Binary(format.encode(payload)?),
                };
                let event = EventBuilderV10::new()
                    .id(id)
                    .source(source)
                    .ty(ty)
                    .time(time)
                    .data(format.content_type(), data)
                    .build()
                    .map_err(|e| HandlerError::Internal(e.to_string()))?;
                let body = serde_json::to_vec(&event)
                    .map_err(|e| HandlerError::Internal(e.to_string()))?;
                (
                    [(header::CONTENT_TYPE, "application/cloudevents+json")],
                    body,
                )
                    .into_response()
            }
        };
        Ok(Reply(response))
    }
}

/// A reply CloudEvent ready to send (200).
#[derive(Debug)]
pub struct Reply(Response);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        self.0
    }
}

impl<S: Send + Sync> FromRequest<S> for CloudEvent {
    type Rejection = HandlerError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(DEFAULT_BODY_LIMIT, |l| l.0);
        let (parts, body) = req.into_parts();
        let body = read_capped(&parts.headers, body, limit).await?;
        // The body read into one buffer is taken over, not copied: at a 32 MiB cap a copy is
        // 32 MiB more per request at the peak.
        let event = Self::parse(&parts.headers, Vec::from(body))?;
        crate::telemetry::continue_trace_from_event(&event.event);
        Ok(event)
    }
}

/// Reads a request body under a hard cap: a declared length over it is refused before a byte is
/// read, and a chunked body is cut off (413) as soon as it passes the cap. A body that breaks off
/// for any other reason (the sender's connection failed mid-body) is
/// [`HandlerError::BodyIncomplete`], retryable: the event was never seen whole, so it cannot be
/// judged bad. Shared by the event extractor and by functions that take other bodies (webhooks).
pub async fn read_capped(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, HandlerError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(HandlerError::PayloadTooLarge { limit });
    }
    Ok(Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                HandlerError::PayloadTooLarge { limit }
            } else {
                HandlerError::BodyIncomplete(e.to_string())
            }
        })?
        .to_bytes())
}

fn too_deep() -> HandlerError {
    HandlerError::InvalidPayload(format!(
        "data nests deeper than {MAX_DATA_DEPTH} levels of arrays and maps"
    ))
}

/// Refuses JSON text whose arrays and objects nest deeper than [`MAX_DATA_DEPTH`], by counting
/// brackets outside strings, before the text is parsed. Text that is not JSON may be counted
/// wrongly; the parser refuses it anyway.
fn check_json_depth(text: &[u8]) -> Result<(), HandlerError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return Err(too_deep());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// How deeply `value`'s arrays and objects nest (a scalar: 0), without recursing.
fn json_value_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let mut deepest = 0;
    let mut pending = vec![(value, 0usize)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(fields) => pending.extend(fields.values().map(|v| (v, depth + 1))),
            _ => continue,
        }
        deepest = deepest.max(depth + 1);
    }
    deepest
}

fn event_is_structured(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/cloudevents+json"))
}

fn negotiate_reply(headers: &HeaderMap, mode: Mode) -> (Mode, Option<DataFormat>) {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if accept.starts_with("application/cloudevents+json") {
        (Mode::Structured, None)
    } else {
        (mode, DataFormat::from_content_type(accept))
    }
}

fn describe_parse_error(err: cloudevents::message::Error) -> HandlerError {
    use cloudevents::message::Error;
    let detail = match err {
        Error::WrongEncoding {} => "not a CloudEvent: send binary mode (ce-specversion, ce-id, \
             ce-source, ce-type headers) or structured mode (content-type \
             application/cloudevents+json)"
            .to_string(),
        Error::UnknownSpecVersion { source } => {
            format!("{source}; this function speaks CloudEvents 1.0")
        }
        other => other.to_string(),
    };
    HandlerError::InvalidEvent(detail)
}

/// Serde for byte fields (audio): MessagePack `bin` on the wire, a base64 string in JSON.
///
/// Use with `#[serde(with = "handler_kit::event::bytes_field")]` on a `Vec<u8>`.
pub mod bytes_field {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Bytes as `bin` for binary formats, base64 for human-readable ones.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    /// Accepts `bin`, a base64 string, or an array of byte values.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes or a base64 string")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            Ok(v)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            STANDARD
                .decode(v.trim())
                .map_err(|e| E::custom(format!("invalid base64: {e}")))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // The hint is the sender's claim (a MessagePack array32 may claim 4 Gi elements):
            // reserve no more than 64 KiB on its word, and let the bytes that do arrive grow it.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Audio {
        #[serde(with = "bytes_field")]
        audio: Vec<u8>,
    }

    #[test]
    fn bytes_are_bin_in_msgpack_and_base64_in_json() {
        let a = Audio {
            audio: vec![0, 1, 2, 255],
        };
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(json, r#"{"audio":"AAEC/w=="}"#);
        assert_eq!(serde_json::from_str::<Audio>(&json).expect("json back"), a);
        let mp = rmp_serde::to_vec_named(&a).expect("msgpack");
        // 0xc4 = bin 8: the bytes travel as binary, not as a string or an array.
        assert!(mp.windows(2).any(|w| w == [0xc4, 4]));
        assert_eq!(
            rmp_serde::from_slice::<Audio>(&mp).expect("msgpack back"),
            a
        );
    }

    #[test]
    fn raw_data_is_available_in_both_modes() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/t"),
            ("ce-type", "t"),
            ("content-type", "audio/wav"),
        ] {
            headers.insert(k, HeaderValue::from_static(v));
        }
        let ce = CloudEvent::parse(&headers, b"RIFF0000".to_vec()).expect("binary event");
        assert_eq!(&*ce.data_bytes().expect("bytes"), b"RIFF0000");
        assert!(matches!(
            ce.data::<serde_json::Value>(),
            Err(HandlerError::UnsupportedMediaType(_))
        ));

        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        let body = br#"{"specversion":"1.0","id":"2","source":"/t","type":"t","datacontenttype":"audio/wav","data_base64":"UklGRg=="}"#;
        let ce = CloudEvent::parse(&headers, body.to_vec()).expect("structured event");
        assert_eq!(ce.mode(), Mode::Structured);
        assert_eq!(&*ce.data_bytes().expect("bytes"), b"RIFF");
    }

    fn broken_body() -> axum::body::Body {
        let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
            Ok(bytes::Bytes::from_static(b"{\"text\": \"half")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            )),
        ];
        axum::body::Body::from_stream(futures::stream::iter(pieces))
    }

    #[tokio::test]
    async fn a_body_cut_off_mid_read_is_retried_and_one_over_the_cap_is_not() {
        let cut = read_capped(&HeaderMap::new(), broken_body(), 1024)
            .await
            .expect_err("a broken body");
        assert!(matches!(cut, HandlerError::BodyIncomplete(_)), "{cut:?}");
        assert!(cut.class().is_retryable());
        let big = axum::body::Body::from(vec![b'x'; 2048]);
        let over = read_capped(&HeaderMap::new(), big, 1024)
            .await
            .expect_err("over the cap");
        assert!(matches!(
            over,
            HandlerError::PayloadTooLarge { limit: 1024 }
        ));
        assert!(!over.class().is_retryable());
    }

    /// Through a function's HTTP surface: the event extractor answers 408, which the source
    /// retries, instead of 400, which it would dead-letter.
    #[tokio::test]
    async fn an_event_whose_body_breaks_off_is_answered_408() {
        use tower::ServiceExt as _;
        let events = axum::Router::new().route(
            "/",
            axum::routing::post(|_event: CloudEvent| async { "never reached" }),
        );
        let app = crate::serve::function_router(events, crate::serve::Health::new(), 1024);
        let request = axum::http::Request::post("/")
            .header("ce-specversion", "1.0")
            .header("ce-id", "cut-1")
            .header("ce-source", "/test")
            .header("ce-type", "ai.test")
            .header("content-type", "application/json")
            .body(broken_body())
            .expect("request");
        let response = app.oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        assert!(matches!(
            crate::delivery::disposition(response.status(), None),
            crate::delivery::Disposition::Retry { .. }
        ));
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["error"], "body_incomplete");
    }

    #[test]
    fn ids_with_control_characters_or_over_the_cap_are_refused_naming_the_field() {
        for bad in [
            "a\nb",
            "a\rb",
            "nul\0",
            "tab\there",
            "del\u{7f}",
            "c1\u{85}",
            "",
        ] {
            let err = check_token("request_id", bad).expect_err(bad);
            assert!(matches!(err, HandlerError::Unprocessable(_)), "{bad:?}");
            assert!(err.to_string().contains("request_id"), "{err}");
            assert!(!err.class().is_retryable());
        }
        let long = "x".repeat(6000);
        let err = check_token("session_id", &long).expect_err("long");
        assert!(
            err.to_string().contains("session_id is 6000 bytes"),
            "{err}"
        );
        // The cap counts bytes: 129 two-byte characters are over it.
        assert!(check_token("request_id", &"é".repeat(129)).is_err());
        for good in [
            "r-1",
            "AI:42",
            "Ünïcödé id with spaces/and.dots",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert!(check_token("request_id", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn the_request_id_falls_back_to_the_event_id_and_both_are_checked() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        // Structured mode is where an id can carry a newline: JSON escapes it.
        let body = br#"{"specversion":"1.0","id":"e\n1","source":"/t","type":"t"}"#;
        let ce = CloudEvent::parse(&headers, body.to_vec()).expect("structured event");
        assert_eq!(ce.request_id(Some("r-1")).expect("given"), "r-1");
        let err = ce.request_id(None).expect_err("the event id has a newline");
        assert!(err.to_string().contains("event id"), "{err}");
        let err = ce.request_id(Some("a\nb")).expect_err("newline");
        assert!(err.to_string().contains("request_id"), "{err}");
    }

    /// A sequence that claims `usize::MAX` elements and has none.
    struct Boasting;

    impl Iterator for Boasting {
        type Item = u8;

        fn next(&mut self) -> Option<u8> {
            None
        }

        fn size_hint(&self) -> (usize, Option<usize>) {
            (usize::MAX, Some(usize::MAX))
        }
    }

    #[test]
    fn a_claimed_length_sizes_no_allocation_of_bytes() {
        // Reserving what it claims would panic (capacity overflow) before a byte was read.
        let claimed =
            serde::de::value::SeqDeserializer::<_, serde::de::value::Error>::new(Boasting);
        assert_eq!(
            bytes_field::deserialize(claimed).expect("no bytes"),
            Vec::<u8>::new()
        );
        // MessagePack's array32 claiming 4 Gi bytes, with none following: refused.
        let hostile = [
            0x81, 0xa5, b'a', b'u', b'd', b'i', b'o', 0xdd, 0xff, 0xff, 0xff, 0xff,
        ];
        let err = DataFormat::Msgpack
            .decode::<Audio>(&hostile)
            .expect_err("no data behind the prefix");
        assert!(matches!(err, HandlerError::InvalidPayload(_)), "{err:?}");
    }

    /// `depth` arrays nested in one another, around `0`.
    fn nested_msgpack(depth: usize) -> Vec<u8> {
        let mut data = vec![0x91; depth];
        data.push(0x00);
        data
    }

    fn nested_json(depth: usize) -> String {
        format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn data_nested_up_to_the_cap_decodes_and_deeper_is_refused_in_both_formats() {
        use serde_json::Value;
        for depth in [1, MAX_DATA_DEPTH] {
            let msgpack = DataFormat::Msgpack.decode::<Value>(&nested_msgpack(depth));
            let json = DataFormat::Json.decode::<Value>(nested_json(depth).as_bytes());
            assert_eq!(msgpack.expect("msgpack"), json.expect("json"), "{depth}");
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Text {
            text: String,
        }
        for depth in [MAX_DATA_DEPTH + 1, 10_000] {
            // In a field that is skipped as unknown, the nesting is still refused.
            let mut unknown_field =
                vec![0x82, 0xa4, b't', b'e', b'x', b't', 0xa1, b'[', 0xa1, b'x'];
            unknown_field.extend(nested_msgpack(depth - 1));
            for err in [
                DataFormat::Msgpack
                    .decode::<Value>(&nested_msgpack(depth))
                    .map(drop),
                DataFormat::Json
                    .decode::<Value>(nested_json(depth).as_bytes())
                    .map(drop),
                DataFormat::Msgpack.decode::<Text>(&unknown_field).map(drop),
                DataFormat::Json
                    .decode::<Text>(
                        format!(r#"{{"text": "[[{{", "x": {}}}"#, nested_json(depth - 1))
                            .as_bytes(),
                    )
                    .map(drop),
            ] {
                let err = err.expect_err("too deep");
                assert!(err.to_string().contains("deeper than 64"), "{depth}: {err}");
            }
        }
        // Brackets inside strings (escaped quotes too) do not count.
        let text = format!(r#"{{"a": "\"{}"}}"#, "[".repeat(1000));
        assert!(DataFormat::Json.decode::<Value>(text.as_bytes()).is_ok());
    }

    #[test]
    fn a_structured_envelopes_data_is_held_to_the_same_depth() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        for (depth, ok) in [(MAX_DATA_DEPTH, true), (MAX_DATA_DEPTH + 1, false)] {
            let body = format!(
                r#"{{"specversion":"1.0","id":"d","source":"/t","type":"t","data":{}}}"#,
                nested_json(depth)
            );
            let ce = CloudEvent::parse(&headers, body.into_bytes()).expect("structured event");
            let data = ce.data::<serde_json::Value>();
            assert_eq!(data.is_ok(), ok, "{depth}: {data:?}");
        }
    }

    #[test]
    fn content_types_are_recognised_with_parameters() {
        assert_eq!(
            DataFormat::from_content_type("application/json; charset=utf-8"),
            Some(DataFormat::Json)
        );
        assert_eq!(
            DataFormat::from_content_type("application/x-msgpack"),
            Some(DataFormat::Msgpack)
        );
        assert_eq!(DataFormat::from_content_type("text/plain"), None);
    }
}
