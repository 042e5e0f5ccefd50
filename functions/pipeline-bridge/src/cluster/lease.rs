//! Locks: `coordination.k8s.io/v1` Leases held by a request id, taken, renewed, taken over
//! once expired and freed, every change settled by the API server's optimistic concurrency.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use serde_json::{Value, json};

use handler_kit::HandlerError;

use super::api::Answer;
use super::{Cluster, LEASES};
use crate::names::{MANAGED_BY, MANAGED_BY_LABEL};

/// How many times a change of a Lease is tried again after another replica changed it first.
const RACES: usize = 4;

impl Cluster {
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
        for _ in 0..RACES {
            let now = Utc::now();
            let Some(mut lease) = self.get(namespace, &LEASES, name).await? else {
                if self
                    .create_lease(namespace, name, holder, seconds, now)
                    .await?
                {
                    return Ok(());
                }
                // Another replica created it first: read it again.
                continue;
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
            take(&mut lease, holder, seconds, now);
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

    /// Creates the lock Lease `name`, held by `holder` for `seconds`: false when another
    /// replica created it first (it is to be read again).
    async fn create_lease(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        seconds: i32,
        now: DateTime<Utc>,
    ) -> Result<bool, HandlerError> {
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
        let body = serde_json::to_vec(&lease).map_err(|e| HandlerError::Internal(e.to_string()))?;
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
            Answer::Done(_) => Ok(true),
            Answer::AlreadyExists => Ok(false),
            // Leases are always served: the namespace is what is missing.
            Answer::NotFound(_) => Err(HandlerError::BackendRejected {
                backend: "kubernetes",
                detail: format!("{}: the namespace does not exist", what()),
            }),
            Answer::Stale => Err(HandlerError::Conflict(format!("{}: 409 Conflict", what()))),
        }
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
        for _ in 0..RACES {
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

/// Makes `holder` the Lease's holder for `seconds` from `now`, counting one more transition;
/// the rest of the Lease stays as it was read.
fn take(lease: &mut Value, holder: &str, seconds: i32, now: DateTime<Utc>) {
    let transitions = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
    let spec = spec_mut(lease);
    spec.insert("holderIdentity".into(), json!(holder));
    spec.insert("leaseDurationSeconds".into(), json!(seconds));
    spec.insert("acquireTime".into(), json!(micro_time(now)));
    spec.insert("renewTime".into(), json!(micro_time(now)));
    spec.insert(
        "leaseTransitions".into(),
        json!(transitions.saturating_add(1)),
    );
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
}
