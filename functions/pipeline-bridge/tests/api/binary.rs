//! The real binary: kube-rs' own configuration path (KUBECONFIG), exit 64 on a bad catalog.

use std::time::Duration;

use serde_json::json;
use testkit::fake_kube::{FakeKfp, FakeKube};
use testkit::nats_server::NatsServer;

use crate::support::{base_env, event, eventually};

#[tokio::test]
async fn the_binary_triggers_a_run_through_its_kubeconfig() {
    let kube = FakeKube::start().await.expect("kube");
    let kfp = FakeKfp::start().await.expect("kfp");
    let nats = NatsServer::start().await.expect("nats");
    let dir = tempfile::tempdir().expect("dir");
    let env = base_env(&kube, &kfp, &nats, &dir);
    let port = testkit::nats_server::free_port().expect("port");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline-bridge"))
        .env_clear()
        .env("PORT", port.to_string())
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let http = handler_kit::http::client(Duration::from_secs(5)).expect("client");
    let base = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(10), || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(up.is_some(), "never ready");
    let (headers, body) = event("ai.pipeline.trigger")
        .id("bin-1")
        .json(&json!({"pipeline": "train", "parameters": {"model": "bert"}}))
        .binary_parts();
    let mut request = http.post(&base).body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let answer = request.send().await.expect("answer");
    assert_eq!(answer.status(), 200);
    let reply: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(
        reply["request_id"], "bin-1",
        "the CloudEvent id names the run"
    );
    assert_eq!(reply["state"], "submitted");
    assert_eq!(kube.requests_to("POST", "/workflows").len(), 1);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn a_bad_catalog_exits_64_with_every_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, "pipelines:\n  Bad:\n    kind: argo\n  k:\n    kind: kubeflow\n    kubeflow: {pipeline_id: p}\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline-bridge"))
        .env_clear()
        .env("PIPELINE_CATALOG", &catalog)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"Bad\""), "{stderr}");
    assert!(stderr.contains("KFP_URL is required"), "{stderr}");
}
