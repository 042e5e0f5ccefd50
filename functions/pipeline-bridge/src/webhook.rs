//! Git push webhooks (Gitea, GitHub) -> the catalog entries whose paths changed.
//!
//! Order matters: the body is read under a cap, then the HMAC-SHA256 signature is checked (in
//! constant time, by *ring*) before a byte of it is parsed; only then is the delivery looked
//! up. A trigger that fails for a passing reason (a held lock, the API down) is queued through
//! JetStream on `PIPELINE_WEBHOOK_DEFER_SUBJECT` for the event source to retry with backoff,
//! since senders do not reliably redeliver (GitHub never does by itself). A delivery is recorded
//! as seen once each of its triggers succeeded, failed for good or was queued, so one that could
//! not queue is redone when the sender redelivers it, while a replay of a finished one is
//! answered without touching the cluster. Each trigger's `request_id` is
//! derived from the delivery id and the pipeline, so even a replay that slips past the record
//! (two replicas at once, a restarted process without NATS) finds its runs already there.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use handler_kit::HandlerError;
use handler_kit::nats::Nats;
use lru::LruCache;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::State;
use crate::names::short_hash;
use crate::run::{RunStatus, TriggerRequest, trigger};

/// Who sends the webhook; decides the header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Gitea (and Forgejo): `X-Gitea-Event`, `X-Gitea-Delivery`, `X-Gitea-Signature` (hex).
    Gitea,
    /// GitHub: `X-GitHub-Event`, `X-GitHub-Delivery`, `X-Hub-Signature-256` (`sha256=` hex).
    Github,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Self::Gitea => "gitea",
            Self::Github => "github",
        }
    }

    fn event_header(self) -> &'static str {
        match self {
            Self::Gitea => "x-gitea-event",
            Self::Github => "x-github-event",
        }
    }

    fn delivery_header(self) -> &'static str {
        match self {
            Self::Gitea => "x-gitea-delivery",
            Self::Github => "x-github-delivery",
        }
    }

    /// The hex signature: Gitea's own header, else the GitHub-style one both can send.
    fn signature(self, headers: &HeaderMap) -> Option<String> {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let hub = get("x-hub-signature-256").and_then(|v| v.strip_prefix("sha256="));
        match self {
            Self::Gitea => get("x-gitea-signature").or(hub),
            Self::Github => hub,
        }
        .map(str::to_string)
    }
}

/// A webhook secret; never printed.
#[derive(Clone)]
pub struct Secret(Arc<hmac::Key>);

impl Secret {
    /// The HMAC-SHA256 key for `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Checks `signature_hex` against the HMAC-SHA256 of `body`, in constant time.
pub fn verify(
    secret: &Secret,
    body: &[u8],
    signature_hex: Option<&str>,
) -> Result<(), HandlerError> {
    let signature = signature_hex
        .ok_or_else(|| HandlerError::Unauthorized("the request is not signed".into()))?;
    let bytes = hex::decode(signature)
        .map_err(|_| HandlerError::Unauthorized("the signature is not hex".into()))?;
    hmac::verify(&secret.0, body, &bytes)
        .map_err(|_| HandlerError::Unauthorized("the signature does not match the body".into()))
}

/// Deliveries already handled: a JetStream KV bucket shared by every replica when NATS is
/// configured, an in-process LRU otherwise (and when the bucket cannot be reached).
#[derive(Debug)]
pub struct Deliveries {
    bucket: String,
    ttl: Duration,
    store: OnceCell<kv::Store>,
    recent: Mutex<LruCache<String, ()>>,
}

impl Deliveries {
    /// A record over `bucket` (entries expire after `ttl`) with an LRU of `capacity`.
    pub fn new(bucket: String, ttl: Duration, capacity: usize) -> Self {
        Self {
            bucket,
            ttl,
            store: OnceCell::new(),
            recent: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, LruCache<String, ()>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn store(&self, nats: &Nats) -> Option<&kv::Store> {
        let client = nats.client()?;
        let opened = self
            .store
            .get_or_try_init(|| {
                handler_kit::nats::open_or_create_kv(client, &self.bucket, self.ttl)
            })
            .await;
        match opened {
            Ok(store) => Some(store),
            Err(e) => {
                tracing::warn!(bucket = %self.bucket, error = %e, "delivery bucket unavailable; deduplicating in process");
                None
            }
        }
    }

    /// Whether `key` was handled already.
    pub async fn seen(&self, nats: &Nats, key: &str) -> bool {
        if self.recent().contains(key) {
            return true;
        }
        let Some(store) = self.store(nats).await else {
            return false;
        };
        match store.get(key).await {
            Ok(found) => found.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "delivery lookup failed; treating the delivery as new");
                false
            }
        }
    }

