//! The gate in front of the sink: backpressure for the whole source, not per message.
//!
//! When the sink says it cannot take work now (503 or 429, with or without `Retry-After`; a
//! refused or reset connection; no answer before the headers), every other message would meet
//! the same answer. Retrying each on its own schedule spends their retries in seconds and
//! hammers a sink that is trying to recover. Instead the gate closes: the fetch loop stops
//! pulling, a message that arrives anyway is handed back with the gate's remaining time as its
//! delay, and no such attempt counts against a message's retry budget.
//!
//! Like a circuit breaker: **closed** (here: the gate is shut) for `Retry-After` (capped at
//! `BACKOFF_MAX_MS`) or, without one, for `BACKOFF_BASE_MS` doubling with each closing in a
//! row; then **probing**: one message at a time, nothing else in flight, until an answer that
//! is not backpressure opens it again (any answer: the sink took the work, even a 500).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Backoff;

/// What the fetch loop may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Pull as many as there are free slots.
    Open,
    /// Pull one message, once nothing else is in flight: it is the probe.
    Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Shut {
        until: Instant,
    },
    /// `out`: the probe is out, the next waits for it.
    Probing {
        out: bool,
    },
}

/// The gate to one sink.
#[derive(Debug)]
pub(crate) struct Gate {
    inner: Mutex<Inner>,
    /// Bumped on every change, so waiters wake.
    changed: watch::Sender<u64>,
    /// How long a closing lasts, by closings in a row.
    backoff: Backoff,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Closings in a row without an answer that opened it: how long the next one lasts.
    closings: u32,
}

