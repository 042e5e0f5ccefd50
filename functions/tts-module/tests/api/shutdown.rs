//! SIGTERM with events in flight: they complete, new work is refused, the process exits cleanly.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use wiremock::MockServer;

use crate::support::{event, eventually};

#[tokio::test]
async fn sigterm_lets_in_flight_events_finish() {
    let tts = MockServer::start().await;
    let wav = testkit::wav::sine_wav(50, 16000, 300.0);
    let _slow = testkit::mocks::coqui_tts(&tts, wav, Duration::from_millis(1500)).await;
    let port = testkit::nats_server::free_port().expect("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tts-module"))
        .env_clear()
        .env("PORT", port.to_string())
        .env("TTS_URL", tts.uri())
        .env("SHUTDOWN_GRACE_MS", "10000")
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
        .json(&json!({"text": "Slow."}))
        .binary_parts();
    let in_flight = {
        let mut request = http.post(&base).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        tokio::spawn(request.send())
    };
    // Only signal once the backend has the call: the event is genuinely in flight.
    let reached = eventually(Duration::from_secs(5), || async {
        (!tts.received_requests().await.unwrap_or_default().is_empty()).then_some(())
    })
    .await;
    assert!(reached.is_some());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let response = in_flight
        .await
        .expect("task")
        .expect("in-flight event answered");
    assert_eq!(response.status(), 200);
    let exited = eventually(Duration::from_secs(10), || {
        let status = child.try_wait().expect("wait");
        async move { status }
    })
    .await
    .expect("process exited after draining");
    assert!(exited.success(), "{exited}");
    // After the drain nothing listens any more.
    assert!(http.get(format!("{base}/healthz")).send().await.is_err());
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
