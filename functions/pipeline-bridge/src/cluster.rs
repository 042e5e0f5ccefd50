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

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use handler_kit::HandlerError;
use handler_kit::http::{BodyError, ERROR_BODY_BYTES, Identity, Tls, read_body, read_start};

use crate::names::{MANAGED_BY, MANAGED_BY_LABEL};

/// How long to wait before retrying when the API server cannot be reached.
const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);
/// How long to wait before retrying when the API server throttles without saying.
const THROTTLED_RETRY: Duration = Duration::from_secs(2);
/// How often a token file is read again: service account tokens are rotated by the kubelet.
const TOKEN_FILE_REFRESH: Duration = Duration::from_secs(60);

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

/// How requests prove who sends them.
#[derive(Debug)]
enum Auth {
    None,
    /// A fixed `Authorization` value (a token or basic credentials).
    Fixed(HeaderValue),
    /// A bearer token file read again every [`TOKEN_FILE_REFRESH`].
    TokenFile {
        path: PathBuf,
        current: RwLock<(HeaderValue, Instant)>,
    },
}

impl Auth {
    fn header(&self) -> Result<Option<HeaderValue>, HandlerError> {
        match self {
            Self::None => Ok(None),
            Self::Fixed(value) => Ok(Some(value.clone())),
            Self::TokenFile { path, current } => {
                if let Ok(read) = current.read()
                    && read.1.elapsed() < TOKEN_FILE_REFRESH
                {
                    return Ok(Some(read.0.clone()));
                }
                // A token file that cannot be read now keeps the last token: it may still be
                // valid, and the API server says so (401) if it is not.
                let value = match read_token(path) {
                    Ok(value) => value,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "token file unreadable; keeping the last token");
                        return Ok(current.read().ok().map(|c| c.0.clone()));
                    }
                };
                if let Ok(mut write) = current.write() {
                    *write = (value.clone(), Instant::now());
                }
                Ok(Some(value))
            }
        }
    }
}

fn bearer(token: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
        .map_err(|_| "the token is not a valid header value".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

fn read_token(path: &Path) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    bearer(&text)
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

/// A `metav1.Status`, the API server's error body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Status {
    reason: String,
    message: String,
    details: StatusDetails,
}

/// What a `Status` is about: `kind` is the resource (plural) of the object it names.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StatusDetails {
    kind: String,
}

/// What a 404 says was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Missing {
    /// The namespace the request is in: a `Status` naming a `namespaces` object, as the
    /// NamespaceLifecycle admission answers a create in a namespace that does not exist.
    Namespace,
    /// An object: a `NotFound` `Status` naming the resource (plural) it is of, the answer to
    /// reading an object that does not exist.
    Object(String),
    /// Anything else: the whole collection (a kind the API server does not serve answers a
    /// plain-text `404 page not found`).
    Other,
}

impl Missing {
    fn of(status: &Status) -> Self {
        match status.details.kind.as_str() {
            "namespaces" => Self::Namespace,
            "" => Self::Other,
            kind if status.reason == "NotFound" => Self::Object(kind.to_string()),
            _ => Self::Other,
        }
    }
}

/// A create that failed, and whether the run may exist anyway.
///
/// Only an answer of the API server that refuses the request (4xx but 408) is given before
/// anything is stored: authentication, authorization, admission, validation and quota all run
/// before the write. No answer (unreachable mid-request, a timeout), a 5xx (a `504 Timeout` is
/// the API server giving up on etcd, which may still commit) or a `2xx` cut off mid-body say
/// nothing about whether the object was stored.
#[derive(Debug)]
pub struct CreateFailed {
    /// What the trigger answers.
    pub error: HandlerError,
    /// True only when nothing was created: the lock taken for it may be freed.
    pub refused: bool,
}

impl CreateFailed {
    /// A failure that created nothing (a refusal, or one before any create was sent).
    pub fn refused(error: HandlerError) -> Self {
        Self {
            error,
            refused: true,
        }
    }

    /// A failure that may have created the run.
    pub fn unclear(error: HandlerError) -> Self {
        Self {
            error,
            refused: false,
        }
    }
}

impl From<CreateFailed> for HandlerError {
    fn from(failed: CreateFailed) -> Self {
        failed.error
    }
}

/// What reading an object back came to.
#[derive(Debug)]
pub enum ReadBack {
    /// The object, as the API server has it.
    Found(Value),
    /// The API server says there is no such object (a `NotFound` `Status` naming its kind).
    Gone,
}

