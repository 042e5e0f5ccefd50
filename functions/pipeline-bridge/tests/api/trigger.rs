//! `ai.pipeline.trigger`: the exact API calls, idempotency, locks, bad input, API failures.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::fake_kube::Failure;

use crate::support::{Harness, assert_error, event, run_name, writes};

#[tokio::test]
async fn a_job_trigger_takes_its_lock_creates_the_job_and_publishes_submitted() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let answer = h
        .trigger(
            "ce-1",
            json!({"request_id": "r-1", "pipeline": "deploy", "parameters": {"env": "prod"}}),
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.header("ce-type"), "ai.pipeline.status");
    let name = run_name("deploy", "r-1");
    let reply = answer.json();
    assert_eq!(
        reply,
        json!({"request_id": "r-1", "pipeline": "deploy", "state": "submitted", "kind": "job",
               "name": name, "namespace": "ops", "created": true})
    );

    // Exactly: read the lock Lease, create it, create the Job.
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
                format!("/apis/coordination.k8s.io/v1/namespaces/ops/leases/{lease}")
            ),
            (
                "POST".to_string(),
                "/apis/coordination.k8s.io/v1/namespaces/ops/leases".to_string()
            ),
            (
                "POST".to_string(),
                "/apis/batch/v1/namespaces/ops/jobs".to_string()
            ),
        ]
    );
    let requests = h.kube.requests();
    let lease_body = &requests[1].body;
    assert_eq!(lease_body["metadata"]["name"], lease);
    assert_eq!(lease_body["spec"]["holderIdentity"], "r-1");
    assert_eq!(lease_body["spec"]["leaseDurationSeconds"], 21600);
    assert_eq!(lease_body["spec"]["leaseTransitions"], 0);
    assert!(
        lease_body["spec"]["acquireTime"].is_string()
            && lease_body["spec"]["renewTime"].is_string()
    );
    assert_eq!(
        requests[2].body,
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": "ops",
                "labels": {"app.kubernetes.io/managed-by": "pipeline-bridge", "pipeline-bridge/pipeline": "deploy"},
                "annotations": {"pipeline-bridge/request-id": "r-1", "pipeline-bridge/lock": lease},
            },
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {"restartPolicy": "Never", "containers": [{
                    "name": "deploy", "image": "registry.example/deploy:1",
                    "args": ["--env", "prod", "--revision", ""],
                }]}},
            },
        })
    );
    let (subject, data) = statuses.next().await;
    assert_eq!(subject, "ai.pipeline.status.r-1");
    assert_eq!(data, reply);
}

#[tokio::test]
async fn the_same_trigger_twice_creates_one_workflow() {
    let h = Harness::start().await;
    let data = json!({"request_id": "same", "pipeline": "train", "parameters": {"model": "bert", "epochs": 5}});
    let first = h.trigger("ce-a", data.clone()).await;
    let second = h.trigger("ce-b", data).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        second.status,
        200,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(first.json()["created"], true);
    assert_eq!(second.json()["created"], false);
    assert_eq!(second.json()["state"], "submitted");
    let name = run_name("train", "same");
    // Two create attempts, one object: the second got AlreadyExists and read the first back.
    let posts = h.kube.requests_to("POST", "/workflows");
    assert_eq!(posts.len(), 2);
    assert_eq!(
        posts[0].path,
        "/apis/argoproj.io/v1alpha1/namespaces/ml/workflows"
    );
    assert_eq!(posts[0].body, posts[1].body);
    assert_eq!(
        posts[0].body["spec"],
        json!({
            "workflowTemplateRef": {"name": "train-model"},
            "arguments": {"parameters": [{"name": "epochs", "value": "5"}, {"name": "model", "value": "bert"}]},
        })
    );
    assert_eq!(posts[0].body["metadata"]["name"], name);
    assert_eq!(
        h.kube
            .objects("/apis/argoproj.io/v1alpha1/namespaces/ml/workflows")
            .len(),
        1
    );
    assert_eq!(
        h.kube.requests_to("GET", "/workflows")[0].path,
        format!("/apis/argoproj.io/v1alpha1/namespaces/ml/workflows/{name}")
    );
}

