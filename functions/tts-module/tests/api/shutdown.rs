//! SIGTERM with events in flight: they complete, new work is refused, the process exits cleanly.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use wiremock::MockServer;

use crate::support::{Process, event, eventually};

#[tokio::test]
async fn sigterm_lets_in_flight_events_finish() {
    let tts = MockServer::start().await;
    let wav = testkit::wav::sine_wav(50, 16000, 300.0);
    let _slow = testkit::mocks::coqui_tts(&tts, wav, Duration::from_millis(1500)).await;
    let tts_url = tts.uri();
    let mut process =
        Process::start(&[("TTS_URL", &tts_url), ("SHUTDOWN_GRACE_MS", "10000")]).await;
    let in_flight = tokio::spawn(
        process
            .post(event("ai.tts.request").json(&json!({"text": "Slow."})))
            .send(),
    );
    // Only signal once the backend has the call: the event is genuinely in flight.
    let reached = eventually(Duration::from_secs(5), || async {
        (!tts
            .received_requests()
            .await
            .expect("wiremock records requests")
            .is_empty())
        .then_some(())
    })
    .await;
    assert!(reached.is_some());
    let killed = Command::new("kill")
        .args(["-TERM", &process.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    // New work is refused while the in-flight event is still being answered: a fresh
    // connection (no pooled one) is not accepted once the drain has begun.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let (headers, body) = event("ai.tts.request")
        .json(&json!({"text": "Too late."}))
        .binary_parts();
    let refused = eventually(Duration::from_secs(1), || {
        let mut request = fresh.post(&process.base).body(body.clone());
        for (name, value) in &headers {
            request = request.header(name.clone(), value.clone());
        }
        async move {
            match request.send().await {
                Err(e) if e.is_connect() => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        refused.is_some(),
        "a new connection was still served while draining"
    );
    assert!(
        !in_flight.is_finished(),
        "the refusal was seen while the first event was still in flight"
    );

    let response = in_flight
        .await
        .expect("task")
        .expect("in-flight event answered");
    assert_eq!(response.status(), 200);
    let exited = eventually(Duration::from_secs(10), || {
        let status = process.child.try_wait().expect("wait");
        async move { status }
    })
    .await
    .expect("process exited after draining");
    assert!(exited.success(), "{exited}");
    // After the drain nothing listens any more.
    let healthz = format!("{}/healthz", process.base);
    assert!(process.http.get(healthz).send().await.is_err());
}

#[test]
fn bad_configuration_lists_every_problem_and_exits_64() {
    let output = Command::new(env!("CARGO_BIN_EXE_tts-module"))
        .env_clear()
        .env("PORT", "not-a-port")
        .env("TTS_API", "festival")
        .output()
        .expect("run tts-module");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in ["PORT=", "TTS_URL is required", "TTS_API="] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
}
