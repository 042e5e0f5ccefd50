//! Git push webhooks (Gitea, GitHub) -> the catalog entries whose paths changed.
//!
//! Order matters, and it bounds what a stranger can make this function hold. Before a byte of
//! the body is read, the provider must have a secret and the request must carry a well-formed
//! signature header and a delivery id; otherwise the answer is 401 (or 400) at once and the
//! body is never polled (an `Expect: 100-continue` sender never sends it). Then the body is
//! read in one of `PIPELINE_WEBHOOK_MAX_READS` slots, under `PIPELINE_WEBHOOK_MAX_BODY_BYTES`
//! (413 past it, having held at most the cap and one chunk), and its HMAC-SHA256 is checked in
//! constant time (by *ring*) before any of it is parsed; the slot is held until the raw body is
//! dropped, so unverified bytes in memory stay under slots x (cap + one chunk), whatever
//! arrives. Only then is the delivery looked up. A trigger that fails for a passing reason (a
//! held lock, the API down) is queued through
//! JetStream on `PIPELINE_WEBHOOK_DEFER_SUBJECT` for the event source to retry with backoff,
//! since senders do not reliably redeliver (GitHub never does by itself).
//!
//! Replays. The signature covers the body, not the delivery id header, so a captured body can
//! be sent again under any delivery id. A push is therefore known by what the signature
//! covers, its repository, branch and the commit it moved to (`after`), as well as by its
//! delivery id: either one seen before makes it a duplicate. Both are recorded once each of
//! its triggers succeeded, failed for good or was queued, so one that could not queue is redone
//! when the sender redelivers it, while a replay of a finished one is answered without touching
//! the cluster. Each trigger's `request_id` is derived from the push (provider, repository,
//! branch, `after`) and the pipeline, so even a replay that slips past the record (two at once,
//! a record expired or lost without NATS) finds its runs already there: one run per pipeline
//! per pushed commit and branch. Only a push without `after` falls back to the delivery id.
//!
//! What goes back to the sender is the outcome's code and a fixed sentence: the detail of a
//! failure, which can quote the Kubernetes API server, is only logged.

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
use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};

use crate::names::short_hash;
use crate::run::{RunStatus, TriggerRequest, trigger};
use crate::{Config, State};

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

    fn secret(self, config: &Config) -> Option<&Secret> {
        match self {
            Self::Gitea => config.gitea_secret.as_ref(),
            Self::Github => config.github_secret.as_ref(),
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

/// The HMAC-SHA256 a request claims for its body, decoded from its header before the body is
/// read: a request without one, or with one that cannot be an HMAC-SHA256, is refused unread.
#[derive(Debug)]
struct Signature(Vec<u8>);

impl Signature {
    fn parse(signature_hex: Option<&str>) -> Result<Self, HandlerError> {
        let signature = signature_hex
            .ok_or_else(|| HandlerError::Unauthorized("the request is not signed".into()))?;
        let bytes = hex::decode(signature)
            .map_err(|_| HandlerError::Unauthorized("the signature is not hex".into()))?;
        if bytes.len() != hmac::HMAC_SHA256.digest_algorithm().output_len() {
            return Err(HandlerError::Unauthorized(
                "the signature is not an HMAC-SHA256".into(),
            ));
        }
        Ok(Self(bytes))
    }

    /// Checks the signature against the HMAC-SHA256 of `body`, in constant time.
    fn verify(&self, secret: &Secret, body: &[u8]) -> Result<(), HandlerError> {
        hmac::verify(&secret.0, body, &self.0)
            .map_err(|_| HandlerError::Unauthorized("the signature does not match the body".into()))
    }
}

/// `PIPELINE_WEBHOOK_MAX_BODY_BYTES`' default, 4 MiB. GitHub sends up to 25 MB, but a push is
/// far smaller: one of 2,048 commits with three paths each measures 1.6 MB, and one commit
/// with 15,000 paths (GitHub lists at most 5,000 in each of added, removed, modified) 1.4 MB,
/// as `the_default_cap_holds_the_largest_pushes_with_room_to_spare` checks. Four slots of
/// 4 MiB keep unverified bytes under ~35 MiB (per slot, the cap and one hyper chunk of at most
/// 408 KiB, twice over while the chunks are joined into one buffer), within the Service's
/// 96 MiB memory limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// `PIPELINE_WEBHOOK_MAX_READS`' default: a push body arrives in milliseconds, so four slots
/// serve a burst of pushes; only slow (hostile) bodies keep them, each for `READ_DEADLINE`.
pub const DEFAULT_MAX_READS: usize = 4;

/// `PIPELINE_WEBHOOK_READ_WAIT_MS`' default: how long a webhook waits for a read slot before
/// 503. Waiting beats refusing, since no sender redelivers by itself, but the whole answer must
/// fit the sender's own timeout: Gitea gives up after 5 s (`[webhook] DELIVER_TIMEOUT`), GitHub
/// and GitLab after 10 s, so 2 s leaves Gitea 3 s to read and trigger.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(2);

/// How long a body may take to arrive once it holds a slot (then 408): a push from a git
/// server arrives in well under a second, and a sender waits 10 s at most for the whole answer,
/// so a body still dribbling in after this is only keeping a slot from the others.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// The webhook bodies being read: at most `max` at once, a request waiting `wait` for a slot.
#[derive(Debug)]
pub struct BodyReads {
    slots: Semaphore,
    max: usize,
    wait: Duration,
}

impl BodyReads {
    /// At most `max` bodies read at once; a request waits `wait` for a slot, then gets 503.
    pub fn new(max: usize, wait: Duration) -> Self {
        Self {
            slots: Semaphore::new(max),
            max,
            wait,
        }
    }

    async fn slot(&self) -> Result<SemaphorePermit<'_>, HandlerError> {
        match tokio::time::timeout(self.wait, self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            // The semaphore is never closed, so only the wait can end without a slot.
            Ok(Err(_)) | Err(_) => Err(HandlerError::Unavailable {
                backend: "webhook body reads",
                reason: format!(
                    "all {} read slots stayed busy for {:?}",
                    self.max, self.wait
                ),
                retry_after: self.wait,
            }),
        }
    }
}

/// A webhook body whose signature verified, keeping its read slot until it is dropped.
struct SignedBody<'a> {
    bytes: bytes::Bytes,
    _slot: SemaphorePermit<'a>,
}

