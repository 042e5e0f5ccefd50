//! Trust boundaries: resource events are hints checked against the API server, a create whose
//! outcome is unknown keeps its lock, and Kubernetes' own words never reach webhook senders.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::fake_kube::{Failure, Lost, LostAnswer};

use crate::support::{Harness, assert_error, lease_holder, run_name, writes};

const JOBS: &str = "/apis/batch/v1/namespaces/ops/jobs";

/// Triggers `deploy` to prod as `request_id`; returns the Job as the API has it.
async fn deploy(h: &Harness, request_id: &str) -> Value {
    let data =
        json!({"request_id": request_id, "pipeline": "deploy", "parameters": {"env": "prod"}});
    let answer = h.trigger(&format!("ce-{request_id}"), data).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    h.kube
        .object(&format!("{JOBS}/{}", run_name("deploy", request_id)))
        .expect("job")
}

fn ignored(answer: &crate::support::Answer, why: &str) {
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        answer.json()["ignored"]
            .as_str()
            .is_some_and(|w| w.contains(why)),
        "expected ignored ({why}): {}",
        answer.json()
    );
}

fn failed(job: &mut Value) {
    job["status"] = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]});
}

#[tokio::test]
async fn a_forged_delete_of_a_live_run_leaves_its_lock_held_and_publishes_nothing() {
    let h = Harness::start_with(&[("KUBE_TIMEOUT_MS", "300")]).await;
    let mut statuses = h.statuses().await;
    let job = deploy(&h, "r-1").await;
    statuses.next().await;
    h.kube.clear_requests();

    // The Job's own body, as a delete: the API still has it, under the same uid.
    ignored(&h.resource_event("delete", &job).await, "still exists");
    // Without a uid the event cannot say it is about another object.
    let mut no_uid = job.clone();
    no_uid["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("uid");
    ignored(&h.resource_event("delete", &no_uid).await, "still exists");
    // A delete of an object that never existed, carrying the real lock and request id: the
    // API says 404, but the name is not the one request r-1's run has.
    let mut elsewhere = job.clone();
    elsewhere["metadata"]["name"] = json!("deploy-0123456789abcdef");
    ignored(
        &h.resource_event("delete", &elsewhere).await,
        "not the run name",
    );

    assert_eq!(lease_holder(&h, "deploy-prod"), Some("r-1".into()));
    statuses.assert_quiet().await;
    assert!(writes(&h.kube).is_empty(), "{:?}", writes(&h.kube));
    // Each event was checked by reading the object it names, and nothing else.
    let reads: Vec<String> = h.kube.requests().into_iter().map(|r| r.path).collect();
    let live = format!("{JOBS}/{}", run_name("deploy", "r-1"));
    assert_eq!(
        reads,
        [
            live.clone(),
            live,
            format!("{JOBS}/deploy-0123456789abcdef")
        ]
    );

    // The real delete frees it, once no create under the lock can be in flight any more.
    h.kube
        .remove(&format!("{JOBS}/{}", run_name("deploy", "r-1")));
    let answer = crate::support::eventually(Duration::from_secs(5), || {
        let (h, job) = (&h, &job);
        async move {
            let answer = h.resource_event("delete", job).await;
            (answer.status == 202).then_some(answer)
        }
    })
    .await
    .expect("the delete was acted on");
    assert_eq!(answer.json()["state"], "failed", "{}", answer.json());
    assert_eq!(
        statuses.next().await.1["reason"],
        "deleted before it finished"
    );
    assert_eq!(lease_holder(&h, "deploy-prod"), None);
}

#[tokio::test]
async fn a_delete_does_not_free_a_lock_whose_create_may_still_be_in_flight() {
    // A 500 on the create: the run may or may not appear. A delete event for its name (404
    // now) must not free the lock while the create could still be on its way.
    let h = Harness::start_with(&[("KUBE_TIMEOUT_MS", "2000")]).await;
    let mut statuses = h.statuses().await;
    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/jobs".into(),
        code: 500,
        reason: "InternalError".into(),
        times: Some(1),
    });
    let data = json!({"request_id": "r-5", "pipeline": "deploy", "parameters": {"env": "prod"}});
    assert_error(
        &h.trigger("ce-r-5", data.clone()).await,
        502,
        "backend_error",
    );
    assert!(h.kube.objects(JOBS).is_empty());
    let lease = pipeline_bridge::names::lease_name("deploy-prod");
    let forged = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": run_name("deploy", "r-5"), "namespace": "ops", "uid": "u-1",
            "labels": {"app.kubernetes.io/managed-by": "pipeline-bridge", "pipeline-bridge/pipeline": "deploy"},
            "annotations": {"pipeline-bridge/request-id": "r-5", "pipeline-bridge/lock": lease}}});
    let answer = h.resource_event("delete", &forged).await;
    assert_error(&answer, 409, "held");
    let retry_after: u64 = answer.header("retry-after").parse().expect("Retry-After");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(lease_holder(&h, "deploy-prod"), Some("r-5".into()));
    // The trigger's redelivery renews the lock and creates the run ...
    assert_eq!(h.trigger("ce-r-5", data).await.status, 200);
    assert_eq!(statuses.next().await.1["state"], "submitted");
    // ... and now that the API has a run of that name (another uid than the event's), the
    // delete frees nothing: the run there decides.
    ignored(
        &h.resource_event("delete", &forged).await,
        "another object took its name",
    );
    assert_eq!(lease_holder(&h, "deploy-prod"), Some("r-5".into()));
    statuses.assert_quiet().await;
}

