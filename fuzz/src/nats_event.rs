//! `nats_event`: nats-source's translation of a NATS message into the HTTP CloudEvent it
//! POSTs ([`nats_source::event::to_http`]), the reply subject it picks
//! ([`nats_source::event::reply_subject`]), and the reply message it builds from a function's
//! answer ([`nats_source::event::reply_message`]).
//!
//! Input: the subject on the first line, NATS header lines (`Name: value`, invalid ones dropped
//! as the client's parser refuses them), a blank line, the payload; `:sequence: N` sets the
//! stream position. Invariants: a deliverable event's id is at most `MAX_ID_BYTES` without
//! control characters; a plain message (not already a CloudEvent, in printable ASCII)
//! becomes an event the functions' extractor accepts; the reply to it carries a `Nats-Msg-Id`;
//! a reply subject that is not refused can be published to.

use std::str::FromStr as _;
use std::sync::OnceLock;

use async_nats::header::{HeaderMap as NatsHeaders, HeaderName, HeaderValue};
use axum::response::IntoResponse as _;
use bytes::Bytes;
use handler_kit::CloudEvent;
use nats_source::Config;
use nats_source::event::{MAX_ID_BYTES, Position, reply_message, reply_subject, to_http};

fn configs() -> &'static [Config; 2] {
    static CONFIGS: OnceLock<[Config; 2]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let base = [
            ("NATS_URL", "nats://127.0.0.1:4222"),
            ("K_SINK", "http://127.0.0.1:9"),
            ("STREAM", "AI"),
            ("CONSUMER", "c"),
            ("K_CE_OVERRIDES", r#"{"extensions":{"cluster":"east"}}"#),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let env: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
            handler_kit::config::load(&env, Config::read)
                .unwrap_or_else(|e| panic!("nats-source config: {e}"))
        };
        [
            with(&[("TYPE_MAP", "ai.stt.stream.*=ai.stt.chunk;ai.>=ai.request")]),
            with(&[
                ("REPLY_SUBJECT", "{subject}.reply.{stream}"),
                ("DEFAULT_CONTENT_TYPE", "application/json"),
            ]),
        ]
    })
}

/// Whether the message's subject and header values are printable ASCII. The CloudEvents HTTP
/// binding wants other characters percent-encoded in `ce-*` headers, which the source does not
/// do yet: a header it cannot build is left out, and the functions refuse the event (400).
/// The check covers the rest until it does.
fn ascii_only(message: &async_nats::Message) -> bool {
    let printable = |s: &str| s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    printable(message.subject.as_str())
        && message
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .all(|(_, values)| values.iter().all(|v| printable(v.as_str())))
}

/// One input; see the module docs for its layout.
pub fn run(data: &[u8]) {
    let (head, payload) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let mut lines = head.split('\n');
    let subject = lines.next().unwrap_or_default().trim();
    let subject = if subject.is_empty() {
        "ai.tts.request"
    } else {
        subject
    };
    let mut headers = NatsHeaders::new();
    let mut sequence = 42;
    for line in lines {
        if let Some(rest) = line.strip_prefix(':') {
            if let Some(("sequence", n)) = rest.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
                sequence = n.parse().unwrap_or(sequence);
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_str(name),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(name, value);
        }
    }
    let message = async_nats::Message {
        subject: subject.into(),
        reply: None,
        payload: Bytes::copy_from_slice(payload),
        headers: (!headers.is_empty()).then_some(headers),
        status: None,
        description: None,
        length: data.len(),
    };
    let position = Position {
        stream: "AI".into(),
        sequence,
        published: chrono::DateTime::UNIX_EPOCH,
    };
    let header = |name: &str| {
        message.headers.as_ref().is_some_and(|h| {
            h.iter()
                .any(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))
        })
    };
    let binary_event = header("ce-id") && header("ce-specversion");
    for config in configs() {
        if let Ok(Some(subject)) = reply_subject(config, &message) {
            assert!(
                !subject.is_empty()
                    && subject.split('.').all(|t| {
                        !t.is_empty() && t != "*" && t != ">" && !t.chars().any(char::is_whitespace)
                    }),
                "reply subject {subject:?} passed"
            );
        }
        let Ok(outbound) = to_http(config, &message, &position) else {
            continue;
        };
        assert!(
            outbound.id.len() <= MAX_ID_BYTES,
            "id of {} bytes",
            outbound.id.len()
        );
        assert!(
            !outbound.id.chars().any(char::is_control),
            "id {:?}",
            outbound.id
        );
        // What the functions' extractor takes for structured mode: a message that declares
        // itself a CloudEvent but is not one is refused there, as it should be.
        let structured = outbound
            .headers
            .get("content-type")
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/cloudevents+json"));
        let event = CloudEvent::parse(&outbound.headers, outbound.body.to_vec());
        if !binary_event
            && !structured
            && ascii_only(&message)
            && let Err(e) = &event
        {
            panic!("a plain message became an event the functions refuse: {e}");
        }
        let Ok(event) = event else {
            continue;
        };
        // The function's answer, as handler-kit builds it, back into a NATS reply.
        let Ok(reply) = event.reply("ai.fuzz.reply", "/fuzz", &serde_json::json!({"ok": true}))
        else {
            continue;
        };
        let response = reply.into_response();
        let (reply_headers, _) = reply_message(response.headers(), Bytes::new(), &outbound.id);
        assert!(
            reply_headers.get("Nats-Msg-Id").is_some(),
            "a reply without Nats-Msg-Id"
        );
    }
}
