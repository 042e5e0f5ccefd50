//! OTLP export: with an endpoint set, the event's span joins the caller's trace and metrics flow.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{Process, event, eventually, simulator};

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
    let (tts_url, collector_url) = (simulator().await, collector.uri());
    let process = Process::start(&[
        ("TTS_URL", &tts_url),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_url),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
    ])
    .await;
    let traced = event("ai.tts.request")
        .json(&json!({"text": "Traced."}))
        .header("traceparent", &format!("00-{TRACE_ID}-00f067aa0ba902b7-01"));
    assert_eq!(
        process.post(traced).send().await.expect("answer").status(),
        200
    );

    // OTLP/HTTP bodies are protobuf: the trace id travels as its 16 raw bytes.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let exported = eventually(Duration::from_secs(10), || async {
        let received = collector
            .received_requests()
            .await
            .expect("wiremock records requests");
        let traced = received.iter().any(|r| {
            r.url.path() == "/v1/traces" && r.body.windows(16).any(|w| w == trace_bytes.as_slice())
        });
        let metrics = received.iter().any(|r| {
            r.url.path() == "/v1/metrics" && r.body.windows(14).any(|w| w == b"handler_events")
        });
        (traced && metrics).then_some(())
    })
    .await;
    drop(process);
    assert!(
        exported.is_some(),
        "no span with the caller's trace id and no metrics reached the collector"
    );
}
