//! A run's life: triggered (validated, locked, created, announced) and asked about; what the
//! cluster says about it afterwards is [`crate::observe`].

use std::collections::BTreeMap;

use handler_kit::HandlerError;
use handler_kit::event::check_token;
use handler_kit::nats::subject;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::State;
use crate::catalog::{Entry, Kind, Target, fill, fill_value};
use crate::cluster::{CreateFailed, JOBS, Resource, WORKFLOWS};
use crate::names::{
    LOCK_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, PIPELINE_LABEL, REQUEST_ID_ANNOTATION,
    lease_name, run_name,
};
use crate::status::{RunState, of_object};

/// `ai.pipeline.trigger` data.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// Names the run; the CloudEvent `id` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// A catalog entry.
    pub pipeline: String,
    /// Parameter values (strings, numbers or booleans).
    #[serde(default)]
    pub parameters: BTreeMap<String, Value>,
}

/// `ai.pipeline.status.request` data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// The run's request id.
    pub request_id: String,
    /// Its catalog entry.
    pub pipeline: String,
}

/// `ai.pipeline.status` data, also published to `ai.pipeline.status.{request_id}`.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    /// The run's request id.
    pub request_id: String,
    /// Its catalog entry.
    pub pipeline: String,
    /// Where it is.
    pub state: RunState,
    /// `argo`, `kubeflow` or `job`.
    pub kind: Kind,
    /// The Workflow's or Job's name, or the KFP run's display name.
    pub name: String,
    /// Where it runs.
    pub namespace: String,
    /// The KFP run id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// False when a redelivered trigger found the run already there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Validates, locks, creates (idempotently) and announces one run.
pub async fn trigger(
    state: &State,
    request_id: &str,
    request: &TriggerRequest,
) -> Result<RunStatus, HandlerError> {
    check_token("request_id", request_id)?;
    // Its status subject must not be the status-request subject (`{request_id}` = "request").
    if subject(&state.config.status_subject, &[("request_id", request_id)])
        == crate::STATUS_REQUEST_TYPE
    {
        return Err(HandlerError::Unprocessable(format!(
            "request_id {request_id:?} is reserved"
        )));
    }
    let entry = entry(state, &request.pipeline)?;
    let parameters = entry.resolve(&request.parameters)?;
    let name = run_name(&entry.name, request_id);
    let lock = entry
        .lock
        .as_ref()
        .map(|key| lease_name(&fill(key, &parameters)));
    if let Some(lease) = &lock {
        state
            .cluster
            .acquire(
                &entry.namespace,
                lease,
                request_id,
                state.config.lock_ttl,
                state.config.lock_retry_after,
            )
            .await?;
    }
    let created = create(
        state,
        entry,
        request_id,
        &name,
        lock.as_deref(),
        &parameters,
    )
    .await;
    let status = match created {
        Ok(status) => status,
        Err(CreateFailed { error, refused }) => {
            if let Some(lease) = &lock {
                if refused {
                    // Refusals (401/403, 400/422, a missing namespace or kind) come before the
                    // API server stores anything, so no run holds the lock: free it for the
                    // next request. The retryable ones are redelivered, and take it again.
                    release(state, &entry.namespace, lease, request_id).await;
                } else {
                    // No answer, or a 5xx: the run may exist. The lock stays with this
                    // request, whose redelivery takes it again (re-entrant) and finds the run
                    // (`AlreadyExists`) or creates it; until then no other request can start a
                    // second run under it. A redelivery that never comes leaves it to the TTL.
                    tracing::warn!(lease = %lease, request_id, error = %error, "create outcome unknown; the lock stays held");
                }
            }
            return Err(error);
        }
    };
    // A redelivery that finds its run already finished must not leave the lock taken again.
    if status.state.is_final()
        && let Some(lease) = &lock
    {
        release(state, &entry.namespace, lease, request_id).await;
    }
    publish(state, &status).await?;
    Ok(status)
}

fn entry<'a>(state: &'a State, pipeline: &str) -> Result<&'a Entry, HandlerError> {
    state.config.catalog.get(pipeline).ok_or_else(|| {
        HandlerError::Unprocessable(format!("pipeline {pipeline:?} is not in the catalog"))
    })
}

async fn create(
    state: &State,
    entry: &Entry,
    request_id: &str,
    name: &str,
    lock: Option<&str>,
    parameters: &BTreeMap<String, String>,
) -> Result<RunStatus, CreateFailed> {
    let kind = entry.kind();
    let mut status = RunStatus {
        request_id: request_id.to_string(),
        pipeline: entry.name.clone(),
        state: RunState::Submitted,
        kind,
        name: name.to_string(),
        namespace: entry.namespace.clone(),
        run_id: None,
        created: None,
        reason: None,
    };
    let existing = match &entry.target {
        Target::Kubeflow(pipeline) => {
            let kfp = state.kfp.as_ref().ok_or_else(|| {
                CreateFailed::refused(HandlerError::Internal(
                    "KFP_URL is not set but the catalog has kubeflow runs".into(),
                ))
            })?;
            let description = format!("pipeline-bridge request {request_id}");
            let (run, created) = kfp.create(name, &description, pipeline, parameters).await?;
            status.run_id = run["run_id"].as_str().map(str::to_string);
            (!created).then_some(run)
        }
        Target::Argo {
            template,
            cluster_scope,
        } => {
            let mut reference = json!({ "name": template });
            if *cluster_scope {
                reference["clusterScope"] = json!(true);
            }
            let arguments: Vec<Value> = parameters
                .iter()
                .map(|(name, value)| json!({ "name": name, "value": value }))
                .collect();
            let spec = json!({
                "workflowTemplateRef": reference,
                "arguments": { "parameters": arguments },
            });
            let object = run_object(&WORKFLOWS, entry, request_id, name, lock, &spec)
                .map_err(CreateFailed::refused)?;
            state
                .cluster
                .create(&entry.namespace, &WORKFLOWS, name, object)
                .await?
        }
        Target::Job(template) => {
            let spec = fill_value(template, parameters);
            let object = run_object(&JOBS, entry, request_id, name, lock, &spec)
                .map_err(CreateFailed::refused)?;
            state
                .cluster
                .create(&entry.namespace, &JOBS, name, object)
                .await?
        }
    };
    status.created = Some(existing.is_none());
    if let Some(object) = existing {
        let (state, reason) = of_object(kind, &object);
        status.state = if state == RunState::NotFound {
            RunState::Submitted
        } else {
            state
        };
        status.reason = reason;
    }
    Ok(status)
}

