//! Ids that become status subjects, `Nats-Msg-Id`s, annotations and Lease holders are checked
//! before the cluster is touched: a bad one is a final 422 naming it, and nothing is published.

use serde_json::json;

use crate::support::{Harness, assert_error, event, push};
use crate::webhooks::{AFTER, github};

fn assert_names(answer: &crate::support::Answer, field: &str) {
    assert_error(answer, 422, "unprocessable");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains(field)),
        "{field}: {}",
        answer.json()
    );
}

#[tokio::test]
async fn bad_ids_in_triggers_and_status_requests_are_422_before_any_api_call() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    for bad in ["a\nb".to_string(), "x".repeat(6000)] {
        let trigger = json!({"request_id": bad, "pipeline": "train"});
        assert_names(&h.trigger("ce-1", trigger).await, "request_id");
        let ask = event("ai.pipeline.status.request")
            .json(&json!({"request_id": bad, "pipeline": "train"}))
            .binary();
        assert_names(&h.send(ask).await, "request_id");
    }
    // Without request_id the event's id names the run; structured mode can carry a newline.
    let structured = event("ai.pipeline.trigger")
        .id("e\n1")
        .json(&json!({"pipeline": "train"}))
        .structured();
    assert_names(&h.send(structured).await, "event id");
    assert!(h.kube.requests().is_empty(), "{:?}", h.kube.requests());
    assert!(h.kfp.requests().is_empty());
    statuses.assert_quiet().await;
}

#[tokio::test]
async fn a_request_id_of_exactly_256_bytes_starts_its_run() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let request_id = "r".repeat(handler_kit::event::MAX_ID_LEN);
    let answer = h
        .trigger(
            "ce-1",
            json!({"request_id": request_id, "pipeline": "train"}),
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let (subject, data) = statuses.next().await;
    assert_eq!(subject, format!("ai.pipeline.status.{request_id}"));
    assert_eq!(data["request_id"], request_id.as_str());
}

/// Anyone can label an object as ours; its request-id annotation is checked like a request's.
#[tokio::test]
async fn a_resource_event_whose_request_id_annotation_has_a_newline_is_422() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let forged = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "forged", "namespace": "ops", "resourceVersion": "1",
            "labels": {"app.kubernetes.io/managed-by": "pipeline-bridge"},
            "annotations": {"pipeline-bridge/request-id": "a\nb"}},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]}});
    let answer = h.resource_event("update", &forged).await;
    assert_names(&answer, "pipeline-bridge/request-id");
    statuses.assert_quiet().await;
    assert!(h.kube.requests().is_empty());
}

/// A delivery id is a header value, which can still hold a tab; it names the triggers' runs.
#[tokio::test]
async fn a_webhook_delivery_id_with_a_tab_is_422_and_starts_nothing() {
    let h = Harness::start().await;
    let body = push("main", AFTER, &[(&["models/a"], &[], &[])]);
    let answer = h.send(github("d\t1", "push", &body, "github-secret")).await;
    assert_names(&answer, "x-github-delivery");
    assert!(h.kube.requests().is_empty(), "{:?}", h.kube.requests());
}