#[tokio::test]
async fn a_kubeflow_run_is_looked_up_by_name_before_it_is_created_once() {
    let h = Harness::start().await;
    let data = json!({"request_id": "k-1", "pipeline": "kfp-train", "parameters": {"lr": "0.5"}});
    let first = h.trigger("ce-1", data.clone()).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let second = h.trigger("ce-2", data).await;
    assert_eq!(second.status, 200);
    let name = run_name("kfp-train", "k-1");
    assert_eq!(h.kfp.runs().len(), 1, "one run for two deliveries");
    let requests = h.kfp.requests();
    let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["GET", "POST", "GET"]);
    assert_eq!(requests[0].path, "/apis/v2beta1/runs");
    assert!(
        requests[0].query.contains("experiment_id=e-1"),
        "{}",
        requests[0].query
    );
    let filter = requests[0]
        .query
        .split('&')
        .find_map(|p| p.strip_prefix("filter="))
        .expect("a filter");
    assert!(
        filter.contains("display_name") && filter.contains(&name),
        "{filter}"
    );
    assert_eq!(
        requests[1].body,
        json!({
            "display_name": name,
            "description": "pipeline-bridge request k-1",
            "pipeline_version_reference": {"pipeline_id": "p-1", "pipeline_version_id": "v-1"},
            "runtime_config": {"parameters": {"lr": "0.5"}},
            "experiment_id": "e-1",
        })
    );
    let (a, b) = (first.json(), second.json());
    assert_eq!(a["created"], true);
    assert_eq!(b["created"], false);
    assert_eq!(a["run_id"], b["run_id"]);
    assert_eq!(a["kind"], "kubeflow");
    assert!(h.kube.requests().is_empty(), "no lock, no Kubernetes call");
}

#[tokio::test]
async fn two_concurrent_triggers_on_one_lock_one_runs_and_the_other_is_a_409_until_release() {
    let h = Harness::start().await;
    let a = json!({"request_id": "a", "pipeline": "deploy", "parameters": {"env": "prod"}});
    let b = json!({"request_id": "b", "pipeline": "deploy", "parameters": {"env": "prod"}});
    let (ra, rb) = tokio::join!(h.trigger("ce-a", a), h.trigger("ce-b", b.clone()));
    let mut codes = [ra.status, rb.status];
    codes.sort_unstable();
    // 409, a failed attempt of this trigger only: a 503 would shut the source's gate to the
    // function and hold back every other pipeline's triggers while this lock is held.
    assert_eq!(codes, [200, 409], "{ra:?} {rb:?}");
    let (winner, loser, loser_id) = if ra.status == 200 {
        ("a", rb, "b")
    } else {
        ("b", ra, "a")
    };
    assert_error(&loser, 409, "held");
    let retry_after: u64 = loser.header("retry-after").parse().expect("Retry-After");
    assert!(
        (1..=7).contains(&retry_after),
        "capped by PIPELINE_LOCK_RETRY_AFTER_S: {retry_after}"
    );
    assert!(
        loser.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("held by request {winner}"))
    );
    let jobs = "/apis/batch/v1/namespaces/ops/jobs";
    assert_eq!(
        h.kube.objects(jobs).len(),
        1,
        "only the lock holder created a Job"
    );

    // While the first runs, the retry is refused again.
    let again =
        json!({"request_id": loser_id, "pipeline": "deploy", "parameters": {"env": "prod"}});
    assert_eq!(h.trigger("ce-retry-1", again.clone()).await.status, 409);

    // The Job completes; its ApiServerSource event frees the lock.
    let job_path = format!("{jobs}/{}", run_name("deploy", winner));
    let done = h
        .kube
        .update(&job_path, |job| {
            job["status"] =
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
        })
        .expect("job exists");
    let observed = h.resource_event("update", &done).await;
    assert_eq!(
        observed.status,
        202,
        "{}",
        String::from_utf8_lossy(&observed.body)
    );
    let lease = h
        .kube
        .object(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases/{}",
            pipeline_bridge::names::lease_name("deploy-prod")
        ))
        .expect("lease");
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");

    let retried = h.trigger("ce-retry-2", again).await;
    assert_eq!(
        retried.status,
        200,
        "{}",
        String::from_utf8_lossy(&retried.body)
    );
    assert_eq!(h.kube.objects(jobs).len(), 2);
    let lease = h.kube.object(&format!(
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases/{}",
        pipeline_bridge::names::lease_name("deploy-prod")
    ));
    let lease = lease.expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], loser_id);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    // Other lock keys were never in the way.
    let staging =
        json!({"request_id": "s", "pipeline": "deploy", "parameters": {"env": "staging"}});
    assert_eq!(h.trigger("ce-s", staging).await.status, 200);
}