/// A Workflow or Job (as JSON) carrying the labels and annotations the status path reads back.
fn run_object(
    resource: &Resource,
    entry: &Entry,
    request_id: &str,
    name: &str,
    lock: Option<&str>,
    spec: &Value,
) -> Result<Vec<u8>, HandlerError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Object<'a> {
        api_version: &'a str,
        kind: &'a str,
        metadata: Metadata<'a>,
        spec: &'a Value,
    }
    #[derive(Serialize)]
    struct Metadata<'a> {
        name: &'a str,
        namespace: &'a str,
        labels: BTreeMap<&'a str, &'a str>,
        annotations: BTreeMap<&'a str, &'a str>,
    }
    let mut annotations = BTreeMap::from([(REQUEST_ID_ANNOTATION, request_id)]);
    if let Some(lease) = lock {
        annotations.insert(LOCK_ANNOTATION, lease);
    }
    let object = Object {
        api_version: resource.api_version,
        kind: resource.kind,
        metadata: Metadata {
            name,
            namespace: &entry.namespace,
            labels: BTreeMap::from([
                (MANAGED_BY_LABEL, MANAGED_BY),
                (PIPELINE_LABEL, &*entry.name),
            ]),
            annotations,
        },
        spec,
    };
    serde_json::to_vec(&object).map_err(|e| HandlerError::Internal(e.to_string()))
}

/// Releases a lock, logging instead of failing: used where the event already has an outcome
/// to report, and the Lease's TTL is the backstop.
async fn release(state: &State, namespace: &str, lease: &str, holder: &str) {
    if let Err(e) = release_or_fail(state, namespace, lease, holder).await {
        tracing::warn!(lease, holder, error = %e, "could not release lock; it expires with its TTL");
    }
}

/// Releases a lock held by `holder` (nothing when another holds it).
pub(crate) async fn release_or_fail(
    state: &State,
    namespace: &str,
    lease: &str,
    holder: &str,
) -> Result<(), HandlerError> {
    if state.cluster.release(namespace, lease, holder).await? {
        tracing::info!(lease, holder, "lock released");
    }
    Ok(())
}

/// Publishes a status to `ai.pipeline.status.{request_id}`; `Nats-Msg-Id` is
/// `{request_id}.{state}`, so a stream keeps each state of a run once.
pub(crate) async fn publish(state: &State, status: &RunStatus) -> Result<(), HandlerError> {
    if !state.nats.is_enabled() {
        return Ok(());
    }
    let subject = subject(
        &state.config.status_subject,
        &[("request_id", &status.request_id)],
    );
    let msg_id = format!("{}.{}", status.request_id, status.state.as_str());
    state.nats.publish(subject, status, Some(&msg_id)).await
}

/// Answers `ai.pipeline.status.request` from the API (publishing what it found), and frees
/// the lock of a run found finished.
pub async fn status(state: &State, request: &StatusRequest) -> Result<RunStatus, HandlerError> {
    check_token("request_id", &request.request_id)?;
    let entry = entry(state, &request.pipeline)?;
    let name = run_name(&entry.name, &request.request_id);
    let kind = entry.kind();
    let found = match &entry.target {
        Target::Kubeflow(pipeline) => {
            let kfp = state
                .kfp
                .as_ref()
                .ok_or_else(|| HandlerError::Internal("KFP_URL is not set".into()))?;
            kfp.find(&name, pipeline.experiment_id.as_deref()).await?
        }
        Target::Argo { .. } => {
            state
                .cluster
                .get(&entry.namespace, &WORKFLOWS, &name)
                .await?
        }
        Target::Job(_) => state.cluster.get(&entry.namespace, &JOBS, &name).await?,
    };
    let mut status = RunStatus {
        request_id: request.request_id.clone(),
        pipeline: entry.name.clone(),
        state: RunState::NotFound,
        kind,
        name,
        namespace: entry.namespace.clone(),
        run_id: None,
        created: None,
        reason: None,
    };
    let Some(object) = found else {
        return Ok(status);
    };
    let (run_state, reason) = of_object(kind, &object);
    status.state = run_state;
    status.reason = reason;
    status.run_id = object["run_id"].as_str().map(str::to_string);
    if run_state.is_final()
        && let Some(lease) = object["metadata"]["annotations"][LOCK_ANNOTATION].as_str()
    {
        release(state, &entry.namespace, lease, &request.request_id).await;
    }
    publish(state, &status).await?;
    Ok(status)
}
