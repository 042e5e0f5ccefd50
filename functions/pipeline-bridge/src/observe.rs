//! ApiServerSource events: hints that a run changed, acted on only as the API server confirms.
//!
//! Anyone who can reach the function can send a `dev.knative.apiserver.resource.*` event, so
//! its data (the whole object, in mode `Resource`) is never believed. It only names what to
//! look at (kind, namespace, name, uid); the object is then read back from the API server, and
//! what is published or released is decided from that answer:
//! - **add / update**: the object must exist with the event's uid, be a run this function
//!   started (its labels and annotations as the API has them, its name the one its request id
//!   derives, in its catalog entry's namespace) and be in the state the event claims. Then that
//!   state is published and, when final, the lock it names is freed. An event whose state is
//!   not the API's is stale or forged: ignored, since the event of the change that did happen
//!   comes too (and events arriving out of order cannot publish a state the run has left).
//! - **delete**: real only when the API answers 404 for the name. An object still there with
//!   the event's uid was not deleted (ignored); one with another uid took the name again and
//!   its own events decide. Once gone, nothing about the object can be read any more: the
//!   event's own labels must still name a run this function could have started under that
//!   name, and the lock is freed only if that request holds it and took or renewed it more
//!   than `KUBE_TIMEOUT_MS` ago (sooner, a create of the run may still be in flight: 409 with
//!   `Retry-After`, judged again then). A run deleted before it
//!   finished is published `failed`; one the event says had finished publishes nothing (its
//!   final state was confirmed and published while it existed).
//!
//! Objects outside the namespaces and kinds of the catalog are ignored unread. A read-back that
//! fails for a passing reason (the API unreachable, a 5xx, a 404 for a kind it does not serve)
//! fails the event retryably (503/502): it is redelivered, never acted on unverified.

use serde::Serialize;
use serde_json::Value;

use handler_kit::HandlerError;
use handler_kit::event::check_token;

use crate::State;
use crate::catalog::{Entry, Kind, is_dns_label};
use crate::cluster::{JOBS, ReadBack, Resource, WORKFLOWS};
use crate::names::{
    LOCK_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, PIPELINE_LABEL, REQUEST_ID_ANNOTATION, run_name,
};
use crate::run::{RunStatus, publish, release_or_fail};
use crate::status::{RunState, of_object};

/// What a resource event did.
#[derive(Debug, Serialize)]
pub struct Observed {
    /// The run's request id, when the object is one of ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The state published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    /// Why nothing was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
}

impl Observed {
    fn ignored(why: &str) -> Self {
        Self {
            request_id: None,
            state: None,
            ignored: Some(why.to_string()),
        }
    }
}

/// What an event names: all that is taken from its data before the read-back.
struct Hint<'a> {
    kind: Kind,
    resource: &'static Resource,
    namespace: &'a str,
    name: &'a str,
    uid: Option<&'a str>,
    /// The event's whole object, for the state it claims.
    object: &'a Value,
}

impl<'a> Hint<'a> {
    /// The object an event names, or why it names none this function could have started.
    fn of(object: &'a Value) -> Result<Self, &'static str> {
        let (kind, resource) = match (object["apiVersion"].as_str(), object["kind"].as_str()) {
            (Some("argoproj.io/v1alpha1"), Some("Workflow")) => (Kind::Argo, &WORKFLOWS),
            (Some("batch/v1"), Some("Job")) => (Kind::Job, &JOBS),
            _ => return Err("neither an Argo Workflow nor a batch/v1 Job"),
        };
        let metadata = &object["metadata"];
        // Both go into the read-back's path: only DNS labels (what run names and catalog
        // namespaces are) pass, so nothing else can be asked of the API server.
        let label = |field: &str| metadata[field].as_str().filter(|v| is_dns_label(v));
        let (Some(namespace), Some(name)) = (label("namespace"), label("name")) else {
            return Err("names no run (namespace and name must be DNS labels)");
        };
        Ok(Self {
            kind,
            resource,
            namespace,
            name,
            uid: metadata["uid"].as_str().filter(|u| !u.is_empty()),
            object,
        })
    }

    fn state(&self) -> RunState {
        of_object(self.kind, self.object).0
    }
}

/// A run this function started, as an object's metadata shows it.
struct Run<'a> {
    request_id: &'a str,
    entry: &'a Entry,
    lock: Option<&'a str>,
}

