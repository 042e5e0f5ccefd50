//! Ids that become status subjects, `Nats-Msg-Id`s, annotations and Lease holders are checked
//! before the cluster is touched: a bad one is a final 422 naming it, and nothing is published.
//! (An id read back from the API, as a run's annotation, is not acted on when it is bad.)

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

/// A request-id annotation is checked like a request's, as the API server has it: a run whose
/// annotation was edited to hold a newline is not acted on (nothing published, lock kept).
#[tokio::test]
async fn a_run_whose_request_id_annotation_has_a_newline_is_ignored_and_keeps_its_lock() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let trigger = json!({"request_id": "n-1", "pipeline": "deploy", "parameters": {"env": "prod"}});
    assert_eq!(h.trigger("ce-1", trigger).await.status, 200);
    statuses.next().await;
    let path = format!(
        "/apis/batch/v1/namespaces/ops/jobs/{}",
        crate::support::run_name("deploy", "n-1")
    );
    let edited = h
        .kube
        .update(&path, |j| {
            j["metadata"]["annotations"]["pipeline-bridge/request-id"] = json!("a\nb");
            j["status"] = json!({"conditions": [{"type": "Complete", "status": "True"}]});
        })
        .expect("job");
    let answer = h.resource_event("update", &edited).await;
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        answer.json()["ignored"]
            .as_str()
            .is_some_and(|why| why.contains("request id")),
        "{}",
        answer.json()
    );
    statuses.assert_quiet().await;
    assert_eq!(
        crate::support::lease_holder(&h, "deploy-prod"),
        Some("n-1".into())
    );
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
