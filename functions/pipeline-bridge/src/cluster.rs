//! The Kubernetes API, through kube-rs: creating runs, reading them, and Lease-based locks.
//!
//! Errors are sorted by what a retry can do. The API server unreachable or timing out, 429 and
//! 5xx are retryable (503 with `Retry-After` for an unreachable or throttling server, so the
//! source backs off); 401/403 (RBAC), 400/422 (an invalid object) and 404 on a create (a missing
//! namespace or CRD) are final (422) with the API server's own message, because retrying a
//! misconfiguration only delays the dead letter.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PostParams};
use serde_json::Value;

use handler_kit::HandlerError;

use crate::names::{MANAGED_BY, MANAGED_BY_LABEL};

/// How long to wait before retrying when the API server cannot be reached.
const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);

/// `argoproj.io/v1alpha1` Workflows.
pub fn workflows() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Workflow"),
        "workflows",
    )
}

/// `batch/v1` Jobs.
pub fn jobs() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("batch", "v1", "Job"), "jobs")
}

/// A client of the cluster's API server.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// The outcome of a create that tolerates an existing object.
#[derive(Debug, Clone)]
pub struct Created {
    /// The object as the API server returned it (the existing one after `AlreadyExists`).
    pub object: Value,
    /// False when it already existed (a redelivery).
    pub created: bool,
}

impl Cluster {
    /// A client from `kubeconfig` when given, else inferred (in-cluster service account, then
    /// `$KUBECONFIG` / `~/.kube/config`). Reads local files only: no network I/O.
    pub async fn connect(kubeconfig: Option<&Path>, timeout: Duration) -> Result<Self, String> {
        let mut config = match kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("KUBECONFIG {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| format!("KUBECONFIG {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no Kubernetes configuration: {e}"))?,
        };
        // An unreachable API server must fail fast (503, retried later), not hold the event.
        config.connect_timeout = Some(timeout.min(Duration::from_secs(3)));
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        let client =
            kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
        Ok(Self { client })
    }

    fn api(&self, namespace: &str, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, resource)
    }

    /// Creates `object`; an existing object of that name is read back instead (`created:
    /// false`), so a redelivered request never starts a second run.
    pub async fn create(
        &self,
        namespace: &str,
        resource: &ApiResource,
        object: &DynamicObject,
    ) -> Result<Created, HandlerError> {
        let api = self.api(namespace, resource);
        match api.create(&PostParams::default(), object).await {
            Ok(made) => Ok(Created {
                object: to_value(&made)?,
                created: true,
            }),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let name = object.metadata.name.clone().unwrap_or_default();
                let existing = api
                    .get_opt(&name)
                    .await
                    .map_err(|e| describe(e, "read", resource, &name))?;
                // Deleted between the two calls: the next delivery creates it.
                let existing = existing.ok_or_else(|| {
                    HandlerError::Conflict(format!(
                        "{} {name} vanished after AlreadyExists",
                        resource.kind
                    ))
                })?;
                Ok(Created {
                    object: to_value(&existing)?,
                    created: false,
                })
            }
            Err(e) => Err(describe(
                e,
                "create",
                resource,
                object.metadata.name.as_deref().unwrap_or_default(),
            )),
        }
    }

    /// The object `name`, or `None` when there is none.
    pub async fn get(
        &self,
        namespace: &str,
        resource: &ApiResource,
        name: &str,
    ) -> Result<Option<Value>, HandlerError> {
        let found = self
            .api(namespace, resource)
            .get_opt(name)
            .await
            .map_err(|e| describe(e, "read", resource, name))?;
        found.as_ref().map(to_value).transpose()
    }

    fn leases(&self, namespace: &str) -> Api<Lease> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Takes the lock Lease `name` for `holder` for `ttl`.
    ///
    /// Re-entrant (a redelivery of the holder's own request passes), and a Lease that is free
    /// or whose holder stopped renewing it for longer than its duration is taken over. Held by
    /// another: 503 with `Retry-After` (the time left, at most `max_retry_after`), so the
    /// source tries again later. Races between replicas are settled by the API server's
    /// optimistic concurrency (`resourceVersion`): the loser reads again.
    pub async fn acquire(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        ttl: Duration,
        max_retry_after: Duration,
    ) -> Result<(), HandlerError> {
        let api = self.leases(namespace);
        let lease_resource = lease_resource();
        let seconds = i32::try_from(ttl.as_secs()).unwrap_or(i32::MAX).max(1);
        for _ in 0..4 {
            let now = Timestamp::now();
            let current = api
                .get_opt(name)
                .await
                .map_err(|e| describe(e, "read", &lease_resource, name))?;
            let Some(mut lease) = current else {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        labels: Some(
                            [(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(holder.to_string()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => return Ok(()),
                    // Another replica created it first: read it again.
                    Err(kube::Error::Api(s)) if s.is_already_exists() => continue,
                    Err(e) => return Err(describe(e, "create", &lease_resource, name)),
                }
            };
            let spec = lease.spec.clone().unwrap_or_default();
            let current_holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
            if current_holder.as_deref() == Some(holder) {
                return Ok(());
            }
            if let Some(other) = &current_holder {
                let left = time_left(&spec, now);
                if !left.is_zero() {
                    return Err(HandlerError::Unavailable {
                        backend: "lock",
                        reason: format!("lock Lease {name} is held by request {other}"),
                        retry_after: left.min(max_retry_after),
                    });
                }
                tracing::warn!(lease = name, holder = %other, "taking over an expired lock");
            }
            let transitions = spec.lease_transitions.unwrap_or(0);
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(holder.to_string()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions.saturating_add(1)),
                ..spec
            });
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(describe(e, "update", &lease_resource, name)),
            }
        }
        Err(HandlerError::Unavailable {
            backend: "lock",
            reason: format!("lock Lease {name} is contended"),
            retry_after: Duration::from_secs(1),
        })
    }

    /// Frees the lock Lease `name` if `holder` holds it (clears `holderIdentity`, keeps the
    /// Lease and its history). Returns whether it was released.
    pub async fn release(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
    ) -> Result<bool, HandlerError> {
        let api = self.leases(namespace);
        let lease_resource = lease_resource();
        for _ in 0..4 {
            let Some(mut lease) = api
                .get_opt(name)
                .await
                .map_err(|e| describe(e, "read", &lease_resource, name))?
            else {
                return Ok(false);
            };
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(holder) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.acquire_time = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            lease.spec = Some(spec);
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(describe(e, "update", &lease_resource, name)),
            }
        }
        Err(HandlerError::Conflict(format!(
            "lock Lease {name} kept changing"
        )))
    }
}

