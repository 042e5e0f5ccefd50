//! Signed git push webhooks: signatures, delivery replays, path and branch mapping.

use serde_json::json;

use crate::support::{
    Harness, assert_error, push, push_request_id, run_name, sign, webhook, writes,
};

pub(crate) const AFTER: &str = "0123456789abcdef0123456789abcdef01234567";

pub(crate) fn github(
    delivery: &str,
    event: &str,
    body: &[u8],
    secret: &str,
) -> http::Request<axum::body::Body> {
    webhook(
        "/webhooks/github",
        &[
            ("x-github-event", event.to_string()),
            ("x-github-delivery", delivery.to_string()),
            (
                "x-hub-signature-256",
                format!("sha256={}", sign(secret, body)),
            ),
        ],
        body,
    )
}

/// A manual `deploy` run (request `manual`) takes the staging lock; then delivery `delivery`
/// pushes to both `deploy` (locked) and `train`. Returns the push body and the answer.
async fn push_into_held_lock(h: &Harness, delivery: &str) -> (Vec<u8>, crate::support::Answer) {
    let held =
        json!({"request_id": "manual", "pipeline": "deploy", "parameters": {"env": "staging"}});
    assert_eq!(h.trigger("ce-1", held).await.status, 200);
    let body = push("main", AFTER, &[(&["deploy/a.yaml", "models/b"], &[], &[])]);
    let answer = h
        .send(github(delivery, "push", &body, "github-secret"))
        .await;
    (body, answer)
}

/// The manual run's Job fails; its completion event frees the staging lock.
async fn finish_manual_run(h: &Harness) {
    let jobs = "/apis/batch/v1/namespaces/ops/jobs";
    let done = h
        .kube
        .update(&format!("{jobs}/{}", run_name("deploy", "manual")), |j| {
            j["status"] = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]});
        })
        .expect("job");
    assert_eq!(h.resource_event("update", &done).await.status, 202);
}

#[tokio::test]
async fn a_signed_push_triggers_every_entry_whose_paths_changed_once_per_delivery() {
    let h = Harness::start().await;
    let mut statuses = h.statuses().await;
    let body = push(
        "main",
        AFTER,
        &[
            (&["models/bert/config.json"], &["README.md"], &[]),
            (&[], &[], &["charts/app.yaml"]),
        ],
    );
    let answer = h.send(github("d-1", "push", &body, "github-secret")).await;
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let reply = answer.json();
    assert_eq!(reply["delivery"], "d-1");
    assert_eq!(reply["duplicate"], false);
    let triggered = reply["triggered"].as_array().expect("list");
    let names: Vec<&str> = triggered
        .iter()
        .map(|t| t["pipeline"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["deploy", "train"], "{reply}");
    // Named from the push (repository, branch, commit), not from the delivery id.
    let deploy_id = push_request_id("github", "main", AFTER, "deploy");
    let train_id = push_request_id("github", "main", AFTER, "train");
    assert_eq!(triggered[0]["request_id"], deploy_id.as_str());
    assert_eq!(triggered[0]["state"], "submitted");
    assert_eq!(triggered[0]["name"], run_name("deploy", &deploy_id));
    // Parameters came from the push: the Job got the pushed revision, the Workflow the branch.
    let job = &h.kube.requests_to("POST", "/jobs")[0].body;
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["--env", "staging", "--revision", AFTER])
    );
    let workflow = &h.kube.requests_to("POST", "/workflows")[0].body;
    assert_eq!(
        workflow["spec"]["arguments"]["parameters"],
        json!([{"name": "epochs", "value": "3"}, {"name": "model", "value": "git-main"}])
    );
    let mut subjects = vec![statuses.next().await.0, statuses.next().await.0];
    subjects.sort();
    let mut expected = [
        format!("ai.pipeline.status.{deploy_id}"),
        format!("ai.pipeline.status.{train_id}"),
    ];
    expected.sort();
    assert_eq!(subjects, expected);

    // The sender replays the delivery: answered from the record, nothing sent to Kubernetes.
    let before = h.kube.requests().len();
    let replay = h.send(github("d-1", "push", &body, "github-secret")).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.json()["duplicate"], true);
    assert_eq!(replay.json()["triggered"], json!([]));
    assert_eq!(h.kube.requests().len(), before);
    statuses.assert_quiet().await;
}