/// The provider's secret and the request's signature, from the headers alone: 401 without.
fn admit<'a>(
    config: &'a Config,
    provider: Provider,
    headers: &HeaderMap,
) -> Result<(&'a Secret, Signature), HandlerError> {
    let secret = provider.secret(config).ok_or_else(|| {
        HandlerError::Unauthorized(format!(
            "{} webhooks are not enabled (no secret configured)",
            provider.name()
        ))
    })?;
    let signature = Signature::parse(provider.signature(headers).as_deref())?;
    Ok((secret, signature))
}

/// Reads `body` in a slot, under the cap and `READ_DEADLINE`, and verifies it.
async fn read_signed<'a>(
    state: &'a State,
    (secret, signature): (&Secret, Signature),
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<SignedBody<'a>, HandlerError> {
    let slot = state.webhook_reads.slot().await?;
    let limit = state.config.webhook_max_body_bytes;
    let bytes = tokio::time::timeout(
        READ_DEADLINE,
        handler_kit::event::read_capped(headers, body, limit),
    )
    .await
    .map_err(|_| {
        HandlerError::BodyIncomplete(format!("the body took longer than {READ_DEADLINE:?}"))
    })??;
    signature.verify(secret, &bytes)?;
    Ok(SignedBody { bytes, _slot: slot })
}

/// Deliveries and pushes already handled, by key (`{provider}.{hash of the delivery id}` and
/// `{provider}.push.{push identity}`): a JetStream KV bucket shared by every replica when NATS
/// is configured, file-backed so it outlives restarts, entries expiring after
/// `PIPELINE_DELIVERY_TTL_MS`; an in-process LRU otherwise (and when the bucket cannot be
/// reached), lost on restart.
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

/// What a push to a branch changed: all that is kept of its body once the body is dropped.
#[derive(Debug)]
struct Pushed {
    branch: String,
    after: String,
    repository: Option<String>,
    /// Added, removed and modified paths of every commit, sorted, once each.
    paths: Vec<String>,
}

impl Pushed {
    /// What the push is, whatever delivery id it came under: 16 hex of SHA-256 over the
    /// provider, repository, branch and `after` commit (`None` without an `after`).
    fn identity(&self, provider: Provider) -> Option<String> {
        if self.after.is_empty() {
            return None;
        }
        let repository = self.repository.as_deref().unwrap_or("");
        Some(short_hash(
            &[provider.name(), repository, &self.branch, &self.after],
            8,
        ))
    }
}

