//! The Kubernetes API: creating runs, reading them, and Lease-based locks.
//!
//! kube-rs reads the configuration (in-cluster service account, `$KUBECONFIG` or
//! `~/.kube/config`); the calls themselves are plain REST requests on the shared reqwest
//! client. A trigger is one `POST` whose answer is not even parsed when it is a `201`: the
//! typed client's layers (a buffer task, tracing spans, typed (de)serialization of the object
//! both ways) cost more CPU than the rest of the trigger together, and at 100 triggers in
//! flight the CPU is the latency.
//!
//! Errors are sorted by what a retry can do. An API server that refuses everyone is an outage,
//! not a verdict on the request: unreachable or timing out, 429 (503 with `Retry-After`, so
//! the source backs off), 5xx, 401/403 (an expired token, RBAC being changed, a quota) and a
//! create of a kind it does not serve (a CRD not installed) are retryable (502 but for the
//! 503s). What is wrong with this request alone is final (422, with the API server's own
//! message): 400/422 (an invalid object) and a create in a namespace that does not exist.
//!
//! A failed create also says whether the run may exist ([`CreateFailed`]): only a refusal
//! (4xx but 408) stored nothing, so only then is the trigger's lock freed.
//!
//! Answers are read under a cap (`KUBE_MAX_RESPONSE_BYTES`), error bodies under
//! [`handler_kit::http::ERROR_BODY_BYTES`]: an answer over its cap is a failed call (502).
//!
//! # Layout
//! - this module: [`Cluster`] (the client, built by [`Cluster::connect`]) and [`Resource`],
//!   where a kind's objects live.
//! - `auth`: credentials from the kubeconfig or the service account (a token, a token file
//!   read again as it rotates, a client certificate, basic auth, impersonation), and what of a
//!   configuration is refused at start (credential plugins, `insecure-skip-tls-verify`,
//!   proxies).
//! - `api`: the REST requests ([`Cluster::create`], [`Cluster::get`],
//!   [`Cluster::read_back`], replace): answers sorted from the status and the `Status` body's
//!   `reason`, `Retry-After`, [`CreateFailed`] and [`ReadBack`].
//! - `lease`: the locks ([`Cluster::acquire`], [`Cluster::release`],
//!   [`Cluster::release_settled`]) on `coordination.k8s.io/v1` Leases.

mod api;
mod auth;
mod lease;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;

use handler_kit::http::Tls;

pub use api::{CreateFailed, ReadBack};
use auth::Auth;

/// A namespaced resource kind: where its objects live in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// `group/version`, or `version` for the core group.
    pub api_version: &'static str,
    /// The object's `kind`.
    pub kind: &'static str,
    /// The URL segment.
    pub plural: &'static str,
}

/// `argoproj.io/v1alpha1` Workflows.
pub const WORKFLOWS: Resource = Resource {
    api_version: "argoproj.io/v1alpha1",
    kind: "Workflow",
    plural: "workflows",
};

/// `batch/v1` Jobs.
pub const JOBS: Resource = Resource {
    api_version: "batch/v1",
    kind: "Job",
    plural: "jobs",
};

/// `coordination.k8s.io/v1` Leases, the locks.
pub const LEASES: Resource = Resource {
    api_version: "coordination.k8s.io/v1",
    kind: "Lease",
    plural: "leases",
};

impl Resource {
    /// The collection's path: `/apis/{group}/{version}/namespaces/{namespace}/{plural}`.
    pub fn collection(&self, namespace: &str) -> String {
        let root = if self.api_version.contains('/') {
            "apis"
        } else {
            "api"
        };
        format!(
            "/{root}/{}/namespaces/{namespace}/{}",
            self.api_version, self.plural
        )
    }
}

/// A client of the cluster's API server.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// The server URL, parsed once: each request only sets its path.
    base: reqwest::Url,
    /// The server URL's path without a trailing `/` (a prefix, as behind a proxy; else empty).
    prefix: String,
    auth: Auth,
    /// Impersonation headers from the kubeconfig.
    headers: HeaderMap,
    timeout: Duration,
    /// The largest answer read, in bytes.
    max_answer_bytes: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A client from `kubeconfig` when given, else inferred (`$KUBECONFIG` or `~/.kube/config`,
    /// else the in-cluster service account). Reads local files only: no network I/O.
    ///
    /// Credentials: bearer tokens (also from a file, re-read every minute as service account
    /// tokens rotate), client certificates, basic auth, impersonation. Exec and auth-provider
    /// plugins, `insecure-skip-tls-verify` and proxies are refused here, at start, rather than
    /// failing every request later.
    ///
    /// Each call waits at most `timeout` and reads at most `max_answer_bytes` of an answer.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<Self, String> {
        let config = auth::load(kubeconfig).await?;
        auth::refuse_unsupported(&config)?;
        let user = &config.auth_info;
        let credentials = Auth::of(user)?;
        let tls = Tls {
            roots: config.root_cert.clone().unwrap_or_default(),
            identity: auth::identity(user)?,
        };
        // An unreachable API server must fail fast (503, retried later), not hold the event.
        let http = handler_kit::http::client_with(timeout.min(Duration::from_secs(3)), tls)
            .map_err(|e| format!("Kubernetes client: {e}"))?;
        let base = reqwest::Url::parse(&config.cluster_url.to_string())
            .map_err(|e| format!("Kubernetes server URL {}: {e}", config.cluster_url))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                prefix: base.path().trim_end_matches('/').to_string(),
                base,
                auth: credentials,
                headers: auth::impersonation(user)?,
                timeout,
                max_answer_bytes,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_are_under_apis_for_named_groups_and_api_for_the_core_group() {
        assert_eq!(JOBS.collection("ops"), "/apis/batch/v1/namespaces/ops/jobs");
        let pods = Resource {
            api_version: "v1",
            kind: "Pod",
            plural: "pods",
        };
        assert_eq!(pods.collection("ops"), "/api/v1/namespaces/ops/pods");
    }
}
