//! `cloudevent`: handler-kit's CloudEvent extractor, in both content modes, with MessagePack,
//! JSON and raw data, behind the standard function router (body cap, event middleware,
//! trace continuation).
//!
//! The route decodes the data every way a function does and answers with what it decoded.
//! Beyond "no panic, no 500": a 200's reply is a CloudEvent whose id is the request's id with
//! `.reply`, and whose data decodes back to the value that was sent (in whichever format the
//! reply was negotiated).

use std::sync::OnceLock;

use axum::Router;
use axum::routing::post;
use handler_kit::event::bytes_field;
use handler_kit::serve::{Health, function_router};
use handler_kit::{CloudEvent, HandlerError, Reply};
use serde::Deserialize;
use serde_json::Value;

use crate::common::{Raw, check_answer, runtime, send};

/// The event route's body cap: small, so the 413 path is reached by inputs libFuzzer makes.
const BODY_LIMIT: usize = 2048;

/// The shape of a typical function payload: an id, text, and audio bytes.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // read through Debug only: decoding is what is exercised
struct Payload {
    request_id: Option<String>,
    text: Option<String>,
    #[serde(with = "bytes_field", default)]
    audio: Vec<u8>,
}

async fn echo(event: CloudEvent) -> Result<Reply, HandlerError> {
    let _ = (event.id(), event.ty(), event.subject(), event.mode());
    let _ = event.expect_type(&["ai.fuzz.request"]);
    let _ = event.data_bytes();
    let _ = event.reply_format();
    let typed = event.data::<Payload>();
    let given = typed.as_ref().ok().and_then(|p| p.request_id.clone());
    let request_id = event.request_id(given.as_deref());
    let value: Value = event.data()?;
    request_id?;
    event.reply("ai.fuzz.reply", "/fuzz", &value)
}

fn app() -> &'static Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| {
        let events = Router::new().route("/", post(echo));
        function_router(events, Health::new(), BODY_LIMIT)
    })
}

/// One input: headers, a blank line, the body.
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let request = raw.request("/");
    runtime().block_on(async {
        let answer = send(app(), request).await;
        check_answer(&answer);
        if answer.status != 200 {
            return;
        }
        // Only a parsed event gets a 200, so the request parses here too.
        let sent = CloudEvent::parse(&raw.headers, raw.body.clone())
            .unwrap_or_else(|e| panic!("answered 200 to an event that does not parse: {e}"));
        let reply = CloudEvent::parse(&answer.headers, answer.body.to_vec())
            .unwrap_or_else(|e| panic!("the reply does not parse: {e}"));
        assert_eq!(reply.id(), format!("{}.reply", sent.id()));
        assert_eq!(reply.ty(), "ai.fuzz.reply");
        let back: Value = reply
            .data()
            .unwrap_or_else(|e| panic!("the reply's data does not decode: {e}"));
        let value: Value = sent.data().unwrap_or_else(|e| panic!("decoded once: {e}"));
        assert!(
            same_data(&back, &value),
            "the reply changed the data: {back} vs {value}"
        );
    });
}

/// Equal, but for floats within a few units in the last place: serde_json's default float
/// parsing is not correctly rounded, so a float can move by one ULP through a JSON reply
/// (e.g. a MessagePack f32, printed with 17 digits and read back).
fn same_data(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
                _ => false,
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_data(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_data(v, w)))
        }
        (a, b) => a == b,
    }
}