impl Push {
    /// The branch push in `body`, or why it starts nothing (a tag, a deleted branch).
    fn parse(body: &[u8]) -> Result<Result<Pushed, String>, HandlerError> {
        let push: Self = serde_json::from_slice(body)
            .map_err(|e| HandlerError::InvalidPayload(format!("not a push event: {e}")))?;
        let Some(branch) = push.git_ref.strip_prefix("refs/heads/") else {
            return Ok(Err(format!("{} is not a branch", push.git_ref)));
        };
        if push.deleted {
            return Ok(Err(format!("branch {branch} was deleted")));
        }
        let commits = if push.commits.is_empty() {
            push.head_commit.into_iter().collect()
        } else {
            push.commits
        };
        let mut paths: Vec<String> = Vec::new();
        for commit in commits {
            paths.extend(commit.added);
            paths.extend(commit.removed);
            paths.extend(commit.modified);
        }
        paths.sort();
        paths.dedup();
        Ok(Ok(Pushed {
            branch: branch.to_string(),
            after: push.after,
            repository: push.repository.and_then(|r| r.full_name),
            paths,
        }))
    }
}

/// Handles one webhook request of `provider`.
pub async fn handle(
    state: &State,
    provider: Provider,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, HandlerError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    // Every header is checked before a byte of the body is read.
    let admitted = admit(&state.config, provider, headers)?;
    let delivery = header(provider.delivery_header());
    if delivery.is_empty() || delivery.len() > 128 {
        return Err(HandlerError::InvalidPayload(format!(
            "{} is missing or too long",
            provider.delivery_header()
        )));
    }
    // A header value can still hold a tab; the id names runs, subjects and `Nats-Msg-Id`s.
    handler_kit::event::check_token(provider.delivery_header(), &delivery)?;
    let body = read_signed(state, admitted, headers, body).await?;
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
    let parsed = Push::parse(&body.bytes);
    // Frees the read slot: what stays in memory now came from a holder of the secret.
    drop(body);
    let pushed = match parsed? {
        Ok(pushed) => pushed,
        Err(ignored) => {
            answer.ignored = Some(ignored);
            return Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response());
        }
    };
    let identity = pushed.identity(provider);
    let mut keys = vec![format!(
        "{}.{}",
        provider.name(),
        short_hash(&[&delivery], 16)
    )];
    if let Some(identity) = &identity {
        keys.push(format!("{}.push.{identity}", provider.name()));
    }
    for key in &keys {
        if state.deliveries.seen(&state.nats, key).await {
            tracing::info!(delivery = %delivery, key = %key, "webhook replay: already handled");
            answer.duplicate = true;
            return Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response());
        }
    }
    // Runs are named from the push itself, so the same push under another delivery id (a
    // replay past the record) finds them instead of starting them again.
    let run_key = identity.as_deref().unwrap_or(&delivery);
    let retry = trigger_selected(state, &delivery, run_key, &pushed, &mut answer.triggered).await;
    if let Some(error) = retry {
        // Not recorded: the sender's redelivery redoes it, and what was created is found again.
        tracing::warn!(delivery = %delivery, error = %error, "webhook delivery not finished; redeliver it");
        return Ok(error.response(&answer));
    }
    for key in &keys {
        state.deliveries.record(&state.nats, key).await;
    }
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

/// What a webhook sender is told about a trigger that failed: a fixed sentence per kind of
/// failure. The error itself can quote the Kubernetes API server (object names, admission and
/// quota messages) and is only logged; the catalog's own refusal of the push's parameters
/// (`Unprocessable`) is the sender's configuration to fix, so it is shown.
fn public_detail(error: &HandlerError) -> String {
    match error {
        HandlerError::Unprocessable(detail) => detail.clone(),
        HandlerError::Held { .. } => "the pipeline's lock is held by another run".into(),
        HandlerError::Unavailable { .. }
        | HandlerError::Timeout { .. }
        | HandlerError::Deadline(_) => "the cluster is unavailable".into(),
        HandlerError::BackendRejected { .. } => "the cluster refused the run".into(),
        _ => "the run could not be started".into(),
    }
}