#[tokio::test]
async fn a_forged_failed_update_leaves_the_lock_held_and_publishes_nothing() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let job = deploy(&h, "r-2").await;
    statuses.next().await;

    // The run's body claiming it failed; the API says it has not.
    let mut forged = job.clone();
    failed(&mut forged);
    ignored(&h.resource_event("update", &forged).await, "not the API's");

    // An object someone else created with the run's labels and lock annotation, and really
    // failed: the API vouches for its state, but it is not the run its request id names.
    let mut impostor = job.clone();
    impostor["metadata"] = json!({
        "name": "impostor", "namespace": "ops",
        "labels": job["metadata"]["labels"], "annotations": job["metadata"]["annotations"],
    });
    let created = reqwest::Client::new()
        .post(format!("{}{JOBS}", h.kube.url()))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&impostor).expect("json"))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let impostor = h
        .kube
        .update(&format!("{JOBS}/impostor"), failed)
        .expect("impostor");
    ignored(
        &h.resource_event("update", &impostor).await,
        "not the run name",
    );

    assert_eq!(lease_holder(&h, "deploy-prod"), Some("r-2".into()));
    statuses.assert_quiet().await;

    // The run really failing is published and frees its lock.
    let real = h
        .kube
        .update(&format!("{JOBS}/{}", run_name("deploy", "r-2")), failed)
        .expect("job");
    assert_eq!(
        h.resource_event("update", &real).await.json()["state"],
        "failed"
    );
    assert_eq!(statuses.next().await.1["reason"], "BackoffLimitExceeded");
    assert_eq!(lease_holder(&h, "deploy-prod"), None);
}

#[tokio::test]
async fn an_event_whose_read_back_fails_is_retried_and_not_acted_on() {
    let h = Harness::start_with(&[("KUBE_TIMEOUT_MS", "300")]).await;
    let mut statuses = h.statuses().await;
    deploy(&h, "r-3").await;
    statuses.next().await;
    let done = h
        .kube
        .update(&format!("{JOBS}/{}", run_name("deploy", "r-3")), |j| {
            j["status"] = json!({"conditions": [{"type": "Complete", "status": "True"}]});
        })
        .expect("job");

    // A 5xx on the read-back: 502, redelivered.
    h.kube.fail(Failure {
        method: "GET".into(),
        path_contains: "/jobs/".into(),
        code: 500,
        reason: "InternalError".into(),
        times: Some(1),
    });
    assert_error(
        &h.resource_event("update", &done).await,
        502,
        "backend_error",
    );
    // No answer in time: 503 with Retry-After.
    h.kube.lose_answer(Lost {
        method: "GET".into(),
        path_contains: "/jobs/".into(),
        answer: LostAnswer::Hang(Duration::from_secs(3)),
        times: Some(1),
    });
    let unanswered = h.resource_event("update", &done).await;
    assert_error(&unanswered, 503, "backend_unavailable");
    assert!(!unanswered.header("retry-after").is_empty());
    // A 404 that names no object (the kind is not served: its CRD being reinstalled) proves
    // no delete.
    let train = json!({"request_id": "w-3", "pipeline": "train"});
    assert_eq!(h.trigger("ce-w", train).await.status, 200);
    statuses.next().await;
    let workflow = h
        .kube
        .object(&format!(
            "/apis/argoproj.io/v1alpha1/namespaces/ml/workflows/{}",
            run_name("train", "w-3")
        ))
        .expect("workflow");
    h.kube.fail(Failure {
        method: "GET".into(),
        path_contains: "/workflows/".into(),
        code: 404,
        reason: "NotFound".into(),
        times: Some(1),
    });
    assert_error(
        &h.resource_event("delete", &workflow).await,
        502,
        "backend_error",
    );

    assert_eq!(lease_holder(&h, "deploy-prod"), Some("r-3".into()));
    statuses.assert_quiet().await;
    // The redelivery, with the API well again, is acted on.
    assert_eq!(
        h.resource_event("update", &done).await.json()["state"],
        "succeeded"
    );
    assert_eq!(statuses.next().await.1["state"], "succeeded");
    assert_eq!(lease_holder(&h, "deploy-prod"), None);
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_keeps_its_lock_so_no_second_run_starts() {
    let h = Harness::start_with(&[("KUBE_TIMEOUT_MS", "500")]).await;
    let trigger = |id: &str, env: &str| json!({"request_id": id, "pipeline": "deploy", "parameters": {"env": env}});
    // The API server creates the Job, then its answer never arrives.
    h.kube.lose_answer(Lost {
        method: "POST".into(),
        path_contains: "/jobs".into(),
        answer: LostAnswer::Hang(Duration::from_secs(3)),
        times: Some(1),
    });
    let lost = h.trigger("ce-a", trigger("a", "prod")).await;
    assert_error(&lost, 503, "backend_unavailable");
    assert_eq!(h.kube.objects(JOBS).len(), 1, "the create took effect");
    assert_eq!(lease_holder(&h, "deploy-prod"), Some("a".into()));
    // Another trigger on the same lock is held off: no second create is even sent.
    assert_error(&h.trigger("ce-b", trigger("b", "prod")).await, 409, "held");
    assert_eq!(h.kube.requests_to("POST", "/jobs").len(), 1);
    // The redelivery finds the run its first attempt made.
    let again = h.trigger("ce-a", trigger("a", "prod")).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["created"], false);

    // A 5xx after the write (the API server giving up on etcd) is no refusal either.
    h.kube.lose_answer(Lost {
        method: "POST".into(),
        path_contains: "/jobs".into(),
        answer: LostAnswer::Status(504, "Timeout".into()),
        times: Some(1),
    });
    assert_error(
        &h.trigger("ce-c", trigger("c", "staging")).await,
        502,
        "backend_error",
    );
    assert_eq!(lease_holder(&h, "deploy-staging"), Some("c".into()));
    assert_error(
        &h.trigger("ce-d", trigger("d", "staging")).await,
        409,
        "held",
    );
    assert_eq!(h.kube.objects(JOBS).len(), 2);
    assert_eq!(h.kube.requests_to("POST", "/jobs").len(), 3);
}

