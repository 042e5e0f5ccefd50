//! Answers of the Kubernetes API and of KFP are read under caps (`KUBE_MAX_RESPONSE_BYTES`,
//! `KFP_MAX_RESPONSE_BYTES`, 16 KiB of an error's body): one that does not end is a 502, after
//! reading about the cap, which the test server sees as the bytes it managed to write.

use serde_json::json;
use testkit::endless::{EndlessAnswer, EndlessServer};

use crate::support::{Harness, assert_error};

/// A kubeconfig in `dir` pointing at `url` (plain HTTP, no credentials).
fn kubeconfig(dir: &tempfile::TempDir, url: &str) -> String {
    let path = dir.path().join("endless-kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: endless\n  cluster:\n    server: {url}\n\
         users:\n- name: endless\n  user: {{}}\ncontexts:\n- name: endless\n  context:\n    \
         cluster: endless\n    user: endless\n    namespace: default\ncurrent-context: endless\n"
    );
    std::fs::write(&path, text).expect("kubeconfig");
    path.display().to_string()
}

/// An object whose `status` never closes.
fn endless_object(status: u16) -> EndlessAnswer {
    EndlessAnswer::new(
        "application/json",
        r#"{"kind": "Workflow", "status": {"nodes": ["#,
        r#"{"phase": "Running", "message": "still going"}, "#.repeat(256),
    )
    .status(status)
}

#[tokio::test]
async fn a_kubernetes_answer_without_end_is_a_502_after_reading_no_more_than_the_cap() {
    let cap = 256 * 1024;
    for (status, read_at_most, what) in [
        (201, cap, "a created object"),
        (500, handler_kit::http::ERROR_BODY_BYTES, "an error body"),
    ] {
        let server = EndlessServer::start(endless_object(status))
            .await
            .expect("endless API server");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = kubeconfig(&dir, &server.url());
        let cap_text = cap.to_string();
        let h = Harness::start_with(&[
            ("KUBECONFIG", config.as_str()),
            ("KUBE_MAX_RESPONSE_BYTES", cap_text.as_str()),
        ])
        .await;
        let answer = h
            .trigger("endless-1", json!({"pipeline": "train", "parameters": {}}))
            .await;
        assert_error(&answer, 502, "backend_error");
        server
            .assert_hung_up_within(read_at_most as u64, what)
            .await;
    }
}

#[tokio::test]
async fn a_kfp_answer_without_end_is_a_502_after_reading_no_more_than_the_cap() {
    let kfp = EndlessServer::start(EndlessAnswer::new(
        "application/json",
        r#"{"runs": ["#,
        r#"{"display_name": "someone else's run", "state": "RUNNING"}, "#.repeat(256),
    ))
    .await
    .expect("endless KFP");
    let url = kfp.url();
    let h = Harness::start_with(&[
        ("KFP_URL", url.as_str()),
        ("KFP_MAX_RESPONSE_BYTES", "262144"),
    ])
    .await;
    let answer = h
        .trigger(
            "endless-kfp",
            json!({"pipeline": "kfp-train", "parameters": {}}),
        )
        .await;
    assert_error(&answer, 502, "backend_error");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("answered more than 262144 bytes")),
        "{}",
        answer.json()
    );
    kfp.assert_hung_up_within(262_144, "an endless KFP runs list")
        .await;
}