/// Triggers every catalog entry `pushed` selects, each outcome pushed onto `triggered`.
/// Returns the first retryable failure that could not be deferred: the delivery is unfinished.
async fn trigger_selected(
    state: &State,
    delivery: &str,
    run_key: &str,
    pushed: &Pushed,
    triggered: &mut Vec<Triggered>,
) -> Option<HandlerError> {
    let git = [
        ("git.after", pushed.after.as_str()),
        ("git.branch", pushed.branch.as_str()),
        ("git.repository", pushed.repository.as_deref().unwrap_or("")),
    ];
    let mut retry: Option<HandlerError> = None;
    for entry in state.config.catalog.select_for_push(
        pushed.repository.as_deref(),
        &pushed.branch,
        &pushed.paths,
    ) {
        let request_id = format!("git-{run_key}-{}", entry.name);
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
                tracing::warn!(delivery, request_id = %request_id, error = %e, "webhook trigger failed");
                item.error = Some(e.code());
                item.detail = Some(public_detail(&e));
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
        triggered.push(item);
    }
    retry
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

    fn verify(secret: &Secret, body: &[u8], signature: Option<&str>) -> Result<(), HandlerError> {
        Signature::parse(signature)?.verify(secret, body)
    }

    #[test]
    fn only_the_right_signature_of_the_exact_body_passes() {
        let secret = Secret::new(b"s3cret");
        let good = sign(b"s3cret", b"{}");
        assert!(verify(&secret, b"{}", Some(&good)).is_ok());
        assert!(verify(&secret, b"{} ", Some(&good)).is_err());
        assert!(verify(&secret, b"{}", Some(&sign(b"other", b"{}"))).is_err());
        assert!(verify(&secret, b"{}", None).is_err());
    }

    #[test]
    fn a_signature_that_cannot_be_an_hmac_sha256_is_refused_before_any_body() {
        assert!(Signature::parse(Some("zz")).is_err());
        assert!(Signature::parse(Some("abcd")).is_err(), "too short");
        assert!(
            Signature::parse(Some(&"ab".repeat(33))).is_err(),
            "too long"
        );
        assert!(Signature::parse(Some(&"ab".repeat(32))).is_ok());
    }

    /// A GitHub push body of `commits` commits, each modifying `paths` files, with the fields
    /// GitHub sends (a repository object of ~90 fields, author and committer, urls).
    fn push_of(commits: usize, paths: usize) -> Vec<u8> {
        let person = serde_json::json!({"name": "Ada Lovelace", "email": "ada.lovelace@example.com", "username": "ada-lovelace"});
        let commits: Vec<Value> = (0..commits)
            .map(|i| {
                let sha = format!("{:040x}", i * 7919);
                serde_json::json!({
                    "id": sha, "tree_id": sha, "distinct": true,
                    "message": "models: retrain the ranking head on the March data set (#1234)\n\nSigned-off-by: Ada Lovelace <ada.lovelace@example.com>",
                    "timestamp": "2026-03-01T12:34:56+01:00",
                    "url": format!("https://github.com/ai-platform/platform/commit/{sha}"),
                    "author": person, "committer": person, "added": [], "removed": [],
                    "modified": (0..paths)
                        .map(|k| format!("models/ranking/head/layer_{:05}/config.yaml", i * paths + k))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let fields = |n: usize, width: usize| -> serde_json::Map<String, Value> {
            (0..n)
                .map(|k| (format!("field_{k}"), Value::String("x".repeat(width))))
                .collect()
        };
        serde_json::to_vec(&serde_json::json!({
            "ref": "refs/heads/main", "before": "0".repeat(40), "after": "f".repeat(40),
            "repository": fields(90, 60), "sender": fields(20, 50),
            "pusher": {"name": "ada", "email": "ada.lovelace@example.com"},
            "head_commit": commits.last(), "commits": commits,
        }))
        .expect("JSON")
    }

    #[test]
    fn the_default_cap_holds_the_largest_pushes_with_room_to_spare() {
        // 2,048 commits, and one commit at GitHub's 5,000 paths in each of its three lists.
        for (commits, paths) in [(2048, 3), (1, 15_000)] {
            let size = push_of(commits, paths).len();
            assert!(
                size * 2 < DEFAULT_MAX_BODY_BYTES,
                "{commits} commits x {paths} paths: {size} bytes"
            );
            assert!(
                size > 1_300_000,
                "the example stays realistic: {size} bytes"
            );
        }
        // An everyday push is a few kilobytes.
        assert!(push_of(3, 3).len() < 16 * 1024);
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