/// A call that failed, with the status the API server answered, if it answered.
struct Failed {
    error: HandlerError,
    answered: Option<StatusCode>,
}

impl From<Failed> for HandlerError {
    fn from(failed: Failed) -> Self {
        failed.error
    }
}

/// What a request came to, short of an error.
enum Answer {
    /// 2xx, with the body.
    Done(Bytes),
    /// 404.
    NotFound(Missing),
    /// 409 `AlreadyExists` (a create).
    AlreadyExists,
    /// 409 `Conflict` (a replace with a stale `resourceVersion`).
    Stale,
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
        let config = match kubeconfig {
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
        let refuse = |what: &str| Err(format!("Kubernetes configuration: {what} is not supported"));
        let user = &config.auth_info;
        if user.exec.is_some() || user.auth_provider.is_some() {
            return refuse(
                "an exec or auth-provider credential plugin (use a token, a token file or a client certificate)",
            );
        }
        if config.accept_invalid_certs {
            return refuse("insecure-skip-tls-verify (give the cluster's CA)");
        }
        if config.proxy_url.is_some() {
            return refuse("proxy-url");
        }
        let auth = auth(user)?;
        let tls = Tls {
            roots: config.root_cert.clone().unwrap_or_default(),
            identity: identity(user)?,
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
                auth,
                headers: impersonation(user)?,
                timeout,
                max_answer_bytes,
            }),
        })
    }

    /// One request; 2xx, 404 and 409 are answers, everything else an error sorted by what a
    /// retry can do (see the module docs).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: impl Fn() -> String,
    ) -> Result<Answer, HandlerError> {
        Ok(self.call(method, path, body, what).await?)
    }

    /// [`Self::send`], keeping the status of a failed call the API server answered.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: impl Fn() -> String,
    ) -> Result<Answer, Failed> {
        let inner = &*self.inner;
        // Setting the path of the parsed URL: no scheme, host or IDNA parsing per request.
        let mut url = inner.base.clone();
        url.set_path(&format!("{}{path}", inner.prefix));
        let mut request = inner
            .http
            .request(method, url)
            .timeout(inner.timeout)
            .headers(inner.headers.clone())
            .header(ACCEPT, "application/json");
        let unanswered = |error: HandlerError| Failed {
            error,
            answered: None,
        };
        if let Some(auth) = inner.auth.header().map_err(unanswered)? {
            request = request.header(AUTHORIZATION, auth);
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let unreachable = |e: reqwest::Error| HandlerError::Unavailable {
            backend: "kubernetes",
            reason: format!(
                "{}: API server unreachable: {}",
                what(),
                handler_kit::http::describe(&e)
            ),
            retry_after: UNREACHABLE_RETRY,
        };
        let response = request
            .send()
            .await
            .map_err(|e| unanswered(unreachable(e)))?;
        let code = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if code.is_success() {
            let failed = |error| Failed {
                error,
                answered: Some(code),
            };
            return match read_body(response, inner.max_answer_bytes).await {
                Ok(body) => Ok(Answer::Done(body)),
                Err(BodyError::Broken(detail)) => Err(failed(HandlerError::Unavailable {
                    backend: "kubernetes",
                    reason: format!("{}: API server unreachable: {detail}", what()),
                    retry_after: UNREACHABLE_RETRY,
                })),
                Err(too_large @ BodyError::TooLarge { .. }) => Err(failed(HandlerError::Backend {
                    backend: "kubernetes",
                    detail: format!("{}: {too_large} (KUBE_MAX_RESPONSE_BYTES)", what()),
                })),
            };
        }
        let body = read_start(response, ERROR_BODY_BYTES).await;
        let status: Status = serde_json::from_slice(&body).unwrap_or_default();
        match (code, status.reason.as_str()) {
            (StatusCode::NOT_FOUND, _) => return Ok(Answer::NotFound(Missing::of(&status))),
            (StatusCode::CONFLICT, "AlreadyExists") => return Ok(Answer::AlreadyExists),
            (StatusCode::CONFLICT, "Conflict") => return Ok(Answer::Stale),
            _ => {}
        }
        let detail = format!(
            "{}: {} {}: {}",
            what(),
            code.as_u16(),
            if status.reason.is_empty() {
                "Failure"
            } else {
                &status.reason
            },
            if status.message.is_empty() {
                String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
            } else {
                status.message
            }
        );
        let error = match code.as_u16() {
            429 => HandlerError::Unavailable {
                backend: "kubernetes",
                reason: detail,
                retry_after: retry_after.unwrap_or(THROTTLED_RETRY),
            },
            409 => HandlerError::Conflict(detail),
            // Authentication, authorization and quota are decided before anything is stored,
            // and alike for every request: until the token is renewed (a token file is read
            // again every TOKEN_FILE_REFRESH), the RBAC fixed or the quota freed, every run is
            // refused. An outage, retried (counted: a lasting one still ends in the dead
            // letter, to be redriven), not a verdict on this request. Nothing was created, so
            // a lock taken for it may be freed.
            401 | 403 => HandlerError::Backend {
                backend: "kubernetes",
                detail,
            },
            400..=499 => HandlerError::BackendRejected {
                backend: "kubernetes",
                detail,
            },
            _ => HandlerError::Backend {
                backend: "kubernetes",
                detail,
            },
        };
        Err(Failed {
            error,
            answered: Some(code),
        })
    }

    /// Creates `object` (its JSON) named `name`: `Ok(None)` when it was created, the existing
    /// object when one of that name was already there, so a redelivered request never starts
    /// a second run. A created object's answer is not parsed: nothing in it is needed.
    ///
    /// A failure says whether the object may exist ([`CreateFailed::refused`]): only a refusal
    /// of the create itself is sure to have stored nothing. An `AlreadyExists` whose read-back
    /// fails is not one: the object was there.
    pub async fn create(
        &self,
        namespace: &str,
        resource: &Resource,
        name: &str,
        object: Vec<u8>,
    ) -> Result<Option<Value>, CreateFailed> {
        let what = || format!("create {} {name}", resource.kind);
        let path = resource.collection(namespace);
        let answer = match self.call(Method::POST, &path, Some(object), what).await {
            Ok(answer) => answer,
            Err(Failed { error, answered }) => {
                let refused = answered.is_some_and(|code| {
                    code.is_client_error() && code != StatusCode::REQUEST_TIMEOUT
                });
                return Err(CreateFailed { error, refused });
            }
        };
        match answer {
            Answer::Done(_) => Ok(None),
            Answer::AlreadyExists => {
                // Deleted between the two calls: the next delivery creates it.
                let existing = self
                    .get(namespace, resource, name)
                    .await
                    .map_err(CreateFailed::unclear)?;
                existing.map(Some).ok_or_else(|| {
                    CreateFailed::unclear(HandlerError::Conflict(format!(
                        "{} {name} vanished after AlreadyExists",
                        resource.kind
                    )))
                })
            }
            Answer::NotFound(Missing::Namespace) => {
                Err(CreateFailed::refused(HandlerError::BackendRejected {
                    backend: "kubernetes",
                    detail: format!("{}: the namespace {namespace} does not exist", what()),
                }))
            }
            // The collection itself is missing: the kind is not served (its CRD not installed,
            // or being reinstalled), which fails every run of it until it is.
            Answer::NotFound(_) => Err(CreateFailed::refused(HandlerError::Backend {
                backend: "kubernetes",
                detail: format!(
                    "{}: the API server does not serve {} {} (is its CRD installed?)",
                    what(),
                    resource.api_version,
                    resource.plural
                ),
            })),
            Answer::Stale => Err(CreateFailed::refused(HandlerError::Conflict(format!(
                "{}: 409 Conflict",
                what()
            )))),
        }
    }

    /// Reads the object `name` back, to check what an event says about it: [`ReadBack::Gone`]
    /// only when the API server says the object does not exist. Any other 404 (the kind is not
    /// served: a CRD being reinstalled) proves nothing, and is a retryable 502.
    pub async fn read_back(
        &self,
        namespace: &str,
        resource: &Resource,
        name: &str,
    ) -> Result<ReadBack, HandlerError> {
        let what = || format!("read {} {name}", resource.kind);
        let path = format!("{}/{name}", resource.collection(namespace));
        match self.send(Method::GET, &path, None, what).await? {
            Answer::Done(body) => serde_json::from_slice(&body)
                .map(ReadBack::Found)
                .map_err(|e| HandlerError::Backend {
                    backend: "kubernetes",
                    detail: format!("{}: unreadable answer: {e}", what()),
                }),
            Answer::NotFound(Missing::Object(kind)) if kind == resource.plural => {
                Ok(ReadBack::Gone)
            }
            _ => Err(HandlerError::Backend {
                backend: "kubernetes",
                detail: format!(
                    "{}: 404 without a NotFound for {} (is its CRD installed?)",
                    what(),
                    resource.plural
                ),
            }),
        }
    }

    /// The object `name`, or `None` when there is none.
    pub async fn get(
        &self,
        namespace: &str,
        resource: &Resource,
        name: &str,
    ) -> Result<Option<Value>, HandlerError> {
        let what = || format!("read {} {name}", resource.kind);
        let path = format!("{}/{name}", resource.collection(namespace));
        match self.send(Method::GET, &path, None, what).await? {
            Answer::Done(body) => {
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| HandlerError::Backend {
                        backend: "kubernetes",
                        detail: format!("{}: unreadable answer: {e}", what()),
                    })
            }
            _ => Ok(None),
        }
    }

    /// Replaces `object` (which carries the `resourceVersion` it was read at): false when it
    /// changed since (409 Conflict), so the caller reads it again.
    async fn replace(
        &self,
        namespace: &str,
        resource: &Resource,
        name: &str,
        object: &Value,
    ) -> Result<bool, HandlerError> {
        let what = || format!("update {} {name}", resource.kind);
        let path = format!("{}/{name}", resource.collection(namespace));
        let body = serde_json::to_vec(object).map_err(|e| HandlerError::Internal(e.to_string()))?;
        match self.send(Method::PUT, &path, Some(body), what).await? {
            Answer::Done(_) => Ok(true),
            Answer::Stale => Ok(false),
            Answer::NotFound(_) | Answer::AlreadyExists => Err(HandlerError::Conflict(format!(
                "{}: it was deleted meanwhile",
                what()
            ))),
        }
    }

    /// Takes the lock Lease `name` for `holder` for `ttl`.
    ///
    /// Re-entrant (a redelivery of the holder's own request passes), and a Lease that is free
    /// or whose holder stopped renewing it for longer than its duration is taken over. Held by
    /// another: [`HandlerError::Held`], 409 with `Retry-After` (the time left, at most
    /// `max_retry_after`), so the source tries this trigger again then, counted against its
    /// `MAX_DELIVER`. Not a 503: that is backpressure, and would hold back every other
    /// pipeline's triggers too while one lock is held. Races between replicas are settled by
    /// the API server's optimistic concurrency (`resourceVersion`): the loser reads again.
    /// Whatever else the Lease carries is kept: it is replaced as read, with only the holder's
    /// fields changed.
    pub async fn acquire(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        ttl: Duration,
        max_retry_after: Duration,
    ) -> Result<(), HandlerError> {
        let seconds = i32::try_from(ttl.as_secs()).unwrap_or(i32::MAX).max(1);
        for _ in 0..4 {
            let now = Utc::now();
            let Some(mut lease) = self.get(namespace, &LEASES, name).await? else {
                let lease = json!({
                    "apiVersion": LEASES.api_version,
                    "kind": LEASES.kind,
                    "metadata": {"name": name, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                    "spec": {
                        "holderIdentity": holder,
                        "leaseDurationSeconds": seconds,
                        "acquireTime": micro_time(now),
                        "renewTime": micro_time(now),
                        "leaseTransitions": 0,
                    },
                });
                let body = serde_json::to_vec(&lease)
                    .map_err(|e| HandlerError::Internal(e.to_string()))?;
                let what = || format!("create Lease {name}");
                match self
                    .send(
                        Method::POST,
                        &LEASES.collection(namespace),
                        Some(body),
                        what,
                    )
                    .await?
                {
                    Answer::Done(_) => return Ok(()),
                    // Another replica created it first: read it again.
                    Answer::AlreadyExists => continue,
                    // Leases are always served: the namespace is what is missing.
                    Answer::NotFound(_) => {
                        return Err(HandlerError::BackendRejected {
                            backend: "kubernetes",
                            detail: format!("{}: the namespace does not exist", what()),
                        });
                    }
                    Answer::Stale => {
                        return Err(HandlerError::Conflict(format!("{}: 409 Conflict", what())));
                    }
                }
            };
            let spec = &lease["spec"];
            let current = spec["holderIdentity"].as_str().filter(|h| !h.is_empty());
            if current == Some(holder) {
                // Renewed: the holder's redelivery is about to create again, and
                // `release_settled` counts from here.
                spec_mut(&mut lease).insert("renewTime".into(), json!(micro_time(now)));
                if self.replace(namespace, &LEASES, name, &lease).await? {
                    return Ok(());
                }
                continue;
            }
            if let Some(other) = current {
                let left = time_left(spec, now);
                if !left.is_zero() {
                    return Err(HandlerError::Held {
                        what: format!("lock Lease {name} is held by request {other}"),
                        retry_after: left.min(max_retry_after),
                    });
                }
                tracing::warn!(lease = name, holder = %other, "taking over an expired lock");
            }
            let transitions = spec["leaseTransitions"].as_i64().unwrap_or(0);
            let spec = spec_mut(&mut lease);
            spec.insert("holderIdentity".into(), json!(holder));
            spec.insert("leaseDurationSeconds".into(), json!(seconds));
            spec.insert("acquireTime".into(), json!(micro_time(now)));
            spec.insert("renewTime".into(), json!(micro_time(now)));
            spec.insert(
                "leaseTransitions".into(),
                json!(transitions.saturating_add(1)),
            );
            if self.replace(namespace, &LEASES, name, &lease).await? {
                return Ok(());
            }
        }
        // Four races lost in a row: other replicas are taking and freeing it right now.
        Err(HandlerError::Held {
            what: format!("lock Lease {name} is contended"),
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
        self.release_after(namespace, name, holder, Duration::ZERO)
            .await
    }

    /// [`Self::release`], but only once `holder` took or renewed it at least `settled` ago:
    /// sooner, a create under it may still be on its way to the API server, and a 404 for the
    /// run proves nothing yet. Then [`HandlerError::Held`] (409 with `Retry-After`: the time
    /// left), so the event is judged again later.
    pub async fn release_settled(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        settled: Duration,
    ) -> Result<bool, HandlerError> {
        self.release_after(namespace, name, holder, settled).await
    }

    async fn release_after(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        settled: Duration,
    ) -> Result<bool, HandlerError> {
        for _ in 0..4 {
            let Some(mut lease) = self.get(namespace, &LEASES, name).await? else {
                return Ok(false);
            };
            if lease["spec"]["holderIdentity"].as_str() != Some(holder) {
                return Ok(false);
            }
            let held = held_for(&lease["spec"], Utc::now());
            if held < settled {
                return Err(HandlerError::Held {
                    what: format!(
                        "lock Lease {name} was taken {}s ago: a create under it may be in flight",
                        held.as_secs()
                    ),
                    retry_after: settled - held,
                });
            }
            let spec = spec_mut(&mut lease);
            spec.remove("holderIdentity");
            spec.remove("acquireTime");
            spec.insert("renewTime".into(), json!(micro_time(Utc::now())));
            if self.replace(namespace, &LEASES, name, &lease).await? {
                return Ok(true);
            }
        }
        Err(HandlerError::Conflict(format!(
            "lock Lease {name} kept changing"
        )))
    }
}

/// The Lease's `spec` as a map, made one if it is missing.
fn spec_mut(lease: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !lease["spec"].is_object() {
        lease["spec"] = json!({});
    }
    lease["spec"]
        .as_object_mut()
        .expect("spec was just made an object")
}

/// A `metav1.MicroTime`: RFC 3339 with microseconds, in UTC.
fn micro_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// How long since the holder last took or renewed the Lease (zero when it does not say).
fn held_for(spec: &Value, now: DateTime<Utc>) -> Duration {
    ["renewTime", "acquireTime"]
        .iter()
        .find_map(|field| DateTime::parse_from_rfc3339(spec[field].as_str()?).ok())
        .and_then(|since| (now - since.with_timezone(&Utc)).to_std().ok())
        .unwrap_or(Duration::ZERO)
}

/// How long the holder still has: from the last renewal (or acquisition) plus the duration.
fn time_left(spec: &Value, now: DateTime<Utc>) -> Duration {
    let since = ["renewTime", "acquireTime"]
        .iter()
        .find_map(|field| DateTime::parse_from_rfc3339(spec[field].as_str()?).ok());
    let Some(since) = since else {
        return Duration::ZERO;
    };
    let duration = spec["leaseDurationSeconds"].as_i64().unwrap_or(0);
    let ends = since.timestamp().saturating_add(duration);
    u64::try_from(ends.saturating_sub(now.timestamp()))
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO)
}

/// The `Authorization` a kubeconfig user (or the service account) gives.
fn auth(user: &kube::config::AuthInfo) -> Result<Auth, String> {
    use secrecy::ExposeSecret as _;
    if let Some(token) = &user.token {
        return Ok(Auth::Fixed(bearer(token.expose_secret())?));
    }
    if let Some(path) = &user.token_file {
        let path = PathBuf::from(path);
        let value = read_token(&path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        return Ok(Auth::TokenFile {
            path,
            current: RwLock::new((value, Instant::now())),
        });
    }
    if let (Some(name), Some(password)) = (&user.username, &user.password) {
        let credentials = base64::engine::general_purpose::STANDARD
            .encode(format!("{name}:{}", password.expose_secret()));
        let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
            .map_err(|_| "the username or password is not a valid header value".to_string())?;
        value.set_sensitive(true);
        return Ok(Auth::Fixed(value));
    }
    Ok(Auth::None)
}

/// The client certificate and key (PEM), from the kubeconfig's data or files.
fn identity(user: &kube::config::AuthInfo) -> Result<Option<Identity>, String> {
    use secrecy::ExposeSecret as _;
    let decode = |what: &str, data: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("{what}: {e}"))
    };
    let read =
        |what: &str, path: &str| std::fs::read(path).map_err(|e| format!("{what} {path}: {e}"));
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(data), _) => Some(decode("client-certificate-data", data)?),
        (None, Some(path)) => Some(read("client-certificate", path)?),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(data), _) => Some(decode("client-key-data", data.expose_secret())?),
        (None, Some(path)) => Some(read("client-key", path)?),
        (None, None) => None,
    };
    match (cert, key) {
        (Some(certificates), Some(key)) => Ok(Some(Identity { certificates, key })),
        (None, None) => Ok(None),
        _ => Err("a client certificate needs its key, and a key its certificate".into()),
    }
}