impl<'a> Run<'a> {
    /// The run `object` (of `hint`'s kind, namespace and name) is, or why it is none. The
    /// name must be the one its request id derives: another object cannot pass for a run by
    /// copying a run's labels and annotations, since that name is taken by the run itself.
    fn of(state: &'a State, hint: &Hint<'_>, object: &'a Value) -> Result<Self, &'static str> {
        let metadata = &object["metadata"];
        if metadata["labels"][MANAGED_BY_LABEL] != MANAGED_BY {
            return Err("not created by pipeline-bridge");
        }
        let request_id = metadata["annotations"][REQUEST_ID_ANNOTATION]
            .as_str()
            .filter(|id| check_token(REQUEST_ID_ANNOTATION, id).is_ok())
            .ok_or("no valid request id annotation")?;
        let entry = metadata["labels"][PIPELINE_LABEL]
            .as_str()
            .and_then(|pipeline| state.config.catalog.get(pipeline))
            .ok_or("its pipeline is not in the catalog")?;
        if entry.kind() != hint.kind || entry.namespace != hint.namespace {
            return Err("not of the kind or in the namespace its pipeline runs");
        }
        if run_name(&entry.name, request_id) != hint.name {
            return Err("its name is not the run name of its request id");
        }
        let lock = metadata["annotations"][LOCK_ANNOTATION]
            .as_str()
            .filter(|lease| entry.lock.is_some() && is_dns_label(lease));
        Ok(Self {
            request_id,
            entry,
            lock,
        })
    }

    fn status(&self, hint: &Hint<'_>, state: RunState, reason: Option<String>) -> RunStatus {
        RunStatus {
            request_id: self.request_id.to_string(),
            pipeline: self.entry.name.clone(),
            state,
            kind: hint.kind,
            name: hint.name.to_string(),
            namespace: hint.namespace.to_string(),
            run_id: None,
            created: None,
            reason,
        }
    }
}

/// An ApiServerSource event (mode `Resource`) for a Workflow or a Job: checked against the API
/// server, then its state published and a finished (or deleted) run's lock freed.
pub async fn observed(
    state: &State,
    event_type: &str,
    object: &Value,
) -> Result<Observed, HandlerError> {
    let hint = match Hint::of(object) {
        Ok(hint) => hint,
        Err(why) => return Ok(Observed::ignored(why)),
    };
    let runs_there = state
        .config
        .catalog
        .entries()
        .iter()
        .any(|e| e.kind() == hint.kind && e.namespace == hint.namespace);
    if !runs_there {
        return Ok(Observed::ignored(
            "no pipeline of the catalog runs this kind in this namespace",
        ));
    }
    let read = state
        .cluster
        .read_back(hint.namespace, hint.resource, hint.name)
        .await?;
    let outcome = if event_type.ends_with(".delete") {
        deleted(state, &hint, read).await?
    } else {
        changed(state, &hint, read).await?
    };
    if let Some(why) = &outcome.ignored {
        tracing::info!(event_type, namespace = hint.namespace, name = hint.name, why = %why, "resource event not acted on");
    }
    Ok(outcome)
}

/// An add or update: acted on as the object the API server has says.
async fn changed(state: &State, hint: &Hint<'_>, read: ReadBack) -> Result<Observed, HandlerError> {
    let ReadBack::Found(object) = read else {
        return Ok(Observed::ignored(
            "the API has no such object (its delete event settles it)",
        ));
    };
    if hint.uid.is_none() || object["metadata"]["uid"].as_str() != hint.uid {
        return Ok(Observed::ignored(
            "the event's uid is not the uid of the object the API has",
        ));
    }
    let run = match Run::of(state, hint, &object) {
        Ok(run) => run,
        Err(why) => return Ok(Observed::ignored(why)),
    };
    let (run_state, reason) = of_object(hint.kind, &object);
    if hint.state() != run_state {
        return Ok(Observed::ignored(
            "the event's state is not the API's (a stale or forged event)",
        ));
    }
    publish(state, &run.status(hint, run_state, reason)).await?;
    // A failed release is retried with the event (the publish repeats under the same
    // Nats-Msg-Id), so a finished run does not keep its lock until the TTL.
    if run_state.is_final()
        && let Some(lease) = run.lock
    {
        release_or_fail(state, hint.namespace, lease, run.request_id).await?;
    }
    Ok(Observed {
        request_id: Some(run.request_id.to_string()),
        state: Some(run_state),
        ignored: None,
    })
}

/// A delete: real only when the API server no longer has the object.
async fn deleted(state: &State, hint: &Hint<'_>, read: ReadBack) -> Result<Observed, HandlerError> {
    if let ReadBack::Found(object) = read {
        let why = if hint.uid.is_none() || object["metadata"]["uid"].as_str() == hint.uid {
            "the object still exists: it was not deleted"
        } else {
            "deleted, and another object took its name: that one's events decide"
        };
        return Ok(Observed::ignored(why));
    }
    // Gone: the event's own metadata is all there is, checked for consistency only.
    let run = match Run::of(state, hint, hint.object) {
        Ok(run) => run,
        Err(why) => return Ok(Observed::ignored(why)),
    };
    // The lock first, since it may say it is too early to judge. Freed only if this request
    // holds it (a lock held by another run stays), and only once no create of its run can
    // still be in flight: one sent just before this read would make the 404 stale. A create
    // waits at most KUBE_TIMEOUT_MS; sooner, the event is retried (and nothing published).
    if let Some(lease) = run.lock {
        let released = state
            .cluster
            .release_settled(
                hint.namespace,
                lease,
                run.request_id,
                state.config.kube_timeout,
            )
            .await?;
        if released {
            tracing::info!(lease, holder = run.request_id, "lock released");
        }
    }
    let published = if hint.state().is_final() {
        None
    } else {
        let status = run.status(
            hint,
            RunState::Failed,
            Some("deleted before it finished".into()),
        );
        publish(state, &status).await?;
        Some(RunState::Failed)
    };
    Ok(Observed {
        request_id: Some(run.request_id.to_string()),
        state: published,
        ignored: None,
    })
}