fn lease_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"),
        "leases",
    )
}

/// How long the holder still has: from the last renewal (or acquisition) plus the duration.
fn time_left(spec: &LeaseSpec, now: Timestamp) -> Duration {
    let Some(since) = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0)
    else {
        return Duration::ZERO;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let ends = since.as_second().saturating_add(duration);
    u64::try_from(ends.saturating_sub(now.as_second()))
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO)
}

fn to_value(object: &impl serde::Serialize) -> Result<Value, HandlerError> {
    serde_json::to_value(object).map_err(|e| HandlerError::Internal(e.to_string()))
}

/// Sorts a kube-rs error by what a retry can do (see the module docs).
fn describe(error: kube::Error, verb: &str, resource: &ApiResource, name: &str) -> HandlerError {
    let what = format!("{verb} {} {name}", resource.kind);
    match error {
        kube::Error::Api(status) => {
            let detail = format!(
                "{what}: {} {}: {}",
                status.code,
                if status.reason.is_empty() {
                    "Failure"
                } else {
                    &status.reason
                },
                status.message
            );
            match status.code {
                429 => HandlerError::Unavailable {
                    backend: "kubernetes",
                    reason: detail,
                    retry_after: Duration::from_secs(2),
                },
                409 => HandlerError::Conflict(detail),
                400..=499 => HandlerError::BackendRejected {
                    backend: "kubernetes",
                    detail,
                },
                _ => HandlerError::Backend {
                    backend: "kubernetes",
                    detail,
                },
            }
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => HandlerError::Unavailable {
            backend: "kubernetes",
            reason: format!("{what}: API server unreachable: {}", chain(&error)),
            retry_after: UNREACHABLE_RETRY,
        },
        other => HandlerError::Backend {
            backend: "kubernetes",
            detail: format!("{what}: {}", chain(&other)),
        },
    }
}

/// An error with its causes, which is where "connection refused" lives.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_held_until_its_duration_passes_since_the_last_renewal() {
        let now = Timestamp::now();
        let at = |secs_ago: i64| {
            MicroTime(Timestamp::from_second(now.as_second() - secs_ago).expect("valid time"))
        };
        let spec = |renewed: i64, duration: i32| LeaseSpec {
            holder_identity: Some("a".into()),
            renew_time: Some(at(renewed)),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        };
        assert_eq!(time_left(&spec(10, 60), now), Duration::from_secs(50));
        assert_eq!(time_left(&spec(61, 60), now), Duration::ZERO);
        assert_eq!(time_left(&LeaseSpec::default(), now), Duration::ZERO);
    }
}