/// `Impersonate-*` headers for a kubeconfig user that impersonates.
fn impersonation(user: &kube::config::AuthInfo) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| format!("impersonation: {v:?}"));
    if let Some(name) = &user.impersonate {
        headers.insert(HeaderName::from_static("impersonate-user"), value(name)?);
    }
    if let Some(uid) = &user.impersonate_uid {
        headers.insert(HeaderName::from_static("impersonate-uid"), value(uid)?);
    }
    for group in user.impersonate_groups.iter().flatten() {
        headers.append(HeaderName::from_static("impersonate-group"), value(group)?);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_held_until_its_duration_passes_since_the_last_renewal() {
        let now = Utc::now();
        let at = |secs_ago: i64| micro_time(now - chrono::Duration::seconds(secs_ago));
        let spec = |renewed: i64, duration: i64| json!({"holderIdentity": "a", "renewTime": at(renewed), "leaseDurationSeconds": duration});
        assert_eq!(time_left(&spec(10, 60), now), Duration::from_secs(50));
        assert_eq!(time_left(&spec(61, 60), now), Duration::ZERO);
        assert_eq!(time_left(&json!({}), now), Duration::ZERO);
        // Acquired but never renewed: counted from the acquisition.
        let acquired = json!({"acquireTime": at(30), "leaseDurationSeconds": 60});
        assert_eq!(time_left(&acquired, now), Duration::from_secs(30));
        assert_eq!(held_for(&acquired, now).as_secs(), 30);
        assert_eq!(held_for(&spec(10, 60), now).as_secs(), 10);
        // A time in the future (clock skew) or none: not held long at all.
        assert_eq!(held_for(&spec(-5, 60), now), Duration::ZERO);
        assert_eq!(held_for(&json!({}), now), Duration::ZERO);
    }

    #[test]
    fn micro_times_are_what_the_api_server_writes() {
        let at = DateTime::parse_from_rfc3339("2026-11-30T23:15:00.123456Z")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(micro_time(at), "2026-11-30T23:15:00.123456Z");
    }

    #[test]
    fn a_404_names_the_namespace_only_when_its_status_is_about_a_namespace() {
        let parse = |body: &str| Missing::of(&serde_json::from_str(body).unwrap_or_default());
        // What the API server answers a create in a namespace that does not exist.
        let namespace = r#"{"kind":"Status","apiVersion":"v1","status":"Failure",
            "message":"namespaces \"ops\" not found","reason":"NotFound",
            "details":{"name":"ops","kind":"namespaces"},"code":404}"#;
        assert_eq!(parse(namespace), Missing::Namespace);
        // A kind it does not serve (no CRD): not even a Status.
        assert_eq!(parse("404 page not found"), Missing::Other);
        let object = r#"{"kind":"Status","reason":"NotFound",
            "details":{"name":"train-1","group":"argoproj.io","kind":"workflows"},"code":404}"#;
        assert_eq!(parse(object), Missing::Object("workflows".into()));
    }

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
