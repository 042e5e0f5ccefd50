//! Run status: ApiServerSource events and `ai.pipeline.status.request`.

use std::time::Duration;

use serde_json::json;

use crate::support::{Harness, assert_error, event, run_name};

#[tokio::test]
async fn workflow_events_publish_running_then_succeeded_and_free_nothing_they_do_not_hold() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let trigger =
        json!({"request_id": "w-1", "pipeline": "train", "parameters": {"model": "bert"}});
    assert_eq!(h.trigger("ce-1", trigger).await.status, 200);
    assert_eq!(statuses.next().await.1["state"], "submitted");
    let path = format!(
        "/apis/argoproj.io/v1alpha1/namespaces/ml/workflows/{}",
        run_name("train", "w-1")
    );
    let added = h.kube.object(&path).expect("workflow");
    assert_eq!(h.resource_event("add", &added).await.status, 202);
    assert_eq!(statuses.next().await.1["state"], "submitted");
    let running = h
        .kube
        .update(&path, |w| w["status"] = json!({"phase": "Running"}))
        .expect("wf");
    let answer = h.resource_event("update", &running).await;
    assert_eq!(
        answer.json(),
        json!({"request_id": "w-1", "state": "running"})
    );
    let (subject, data) = statuses.next().await;
    assert_eq!(subject, "ai.pipeline.status.w-1");
    assert_eq!(
        data,
        json!({"request_id": "w-1", "pipeline": "train", "state": "running", "kind": "argo",
               "name": run_name("train", "w-1"), "namespace": "ml"})
    );
    let failed = h
        .kube
        .update(&path, |w| {
            w["status"] = json!({"phase": "Failed", "message": "child failed"})
        })
        .expect("wf");
    assert_eq!(h.resource_event("update", &failed).await.status, 202);
    let data = statuses.next().await.1;
    assert_eq!(data["state"], "failed");
    assert_eq!(data["reason"], "child failed");
    // No lock on this entry: no Lease traffic.
    assert!(
        h.kube
            .requests()
            .iter()
            .all(|r| !r.path.contains("/leases"))
    );
}

#[tokio::test]
async fn a_job_deleted_before_it_finished_is_failed_and_its_lock_freed() {
    // A lock is freed by a delete only once no create under it can be in flight.
    let h = Harness::start_with(&[("KUBE_TIMEOUT_MS", "300")]).await;
    let mut statuses = h.statuses().await;
    let trigger = json!({"request_id": "j-1", "pipeline": "deploy", "parameters": {"env": "prod"}});
    assert_eq!(h.trigger("ce-1", trigger).await.status, 200);
    statuses.next().await;
    let path = format!(
        "/apis/batch/v1/namespaces/ops/jobs/{}",
        run_name("deploy", "j-1")
    );
    let running = h
        .kube
        .update(&path, |j| {
            j["status"] = json!({"active": 1, "startTime": "2025-01-01T00:00:00Z"})
        })
        .expect("job");
    assert_eq!(h.resource_event("update", &running).await.status, 202);
    assert_eq!(statuses.next().await.1["state"], "running");
    h.kube.remove(&path).expect("deleted");
    let deleted = crate::support::eventually(Duration::from_secs(5), || {
        let (h, running) = (&h, &running);
        async move {
            let answer = h.resource_event("delete", running).await;
            (answer.status == 202).then_some(())
        }
    })
    .await;
    assert!(deleted.is_some(), "the delete was never acted on");
    let data = statuses.next().await.1;
    assert_eq!(data["state"], "failed");
    assert_eq!(data["reason"], "deleted before it finished");
    let lease = h
        .kube
        .object(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases/{}",
            pipeline_bridge::names::lease_name("deploy-prod")
        ))
        .expect("lease");
    assert!(lease["spec"]["holderIdentity"].is_null());
}

#[tokio::test]
async fn objects_not_created_here_are_ignored() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let foreign = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "other", "namespace": "ops", "resourceVersion": "1"},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]}});
    let answer = h.resource_event("update", &foreign).await;
    assert_eq!(answer.status, 202);
    assert!(answer.json()["ignored"].is_string());
    statuses.assert_quiet().await;
    // Read back (the event is only a hint), never written to.
    let calls: Vec<(String, String)> = h
        .kube
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        [(
            "GET".to_string(),
            "/apis/batch/v1/namespaces/ops/jobs/other".to_string()
        )]
    );
    // In a namespace no pipeline runs in, or not a run's name: not even read.
    h.kube.clear_requests();
    let mut elsewhere = foreign.clone();
    elsewhere["metadata"]["namespace"] = json!("kube-system");
    assert!(h.resource_event("update", &elsewhere).await.json()["ignored"].is_string());
    let mut path_like = foreign.clone();
    path_like["metadata"]["name"] = json!("../../../api/v1/secrets");
    assert!(h.resource_event("update", &path_like).await.json()["ignored"].is_string());
    assert!(h.kube.requests().is_empty(), "{:?}", h.kube.requests());
    // Not an object at all: a final 400.
    let bad = event("dev.knative.apiserver.resource.update")
        .raw("application/json", "[")
        .binary();
    assert_error(&h.send(bad).await, 400, "invalid_payload");
}

#[tokio::test]
async fn a_status_request_reads_the_run_from_the_api_and_frees_a_finished_runs_lock() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let ask = |id: &str, pipeline: &str| {
        event("ai.pipeline.status.request")
            .json(&json!({"request_id": id, "pipeline": pipeline}))
            .binary()
    };
    let missing = h.send(ask("none", "deploy")).await;
    assert_eq!(missing.status, 200);
    assert_eq!(missing.json()["state"], "not_found");
    let trigger = json!({"request_id": "s-1", "pipeline": "deploy", "parameters": {"env": "prod"}});
    assert_eq!(h.trigger("ce-1", trigger).await.status, 200);
    statuses.next().await;
    let name = run_name("deploy", "s-1");
    h.kube
        .update(&format!("/apis/batch/v1/namespaces/ops/jobs/{name}"), |j| {
            j["status"] =
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        })
        .expect("job");
    h.kube.clear_requests();
    let answer = h.send(ask("s-1", "deploy")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("ce-type"), "ai.pipeline.status");
    assert_eq!(answer.json()["state"], "succeeded");
    assert_eq!(statuses.next().await.1["state"], "succeeded");
    let lease = pipeline_bridge::names::lease_name("deploy-prod");
    let calls: Vec<(String, String)> = h
        .kube
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        vec![
            (
                "GET".to_string(),
                format!("/apis/batch/v1/namespaces/ops/jobs/{name}")
            ),
            (
                "GET".to_string(),
                format!("/apis/coordination.k8s.io/v1/namespaces/ops/leases/{lease}")
            ),
            (
                "PUT".to_string(),
                format!("/apis/coordination.k8s.io/v1/namespaces/ops/leases/{lease}")
            ),
        ]
    );
    // Kubeflow runs are read from KFP.
    let kfp = json!({"request_id": "k-1", "pipeline": "kfp-train"});
    assert_eq!(h.trigger("ce-2", kfp).await.status, 200);
    let run_id = h.kfp.runs()[0]["run_id"].as_str().expect("id").to_string();
    h.kfp.set_state(&run_id, "RUNNING");
    let answer = h.send(ask("k-1", "kfp-train")).await;
    assert_eq!(answer.json()["state"], "running");
    assert_eq!(answer.json()["run_id"], run_id.as_str());
    assert_error(&h.send(ask("x", "nope")).await, 422, "unprocessable");
}
