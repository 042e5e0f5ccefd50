//! The function under test, its fake Kubernetes and KFP servers, and NATS.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures::StreamExt as _;
use serde_json::{Value, json};
use testkit::fake_kube::{FakeKfp, FakeKube};
use testkit::nats_server::NatsServer;

pub use testkit::cloudevent::{Answer, assert_error, event, eventually, send};

/// Three pipelines, one of each kind; `deploy` has a lock per environment.
pub const CATALOG: &str = r#"
pipelines:
  train:
    kind: argo
    namespace: ml
    workflow_template: train-model
    parameters:
      model: {pattern: "[a-z0-9-]{1,40}", default: "base"}
      epochs: {pattern: "[0-9]{1,3}", default: 3}
    git:
      paths: ["models/**"]
      branch: main
      parameters: {model: "git-{{git.branch}}"}
  deploy:
    kind: job
    namespace: ops
    lock: "deploy-{{parameters.env}}"
    parameters:
      env: {pattern: "staging|prod"}
      revision: {pattern: "[0-9a-f]{0,40}", default: ""}
    job:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: deploy
              image: registry.example/deploy:1
              args: ["--env", "{{parameters.env}}", "--revision", "{{parameters.revision}}"]
    git:
      paths: ["deploy/**", "charts/*.yaml"]
      branch: main
      parameters: {env: staging, revision: "{{git.after}}"}
  kfp-train:
    kind: kubeflow
    namespace: kubeflow
    kubeflow: {pipeline_id: p-1, pipeline_version_id: v-1, experiment_id: e-1}
    parameters:
      lr: {pattern: "0\\.[0-9]+", default: "0.01"}
"#;

/// The fakes, NATS and the router, with their files in a temp dir.
pub struct Harness {
    pub kube: FakeKube,
    pub kfp: FakeKfp,
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub app: Router,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// With extra environment variables (they override the defaults below).
    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        let kube = FakeKube::start().await.expect("fake kube");
        let kfp = FakeKfp::start().await.expect("fake kfp");
        let nats = NatsServer::start().await.expect("nats-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let env = base_env(&kube, &kfp, &nats, &dir);
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config =
            handler_kit::config::load(&env, pipeline_bridge::Config::read).expect("valid config");
        let state = pipeline_bridge::State::new(config).await.expect("state");
        let app = pipeline_bridge::app(state);
        Self {
            kube,
            kfp,
            nats,
            dir,
            app,
        }
    }

    pub async fn send(&self, request: http::Request<Body>) -> Answer {
        send(&self.app, request).await
    }

    /// A binary-mode `ai.pipeline.trigger` with JSON data.
    pub async fn trigger(&self, id: &str, data: Value) -> Answer {
        self.send(event("ai.pipeline.trigger").id(id).json(&data).binary())
            .await
    }

    /// An ApiServerSource event (mode Resource) carrying `object`.
    pub async fn resource_event(&self, verb: &str, object: &Value) -> Answer {
        let subject = format!(
            "/apis/{}/namespaces/{}/{}/{}",
            object["apiVersion"].as_str().unwrap_or_default(),
            object["metadata"]["namespace"].as_str().unwrap_or_default(),
            if object["kind"] == "Job" {
                "jobs"
            } else {
                "workflows"
            },
            object["metadata"]["name"].as_str().unwrap_or_default()
        );
        self.send(
            event(&format!("dev.knative.apiserver.resource.{verb}"))
                .id(&format!(
                    "{verb}-{}",
                    object["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("0")
                ))
                .header("ce-subject", &subject)
                .json(object)
                .binary(),
        )
        .await
    }

    /// A subscriber on every status subject.
    pub async fn statuses(&self) -> Statuses {
        let client = self.nats.client().await.expect("nats client");
        let sub = client
            .subscribe("ai.pipeline.status.>")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        Statuses {
            _client: client,
            sub,
        }
    }
}

/// The environment a test instance runs with: catalog and kubeconfig files in `dir`.
pub fn base_env(
    kube: &FakeKube,
    kfp: &FakeKfp,
    nats: &NatsServer,
    dir: &tempfile::TempDir,
) -> Vec<(String, String)> {
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, CATALOG).expect("catalog");
    let kubeconfig = kube.write_kubeconfig(dir.path()).expect("kubeconfig");
    vec![
        ("PIPELINE_CATALOG".into(), catalog.display().to_string()),
        ("KUBECONFIG".into(), kubeconfig.display().to_string()),
        ("KFP_URL".into(), kfp.url()),
        ("NATS_URL".into(), nats.url()),
        ("GITHUB_WEBHOOK_SECRET".into(), "github-secret".into()),
        ("GITEA_WEBHOOK_SECRET".into(), "gitea-secret".into()),
        ("PIPELINE_LOCK_RETRY_AFTER_S".into(), "7".into()),
    ]
}

/// Status messages published on NATS.
pub struct Statuses {
    _client: async_nats::Client,
    sub: async_nats::Subscriber,
}

impl Statuses {
    /// The next message: its subject and its MessagePack data as JSON.
    pub async fn next(&mut self) -> (String, Value) {
        let message = tokio::time::timeout(Duration::from_secs(5), self.sub.next())
            .await
            .expect("a status message in time")
            .expect("subscription open");
        let data: Value = rmp_serde::from_slice(&message.payload).expect("msgpack");
        (message.subject.to_string(), data)
    }

    /// Nothing more arrives within a short while.
    pub async fn assert_quiet(&mut self) {
        let more = tokio::time::timeout(Duration::from_millis(200), self.sub.next()).await;
        assert!(more.is_err(), "unexpected status message: {more:?}");
    }
}

/// Who holds the lock `key` (its Lease's `holderIdentity`), `None` when free or never taken.
pub fn lease_holder(h: &Harness, key: &str) -> Option<String> {
    let path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases/{}",
        pipeline_bridge::names::lease_name(key)
    );
    h.kube.object(&path)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

/// The `request_id` a push (GitHub or Gitea, to `ai/platform`) triggers `pipeline` under:
/// derived from the push, not from its delivery id.
pub fn push_request_id(provider: &str, branch: &str, after: &str, pipeline: &str) -> String {
    let push = pipeline_bridge::names::short_hash(&[provider, "ai/platform", branch, after], 8);
    format!("git-{push}-{pipeline}")
}

/// The requests that changed something (everything but GETs).
pub fn writes(kube: &FakeKube) -> Vec<testkit::fake_kube::Recorded> {
    kube.requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect()
}

/// The run name pipeline-bridge derives for a request (checked against the created objects).
pub fn run_name(pipeline: &str, request_id: &str) -> String {
    pipeline_bridge::names::run_name(pipeline, request_id)
}

/// A webhook request to `path`, signed with `signature` headers.
pub fn webhook(path: &str, headers: &[(&str, String)], body: &[u8]) -> http::Request<Body> {
    let mut request = http::Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(Body::from(body.to_vec())).expect("request")
}

/// HMAC-SHA256 of `body` as hex.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, body).as_ref())
}

/// A push event in the shape Gitea and GitHub both send.
pub fn push(branch: &str, after: &str, commits: &[(&[&str], &[&str], &[&str])]) -> Vec<u8> {
    let commits: Vec<Value> = commits
        .iter()
        .map(|(added, modified, removed)| json!({"id": after, "added": added, "modified": modified, "removed": removed}))
        .collect();
    serde_json::to_vec(&json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "repository": {"full_name": "ai/platform"},
        "commits": commits,
        "head_commit": commits.last(),
    }))
    .expect("push JSON")
}
