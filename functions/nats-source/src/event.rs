//! Translation between NATS messages and HTTP CloudEvents.
//!
//! A plain message becomes a binary-mode CloudEvent whose `id` is stable across redeliveries
//! (`Nats-Msg-Id`, else `{stream}:{stream_sequence}`), so a function can deduplicate. A message
//! that already is a CloudEvent (binary `ce-*` headers, or structured JSON) passes unchanged.

use async_nats::HeaderMap as NatsHeaders;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, subject_matches};

/// Where a message sits in its stream: what the event's `id` and `time` come from.
#[derive(Debug, Clone)]
pub struct Position {
    /// Stream name.
    pub stream: String,
    /// Sequence in the stream.
    pub sequence: u64,
    /// When the stream stored it.
    pub published: chrono::DateTime<chrono::Utc>,
}

/// An HTTP request ready to POST to the sink.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The event's `id` (for logs and the reply's dedup id).
    pub id: String,
    /// HTTP headers, `ce-*` included.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

fn nats_header<'a>(headers: Option<&'a NatsHeaders>, name: &str) -> Option<&'a str> {
    let headers = headers?;
    headers
        .iter()
        .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str())
}

/// The longest event id the source carries, in bytes. An id becomes a header value (`ce-id`,
/// the reply's `Nats-Msg-Id`), a subject token and a key in functions' stores; 256 is well
/// above a UUID with a prefix, and keeps a hostile 10 KB id from travelling anywhere.
pub const MAX_ID_BYTES: usize = 256;

/// Why a message cannot be carried into a CloudEvent, a reply or a NATS header. Such a
/// message can never succeed: it is dead-lettered at once, with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    /// The event id has control characters (CR, LF, NUL, ...) or is too long.
    #[error("event id {0} cannot be carried in a header")]
    Id(String),
    /// The reply subject named by the message is not a subject one can publish to.
    #[error("reply subject {0} is not a valid NATS subject")]
    ReplySubject(String),
    /// The reply subject named by the message is not one the source may publish to.
    #[error("reply subject {subject} refused: {why}")]
    ReplyRefused {
        /// The subject, previewed.
        subject: String,
        /// Which rule refused it.
        why: &'static str,
    },
}

/// Core CloudEvent attributes: a plain NATS header by one of these names is not an
/// extension, and never overrides the attribute the source maps.
const RESERVED: [&str; 9] = [
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
];

/// A bounded, printable preview of a hostile value for a reason or a log line.
fn preview(value: &str) -> String {
    let shown: String = value
        .chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if value.len() > 64 {
        format!("\"{shown}...\" ({} bytes)", value.len())
    } else {
        format!("\"{shown}\"")
    }
}

/// Checks an event id: printable, at most [`MAX_ID_BYTES`].
fn check_id(id: &str) -> Result<(), Poison> {
    if id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
        return Err(Poison::Id(preview(id)));
    }
    Ok(())
}

