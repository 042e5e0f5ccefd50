//! pipeline-bridge: events and git pushes -> Kubernetes pipelines, idempotent, locked, observable.
//!
//! `ai.pipeline.trigger {request_id?, pipeline, parameters}` starts a catalog entry: an Argo
//! Workflow from a WorkflowTemplate, a Kubeflow Pipelines run, or a `batch/v1` Job from a
//! template. The request is validated against the catalog (422 when it does not fit, never
//! retried), the entry's lock is taken (a `coordination.k8s.io/v1` Lease held by the
//! `request_id`; held by another run: 409 with `Retry-After`), the run is created under a name
//! derived from the `request_id` (`AlreadyExists` is success, so a redelivery never starts a
//! second run), `ai.pipeline.status.{request_id}` gets `{state: "submitted", ...}`, and the
//! reply is `ai.pipeline.status`.
//!
//! Git pushes (`POST /webhooks/gitea`, `POST /webhooks/github`, HMAC-SHA256 signed) trigger
//! the entries whose path globs and branch match the pushed commits; a body is only read when
//! it is signed, a few at a time and under a cap. Knative ApiServerSource
//! events for the Workflows and Jobs it created publish their progress (`running`,
//! `succeeded`, `failed`) and free their locks when they finish, but only as far as reading
//! the object back from the API confirms them; `ai.pipeline.status.request` reads a run's
//! state from the API.
//!
//! # Layout
//! - [`Config`]: every environment variable, with defaults; the catalog is read here.
//! - [`State`] and [`app`]: the router tests drive and `main` serves.
//! - [`catalog`]: the pipelines that may be started and their parameters.
//! - [`names`]: run and lock names derived from request ids; labels and annotations.
//! - [`cluster`]: the Kubernetes API (kube-rs): create, read, Lease locks, error sorting.
//! - [`kfp`]: Kubeflow Pipelines' REST API.
//! - [`run`]: trigger and status request.
//! - [`observe`]: ApiServerSource events, checked against the API before they are acted on.
//! - [`status`]: a run's state from its object.
//! - [`webhook`](mod@webhook): signed git push webhooks, their bounded body reads, delivery deduplication.

pub mod catalog;
pub mod cluster;
pub mod kfp;
pub mod names;
pub mod observe;
pub mod run;
pub mod status;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State as Extract};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use handler_kit::config::{BaseConfig, ConfigReader};
use handler_kit::nats::Nats;
use handler_kit::resilience::BackendConfig;
use handler_kit::serve::{Health, function_router};
use handler_kit::{CloudEvent, HandlerError, Reply};

use crate::catalog::Catalog;
use crate::cluster::Cluster;
use crate::kfp::Kfp;
use crate::webhook::{BodyReads, Deliveries, Provider, Secret};

/// Starts a run.
pub const TRIGGER_TYPE: &str = "ai.pipeline.trigger";
/// Asks for a run's state.
pub const STATUS_REQUEST_TYPE: &str = "ai.pipeline.status.request";
/// The reply to both.
pub const STATUS_TYPE: &str = "ai.pipeline.status";
/// ApiServerSource (mode `Resource`) event types.
pub const RESOURCE_TYPES: [&str; 3] = [
    "dev.knative.apiserver.resource.add",
    "dev.knative.apiserver.resource.update",
    "dev.knative.apiserver.resource.delete",
];

