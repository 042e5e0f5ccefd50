//! pipeline-bridge under fuzz: its `app()` against testkit's fake Kubernetes API and fake
//! Kubeflow Pipelines server, with both webhook secrets set and no NATS.
//!
//! The fakes keep every object created, so the harness is rebuilt every [`REBUILD_EVERY`]
//! inputs: a long run must not grow without bound (libFuzzer would report it as a leak).

use std::sync::Mutex;

use axum::Router;
use testkit::fake_kube::{FakeKfp, FakeKube};

use crate::common::runtime;

/// The GitHub webhook secret the harness configures (and signs with).
pub const GITHUB_SECRET: &str = "github-secret";
/// The Gitea webhook secret.
pub const GITEA_SECRET: &str = "gitea-secret";

/// One pipeline of each kind; the same catalog pipeline-bridge's API tests use.
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

/// Inputs served by one harness before it is rebuilt.
const REBUILD_EVERY: usize = 5000;

struct Harness {
    app: Router,
    served: usize,
    _kube: FakeKube,
    _kfp: FakeKfp,
    _dir: tempfile::TempDir,
}

static HARNESS: Mutex<Option<Harness>> = Mutex::new(None);

fn build() -> Harness {
    runtime().block_on(async {
        let kube = FakeKube::start()
            .await
            .unwrap_or_else(|e| panic!("fake kube: {e}"));
        kube.set_recording(false);
        let kfp = FakeKfp::start()
            .await
            .unwrap_or_else(|e| panic!("fake kfp: {e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let catalog = dir.path().join("catalog.yaml");
        std::fs::write(&catalog, CATALOG).unwrap_or_else(|e| panic!("catalog: {e}"));
        let kubeconfig = kube
            .write_kubeconfig(dir.path())
            .unwrap_or_else(|e| panic!("kubeconfig: {e}"));
        let env = vec![
            (
                "PIPELINE_CATALOG".to_string(),
                catalog.display().to_string(),
            ),
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("KFP_URL".into(), kfp.url()),
            ("KFP_BREAKER_FAILURES".into(), "1000000000".into()),
            ("GITHUB_WEBHOOK_SECRET".into(), GITHUB_SECRET.into()),
            ("GITEA_WEBHOOK_SECRET".into(), GITEA_SECRET.into()),
            ("EVENT_TIMEOUT_MS".into(), "10000".into()),
        ];
        let config = handler_kit::config::load(&env, pipeline_bridge::Config::read)
            .unwrap_or_else(|e| panic!("pipeline-bridge config: {e}"));
        let state = pipeline_bridge::State::new(config)
            .await
            .unwrap_or_else(|e| panic!("pipeline-bridge state: {e}"));
        Harness {
            app: pipeline_bridge::app(state),
            served: 0,
            _kube: kube,
            _kfp: kfp,
            _dir: dir,
        }
    })
}

/// The router to send the next input to (call it outside the runtime).
pub fn app() -> Router {
    let mut harness = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
    if harness.as_ref().is_none_or(|h| h.served >= REBUILD_EVERY) {
        *harness = None;
        *harness = Some(build());
    }
    let harness = harness
        .as_mut()
        .unwrap_or_else(|| unreachable!("just built"));
    harness.served += 1;
    harness.app.clone()
}