/// Whether `subject` can be published to: tokens of printable characters without
/// whitespace or wildcards, none empty, at most 1024 bytes in all.
fn is_publishable(subject: &str) -> bool {
    !subject.is_empty()
        && subject.len() <= 1024
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// Builds the HTTP CloudEvent for one message, or says why it cannot be built.
pub fn to_http(
    config: &Config,
    msg: &async_nats::Message,
    position: &Position,
) -> Result<Outbound, Poison> {
    let outbound = build(config, msg, position);
    check_id(&outbound.id)?;
    Ok(outbound)
}

fn build(config: &Config, msg: &async_nats::Message, position: &Position) -> Outbound {
    let headers = msg.headers.as_ref();
    let content_type = nats_header(headers, "content-type");
    let mut out = HeaderMap::new();
    let set = |out: &mut HeaderMap, name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            out.insert(n, v);
        }
    };

    // Already a binary-mode CloudEvent: forward its ce-* attributes as they are.
    if let Some(id) =
        nats_header(headers, "ce-id").filter(|_| nats_header(headers, "ce-specversion").is_some())
    {
        for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
            let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
            let keep = lower.starts_with("ce-")
                || matches!(
                    lower.as_str(),
                    "content-type" | "traceparent" | "tracestate"
                );
            if let (true, Some(v)) = (keep, values.first()) {
                set(&mut out, &lower, v.as_str());
            }
        }
        return Outbound {
            id: id.to_string(),
            headers: out,
            body: msg.payload.clone(),
        };
    }
    // Already a structured CloudEvent.
    if let Some(id) = structured_id(content_type, &msg.payload) {
        set(&mut out, "content-type", "application/cloudevents+json");
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = nats_header(headers, name) {
                set(&mut out, name, v);
            }
        }
        return Outbound {
            id,
            headers: out,
            body: msg.payload.clone(),
        };
    }

    let id = nats_header(headers, "nats-msg-id").map_or_else(
        || format!("{}:{}", position.stream, position.sequence),
        str::to_string,
    );
    set(&mut out, "ce-specversion", "1.0");
    set(&mut out, "ce-id", &id);
    set(&mut out, "ce-source", &config.source);
    set(&mut out, "ce-type", &config.type_for(msg.subject.as_str()));
    set(&mut out, "ce-subject", msg.subject.as_str());
    set(&mut out, "ce-time", &position.published.to_rfc3339());
    set(
        &mut out,
        "content-type",
        content_type.unwrap_or(&config.default_content_type),
    );
    for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        let Some(value) = values.first() else {
            continue;
        };
        match lower.as_str() {
            "traceparent" | "tracestate" => set(&mut out, &lower, value.as_str()),
            "content-type" | "nats-msg-id" | "reply-subject" => {}
            ext if is_extension_name(ext) && !RESERVED.contains(&ext) => {
                set(&mut out, &format!("ce-{ext}"), value.as_str());
            }
            _ => {}
        }
    }
    for (name, value) in &config.overrides {
        if is_extension_name(name) && !RESERVED.contains(&name.as_str()) {
            set(&mut out, &format!("ce-{name}"), value);
        }
    }
    Outbound {
        id,
        headers: out,
        body: msg.payload.clone(),
    }
}

/// CloudEvents extension names: lowercase ASCII letters and digits, at most 20 characters.
fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The `id` of a structured-mode event, if the payload is one.
fn structured_id(content_type: Option<&str>, payload: &[u8]) -> Option<String> {
    let declared = content_type.is_some_and(|ct| ct.starts_with("application/cloudevents+json"));
    let looks_like =
        content_type.is_none() && payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !declared && !looks_like {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        specversion: Option<String>,
        id: Option<String>,
    }
    let envelope: Envelope = serde_json::from_slice(payload).ok()?;
    envelope.specversion?;
    Some(envelope.id.unwrap_or_default())
}

/// Where a 200's reply goes: the message's `reply-subject` header, its `replysubject`
/// extension, else the configured template. A subject one cannot publish to is poison.
///
/// A subject named by the message is a claim of whoever published it, so it must pass the
/// allow-list: `REPLY_SUBJECTS` when set, else anything but the server's own API (`$JS.`,
/// `$KV.`, `$SYS.`, every `$` subject: a reply there could purge a stream). Either way never
/// one of the consumer's own subjects (a reply there would be consumed as a new request).
pub fn reply_subject(config: &Config, msg: &async_nats::Message) -> Result<Option<String>, Poison> {
    let headers = msg.headers.as_ref();
    let named =
        nats_header(headers, "reply-subject").or_else(|| nats_header(headers, "ce-replysubject"));
    if let Some(subject) = named {
        if !is_publishable(subject) {
            return Err(Poison::ReplySubject(preview(subject)));
        }
        let refused = |why| Poison::ReplyRefused {
            subject: preview(subject),
            why,
        };
        if config
            .subjects
            .iter()
            .any(|own| subject_matches(own, subject))
        {
            return Err(refused("it is one of the source's own request subjects"));
        }
        if config.reply_subjects.is_empty() {
            if subject.starts_with('$') {
                return Err(refused("subjects starting with $ are the server's API"));
            }
        } else if !config
            .reply_subjects
            .iter()
            .any(|allowed| subject_matches(allowed, subject))
        {
            return Err(refused("not in REPLY_SUBJECTS"));
        }
        return Ok(Some(subject.to_string()));
    }
    let configured = config.reply_subject.as_ref().map(|t| {
        t.replace("{subject}", msg.subject.as_str())
            .replace("{stream}", &config.stream)
    });
    match configured {
        Some(s) if !is_publishable(&s) => Err(Poison::ReplySubject(preview(&s))),
        other => Ok(other),
    }
}

