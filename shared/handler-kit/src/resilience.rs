//! Guarding outbound calls: a timeout, a circuit breaker and a concurrency limit per backend.
//!
//! When a backend is down, every event waiting on it would hold a connection, memory and the
//! source's in-flight slot until its timeout. The breaker (the `failsafe` crate: consecutive
//! failures open it, a constant wait half-opens it, one success closes it) turns that into an
//! immediate 503 with `Retry-After`, so the source backs off and the backend gets room to
//! recover. A backend that answers "not now" (429, 503) counts as a failure too, and is answered
//! 503 with its own `Retry-After` (clamped to between 1 s and the breaker's open period): the
//! source treats that as back-pressure and slows down without spending the message's attempts.
//! Only a refusal of the request itself ([`CallError::Rejected`]) leaves the breaker alone.
//! The semaphore bounds how many calls one replica makes at once; a caller that waits
//! longer than the queue timeout is told to come back later instead of piling up.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use failsafe::StateMachine;
use failsafe::backoff::Constant;
use failsafe::failure_policy::ConsecutiveFailures;
use opentelemetry::KeyValue;
use tokio::sync::Semaphore;

use crate::HandlerError;
use crate::config::ConfigReader;
use crate::telemetry;

/// Limits for one backend; read from `{PREFIX}_*` variables.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// `{PREFIX}_TIMEOUT_MS`: one call's deadline.
    pub timeout: Duration,
    /// `{PREFIX}_CONCURRENCY`: calls in flight at once from this replica.
    pub concurrency: usize,
    /// `{PREFIX}_QUEUE_TIMEOUT_MS`: how long a call may wait for a slot before 503.
    pub queue_timeout: Duration,
    /// `{PREFIX}_BREAKER_FAILURES`: consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// `{PREFIX}_BREAKER_OPEN_MS`: how long it stays open before a probe is let through.
    pub breaker_open: Duration,
    /// `{PREFIX}_MAX_RESPONSE_BYTES`: the largest answer read from it (default 1 MiB; each
    /// client sets one that fits its answers); a larger one is a failed call (502), so a
    /// backend answering without end cannot grow the replica's memory.
    pub max_response_bytes: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            concurrency: 8,
            queue_timeout: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(10),
            max_response_bytes: 1024 * 1024,
        }
    }
}

impl BackendConfig {
    /// Reads the `{prefix}_*` variables, falling back to `defaults`.
    pub fn read(r: &mut ConfigReader, prefix: &str, defaults: Self) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            timeout: r.millis(&format!("{prefix}_TIMEOUT_MS"), ms(defaults.timeout)),
            concurrency: r.positive(&format!("{prefix}_CONCURRENCY"), defaults.concurrency),
            queue_timeout: r.millis(
                &format!("{prefix}_QUEUE_TIMEOUT_MS"),
                ms(defaults.queue_timeout),
            ),
            breaker_failures: r
                .positive(
                    &format!("{prefix}_BREAKER_FAILURES"),
                    defaults.breaker_failures as usize,
                )
                .try_into()
                .unwrap_or(u32::MAX),
            breaker_open: r.millis(
                &format!("{prefix}_BREAKER_OPEN_MS"),
                ms(defaults.breaker_open),
            ),
            max_response_bytes: r.positive(
                &format!("{prefix}_MAX_RESPONSE_BYTES"),
                defaults.max_response_bytes,
            ),
        }
    }
}

