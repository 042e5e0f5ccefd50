//! Per-subject ordering (`ORDERING=subject`): which message of a subject may go next, and how
//! many slots one subject may hold.
//!
//! Each ordered subject is a line: its admitted messages run one at a time in stream order, each
//! waiting for the one before. A line holds at most `MAX_IN_FLIGHT_PER_SUBJECT` slots (running
//! plus waiting), so one stuck subject cannot take every slot and starve the others. A message
//! that finds its line full is deferred: handed back to JetStream with a delay. From then on
//! every later message of that subject is deferred too until the earliest deferred one is back
//! and admitted, so deferring never lets a message overtake another. How often a message was
//! deferred is remembered (its delay grows); a deferral is not an attempt, and only attempts
//! count against `MAX_DELIVER` (see `budget`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::deliver::Settled;

/// Every ordered subject's line.
pub(crate) struct Lines {
    lines: HashMap<String, Line>,
    /// Slots one subject may hold.
    cap: usize,
    /// A deferred message not seen again for this long is forgotten (another replica took it,
    /// or it was deleted), so it cannot hold its subject back for ever.
    forget_after: Duration,
    generation: u64,
}

#[derive(Default)]
struct Line {
    /// Generation and completion signal of the subject's latest admitted message.
    last: Option<(u64, oneshot::Receiver<Settled>)>,
    /// Messages of the subject holding slots (running or waiting).
    admitted: usize,
    /// Stream sequence -> its deferral, earliest first.
    deferred: BTreeMap<u64, Deferral>,
}

struct Deferral {
    at: Instant,
    times: u32,
}

/// What to do with a message of an ordered subject.
pub(crate) enum Admission {
    /// Deliver it, once `previous` (the subject's message before it) has settled.
    Admitted(Turn),
    /// Hand it back to JetStream; `times` counts its deferrals, this one included.
    Deferred { times: u32 },
}

/// An admitted message's place in its line.
pub(crate) struct Turn {
    subject: String,
    generation: u64,
    /// The subject's message before this one, if it has not finished.
    pub(crate) previous: Option<oneshot::Receiver<Settled>>,
    /// Tells the next message of the subject how this one ended.
    pub(crate) done: oneshot::Sender<Settled>,
}

impl Lines {
    pub(crate) fn new(cap: usize, forget_after: Duration) -> Self {
        Self {
            lines: HashMap::new(),
            cap: cap.max(1),
            forget_after,
            generation: 0,
        }
    }

    /// Admits or defers the message at stream position `sequence` of `subject`.
    pub(crate) fn admit(&mut self, subject: &str, sequence: u64, now: Instant) -> Admission {
        self.generation += 1;
        if self.generation.is_multiple_of(1024) {
            self.sweep(now);
        }
        let forget_after = self.forget_after;
        let line = self.lines.entry(subject.to_string()).or_default();
        line.deferred
            .retain(|_, d| now.saturating_duration_since(d.at) < forget_after);
        let in_turn = line
            .deferred
            .keys()
            .next()
            .is_none_or(|&first| sequence <= first);
        if line.admitted < self.cap && in_turn {
            line.deferred.remove(&sequence);
            let (done, rx) = oneshot::channel();
            let previous = line.last.replace((self.generation, rx)).map(|(_, rx)| rx);
            line.admitted += 1;
            return Admission::Admitted(Turn {
                subject: subject.to_string(),
                generation: self.generation,
                previous,
                done,
            });
        }
        let deferral = line
            .deferred
            .entry(sequence)
            .or_insert(Deferral { at: now, times: 0 });
        deferral.at = now;
        deferral.times = deferral.times.saturating_add(1);
        Admission::Deferred {
            times: deferral.times,
        }
    }

    /// An admitted message has settled: its slot in the line is free.
    pub(crate) fn finish(&mut self, turn: &Turn) {
        let Some(line) = self.lines.get_mut(&turn.subject) else {
            return;
        };
        line.admitted = line.admitted.saturating_sub(1);
        if line
            .last
            .as_ref()
            .is_some_and(|(g, _)| *g == turn.generation)
        {
            line.last = None;
        }
        if line.admitted == 0 && line.deferred.is_empty() {
            self.lines.remove(&turn.subject);
        }
    }

    /// Drops forgotten deferrals and lines left with nothing.
    fn sweep(&mut self, now: Instant) {
        let forget_after = self.forget_after;
        self.lines.retain(|_, line| {
            line.deferred
                .retain(|_, d| now.saturating_duration_since(d.at) < forget_after);
            line.admitted > 0 || !line.deferred.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> Turn {
        match a {
            Admission::Admitted(t) => t,
            Admission::Deferred { times } => panic!("deferred ({times})"),
        }
    }

    fn deferred(a: Admission) -> u32 {
        match a {
            Admission::Admitted(_) => panic!("admitted"),
            Admission::Deferred { times } => times,
        }
    }

    #[test]
    fn a_full_line_defers_and_later_messages_wait_for_the_deferred_one() {
        let now = Instant::now();
        let mut lines = Lines::new(2, Duration::from_secs(60));
        let first = admitted(lines.admit("s", 1, now));
        assert!(first.previous.is_none());
        let second = admitted(lines.admit("s", 2, now));
        assert!(second.previous.is_some(), "waits for the first");
        // Full: 3 is deferred, and 4 behind it, even once there is room again.
        assert_eq!(deferred(lines.admit("s", 3, now)), 1);
        // Another subject is not held back.
        let other = admitted(lines.admit("t", 9, now));
        lines.finish(&first);
        assert_eq!(deferred(lines.admit("s", 4, now)), 1);
        // 3 comes back first and goes.
        let third = admitted(lines.admit("s", 3, now));
        assert_eq!(deferred(lines.admit("s", 4, now)), 2, "line full again");
        lines.finish(&second);
        let fourth = admitted(lines.admit("s", 4, now));
        lines.finish(&third);
        lines.finish(&fourth);
        lines.finish(&other);
        assert!(lines.lines.is_empty(), "finished lines are dropped");
    }

    #[test]
    fn a_deferred_message_that_never_returns_is_forgotten() {
        let now = Instant::now();
        let mut lines = Lines::new(1, Duration::from_secs(60));
        let first = admitted(lines.admit("s", 1, now));
        assert_eq!(deferred(lines.admit("s", 2, now)), 1);
        lines.finish(&first);
        assert_eq!(deferred(lines.admit("s", 3, now)), 1, "2 goes first");
        let later = now + Duration::from_secs(61);
        admitted(lines.admit("s", 3, later));
    }
}