/// The reply CloudEvent as a NATS message (binary mode per the NATS protocol binding).
pub fn reply_message(
    response_headers: &HeaderMap,
    body: Bytes,
    fallback_id: &str,
) -> (NatsHeaders, Bytes) {
    let mut headers = NatsHeaders::new();
    let mut id = None;
    for (name, value) in response_headers {
        let Ok(v) = value.to_str() else { continue };
        let lower = name.as_str();
        if lower == "ce-id" {
            id = Some(v.to_string());
        }
        if lower.starts_with("ce-") || lower == "content-type" {
            headers.insert(lower, v);
        }
    }
    // Same reply id on a redelivery -> the same Nats-Msg-Id -> JetStream drops the copy.
    // (HTTP header values never hold CR or LF, and the fallback id was checked, so this
    // value is always a valid NATS header value.)
    headers.insert(
        "Nats-Msg-Id",
        id.unwrap_or_else(|| format!("{fallback_id}.reply"))
            .as_str(),
    );
    (headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let env = [
            ("NATS_URL", "nats://x"),
            ("K_SINK", "http://sink"),
            ("STREAM", "AI"),
            ("CONSUMER", "c"),
            ("K_CE_OVERRIDES", r#"{"extensions":{"cluster":"east"}}"#),
        ];
        handler_kit::config::load(&env, Config::read).expect("config")
    }

    fn message(headers: &[(&str, &str)], payload: &'static [u8]) -> async_nats::Message {
        let mut h = NatsHeaders::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        async_nats::Message {
            subject: "ai.tts.request".into(),
            reply: None,
            payload: Bytes::from_static(payload),
            headers: (!headers.is_empty()).then_some(h),
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    fn position() -> Position {
        Position {
            stream: "AI".into(),
            sequence: 42,
            published: chrono::DateTime::UNIX_EPOCH,
        }
    }

    fn header<'a>(o: &'a Outbound, name: &str) -> &'a str {
        o.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[test]
    fn plain_messages_become_binary_cloudevents() {
        let msg = message(
            &[
                ("traceparent", "00-ab-cd-01"),
                ("X-Tenant", "acme"),
                ("Tenantid", "t1"),
                ("Bad_Name", "x"),
            ],
            b"\x81",
        );
        let o = to_http(&config(), &msg, &position()).expect("deliverable");
        assert_eq!(o.id, "AI:42");
        assert_eq!(header(&o, "ce-id"), "AI:42");
        assert_eq!(header(&o, "ce-type"), "ai.tts.request");
        assert_eq!(header(&o, "ce-subject"), "ai.tts.request");
        assert_eq!(header(&o, "ce-source"), "/nats/AI");
        assert_eq!(header(&o, "ce-time"), "1970-01-01T00:00:00+00:00");
        assert_eq!(header(&o, "content-type"), "application/msgpack");
        assert_eq!(header(&o, "traceparent"), "00-ab-cd-01");
        assert_eq!(header(&o, "ce-tenantid"), "t1");
        assert_eq!(header(&o, "ce-cluster"), "east");
        assert!(o.headers.get("ce-x-tenant").is_none() && o.headers.get("ce-bad_name").is_none());
    }

    #[test]
    fn nats_msg_id_is_the_event_id() {
        let msg = message(
            &[
                ("Nats-Msg-Id", "req-7"),
                ("Content-Type", "application/json"),
            ],
            b"{}",
        );
        let o = to_http(&config(), &msg, &position()).expect("deliverable");
        assert_eq!(o.id, "req-7");
        assert_eq!(header(&o, "content-type"), "application/json");
    }

    #[test]
    fn cloudevents_pass_through_unchanged() {
        let binary = message(
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "e1"),
                ("ce-type", "t"),
                ("ce-source", "/s"),
                ("content-type", "application/json"),
            ],
            b"{}",
        );
        let o = to_http(&config(), &binary, &position()).expect("deliverable");
        assert_eq!(o.id, "e1");
        assert_eq!(header(&o, "ce-type"), "t");
        assert!(o.headers.get("ce-cluster").is_none() && o.headers.get("ce-subject").is_none());

        let structured = message(
            &[],
            br#"{"specversion":"1.0","id":"e2","type":"t","source":"/s"}"#,
        );
        let o = to_http(&config(), &structured, &position()).expect("deliverable");
        assert_eq!(o.id, "e2");
        assert_eq!(header(&o, "content-type"), "application/cloudevents+json");
        assert_eq!(&o.body[..], structured.payload.as_ref());
    }

    #[test]
    fn ids_that_cannot_be_carried_are_poison() {
        let newline = message(
            &[],
            b"{\"specversion\":\"1.0\",\"id\":\"a\\nb\",\"type\":\"t\",\"source\":\"/s\"}",
        );
        let err = to_http(&config(), &newline, &position()).expect_err("poison");
        assert_eq!(err, Poison::Id("\"a\\nb\"".into()));
        let long = format!(
            "{{\"specversion\":\"1.0\",\"id\":\"{}\"}}",
            "x".repeat(10_000)
        );
        let mut big = message(&[], b"");
        big.payload = Bytes::from(long);
        let err = to_http(&config(), &big, &position()).expect_err("poison");
        assert!(err.to_string().contains("(10000 bytes)"), "{err}");
        let nul = message(&[("Nats-Msg-Id", "a\0b")], b"\x80");
        assert!(to_http(&config(), &nul, &position()).is_err());
        let fine = format!(
            "{{\"specversion\":\"1.0\",\"id\":\"{}\"}}",
            "x".repeat(MAX_ID_BYTES)
        );
        big.payload = Bytes::from(fine);
        assert!(to_http(&config(), &big, &position()).is_ok());
    }

    #[test]
    fn reply_subjects_must_be_publishable() {
        for bad in ["a b", "a..b", "a.*", "a.>", "", "a.\tb"] {
            let msg = message(&[("reply-subject", bad)], b"");
            assert!(reply_subject(&config(), &msg).is_err(), "{bad:?}");
        }
        let msg = message(&[("reply-subject", "ai.tts.response.r1")], b"");
        assert_eq!(
            reply_subject(&config(), &msg),
            Ok(Some("ai.tts.response.r1".into()))
        );
        assert_eq!(reply_subject(&config(), &message(&[], b"")), Ok(None));
    }

    #[test]
    fn reply_subjects_named_by_a_message_pass_the_allow_list() {
        let mut c = config();
        c.subjects = vec!["ai.tts.request".into()];
        let named = |s: &str| message(&[("reply-subject", s)], b"");
        for refused in [
            "$JS.API.STREAM.PURGE.VICTIM",
            "$KV.b.k",
            "$SYS.REQ.x",
            "ai.tts.request",
        ] {
            assert!(
                matches!(
                    reply_subject(&c, &named(refused)),
                    Err(Poison::ReplyRefused { .. })
                ),
                "{refused}"
            );
        }
        assert!(reply_subject(&c, &named("ai.tts.response.r1")).is_ok());
        c.reply_subjects = vec!["ai.*.response.>".into()];
        assert!(reply_subject(&c, &named("ai.tts.response.r1")).is_ok());
        assert!(reply_subject(&c, &named("other.r1")).is_err());
        // The operator's own template is not a claim of the message.
        c.reply_subject = Some("replies.{subject}".into());
        assert_eq!(
            reply_subject(&c, &message(&[], b"")),
            Ok(Some("replies.ai.tts.request".into()))
        );
    }

    #[test]
    fn plain_headers_named_like_core_attributes_override_nothing() {
        let msg = message(
            &[
                ("id", "forged"),
                ("source", "/forged"),
                ("type", "forged"),
                ("specversion", "0.3"),
                ("time", "1999-01-01T00:00:00Z"),
                ("subject", "forged"),
                ("datacontenttype", "text/plain"),
                ("dataschema", "forged"),
            ],
            b"\x80",
        );
        let o = to_http(&config(), &msg, &position()).expect("deliverable");
        assert_eq!(header(&o, "ce-id"), "AI:42");
        assert_eq!(header(&o, "ce-source"), "/nats/AI");
        assert_eq!(header(&o, "ce-type"), "ai.tts.request");
        assert_eq!(header(&o, "ce-specversion"), "1.0");
        assert_eq!(header(&o, "ce-subject"), "ai.tts.request");
        assert_eq!(header(&o, "ce-time"), "1970-01-01T00:00:00+00:00");
        assert!(o.headers.get("ce-datacontenttype").is_none());
        assert!(o.headers.get("ce-dataschema").is_none());
    }
}