/// Where Kubernetes mounts the pod's namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// pipeline-bridge's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shared settings (`PORT`, `NATS_URL`, `MAX_BODY_BYTES` default 64 KiB, ...).
    pub base: BaseConfig,
    /// `PIPELINE_DEFAULT_NAMESPACE` (default: the pod's own namespace, else `default`) is the
    /// namespace of catalog entries that name none.
    ///
    /// Read from `PIPELINE_CATALOG` (default `/etc/pipeline-bridge/catalog.yaml`, a mounted
    /// ConfigMap): the only pipelines that can be started.
    pub catalog: Arc<Catalog>,
    /// `KUBECONFIG` (unset: in-cluster service account, else `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// `KUBE_TIMEOUT_MS` (default 10000): one Kubernetes API call's deadline. So also the
    /// longest a create can be in flight: a delete event frees a lock only once it was taken or
    /// renewed longer ago than this.
    pub kube_timeout: Duration,
    /// `KUBE_MAX_RESPONSE_BYTES` (default 4 MiB): the largest Kubernetes API answer read (502
    /// above). Each answer is one object, and etcd refuses to store more than 1.5 MiB (its
    /// default `--max-request-bytes`); 4 MiB leaves room for that object rendered as JSON.
    pub kube_max_response_bytes: usize,
    /// `PIPELINE_LOCK_TTL_S` (default 21600, 6 h): how long a lock holds without its run
    /// reporting an end; a backstop for a lost completion event, so longer than any run.
    pub lock_ttl: Duration,
    /// `PIPELINE_LOCK_RETRY_AFTER_S` (default 30): the longest `Retry-After` for a held lock.
    pub lock_retry_after: Duration,
    /// `PIPELINE_STATUS_SUBJECT` (default `ai.pipeline.status.{request_id}`).
    pub status_subject: String,
    /// `KFP_URL` (required when the catalog has `kubeflow` entries): the KFP API server.
    pub kfp_url: Option<String>,
    /// `KFP_TOKEN_FILE` (unset: no token): a bearer token file, read on every call.
    pub kfp_token_file: Option<PathBuf>,
    /// `KFP_TIMEOUT_MS`, `KFP_CONCURRENCY`, ...: the KFP backend guard; `KFP_MAX_RESPONSE_BYTES`
    /// (default 8 MiB) is the largest answer read. A lookup lists up to 10 runs, and a run
    /// carries its pipeline spec and a detail per task: hundreds of KiB for a large pipeline.
    pub kfp: BackendConfig,
    /// `GITEA_WEBHOOK_SECRET` or the file `GITEA_WEBHOOK_SECRET_FILE` (unset: Gitea webhooks refused).
    pub gitea_secret: Option<Secret>,
    /// `GITHUB_WEBHOOK_SECRET` or the file `GITHUB_WEBHOOK_SECRET_FILE` (unset: refused).
    pub github_secret: Option<Secret>,
    /// `PIPELINE_WEBHOOK_MAX_BODY_BYTES` (default 4 MiB, [`webhook::DEFAULT_MAX_BODY_BYTES`]
    /// says why): larger webhook bodies get 413, read no further than the cap and one chunk.
    pub webhook_max_body_bytes: usize,
    /// `PIPELINE_WEBHOOK_MAX_READS` (default 4): webhook bodies read at once, so unsigned or
    /// forged requests cannot make the function buffer more than this many capped bodies.
    pub webhook_max_reads: usize,
    /// `PIPELINE_WEBHOOK_READ_WAIT_MS` (default 2000, [`webhook::DEFAULT_READ_WAIT`] says why):
    /// how long a webhook waits for a read slot before 503 with `Retry-After`.
    pub webhook_read_wait: Duration,
    /// `PIPELINE_DELIVERY_BUCKET` (default `pipeline-webhook-deliveries`): KV bucket (file
    /// storage, so it outlives restarts) of handled webhook delivery ids and pushes (created
    /// when missing).
    pub delivery_bucket: String,
    /// `PIPELINE_DELIVERY_TTL_MS` (default 86400000, a day): how long a delivery id and a push
    /// (repository, branch, `after`) are remembered; a later replay still finds its runs by
    /// the names derived from the push, while their objects exist.
    pub delivery_ttl: Duration,
    /// `PIPELINE_DELIVERY_CACHE` (default 4096): delivery ids and pushes remembered in process
    /// (lost on restart; the only record without NATS).
    pub delivery_cache: usize,
    /// `PIPELINE_WEBHOOK_DEFER_SUBJECT` (default `ai.pipeline.trigger`; `off`: never): where a
    /// webhook trigger that failed for a passing reason (a held lock, the API down) is queued
    /// through JetStream for the event source to retry, instead of failing the delivery.
    pub webhook_defer_subject: Option<String>,
}