#[tokio::test]
async fn an_expired_lock_is_taken_over() {
    let h = Harness::start_with(&[("PIPELINE_LOCK_TTL_S", "1")]).await;
    let first = json!({"request_id": "old", "pipeline": "deploy", "parameters": {"env": "prod"}});
    assert_eq!(h.trigger("ce-1", first).await.status, 200);
    let next = json!({"request_id": "new", "pipeline": "deploy", "parameters": {"env": "prod"}});
    // Held for a second after the last renewal, then free: wait on the condition, not a sleep.
    let taken = crate::support::eventually(Duration::from_secs(5), || {
        let next = next.clone();
        let h = &h;
        async move { (h.trigger("ce-2", next).await.status == 200).then_some(()) }
    })
    .await;
    assert!(taken.is_some(), "the expired lock was never taken over");
}

#[tokio::test]
async fn bad_input_is_a_final_4xx_and_never_reaches_kubernetes() {
    let h = Harness::start().await;
    let cases = [
        (
            json!({"pipeline": "nope"}),
            422,
            "unprocessable",
            "not in the catalog",
        ),
        (
            json!({"pipeline": "deploy", "parameters": {"env": "prod", "force": true}}),
            422,
            "unprocessable",
            "no parameter \"force\"",
        ),
        (
            json!({"pipeline": "deploy", "parameters": {"env": "dev"}}),
            422,
            "unprocessable",
            "does not match",
        ),
        (
            json!({"pipeline": "deploy", "parameters": {"env": "prod; rm -rf /"}}),
            422,
            "unprocessable",
            "does not match",
        ),
        (
            json!({"pipeline": "deploy"}),
            422,
            "unprocessable",
            "is required",
        ),
        (
            json!({"pipeline": "deploy", "parameters": {"env": {"a": 1}}}),
            422,
            "unprocessable",
            "string, number or boolean",
        ),
        (
            json!({"parameters": {}}),
            400,
            "invalid_payload",
            "pipeline",
        ),
        (
            json!({"pipeline": "train", "extra": 1}),
            400,
            "invalid_payload",
            "extra",
        ),
        (json!({"pipeline": 7}), 400, "invalid_payload", "string"),
    ];
    for (data, status, code, detail) in cases {
        let answer = h.trigger("bad", data.clone()).await;
        assert_error(&answer, status, code);
        let text = answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(text.contains(detail), "{data}: {text}");
    }
    let not_an_event = http::Request::post("/")
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{}"))
        .expect("request");
    assert_error(&h.send(not_an_event).await, 400, "invalid_event");
    assert_error(
        &h.send(event("ai.pipeline.unknown").json(&json!({})).binary())
            .await,
        400,
        "invalid_event",
    );
    let garbage = event("ai.pipeline.trigger")
        .raw("application/json", "{not json")
        .binary();
    assert_error(&h.send(garbage).await, 400, "invalid_payload");
    let huge = event("ai.pipeline.trigger")
        .raw("application/json", vec![b' '; 70 * 1024])
        .binary();
    assert_error(&h.send(huge).await, 413, "payload_too_large");
    assert!(h.kube.requests().is_empty(), "{:?}", h.kube.requests());
    assert!(h.kfp.requests().is_empty());
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_fast_retryable_503() {
    // A kubeconfig pointing at a port nobody listens on.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = testkit::nats_server::free_port().expect("port");
    let kubeconfig = dir.path().join("down");
    let text = std::fs::read_to_string(
        testkit::fake_kube::FakeKube::start()
            .await
            .expect("fake")
            .write_kubeconfig(dir.path())
            .expect("kubeconfig"),
    )
    .expect("read");
    let text: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("server:") {
                format!("    server: http://127.0.0.1:{port}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&kubeconfig, text).expect("write");
    let path = kubeconfig.display().to_string();
    let h = Harness::start_with(&[("KUBECONFIG", path.as_str())]).await;
    let started = Instant::now();
    let answer = h
        .trigger("ce-1", json!({"request_id": "d", "pipeline": "train"}))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_error(&answer, 503, "backend_unavailable");
    assert_eq!(answer.header("retry-after"), "5");
    assert!(
        answer.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable")
    );
}

#[tokio::test]
async fn api_outages_are_retried_bad_objects_are_final_and_both_free_the_lock() {
    let h = Harness::start().await;
    let lease_path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases/{}",
        pipeline_bridge::names::lease_name("deploy-prod")
    );
    // 401 (an expired token) and 403 (RBAC): an outage of the API server, not a verdict on
    // the trigger, so a retryable 502 (counted against MAX_DELIVER).
    for (code, reason, id) in [(403, "Forbidden", "f"), (401, "Unauthorized", "u")] {
        h.kube.fail(Failure {
            method: "POST".into(),
            path_contains: "/jobs".into(),
            code,
            reason: reason.into(),
            times: Some(1),
        });
        let answer = h
            .trigger(
                id,
                json!({"request_id": id, "pipeline": "deploy", "parameters": {"env": "prod"}}),
            )
            .await;
        assert_error(&answer, 502, "backend_error");
        let detail = answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            detail.contains("kubernetes")
                && detail.contains(&format!("{code} {reason}"))
                && detail.contains("create Job"),
            "{detail}"
        );
        // The API server refused before creating anything: the lock taken for it was given
        // back, so no run holds it, and the redelivery takes it again.
        assert!(h.kube.object(&lease_path).expect("lease")["spec"]["holderIdentity"].is_null());
    }
    let put = writes(&h.kube)
        .into_iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(
        put, 3,
        "the second trigger took the free Lease (1) and each gave it back (2)"
    );
    assert!(
        h.kube
            .objects("/apis/batch/v1/namespaces/ops/jobs")
            .is_empty()
    );
    let redelivered = h
        .trigger(
            "f",
            json!({"request_id": "f", "pipeline": "deploy", "parameters": {"env": "prod"}}),
        )
        .await;
    assert_eq!(
        redelivered.status,
        200,
        "{}",
        String::from_utf8_lossy(&redelivered.body)
    );

    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/workflows".into(),
        code: 422,
        reason: "Invalid".into(),
        times: Some(1),
    });
    let invalid = h
        .trigger("ce-2", json!({"request_id": "i", "pipeline": "train"}))
        .await;
    assert_error(&invalid, 422, "backend_rejected");
    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/workflows".into(),
        code: 500,
        reason: "InternalError".into(),
        times: Some(1),
    });
    let broken = h
        .trigger("ce-3", json!({"request_id": "i", "pipeline": "train"}))
        .await;
    assert_error(&broken, 502, "backend_error");
    // A 404 on a create that does not name the namespace: the kind is not served (no CRD),
    // which fails every run of it: retried. (A missing namespace is final: cluster/api.rs' tests.)
    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/workflows".into(),
        code: 404,
        reason: "NotFound".into(),
        times: Some(1),
    });
    let missing = h
        .trigger("ce-5", json!({"request_id": "i", "pipeline": "train"}))
        .await;
    assert_error(&missing, 502, "backend_error");
    assert!(
        missing.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not serve argoproj.io/v1alpha1 workflows")),
        "{}",
        missing.json()
    );
    // Throttling (429) is backpressure.
    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/workflows".into(),
        code: 429,
        reason: "TooManyRequests".into(),
        times: Some(1),
    });
    let throttled = h
        .trigger("ce-6", json!({"request_id": "i", "pipeline": "train"}))
        .await;
    assert_error(&throttled, 503, "backend_unavailable");
    assert!(!throttled.header("retry-after").is_empty());
    // The same request once the API server is well again.
    assert_eq!(
        h.trigger("ce-4", json!({"request_id": "i", "pipeline": "train"}))
            .await
            .status,
        200
    );
}
