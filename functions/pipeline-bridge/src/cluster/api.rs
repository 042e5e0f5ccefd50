//! The REST calls: one request, its answer sorted (2xx, 404 and 409 are answers, the rest
//! errors by what a retry can do), and the create, read and replace built on it.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use handler_kit::HandlerError;
use handler_kit::http::{BodyError, ERROR_BODY_BYTES, read_body, read_start};

use super::{Cluster, Resource};

/// How long to wait before retrying when the API server cannot be reached.
const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);
/// How long to wait before retrying when the API server throttles without saying.
const THROTTLED_RETRY: Duration = Duration::from_secs(2);

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
pub(super) enum Missing {
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
pub(super) enum Answer {
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
    /// One request; 2xx, 404 and 409 are answers, everything else an error sorted by what a
    /// retry can do (see the module docs).
    pub(super) async fn send(
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
        let response = request
            .send()
            .await
            .map_err(|e| unanswered(unreachable(&what(), &handler_kit::http::describe(&e))))?;
        let code = response.status();
        let answered = |error| Failed {
            error,
            answered: Some(code),
        };
        if code.is_success() {
            return match read_body(response, inner.max_answer_bytes).await {
                Ok(body) => Ok(Answer::Done(body)),
                Err(BodyError::Broken(detail)) => Err(answered(unreachable(&what(), &detail))),
                Err(too_large @ BodyError::TooLarge { .. }) => {
                    Err(answered(HandlerError::Backend {
                        backend: "kubernetes",
                        detail: format!("{}: {too_large} (KUBE_MAX_RESPONSE_BYTES)", what()),
                    }))
                }
            };
        }
        let retry_after = retry_after(response.headers());
        let body = read_start(response, ERROR_BODY_BYTES).await;
        let status: Status = serde_json::from_slice(&body).unwrap_or_default();
        match (code, status.reason.as_str()) {
            (StatusCode::NOT_FOUND, _) => return Ok(Answer::NotFound(Missing::of(&status))),
            (StatusCode::CONFLICT, "AlreadyExists") => return Ok(Answer::AlreadyExists),
            (StatusCode::CONFLICT, "Conflict") => return Ok(Answer::Stale),
            _ => {}
        }
        let detail = failure_detail(&what(), code, status, &body);
        Err(answered(sort_failure(code, detail, retry_after)))
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
    pub(super) async fn replace(
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
}

/// The API server could not be reached, or its answer broke off: retried after a pause.
fn unreachable(what: &str, detail: &str) -> HandlerError {
    HandlerError::Unavailable {
        backend: "kubernetes",
        reason: format!("{what}: API server unreachable: {detail}"),
        retry_after: UNREACHABLE_RETRY,
    }
}

/// The `Retry-After` of an answer, when it is a number of seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// `{what}: {code} {reason}: {message}` of a failed answer, quoting the start of its body when
/// it is not a `Status` with a message.
fn failure_detail(what: &str, code: StatusCode, status: Status, body: &[u8]) -> String {
    format!(
        "{what}: {} {}: {}",
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
    )
}

/// The error a failed answer (neither 2xx, 404 nor a 409 the callers handle) is, sorted by
/// what a retry can do (see the module docs).
fn sort_failure(code: StatusCode, detail: String, retry_after: Option<Duration>) -> HandlerError {
    match code.as_u16() {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