impl Config {
    /// Reads every variable and the catalog; problems are collected by `r`.
    pub fn read(r: &mut ConfigReader) -> Self {
        let base = BaseConfig::read(r, "pipeline-bridge", 64 * 1024);
        // In a pod, the service account's own namespace: catalog entries without one run
        // next to the function, whatever namespace it was deployed to.
        let own_namespace = std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
            .map(|n| n.trim().to_string())
            .ok()
            .filter(|n| !n.is_empty());
        let namespace = r.string(
            "PIPELINE_DEFAULT_NAMESPACE",
            own_namespace.as_deref().unwrap_or("default"),
        );
        let catalog_path = r.string("PIPELINE_CATALOG", "/etc/pipeline-bridge/catalog.yaml");
        let catalog = match std::fs::read_to_string(&catalog_path) {
            Err(e) => {
                r.problem(format!("PIPELINE_CATALOG {catalog_path}: {e}"));
                Catalog::default()
            }
            Ok(text) => {
                let (catalog, problems) = Catalog::parse_all(&text, &namespace);
                for p in problems {
                    r.problem(format!("{catalog_path}: {p}"));
                }
                catalog
            }
        };
        let kfp_url = r
            .optional("KFP_URL")
            .map(|u| u.trim_end_matches('/').to_string());
        if catalog.uses_kubeflow() && kfp_url.is_none() {
            r.problem("KFP_URL is required: the catalog has kubeflow pipelines");
        }
        // Renamed; refused rather than ignored, so an old cap is not silently replaced.
        if r.optional("PIPELINE_WEBHOOK_MAX_BYTES").is_some() {
            r.problem("PIPELINE_WEBHOOK_MAX_BYTES is now PIPELINE_WEBHOOK_MAX_BODY_BYTES");
        }
        Self {
            catalog: Arc::new(catalog),
            kubeconfig: r.optional("KUBECONFIG").map(PathBuf::from),
            kube_timeout: r.millis("KUBE_TIMEOUT_MS", 10_000),
            kube_max_response_bytes: r.positive("KUBE_MAX_RESPONSE_BYTES", 4 * 1024 * 1024),
            lock_ttl: Duration::from_secs(r.parse("PIPELINE_LOCK_TTL_S", 21_600u64).max(1)),
            lock_retry_after: Duration::from_secs(
                r.parse("PIPELINE_LOCK_RETRY_AFTER_S", 30u64).max(1),
            ),
            status_subject: r.string("PIPELINE_STATUS_SUBJECT", "ai.pipeline.status.{request_id}"),
            kfp_url,
            kfp_token_file: r.optional("KFP_TOKEN_FILE").map(PathBuf::from),
            kfp: BackendConfig::read(
                r,
                "KFP",
                BackendConfig {
                    timeout: Duration::from_secs(10),
                    max_response_bytes: 8 * 1024 * 1024,
                    ..BackendConfig::default()
                },
            ),
            gitea_secret: secret(r, "GITEA_WEBHOOK_SECRET"),
            github_secret: secret(r, "GITHUB_WEBHOOK_SECRET"),
            webhook_max_body_bytes: r.positive(
                "PIPELINE_WEBHOOK_MAX_BODY_BYTES",
                webhook::DEFAULT_MAX_BODY_BYTES,
            ),
            webhook_max_reads: r.positive("PIPELINE_WEBHOOK_MAX_READS", webhook::DEFAULT_MAX_READS),
            webhook_read_wait: r.millis(
                "PIPELINE_WEBHOOK_READ_WAIT_MS",
                webhook::DEFAULT_READ_WAIT.as_millis() as u64,
            ),
            delivery_bucket: r.string("PIPELINE_DELIVERY_BUCKET", "pipeline-webhook-deliveries"),
            delivery_ttl: r.millis("PIPELINE_DELIVERY_TTL_MS", 86_400_000),
            delivery_cache: r.positive("PIPELINE_DELIVERY_CACHE", 4096),
            webhook_defer_subject: Some(
                r.string("PIPELINE_WEBHOOK_DEFER_SUBJECT", crate::TRIGGER_TYPE),
            )
            .filter(|s| s != "off"),
            base,
        }
    }
}

/// A secret from `{key}` or, for a mounted Secret, the file named by `{key}_FILE`.
fn secret(r: &mut ConfigReader, key: &str) -> Option<Secret> {
    let file_key = format!("{key}_FILE");
    let text = match (r.optional(key), r.optional(&file_key)) {
        (Some(_), Some(_)) => {
            r.problem(format!("set {key} or {file_key}, not both"));
            return None;
        }
        (Some(value), None) => value,
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(text) => text.trim_end_matches(['\n', '\r']).to_string(),
            Err(e) => {
                r.problem(format!("{file_key} {path}: {e}"));
                return None;
            }
        },
        (None, None) => return None,
    };
    if text.is_empty() {
        r.problem(format!("{key} is empty"));
        return None;
    }
    Some(Secret::new(text.as_bytes()))
}

/// Shared by every request; one `Arc` to clone per request.
#[derive(Debug, Clone)]
pub struct State(Arc<Shared>);

/// What [`State`] holds.
#[derive(Debug)]
pub struct Shared {
    config: Config,
    cluster: Cluster,
    kfp: Option<Kfp>,
    nats: Nats,
    deliveries: Deliveries,
    webhook_reads: BodyReads,
    health: Arc<Health>,
}