impl Gate {
    /// A gate whose closings last `base` doubling up to `max` (or `Retry-After`, capped at `max`).
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                state: State::Open,
                closings: 0,
            }),
            changed: watch::channel(0).0,
            backoff: Backoff::new(base, max),
        }
    }

    /// Waits until the fetch loop may pull, and says how much. Shut: until its time is up,
    /// then it turns to probing.
    pub(crate) async fn admit(&self) -> Admit {
        let mut changed = self.changed.subscribe();
        loop {
            let until = {
                let mut inner = self.inner.lock().expect("gate lock");
                match inner.state {
                    State::Open => return Admit::Open,
                    State::Probing { out: false } => {
                        inner.state = State::Probing { out: true };
                        return Admit::Probe;
                    }
                    State::Shut { until } if until <= Instant::now() => {
                        inner.state = State::Probing { out: true };
                        tracing::info!("sink gate probing: one message at a time");
                        return Admit::Probe;
                    }
                    State::Probing { out: true } => None,
                    State::Shut { until } => Some(until),
                }
            };
            match until {
                Some(until) => tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    _ = changed.changed() => {}
                },
                None => {
                    let _ = changed.changed().await;
                }
            }
        }
    }

    /// How long the gate stays shut, if it is shut now.
    pub(crate) fn shut_for(&self) -> Option<Duration> {
        match self.inner.lock().expect("gate lock").state {
            State::Shut { until } => {
                Some(until.saturating_duration_since(Instant::now())).filter(|left| !left.is_zero())
            }
            State::Open | State::Probing { .. } => None,
        }
    }

    /// The sink said it cannot take work now: shut the gate (or keep it shut for at least as
    /// long as `retry_after` asks). Returns how long it stays shut.
    pub(crate) fn backpressure(&self, retry_after: Option<Duration>) -> Duration {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("gate lock");
        let (was_shut, left) = match inner.state {
            State::Shut { until } if until > now => (true, until - now),
            _ => (false, Duration::ZERO),
        };
        if !was_shut {
            // Many deliveries in flight meet the same outage: one closing, not one each.
            inner.closings = inner.closings.saturating_add(1);
        }
        let wanted = retry_after.map_or_else(
            || self.backoff.exponential(inner.closings),
            |after| self.backoff.capped(after),
        );
        let shut = wanted.max(left);
        inner.state = State::Shut { until: now + shut };
        drop(inner);
        if !was_shut {
            tracing::warn!(
                shut_ms = u64::try_from(shut.as_millis()).unwrap_or(u64::MAX),
                "sink cannot take work now: gate shut"
            );
        }
        self.changed.send_modify(|n| *n += 1);
        shut
    }

    /// The sink answered something other than backpressure: it takes work. A probe's answer
    /// opens the gate; a late answer to a request sent before it shut leaves it shut.
    pub(crate) fn answered(&self) {
        let mut inner = self.inner.lock().expect("gate lock");
        match inner.state {
            State::Probing { .. } => {
                inner.state = State::Open;
                inner.closings = 0;
                drop(inner);
                tracing::info!("sink takes work again: gate open");
                self.changed.send_modify(|n| *n += 1);
            }
            State::Open => inner.closings = 0,
            State::Shut { .. } => {}
        }
    }

    /// The probe is finished (answered, handed back, or never pulled): the next may go.
    pub(crate) fn probe_done(&self) {
        let mut inner = self.inner.lock().expect("gate lock");
        if inner.state == (State::Probing { out: true }) {
            inner.state = State::Probing { out: false };
            drop(inner);
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

/// The fetch loop's hold on a probe: dropped, it lets the next probe go (a pull that brought
/// nothing, or failed); handed over, the delivery task that took the probe does that.
pub(crate) struct ProbeTicket<'a>(&'a Gate);

impl<'a> ProbeTicket<'a> {
    pub(crate) fn new(gate: &'a Gate) -> Self {
        Self(gate)
    }

    /// The probe's message goes to a delivery task, which calls [`Gate::probe_done`] when it
    /// ends. Returns true (this delivery is the probe).
    pub(crate) fn hand_over(self) -> bool {
        std::mem::forget(self);
        true
    }
}

impl Drop for ProbeTicket<'_> {
    fn drop(&mut self) {
        self.0.probe_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    #[tokio::test(start_paused = true)]
    async fn backpressure_shuts_the_gate_then_a_probe_answer_opens_it() {
        let g = gate();
        assert_eq!(g.admit().await, Admit::Open);
        assert_eq!(g.backpressure(None), Duration::from_millis(100));
        assert!(g.shut_for().is_some());
        let started = Instant::now();
        assert_eq!(g.admit().await, Admit::Probe);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        // One probe at a time: the next waits for the first to finish.
        let second = tokio::time::timeout(Duration::from_secs(60), g.admit()).await;
        assert!(second.is_err(), "a second probe went out");
        g.probe_done();
        assert_eq!(g.admit().await, Admit::Probe);
        g.answered();
        assert_eq!(g.admit().await, Admit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn closings_in_a_row_double_and_one_burst_counts_once() {
        let g = gate();
        assert_eq!(g.backpressure(None), Duration::from_millis(100));
        // Others in flight meet the same outage: no doubling.
        assert!(g.backpressure(None) <= Duration::from_millis(100));
        assert_eq!(g.admit().await, Admit::Probe);
        // The probe meets it too: twice as long.
        assert_eq!(g.backpressure(None), Duration::from_millis(200));
        g.probe_done();
        assert_eq!(g.admit().await, Admit::Probe);
        assert_eq!(g.backpressure(None), Duration::from_millis(400));
        g.probe_done();
        assert_eq!(g.admit().await, Admit::Probe);
        g.answered();
        // Open again: the next closing starts from the base.
        assert_eq!(g.backpressure(None), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_up_to_the_cap() {
        let g = gate();
        assert_eq!(
            g.backpressure(Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        // A shorter ask never shortens a closing.
        assert!(g.backpressure(Some(Duration::from_secs(1))) > Duration::from_secs(4));
        assert_eq!(
            Gate::new(Duration::from_millis(100), Duration::from_secs(2))
                .backpressure(Some(Duration::from_secs(60))),
            Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_pull_that_fails_lets_the_next_probe_go() {
        let g = gate();
        g.backpressure(None);
        assert_eq!(g.admit().await, Admit::Probe);
        // The pull failed (a leader election): the ticket is dropped, not handed over.
        drop(ProbeTicket::new(&g));
        let next = tokio::time::timeout(Duration::from_secs(1), g.admit()).await;
        assert_eq!(
            next,
            Ok(Admit::Probe),
            "the gate stayed waiting for a lost probe"
        );
        assert!(ProbeTicket::new(&g).hand_over());
        let held = tokio::time::timeout(Duration::from_secs(1), g.admit()).await;
        assert!(held.is_err(), "a handed-over probe is still out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_does_not_open_a_shut_gate() {
        let g = gate();
        g.backpressure(Some(Duration::from_secs(5)));
        g.answered();
        assert!(g.shut_for().is_some());
    }
}
