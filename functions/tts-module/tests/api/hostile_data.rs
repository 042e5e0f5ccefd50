//! Event data that lies about its size or nests without end is a quick 400: a length prefix
//! sizes no allocation (the data runs out first) and nesting stops at `MAX_DATA_DEPTH`, before
//! the backend is asked anything.

use std::time::{Duration, Instant};

use handler_kit::event::MAX_DATA_DEPTH;
use wiremock::MockServer;

use crate::support::{app, assert_error, event, send};

/// MessagePack's array32 and str32 prefixes claiming 4 Gi elements (bytes), with nothing after.
const ARRAY_4G: [u8; 5] = [0xdd, 0xff, 0xff, 0xff, 0xff];
const STR_4G: [u8; 5] = [0xdb, 0xff, 0xff, 0xff, 0xff];
const MAP_4G: [u8; 5] = [0xdf, 0xff, 0xff, 0xff, 0xff];

/// `{"text": <value>}` in MessagePack.
fn with_text(value: &[u8]) -> Vec<u8> {
    [&[0x81, 0xa4, b't', b'e', b'x', b't'][..], value].concat()
}

/// `{"text": "hi", "x": <depth arrays nested>}` in MessagePack.
fn nested_in_unknown_field(depth: usize) -> Vec<u8> {
    let mut data = vec![
        0x82, 0xa4, b't', b'e', b'x', b't', 0xa2, b'h', b'i', 0xa1, b'x',
    ];
    data.extend(std::iter::repeat_n(0x91, depth));
    data.push(0x00);
    data
}

#[tokio::test]
async fn hostile_length_prefixes_and_deep_nesting_are_a_quick_400_that_never_reaches_the_backend() {
    let tts = MockServer::start().await;
    let app = app(&tts.uri(), &[]).await;
    let deep_json = format!(
        r#"{{"text": "hi", "x": {}0{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("a 4 Gi array", "application/msgpack", ARRAY_4G.to_vec()),
        ("a 4 Gi map", "application/msgpack", MAP_4G.to_vec()),
        (
            "text as a 4 Gi array",
            "application/msgpack",
            with_text(&ARRAY_4G),
        ),
        (
            "text as a 4 Gi string",
            "application/msgpack",
            with_text(&STR_4G),
        ),
        (
            "10,000 levels of msgpack",
            "application/msgpack",
            nested_in_unknown_field(10_000),
        ),
        (
            "one level too deep",
            "application/msgpack",
            nested_in_unknown_field(MAX_DATA_DEPTH),
        ),
        (
            "10,000 levels of JSON",
            "application/json",
            deep_json.into_bytes(),
        ),
    ];
    for (what, content_type, data) in cases {
        let started = Instant::now();
        let answer = send(
            &app,
            event("ai.tts.request").raw(content_type, data).binary(),
        )
        .await;
        let took = started.elapsed();
        assert_error(&answer, 400, "invalid_payload");
        eprintln!("{what}: 400 in {took:?}: {}", answer.json()["detail"]);
        assert!(took < Duration::from_secs(2), "{what} took {took:?}");
    }
    let calls = tts
        .received_requests()
        .await
        .expect("wiremock records requests");
    assert!(
        calls.is_empty(),
        "hostile data reached the backend: {calls:?}"
    );
}