impl std::ops::Deref for State {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl State {
    /// Builds clients from local configuration only; nothing here waits on the network.
    pub async fn new(config: Config) -> Result<Self, HandlerError> {
        let cluster = Cluster::connect(
            config.kubeconfig.as_deref(),
            config.kube_timeout,
            config.kube_max_response_bytes,
        )
        .await
        .map_err(HandlerError::Internal)?;
        let kfp = match &config.kfp_url {
            Some(url) => Some(Kfp::new(
                handler_kit::http::client(config.kfp.timeout.min(Duration::from_secs(5)))?,
                url.clone(),
                config.kfp_token_file.clone(),
                config.kfp.clone(),
            )),
            None => None,
        };
        let nats = Nats::connect(config.base.nats.as_ref(), "pipeline-bridge").await?;
        let deliveries = Deliveries::new(
            config.delivery_bucket.clone(),
            config.delivery_ttl,
            config.delivery_cache,
        );
        let webhook_reads = BodyReads::new(config.webhook_max_reads, config.webhook_read_wait);
        Ok(Self(Arc::new(Shared {
            webhook_reads,
            config,
            cluster,
            kfp,
            nats,
            deliveries,
            health: Health::new(),
        })))
    }

    /// Readiness, shared with the server so draining shows on `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }
}

handler_kit::function!("pipeline-bridge");

/// The function's router: `POST /` (CloudEvents), the two webhooks, and the standard endpoints.
pub fn app(state: State) -> Router {
    let limit = state.config.base.max_body_bytes;
    let health = state.health.clone();
    let events = Router::new()
        .route("/", post(handle))
        .route("/webhooks/gitea", post(gitea))
        .route("/webhooks/github", post(github))
        .with_state(state);
    function_router(events, health, limit)
}

async fn gitea(Extract(state): Extract<State>, request: Request) -> Result<Response, HandlerError> {
    webhook(state, Provider::Gitea, request).await
}

async fn github(
    Extract(state): Extract<State>,
    request: Request,
) -> Result<Response, HandlerError> {
    webhook(state, Provider::Github, request).await
}

async fn webhook(
    state: State,
    provider: Provider,
    request: Request,
) -> Result<Response, HandlerError> {
    let (parts, body) = request.into_parts();
    let deadline = state.config.base.event_timeout;
    tokio::time::timeout(
        deadline,
        webhook::handle(&state, provider, &parts.headers, body),
    )
    .await
    .map_err(|_| HandlerError::Deadline(deadline))?
}

/// What an event is answered with: a reply event, or 202 for a resource event.
enum Answer {
    Reply(Reply),
    Accepted(observe::Observed),
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Self::Reply(reply) => reply.into_response(),
            Self::Accepted(observed) => {
                (StatusCode::ACCEPTED, axum::Json(observed)).into_response()
            }
        }
    }
}

async fn handle(
    Extract(state): Extract<State>,
    event: CloudEvent,
) -> Result<Response, HandlerError> {
    let deadline = state.config.base.event_timeout;
    tokio::time::timeout(deadline, dispatch(&state, &event))
        .await
        .map_err(|_| HandlerError::Deadline(deadline))?
        .map(IntoResponse::into_response)
}

async fn dispatch(state: &State, event: &CloudEvent) -> Result<Answer, HandlerError> {
    let source = &state.config.base.source;
    match event.ty() {
        TRIGGER_TYPE => {
            let request: run::TriggerRequest = event.data()?;
            let request_id = event.request_id(request.request_id.as_deref())?;
            let status = run::trigger(state, &request_id, &request).await?;
            Ok(Answer::Reply(event.reply(STATUS_TYPE, source, &status)?))
        }
        STATUS_REQUEST_TYPE => {
            let request: run::StatusRequest = event.data()?;
            let status = run::status(state, &request).await?;
            Ok(Answer::Reply(event.reply(STATUS_TYPE, source, &status)?))
        }
        ty if RESOURCE_TYPES.contains(&ty) => {
            let object: serde_json::Value = event.data()?;
            Ok(Answer::Accepted(
                observe::observed(state, ty, &object).await?,
            ))
        }
        _ => {
            let mut accepted = vec![TRIGGER_TYPE, STATUS_REQUEST_TYPE];
            accepted.extend(RESOURCE_TYPES);
            event.expect_type(&accepted).map(|()| unreachable_answer())
        }
    }
}

/// `expect_type` fails for every type not matched above; this keeps the types in one list.
fn unreachable_answer() -> Answer {
    Answer::Accepted(observe::Observed {
        request_id: None,
        state: None,
        ignored: Some("unhandled type".into()),
    })
}
