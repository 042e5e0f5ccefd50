//! OTLP export: with an endpoint set, the event's span joins the caller's trace and metrics flow.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{event, eventually, simulator};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn spans_continue_the_callers_trace_and_go_out_over_otlp() {
    let collector = MockServer::start().await;
    for p in ["/v1/traces", "/v1/metrics"] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200))
            .mount(&collector)
            .await;
    }
    let port = testkit::nats_server::free_port().expect("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tts-module"))
        .env_clear()
        .env("PORT", port.to_string())
        .env("TTS_URL", simulator().await)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.uri())
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tts-module");
    let base = format!("http://127.0.0.1:{port}");
    let http = handler_kit::http::client(Duration::from_secs(5)).expect("client");
    let up = eventually(Duration::from_secs(10), || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(up.is_some(), "tts-module never became ready");

    let (headers, body) = event("ai.tts.request")
        .json(&json!({"text": "Traced."}))
        .header("traceparent", &format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .binary_parts();
    let mut request = http.post(&base).body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.expect("answer").status(), 200);

    // OTLP/HTTP bodies are protobuf: the trace id travels as its 16 raw bytes.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let exported = eventually(Duration::from_secs(10), || async {
        let received = collector.received_requests().await.unwrap_or_default();
        let traced = received.iter().any(|r| {
            r.url.path() == "/v1/traces" && r.body.windows(16).any(|w| w == trace_bytes.as_slice())
        });
        let metrics = received.iter().any(|r| {
            r.url.path() == "/v1/metrics" && r.body.windows(14).any(|w| w == b"handler_events")
        });
        (traced && metrics).then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        exported.is_some(),
        "no span with the caller's trace id and no metrics reached the collector"
    );
}