/// How a call failed, as judged by the code that made it ([`crate::http::verdict`] for HTTP).
#[derive(Debug)]
pub enum CallError {
    /// The backend is unwell (connection refused, 5xx, 401/403/404, garbage): counts against
    /// the breaker.
    Transient(String),
    /// The backend is well but cannot take work now (429, 503): counts against the breaker too,
    /// and is answered 503 with `Retry-After`, so the source backs off instead of spending the
    /// message's attempts.
    Busy {
        /// What it answered.
        detail: String,
        /// Its `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The backend refused this request (400, 409, 413, 422, ...): the backend is fine, the
    /// request is not.
    Rejected(String),
}

type Breaker = StateMachine<ConsecutiveFailures<Constant>, BreakerEvents>;

/// A guarded backend: every call to it goes through [`Backend::call`].
#[derive(Clone)]
pub struct Backend {
    name: &'static str,
    config: BackendConfig,
    breaker: Breaker,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A guard for the backend `name` (used in errors, logs and metric labels).
    pub fn new(name: &'static str, config: BackendConfig) -> Self {
        let policy = failsafe::failure_policy::consecutive_failures(
            config.breaker_failures.max(1),
            failsafe::backoff::constant(config.breaker_open),
        );
        let breaker = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(BreakerEvents {
                backend: name,
                opened: Arc::new(AtomicBool::new(false)),
            })
            .build();
        telemetry::metrics()
            .breaker_open
            .record(0, &[KeyValue::new("backend", name)]);
        Self {
            name,
            permits: Arc::new(Semaphore::new(config.concurrency)),
            config,
            breaker,
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Runs `call` under the breaker, the concurrency limit and the timeout.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, HandlerError> {
        self.admit()?;
        let Ok(Ok(_permit)) =
            tokio::time::timeout(self.config.queue_timeout, self.permits.acquire()).await
        else {
            return Err(self.saturated("call"));
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, call).await;
        telemetry::metrics().backend_duration.record(
            started.elapsed().as_secs_f64(),
            &[KeyValue::new("backend", self.name)],
        );
        match result {
            Ok(Ok(value)) => {
                self.breaker.on_success();
                self.count("ok");
                Ok(value)
            }
            Ok(Err(error)) => Err(self.failed(error)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// For streaming calls: takes a slot and runs `open` (e.g. until response headers arrive)
    /// under the breaker and the timeout, then hands back a [`Lease`] that keeps the slot for
    /// as long as the stream is read. The outcome reaches the breaker when the lease is
    /// finished; a lease dropped unfinished (the caller went away) reports nothing.
    pub async fn open<T>(
        &self,
        open: impl Future<Output = Result<T, CallError>>,
    ) -> Result<(T, Lease), HandlerError> {
        self.admit()?;
        let Ok(Ok(permit)) = tokio::time::timeout(
            self.config.queue_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await
        else {
            return Err(self.saturated("stream"));
        };
        match tokio::time::timeout(self.config.timeout, open).await {
            Ok(Ok(value)) => Ok((
                value,
                Lease {
                    backend: self.clone(),
                    _permit: permit,
                    started: Instant::now(),
                },
            )),
            Ok(Err(error)) => Err(self.failed(error)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// Refuses at once while the breaker is open.
    fn admit(&self) -> Result<(), HandlerError> {
        if self.breaker.is_call_permitted() {
            return Ok(());
        }
        self.count("open");
        Err(HandlerError::Unavailable {
            backend: self.name,
            reason: "circuit breaker open after repeated failures".into(),
            retry_after: self.config.breaker_open,
        })
    }

    /// Every slot stayed taken for the whole queue timeout.
    fn saturated(&self, what: &str) -> HandlerError {
        self.count("saturated");
        HandlerError::Unavailable {
            backend: self.name,
            reason: format!("all {} {what} slots busy", self.config.concurrency),
            retry_after: Duration::from_secs(1),
        }
    }

    /// Reports a failed call to the breaker and says what the event is answered with.
    fn failed(&self, error: CallError) -> HandlerError {
        match error {
            CallError::Rejected(detail) => {
                self.breaker.on_success();
                self.count("rejected");
                HandlerError::BackendRejected {
                    backend: self.name,
                    detail,
                }
            }
            CallError::Busy {
                detail,
                retry_after,
            } => {
                self.breaker.on_error();
                self.count("busy");
                HandlerError::Unavailable {
                    backend: self.name,
                    reason: detail,
                    retry_after: self.busy_retry_after(retry_after),
                }
            }
            CallError::Transient(detail) => {
                self.breaker.on_error();
                self.count("failed");
                HandlerError::Backend {
                    backend: self.name,
                    detail,
                }
            }
        }
    }

    /// The wait a busy backend asked for, passed on to the source: at least 1 s (0 would invite
    /// a hot loop), and at most the breaker's open period, after which this replica probes the
    /// backend anyway; 1 s when it named none.
    fn busy_retry_after(&self, asked: Option<Duration>) -> Duration {
        let floor = Duration::from_secs(1);
        asked.map_or(floor, |a| a.min(self.config.breaker_open).max(floor))
    }

    fn timed_out(&self) -> HandlerError {
        self.breaker.on_error();
        self.count("timeout");
        HandlerError::Timeout {
            backend: self.name,
            after: self.config.timeout,
        }
    }

    fn count(&self, outcome: &'static str) {
        telemetry::metrics().backend_calls.add(
            1,
            &[
                KeyValue::new("backend", self.name),
                KeyValue::new("outcome", outcome),
            ],
        );
    }
}

/// A slot held by an open stream; see [`Backend::open`].
#[derive(Debug)]
pub struct Lease {
    backend: Backend,
    _permit: tokio::sync::OwnedSemaphorePermit,
    started: Instant,
}

impl Lease {
    /// The stream ended well (or ended because the caller stopped reading).
    pub fn succeeded(self) {
        self.finish(true);
    }

    /// The stream broke (reset, garbage, idle timeout): counts against the breaker.
    pub fn failed(self) {
        self.finish(false);
    }

    fn finish(self, ok: bool) {
        let b = &self.backend;
        let m = telemetry::metrics();
        m.backend_duration.record(
            self.started.elapsed().as_secs_f64(),
            &[KeyValue::new("backend", b.name)],
        );
        b.count(if ok { "ok" } else { "failed" });
        if ok {
            b.breaker.on_success();
        } else {
            b.breaker.on_error();
        }
    }
}

/// Logs breaker transitions and keeps the `handler_breaker_open` gauge current.
#[derive(Debug, Clone)]
struct BreakerEvents {
    backend: &'static str,
    /// The state machine reports "closed" when it is created; only a recovery is news.
    opened: Arc<AtomicBool>,
}

impl failsafe::Instrument for BreakerEvents {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.opened.store(true, Ordering::Relaxed);
        tracing::warn!(backend = self.backend, "circuit breaker opened");
        telemetry::metrics()
            .breaker_open
            .record(1, &[KeyValue::new("backend", self.backend)]);
    }

    fn on_half_open(&self) {
        tracing::info!(backend = self.backend, "circuit breaker half-open, probing");
    }

    fn on_closed(&self) {
        if self.opened.swap(false, Ordering::Relaxed) {
            tracing::info!(
                backend = self.backend,
                "circuit breaker closed, backend recovered"
            );
        }
        telemetry::metrics()
            .breaker_open
            .record(0, &[KeyValue::new("backend", self.backend)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(failures: u32, open_ms: u64) -> Backend {
        Backend::new(
            "test",
            BackendConfig {
                timeout: Duration::from_millis(200),
                concurrency: 1,
                queue_timeout: Duration::from_millis(20),
                breaker_failures: failures,
                breaker_open: Duration::from_millis(open_ms),
                ..BackendConfig::default()
            },
        )
    }

    #[tokio::test]
    async fn breaker_opens_after_consecutive_failures_and_recovers() {
        let b = backend(2, 50);
        for _ in 0..2 {
            let r = b
                .call(async { Err::<(), _>(CallError::Transient("boom".into())) })
                .await;
            assert!(matches!(r, Err(HandlerError::Backend { .. })));
        }
        let r = b.call(async { Ok::<_, CallError>(1) }).await;
        assert!(matches!(r, Err(HandlerError::Unavailable { .. })), "{r:?}");
        // Past the open period a probe goes through and a success closes the breaker.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match b.call(async { Ok::<_, CallError>(1) }).await {
                Ok(1) => break,
                _ if Instant::now() < deadline => tokio::task::yield_now().await,
                other => panic!("breaker never recovered: {other:?}"),
            }
        }
        assert!(matches!(
            b.call(async { Ok::<_, CallError>(2) }).await,
            Ok(2)
        ));
    }

    #[tokio::test]
    async fn rejections_do_not_open_the_breaker() {
        let b = backend(1, 10_000);
        for _ in 0..3 {
            let r = b
                .call(async { Err::<(), _>(CallError::Rejected("bad voice".into())) })
                .await;
            assert!(matches!(r, Err(HandlerError::BackendRejected { .. })));
        }
        assert!(b.call(async { Ok::<_, CallError>(()) }).await.is_ok());
    }

    #[tokio::test]
    async fn a_busy_backend_opens_the_breaker_and_its_wait_is_passed_on_within_bounds() {
        let b = backend(5, 5_000);
        let busy = |retry_after: Option<u64>| CallError::Busy {
            detail: "HTTP 503: loading model".into(),
            retry_after: retry_after.map(Duration::from_secs),
        };
        // Asked for, capped at the open period, 1 s when absent or zero.
        for (asked, passed_on) in [(Some(3), 3), (Some(3600), 5), (None, 1), (Some(0), 1)] {
            let r = b.call(async { Err::<(), _>(busy(asked)) }).await;
            assert!(
                matches!(&r, Err(HandlerError::Unavailable { retry_after, reason, .. })
                    if *retry_after == Duration::from_secs(passed_on) && reason.contains("loading")),
                "{asked:?}: {r:?}"
            );
        }
        // A stream's opening counts the same way: the fifth busy answer opens the breaker.
        let r = b.open(async { Err::<(), _>(busy(Some(2))) }).await;
        assert!(
            matches!(&r, Err(HandlerError::Unavailable { retry_after, .. }) if retry_after.as_secs() == 2),
            "{r:?}"
        );
        let r = b.call(async { Ok::<_, CallError>(()) }).await;
        assert!(
            matches!(&r, Err(HandlerError::Unavailable { reason, retry_after, .. })
                if reason.contains("circuit breaker") && *retry_after == Duration::from_secs(5)),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_lease_holds_its_slot_until_finished_and_reports_to_the_breaker() {
        let b = backend(1, 10_000);
        let ((), lease) = b
            .open(async { Ok::<_, CallError>(()) })
            .await
            .expect("open");
        // The only slot is held by the open stream.
        let queued = b.call(async { Ok::<_, CallError>(()) }).await;
        assert!(
            matches!(queued, Err(HandlerError::Unavailable { .. })),
            "{queued:?}"
        );
        lease.failed();
        // One failure opens this breaker.
        let r = b.open(async { Ok::<_, CallError>(()) }).await;
        assert!(matches!(r, Err(HandlerError::Unavailable { .. })), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_time_out_and_a_full_queue_answers_unavailable() {
        let b = backend(5, 1000);
        let slow = b.call(async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, CallError>(())
        });
        let queued = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            b.call(async { Ok::<_, CallError>(()) }).await
        };
        let (slow, queued) = tokio::join!(slow, queued);
        assert!(
            matches!(slow, Err(HandlerError::Timeout { .. })),
            "{slow:?}"
        );
        assert!(
            matches!(queued, Err(HandlerError::Unavailable { .. })),
            "{queued:?}"
        );
    }
}