#[tokio::test]
async fn a_replay_seen_by_another_replica_is_a_duplicate_through_the_shared_bucket() {
    let h = Harness::start().await;
    let body = push("main", AFTER, &[(&["deploy/values.yaml"], &[], &[])]);
    assert_eq!(
        h.send(github("d-2", "push", &body, "github-secret"))
            .await
            .status,
        202
    );
    // A second instance (another replica) on the same NATS and cluster.
    let env = crate::support::base_env(&h.kube, &h.kfp, &h.nats, &h.dir);
    let config = handler_kit::config::load(&env, pipeline_bridge::Config::read).expect("config");
    let other = pipeline_bridge::app(pipeline_bridge::State::new(config).await.expect("state"));
    let writes_before = writes(&h.kube).len();
    let replay = crate::support::send(&other, github("d-2", "push", &body, "github-secret")).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.json()["duplicate"], true, "{}", replay.json());
    assert_eq!(writes(&h.kube).len(), writes_before);
}

#[tokio::test]
async fn without_nats_a_replay_is_still_deduplicated_and_idempotent() {
    let h = Harness::start_with(&[("NATS_URL", "")]).await;
    let body = push("main", AFTER, &[(&["deploy/values.yaml"], &[], &[])]);
    assert_eq!(
        h.send(github("d-3", "push", &body, "github-secret"))
            .await
            .status,
        202
    );
    let replay = h.send(github("d-3", "push", &body, "github-secret")).await;
    assert_eq!(replay.json()["duplicate"], true);
    assert_eq!(
        h.kube.objects("/apis/batch/v1/namespaces/ops/jobs").len(),
        1
    );
}

#[tokio::test]
async fn missing_or_bad_signatures_are_401_before_anything_else() {
    let h = Harness::start().await;
    let body = push("main", AFTER, &[(&["models/a"], &[], &[])]);
    let unsigned = webhook(
        "/webhooks/github",
        &[
            ("x-github-event", "push".into()),
            ("x-github-delivery", "u-1".into()),
        ],
        &body,
    );
    assert_error(&h.send(unsigned).await, 401, "unauthorized");
    assert_error(
        &h.send(github("u-2", "push", &body, "wrong-secret")).await,
        401,
        "unauthorized",
    );
    // Signed for another body.
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let request = webhook(
        "/webhooks/github",
        &[
            ("x-github-event", "push".into()),
            ("x-github-delivery", "u-3".into()),
            (
                "x-hub-signature-256",
                format!("sha256={}", sign("github-secret", &body)),
            ),
        ],
        &tampered,
    );
    assert_error(&h.send(request).await, 401, "unauthorized");
    // Gitea's secret does not open GitHub's endpoint, and garbage is not a signature.
    assert_error(
        &h.send(github("u-4", "push", &body, "gitea-secret")).await,
        401,
        "unauthorized",
    );
    let garbage = webhook(
        "/webhooks/gitea",
        &[
            ("x-gitea-event", "push".into()),
            ("x-gitea-delivery", "u-5".into()),
            ("x-gitea-signature", "not-hex".into()),
        ],
        &body,
    );
    assert_error(&h.send(garbage).await, 401, "unauthorized");
    assert!(h.kube.requests().is_empty());
    // A bad signature does not burn the delivery: the correctly signed one still runs.
    let good = h.send(github("u-2", "push", &body, "github-secret")).await;
    assert_eq!(good.json()["duplicate"], false);
    assert_eq!(good.json()["triggered"][0]["pipeline"], "train");
}