    /// Records `key` as handled (create-if-absent: the first replica's record stands).
    pub async fn record(&self, nats: &Nats, key: &str) {
        self.recent().put(key.to_string(), ());
        if let Some(store) = self.store(nats).await
            && let Err(e) = store.create(key, bytes::Bytes::from_static(b"1")).await
            && e.kind() != kv::CreateErrorKind::AlreadyExists
        {
            tracing::warn!(error = %e, "could not record the delivery in the bucket");
        }
    }
}

/// The parts of a push event this function reads (Gitea and GitHub send the same shape).
#[derive(Debug, Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Option<Repository>,
    #[serde(default)]
    commits: Vec<Commit>,
    head_commit: Option<Commit>,
}

#[derive(Debug, Deserialize)]
struct Repository {
    full_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Commit {
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
}

/// One selected pipeline's outcome.
#[derive(Debug, Serialize)]
struct Triggered {
    pipeline: String,
    request_id: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    status: Option<RunStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// The subject the trigger was queued on after a retryable failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    deferred: Option<String>,
}

/// The answer to a webhook.
#[derive(Debug, Serialize)]
struct Answer {
    delivery: String,
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ignored: Option<String>,
    triggered: Vec<Triggered>,
}

/// Handles one webhook request of `provider`.
pub async fn handle(
    state: &State,
    provider: Provider,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, HandlerError> {
    let body =
        handler_kit::event::read_capped(headers, body, state.config.webhook_max_bytes).await?;
    let secret = match provider {
        Provider::Gitea => state.config.gitea_secret.as_ref(),
        Provider::Github => state.config.github_secret.as_ref(),
    }
    .ok_or_else(|| {
        HandlerError::Unauthorized(format!(
            "{} webhooks are not enabled (no secret configured)",
            provider.name()
        ))
    })?;
    verify(secret, &body, provider.signature(headers).as_deref())?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let delivery = header(provider.delivery_header());
    if delivery.is_empty() || delivery.len() > 128 {
        return Err(HandlerError::InvalidPayload(format!(
            "{} is missing or too long",
            provider.delivery_header()
        )));
    }
    // A header value can still hold a tab; the id names runs, subjects and `Nats-Msg-Id`s.
    handler_kit::event::check_token(provider.delivery_header(), &delivery)?;
    let mut answer = Answer {
        delivery: delivery.clone(),
        duplicate: false,
        ignored: None,
        triggered: Vec::new(),
    };
    let event = header(provider.event_header());
    if event != "push" {
        answer.ignored = Some(format!("{event:?} events start nothing"));
        return Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response());
    }
    let key = format!("{}.{}", provider.name(), short_hash(&[&delivery], 16));
    if state.deliveries.seen(&state.nats, &key).await {
        answer.duplicate = true;
        return Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response());
    }
    let push: Push = serde_json::from_slice(&body)
        .map_err(|e| HandlerError::InvalidPayload(format!("not a push event: {e}")))?;
    let Some(branch) = push.git_ref.strip_prefix("refs/heads/") else {
        answer.ignored = Some(format!("{} is not a branch", push.git_ref));
        return Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response());
    };
    if push.deleted {
        answer.ignored = Some(format!("branch {branch} was deleted"));
        return Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response());
    }
    let mut paths: Vec<String> = Vec::new();
    let commits = if push.commits.is_empty() {
        push.head_commit.into_iter().collect()
    } else {
        push.commits
    };
    for commit in commits {
        paths.extend(commit.added);
        paths.extend(commit.removed);
        paths.extend(commit.modified);
    }
    paths.sort();
    paths.dedup();
    let repository = push.repository.and_then(|r| r.full_name);
    let git = [
        ("git.after", push.after.as_str()),
        ("git.branch", branch),
        ("git.repository", repository.as_deref().unwrap_or("")),
    ];
    let mut retry: Option<HandlerError> = None;
    for entry in state
        .config
        .catalog
        .select_for_push(repository.as_deref(), branch, &paths)
    {
        let request_id = format!("git-{delivery}-{}", entry.name);
        let mut parameters = std::collections::BTreeMap::new();
        if let Some(rule) = &entry.git {
            for (name, template) in &rule.parameters {
                let mut value = template.clone();
                for (placeholder, text) in git {
                    value = value.replace(&format!("{{{{{placeholder}}}}}"), text);
                }
                parameters.insert(name.clone(), Value::String(value));
            }
        }
        let request = TriggerRequest {
            request_id: Some(request_id.clone()),
            pipeline: entry.name.clone(),
            parameters,
        };
        let mut item = Triggered {
            pipeline: entry.name.clone(),
            request_id: request_id.clone(),
            status: None,
            error: None,
            detail: None,
            deferred: None,
        };
        match trigger(state, &request_id, &request).await {
            Ok(status) => item.status = Some(status),
            Err(e) => {
                item.error = Some(e.code());
                item.detail = Some(e.to_string());
                if e.class().is_retryable() {
                    // Queued for the event source to retry; else the sender must redeliver.
                    match defer(state, &request).await {
                        Ok(subject) => item.deferred = Some(subject),
                        Err(why) => {
                            tracing::warn!(request_id = %request_id, error = %why, "could not defer a webhook trigger");
                            retry.get_or_insert(e);
                        }
                    }
                }
            }
        }
        answer.triggered.push(item);
    }
    if let Some(error) = retry {
        // Not recorded: the sender's redelivery redoes it, and what was created is found again.
        tracing::warn!(delivery = %delivery, error = %error, "webhook delivery not finished; redeliver it");
        return Ok(error.response(&answer));
    }
    state.deliveries.record(&state.nats, &key).await;
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