#[tokio::test]
async fn kubernetes_error_text_never_reaches_a_webhook_sender() {
    use crate::support::push;
    use crate::webhooks::github;
    let h = Harness::start().await;
    let leaks = |answer: &crate::support::Answer, words: &[&str]| {
        let text = String::from_utf8_lossy(&answer.body).to_string();
        for word in words {
            assert!(!text.contains(word), "{word:?} in {text}");
        }
    };
    // A refusal: final, answered 202 with the outcome's code and a fixed sentence.
    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/jobs".into(),
        code: 422,
        reason: "AdmissionSaysSecretThings".into(),
        times: Some(1),
    });
    let body = push("main", &"a".repeat(40), &[(&["deploy/a.yaml"], &[], &[])]);
    let answer = h.send(github("k-1", "push", &body, "github-secret")).await;
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["triggered"][0]["error"], "backend_rejected");
    assert_eq!(
        answer.json()["triggered"][0]["detail"],
        "the cluster refused the run"
    );
    leaks(
        &answer,
        &[
            "AdmissionSaysSecretThings",
            "injected",
            "jobs.batch",
            "pipeline-lock",
        ],
    );
    // An outage that cannot be queued (no stream here): the delivery fails retryably, and
    // still says nothing of what the API server answered.
    h.kube.fail(Failure {
        method: "POST".into(),
        path_contains: "/jobs".into(),
        code: 500,
        reason: "EtcdLeaderSecretlyChanged".into(),
        times: Some(1),
    });
    let body = push("main", &"b".repeat(40), &[(&["deploy/a.yaml"], &[], &[])]);
    let answer = h.send(github("k-2", "push", &body, "github-secret")).await;
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["triggered"][0]["error"], "backend_error");
    assert_eq!(
        answer.json()["triggered"][0]["detail"],
        "the run could not be started"
    );
    leaks(
        &answer,
        &["EtcdLeaderSecretlyChanged", "injected", "kubernetes"],
    );
}

#[tokio::test]
async fn a_kubeflow_create_whose_answer_is_lost_keeps_its_lock_and_is_found_by_the_redelivery() {
    // The test catalog's kubeflow entry, with a lock.
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = dir.path().join("locked-kfp.yaml");
    std::fs::write(
        &catalog,
        "pipelines:\n  kfp-locked:\n    kind: kubeflow\n    namespace: ops\n    lock: kfp\n    \
         kubeflow: {pipeline_id: p-1, pipeline_version_id: v-1, experiment_id: e-1}\n",
    )
    .expect("catalog");
    let path = catalog.display().to_string();
    let h = Harness::start_with(&[("PIPELINE_CATALOG", path.as_str())]).await;
    h.kfp
        .lose_create_answer(LostAnswer::Status(500, "the server went away".into()));
    let trigger = |id: &str| json!({"request_id": id, "pipeline": "kfp-locked"});
    assert_error(&h.trigger("ce-a", trigger("a")).await, 502, "backend_error");
    assert_eq!(h.kfp.runs().len(), 1, "the run was started");
    assert_eq!(lease_holder(&h, "kfp"), Some("a".into()));
    assert_error(&h.trigger("ce-b", trigger("b")).await, 409, "held");
    assert_eq!(h.kfp.runs().len(), 1, "no second run");
    // The redelivery looks the run up by its name and answers it.
    let again = h.trigger("ce-a", trigger("a")).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["created"], false);
    assert_eq!(again.json()["run_id"], h.kfp.runs()[0]["run_id"]);
    assert_eq!(h.kfp.runs().len(), 1);
}