#[tokio::test]
async fn gitea_pushes_map_paths_and_branches_to_entries() {
    let h = Harness::start().await;
    let gitea = |delivery: &str, event: &str, body: &[u8]| {
        webhook(
            "/webhooks/gitea",
            &[
                ("x-gitea-event", event.to_string()),
                ("x-gitea-delivery", delivery.to_string()),
                ("x-gitea-signature", sign("gitea-secret", body)),
            ],
            body,
        )
    };
    let names = |answer: &crate::support::Answer| -> Vec<String> {
        answer.json()["triggered"]
            .as_array()
            .expect("list")
            .iter()
            .map(|t| t["pipeline"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    // Only charts/*.yaml directly under charts/ matches; docs change nothing.
    let body = push(
        "main",
        AFTER,
        &[(&["charts/sub/x.yaml", "docs/a.md"], &[], &[])],
    );
    let answer = h.send(gitea("g-1", "push", &body)).await;
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(names(&answer).is_empty());
    // A removed file counts as a change. (Each push moves the branch to another commit: the
    // same commit pushed to the same branch again is a replay.)
    let body = push("main", &"2".repeat(40), &[(&[], &[], &["charts/app.yaml"])]);
    assert_eq!(
        names(&h.send(gitea("g-2", "push", &body)).await),
        ["deploy"]
    );
    // Another branch selects nothing.
    let body = push("feature", &"3".repeat(40), &[(&["models/x"], &[], &[])]);
    assert!(names(&h.send(gitea("g-3", "push", &body)).await).is_empty());
    // Tags and other events are accepted and ignored.
    let mut tag: serde_json::Value =
        serde_json::from_slice(&push("main", &"4".repeat(40), &[(&["models/x"], &[], &[])]))
            .expect("json");
    tag["ref"] = json!("refs/tags/v1");
    let tag = serde_json::to_vec(&tag).expect("json");
    let answer = h.send(gitea("g-4", "push", &tag)).await;
    assert!(
        answer.json()["ignored"]
            .as_str()
            .unwrap_or("")
            .contains("not a branch")
    );
    let answer = h.send(gitea("g-5", "issues", b"{}")).await;
    assert_eq!(answer.status, 202);
    assert!(answer.json()["ignored"].is_string());
    assert_eq!(
        h.kube.objects("/apis/batch/v1/namespaces/ops/jobs").len(),
        1
    );
    assert!(h.kube.requests_to("POST", "/workflows").is_empty());
    // A signed body that is not a push, and a missing delivery id, are 400.
    assert_error(
        &h.send(gitea("g-6", "push", b"[1,2]")).await,
        400,
        "invalid_payload",
    );
    assert_error(
        &h.send(gitea("", "push", &body)).await,
        400,
        "invalid_payload",
    );
}

#[tokio::test]
async fn a_delivery_that_hit_a_held_lock_is_not_recorded_so_its_redelivery_runs() {
    // No stream stores the defer subject here, so the trigger cannot be queued: the delivery
    // fails retryably instead and the sender's redelivery finishes it.
    let h = Harness::start().await;
    // Someone else holds the staging lock.
    let (body, answer) = push_into_held_lock(&h, "l-1").await;
    assert_eq!(
        answer.status,
        409,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(!answer.header("retry-after").is_empty());
    let reply = answer.json();
    assert_eq!(reply["triggered"][0]["error"], "held");
    assert_eq!(
        reply["triggered"][1]["state"], "submitted",
        "the other entry still ran: {reply}"
    );
    // Lock released (the manual run finished): the redelivery runs what is missing.
    finish_manual_run(&h).await;
    let again = h.send(github("l-1", "push", &body, "github-secret")).await;
    assert_eq!(
        again.status,
        202,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    let reply = again.json();
    assert_eq!(reply["triggered"][0]["created"], true);
    assert_eq!(
        reply["triggered"][1]["created"], false,
        "found, not created twice: {reply}"
    );
    assert_eq!(
        h.kube
            .objects("/apis/argoproj.io/v1alpha1/namespaces/ml/workflows")
            .len(),
        1
    );
}

#[tokio::test]
async fn a_trigger_that_hit_a_held_lock_is_queued_for_the_source_and_the_delivery_is_done() {
    let h = Harness::start().await;
    // The stream the event source consumes (knative/pipeline-bridge/source/jetstream.yaml).
    let client = h.nats.client().await.expect("nats");
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "AI_PIPELINE".into(),
            subjects: vec!["ai.pipeline.trigger".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    let (body, answer) = push_into_held_lock(&h, "q-1").await;
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let reply = answer.json();
    assert_eq!(reply["triggered"][0]["error"], "held");
    assert_eq!(reply["triggered"][0]["deferred"], "ai.pipeline.trigger");
    assert_eq!(reply["triggered"][1]["state"], "submitted");

    // Queued once, as the trigger the webhook would have run, deduplicated by its request id.
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
    let queued = stream.get_raw_message(1).await.expect("message");
    let request_id = push_request_id("github", "main", AFTER, "deploy");
    let request_id = request_id.as_str();
    assert_eq!(
        queued.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(request_id)
    );
    let data: serde_json::Value = rmp_serde::from_slice(&queued.payload).expect("msgpack");
    assert_eq!(
        data,
        json!({"request_id": request_id, "pipeline": "deploy",
               "parameters": {"env": "staging", "revision": AFTER}})
    );
    // The delivery is finished: a replay changes nothing.
    let replay = h.send(github("q-1", "push", &body, "github-secret")).await;
    assert_eq!(replay.json()["duplicate"], true);
    assert_eq!(stream.info().await.expect("info").state.messages, 1);

    // While the lock is held, the source's delivery of it is a 409 with Retry-After (a
    // counted attempt, retried then) ...
    let delivered = || {
        crate::support::event("ai.pipeline.trigger")
            .id("ai-pipeline-1")
            .msgpack(&data)
            .binary()
    };
    let held = h.send(delivered()).await;
    assert_error(&held, 409, "held");
    assert!(!held.header("retry-after").is_empty());
    // ... and once the manual run finished, it runs.
    finish_manual_run(&h).await;
    let jobs = "/apis/batch/v1/namespaces/ops/jobs";
    let answer = h.send(delivered()).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    // Answered in the request's encoding, MessagePack.
    let reply: serde_json::Value = rmp_serde::from_slice(&answer.body).expect("msgpack reply");
    assert_eq!(reply["request_id"], request_id);
    assert_eq!(reply["created"], true);
    assert!(
        h.kube
            .object(&format!("{jobs}/{}", run_name("deploy", request_id)))
            .is_some()
    );
}

#[tokio::test]
async fn a_signed_push_resent_under_new_delivery_ids_starts_no_second_run() {
    let h = Harness::start().await;
    let jobs = "/apis/batch/v1/namespaces/ops/jobs";
    let body = push("main", AFTER, &[(&["deploy/values.yaml"], &[], &[])]);
    let first = h.send(github("p-1", "push", &body, "github-secret")).await;
    assert_eq!(
        first.status,
        202,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.json()["triggered"][0]["created"], true);
    // The signature covers the body, not the delivery id: the same body under a new id is a
    // replay, answered from the record.
    let replay = h.send(github("p-2", "push", &body, "github-secret")).await;
    assert_eq!(replay.json()["duplicate"], true, "{}", replay.json());
    assert_eq!(replay.json()["triggered"], json!([]));
    // The record is the KV bucket: an instance started afterwards (a restart) knows it too.
    let instance = |nats_url: Option<&str>| {
        let mut env = crate::support::base_env(&h.kube, &h.kfp, &h.nats, &h.dir);
        if let Some(url) = nats_url {
            env.retain(|(k, _)| k != "NATS_URL");
            env.push(("NATS_URL".into(), url.into()));
        }
        async move {
            let config =
                handler_kit::config::load(&env, pipeline_bridge::Config::read).expect("config");
            pipeline_bridge::app(pipeline_bridge::State::new(config).await.expect("state"))
        }
    };
    let restarted = instance(None).await;
    let replay =
        crate::support::send(&restarted, github("p-3", "push", &body, "github-secret")).await;
    assert_eq!(replay.json()["duplicate"], true, "{}", replay.json());
    // With no record at all (a restart without NATS), the run is named from the push, so it
    // is found, not started again.
    let forgetful = instance(Some("")).await;
    let replay =
        crate::support::send(&forgetful, github("p-4", "push", &body, "github-secret")).await;
    assert_eq!(
        replay.status,
        202,
        "{}",
        String::from_utf8_lossy(&replay.body)
    );
    assert_eq!(replay.json()["duplicate"], false);
    assert_eq!(replay.json()["triggered"][0]["created"], false);
    assert_eq!(h.kube.objects(jobs).len(), 1);
    // Two replays at once, before either is recorded: still one run (of `train`, which has
    // no lock to keep the second out).
    let other = push("main", &"9".repeat(40), &[(&["models/x"], &[], &[])]);
    let (a, b) = tokio::join!(
        h.send(github("p-5", "push", &other, "github-secret")),
        h.send(github("p-6", "push", &other, "github-secret")),
    );
    assert_eq!((a.status, b.status), (202, 202), "{a:?} {b:?}");
    let workflows = "/apis/argoproj.io/v1alpha1/namespaces/ml/workflows";
    assert_eq!(h.kube.objects(workflows).len(), 1);
    // Whichever of them got past the record created or found the same run.
    let handled = [&a, &b]
        .iter()
        .filter(|r| r.json()["duplicate"] == false)
        .count();
    assert_eq!(h.kube.requests_to("POST", "/workflows").len(), handled);
}