/// Queues `request` as an `ai.pipeline.trigger` message on `PIPELINE_WEBHOOK_DEFER_SUBJECT`
/// through JetStream (stored, with `Nats-Msg-Id` = its request id, so a repeat is stored once),
/// for the event source to deliver back with its retries and backoff: a held lock frees up
/// later, and GitHub does not redeliver a failed webhook by itself. Returns the subject; fails
/// without NATS, without a subject, or when no stream stored the message (no `PubAck`).
async fn defer(state: &State, request: &TriggerRequest) -> Result<String, String> {
    let subject = state
        .config
        .webhook_defer_subject
        .clone()
        .ok_or("PIPELINE_WEBHOOK_DEFER_SUBJECT is off")?;
    let ack = state
        .nats
        .publish_stored(
            subject.clone(),
            request,
            request.request_id.as_deref(),
            DEFER_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(subject = %subject, stream = %ack.stream, seq = ack.sequence, request_id = ?request.request_id, "webhook trigger deferred");
    Ok(subject)
}

/// How long a deferral waits for JetStream's `PubAck`.
const DEFER_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        hex::encode(hmac::sign(&key, body).as_ref())
    }

    #[test]
    fn only_the_right_signature_of_the_exact_body_passes() {
        let secret = Secret::new(b"s3cret");
        let good = sign(b"s3cret", b"{}");
        assert!(verify(&secret, b"{}", Some(&good)).is_ok());
        assert!(verify(&secret, b"{} ", Some(&good)).is_err());
        assert!(verify(&secret, b"{}", Some(&sign(b"other", b"{}"))).is_err());
        assert!(verify(&secret, b"{}", Some("zz")).is_err());
        assert!(verify(&secret, b"{}", None).is_err());
    }

    #[test]
    fn each_provider_reads_its_own_signature_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-hub-signature-256",
            "sha256=abcd".parse().expect("header"),
        );
        assert_eq!(
            Provider::Github.signature(&headers).as_deref(),
            Some("abcd")
        );
        assert_eq!(Provider::Gitea.signature(&headers).as_deref(), Some("abcd"));
        headers.insert("x-gitea-signature", "ef01".parse().expect("header"));
        assert_eq!(Provider::Gitea.signature(&headers).as_deref(), Some("ef01"));
        assert!(Provider::Github.signature(&HeaderMap::new()).is_none());
    }
}
