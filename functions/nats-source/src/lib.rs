//! nats-source: the NATS JetStream -> Knative event source.
//!
//! A durable pull consumer feeds messages, at most `MAX_IN_FLIGHT` at a time, to `K_SINK` as
//! binary-mode CloudEvents. The sink's HTTP status decides each message's fate through the
//! shared delivery contract ([`handler_kit::delivery`]): 2xx acks (publishing a 200's reply
//! CloudEvent first), a permanent 4xx dead-letters and terminates, a failed attempt (5xx
//! other than 503, a timeout) naks with exponential backoff and jitter until `MAX_DELIVER`
//! failed attempts, then dead-letters; backpressure (503, 429, refused connections) shuts a
//! gate to the sink for everyone instead of using up retries. `RETRY_TIMEOUT` bounds a
//! message's age; a delivery that panics dead-letters its message. Delivery is at least once:
//! a message is acked only after the sink answered and its reply is stored (PubAck) or, on a
//! subject no stream stores, flushed. A pull asks for no more messages than there are free
//! slots, so every message fetched is being kept alive.
//!
//! # Layout
//! - [`config`]: every environment variable.
//! - [`event`]: NATS message <-> HTTP CloudEvent, and what cannot be carried (poison).
//! - `deliver`: one message from POST to ack / term / nak: the source's delivery table.
//! - `gate`: backpressure: the sink says it cannot take work, the whole source holds off.
//! - `backoff`: how long to wait before trying again (retries, the gate, deferrals), computed
//!   in one place.
//! - `budget`: failed attempts per message, kept in JetStream so restarts do not reset them.
//! - `order`: per-subject lines for `ORDERING=subject`, and how many slots one subject may hold.
//! - [`redrive`]: `nats-source redrive`, dead letters back to the subject they came from.
//! - [`run`]: set up, bind (or create) the consumer, fetch and dispatch (with per-subject
//!   ordering when asked), and drain on shutdown; each a step of its own.

mod backoff;
mod budget;
pub mod config;
mod deliver;
pub mod event;
mod gate;
pub mod lag;
mod order;
pub mod redrive;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt as _;
use handler_kit::serve::Health;
use handler_kit::telemetry;
use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, Ordering};
use deliver::Settled;

/// How long one pull request waits for messages. Short, so a pull lost with a restarting
/// server is noticed soon (the client gives up 5 s after it), and at shutdown the last pull,
/// whose messages are handed back as they come, ends soon.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// How long the fetch loop may wait for a few more free slots before a pull, under load.
const GATHER_SLOTS: Duration = Duration::from_millis(1);

/// What every delivery task shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// Replies and dead letters: stored (PubAck) or flushed, retried across leader elections.
    pub(crate) publisher: handler_kit::nats::Publisher,
    pub(crate) http: reqwest::Client,
    /// `K_SINK`, parsed once (parsing it per message was measurable at 20k messages/s).
    pub(crate) sink: reqwest::Url,
    pub(crate) ack_wait: Duration,
    pub(crate) metrics: Metrics,
    /// Backpressure from the sink, for every delivery at once.
    pub(crate) gate: gate::Gate,
    /// Failed attempts per message.
    pub(crate) ledger: budget::Ledger,
}

/// The source's own instruments (alongside the shared ones at `/metrics`).
pub(crate) struct Metrics {
    /// Messages settled by `outcome`: delivered, retried (a failed attempt), held_off
    /// (backpressure: the gate was shut), dead_lettered, shutdown, deferred, reply_too_large,
    /// panicked.
    pub(crate) settled: Counter<u64>,
    /// Messages being delivered.
    pub(crate) in_flight: UpDownCounter<i64>,
    /// Seconds from the stream storing a message to its ack.
    pub(crate) end_to_end: Histogram<f64>,
    /// Seconds per POST to the sink.
    pub(crate) sink_duration: Histogram<f64>,
}

/// Every `outcome` of `source_messages_total`.
const OUTCOMES: [&str; 8] = [
    "delivered",
    "retried",
    "held_off",
    "deferred",
    "dead_lettered",
    "reply_too_large",
    "panicked",
    "shutdown",
];

impl Metrics {
    fn new() -> Self {
        let meter = telemetry::meter("nats-source");
        let buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let settled = meter
            .u64_counter("source_messages")
            .with_description("Messages settled, by outcome")
            .build();
        // Every outcome from 0: a counter first seen at 1 has no increase in Prometheus, so
        // the first dead letter after a start would never raise the alert.
        for outcome in OUTCOMES {
            settled.add(0, &[opentelemetry::KeyValue::new("outcome", outcome)]);
        }
        Self {
            settled,
            in_flight: meter
                .i64_up_down_counter("source_in_flight")
                .with_description("Messages being delivered")
                .build(),
            end_to_end: meter
                .f64_histogram("source_end_to_end_seconds")
                .with_description("From stored in the stream to acked")
                .with_boundaries(buckets.clone())
                .build(),
            sink_duration: meter
                .f64_histogram("source_sink_duration_seconds")
                .with_description("One POST to the sink")
                .with_boundaries(buckets)
                .build(),
        }
    }
}

/// The error the source stops with (only at start-up: at run time it retries).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The HTTP client could not be built.
    #[error(transparent)]
    Setup(#[from] handler_kit::HandlerError),
}

/// Consumes until `shutdown` is cancelled, then drains in-flight deliveries within the grace
/// period and naks whatever is left. Readiness turns true once the consumer is bound.
pub async fn run(
    config: Config,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let source = Source::set_up(config, health, shutdown).await?;
    source.consume().await;
    source.drain().await;
    Ok(())
}

/// The running source: what the fetch loop and the drain share.
struct Source {
    config: Config,
    health: Arc<Health>,
    shutdown: CancellationToken,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    http: reqwest::Client,
    sink: reqwest::Url,
    /// One per message being delivered: `MAX_IN_FLIGHT`.
    permits: Arc<Semaphore>,
    /// Every delivery task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled when the grace period is over: the deliveries still running hand back.
    abandon: CancellationToken,
    lines: Arc<Mutex<order::Lines>>,
}

/// What the fetch loop does next.
enum Flow {
    /// Pull again, with the slots free by now.
    Pull,
    /// The consumer is gone or moved (a pull failed): bind it again.
    Rebind,
    /// Shutdown: stop fetching.
    Stop,
}

/// The consumer as [`bind`] gives it.
type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

impl Source {
    /// Builds the HTTP client, parses `K_SINK` and connects to NATS (in the background) before
    /// anything is fetched, so a bad sink URL stops start-up rather than every delivery. Starts
    /// the lag gauges, which need only the connection.
    async fn set_up(
        config: Config,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Result<Self, SourceError> {
        let http = handler_kit::http::client(Duration::from_secs(5))?;
        let sink = reqwest::Url::parse(&config.sink)
            .map_err(|e| handler_kit::HandlerError::Internal(format!("K_SINK: {e}")))?;
        let client = connect(&config.nats).await;
        let jetstream = jetstream::new(client.clone());
        let permits = Arc::new(Semaphore::new(config.max_in_flight));
        // A deferred message comes back after at most BACKOFF_MAX, plus however long it waits
        // for a pull while every slot is busy: forget it only well after that.
        let lines = Arc::new(Mutex::new(order::Lines::new(
            config.max_in_flight_per_subject,
            config.backoff_max * 4 + config.ack_wait * 2,
        )));
        tokio::spawn(lag::watch(
            jetstream.clone(),
            config.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        Ok(Self {
            config,
            health,
            shutdown,
            client,
            jetstream,
            http,
            sink,
            permits,
            tracker: TaskTracker::new(),
            abandon: CancellationToken::new(),
            lines,
        })
    }

    /// Binds the consumer and fetches from it until shutdown; binds again whenever a pull
    /// fails (a restarted server, a leader election, a deleted consumer), so the source
    /// outlives every such outage without a restart of its own.
    async fn consume(&self) {
        // Built at the first bind and kept: the gate and the ledger outlive a rebind.
        let mut shared: Option<Arc<Shared>> = None;
        loop {
            let Some((consumer, bound)) = self.bind_until_bound().await else {
                return;
            };
            let s = match &shared {
                Some(s) => s.clone(),
                None => shared.insert(self.share(bound).await).clone(),
            };
            self.health.set_ready(true);
            tracing::info!(stream = %self.config.stream, consumer = %self.config.consumer, "consumer bound, delivering to {}", self.config.sink);
            if let Flow::Stop = self.fetch(&s, &consumer).await {
                return;
            }
        }
    }

    /// Binds the consumer, trying again every second (not ready meanwhile: a consumer that is
    /// not there yet is a deployment still coming up, not a reason to exit). None: shutdown.
    async fn bind_until_bound(&self) -> Option<(PullConsumer, Bound)> {
        while !self.shutdown.is_cancelled() {
            match bind(&self.config, &self.jetstream).await {
                Ok(bound) => return Some(bound),
                Err(e) => {
                    self.health.set_ready(false);
                    tracing::warn!(error = %e, stream = %self.config.stream, consumer = %self.config.consumer, "consumer not bound yet, retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = self.shutdown.cancelled() => return None,
                    }
                }
            }
        }
        None
    }

    /// What every delivery task shares, from the first bound consumer: its ack wait, and its
    /// subjects when `SUBJECTS` names none (a reply must never be published there).
    async fn share(&self, bound: Bound) -> Arc<Shared> {
        let config = &self.config;
        let bucket = budget::bucket_name(&config.stream, &config.consumer);
        let ledger = budget::Ledger::open(
            &self.jetstream,
            &bucket,
            &config.stream,
            config.retry_timeout,
        )
        .await;
        let mut own = config.clone();
        if own.subjects.is_empty() {
            own.subjects = bound.subjects;
        }
        Arc::new(Shared {
            config: own,
            publisher: handler_kit::nats::Publisher::new(self.client.clone()),
            http: self.http.clone(),
            sink: self.sink.clone(),
            ack_wait: bound.ack_wait,
            metrics: Metrics::new(),
            gate: gate::Gate::new(config.backoff_base, config.backoff_max),
            ledger,
        })
    }

    /// The fetch loop: pull after pull from `consumer` until one fails or shutdown.
    async fn fetch(&self, s: &Arc<Shared>, consumer: &PullConsumer) -> Flow {
        loop {
            match self.pull(s, consumer).await {
                Flow::Pull => {}
                flow @ (Flow::Rebind | Flow::Stop) => return flow,
            }
        }
    }

    /// One pull: waits for the sink's gate and for free slots, pulls exactly that many
    /// messages and dispatches each as it arrives.
    async fn pull(&self, s: &Arc<Shared>, consumer: &PullConsumer) -> Flow {
        // The sink's gate first: shut, nothing is pulled; probing, one message at a time.
        let admit = tokio::select! {
            a = s.gate.admit() => a,
            () = self.shutdown.cancelled() => return Flow::Stop,
        };
        // Slots next, then a pull for exactly that many messages: every message that arrives
        // has a delivery task (and its in-progress acks) waiting for it, so nothing sits in a
        // client buffer while its ack wait runs out.
        let mut slots = tokio::select! {
            p = self.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = self.shutdown.cancelled() => return Flow::Stop,
        };
        let probe = admit == gate::Admit::Probe;
        // Lets the next probe go however this pull ends (nothing came, the pull failed, a
        // leader election), unless a delivery task took the probe over.
        let ticket = probe.then(|| gate::ProbeTicket::new(&s.gate));
        if !probe {
            self.gather_slots(&mut slots).await;
        }
        let batch = consumer
            .batch()
            .max_messages(slots.num_permits())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        match batch {
            Ok(batch) => self.dispatch_batch(s, batch, slots, ticket).await,
            Err(e) => {
                tracing::warn!(error = %e, "pull failed, rebinding");
                self.pause(Duration::from_millis(500), Flow::Rebind).await
            }
        }
    }

    /// Adds free slots to `slots`, up to `FETCH_BATCH`. Under load slots free one by one: wait
    /// a moment for a few more rather than pull one message at a time (a pull costs a round
    /// trip and a subscription).
    async fn gather_slots(&self, slots: &mut OwnedSemaphorePermit) {
        let (permits, fetch_batch) = (&self.permits, self.config.fetch_batch);
        let low_water = (fetch_batch / 4).max(1);
        if permits.available_permits() + 1 < low_water {
            let wanted = u32::try_from(low_water - 1).unwrap_or(u32::MAX);
            let gather = permits.clone().acquire_many_owned(wanted);
            if let Ok(Ok(extra)) = tokio::time::timeout(GATHER_SLOTS, gather).await {
                slots.merge(extra);
            }
        }
        let more = permits
            .available_permits()
            .min(fetch_batch.saturating_sub(slots.num_permits()));
        if more > 0
            && let Ok(extra) = permits
                .clone()
                .try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
        {
            slots.merge(extra);
        }
    }

    /// Hands each message of one pull to a delivery task with one of `slots`, until the pull is
    /// fulfilled or expires (pull again), the server ends it with an error (rebind) or shutdown
    /// (whatever the pull still brings is handed back).
    async fn dispatch_batch(
        &self,
        s: &Arc<Shared>,
        mut batch: pull::Batch,
        mut slots: OwnedSemaphorePermit,
        mut ticket: Option<gate::ProbeTicket<'_>>,
    ) -> Flow {
        loop {
            let next = tokio::select! {
                n = batch.next() => n,
                () = self.shutdown.cancelled() => {
                    // The pull may still bring messages: hand each back at once.
                    self.tracker.spawn(hand_back(batch, s.clone()));
                    return Flow::Stop;
                }
            };
            match next {
                Some(Ok(msg)) => match slots.split(1) {
                    Some(permit) => {
                        let probe = ticket.take().is_some_and(gate::ProbeTicket::hand_over);
                        self.dispatch(s, msg, permit, probe);
                    }
                    // More than the pull asked for: never hold a message without a slot.
                    None => {
                        let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                    }
                },
                // Fulfilled or expired: ask again with the slots free by now.
                None => return Flow::Pull,
                Some(Err(e)) => {
                    // A status from the server (consumer deleted, leadership change, ...).
                    tracing::warn!(error = %e, "pull error, rebinding");
                    return self.pause(Duration::from_millis(100), Flow::Rebind).await;
                }
            }
        }
    }

    /// Starts one message's delivery task. A message of an ordered subject first takes its
    /// turn in the subject's line (waiting for the message before it), or is deferred when the
    /// line is full. `probe`: the gate is probing and this message is the probe.
    fn dispatch(
        &self,
        s: &Arc<Shared>,
        msg: jetstream::Message,
        permit: OwnedSemaphorePermit,
        probe: bool,
    ) {
        let sequence = msg.info().map(|i| i.stream_sequence);
        let turn = match sequence {
            Ok(sequence) if s.config.is_ordered(msg.subject.as_str()) => {
                let admission = self.lines.lock().expect("lines lock").admit(
                    msg.subject.as_str(),
                    sequence,
                    std::time::Instant::now(),
                );
                match admission {
                    order::Admission::Admitted(turn) => Some(turn),
                    order::Admission::Deferred { times } => {
                        drop(permit);
                        if probe {
                            s.gate.probe_done();
                        }
                        self.tracker.spawn(defer(s.clone(), msg, times));
                        return;
                    }
                }
            }
            _ => None,
        };
        let (s, lines, cancel) = (s.clone(), self.lines.clone(), self.abandon.clone());
        s.metrics.in_flight.add(1, &[]);
        self.tracker.spawn(async move {
            let Some(mut turn) = turn else {
                guarded(&s, msg, cancel).await;
                finish(&s, probe, permit);
                return;
            };
            // Earlier message of this subject still running: wait, keeping ours alive.
            let previous = match turn.previous.take() {
                Some(previous) => deliver::keep_alive(&msg, s.ack_wait, previous).await,
                None => Ok(Settled::Done),
            };
            let settled = match previous {
                Ok(Settled::Done) => guarded(&s, msg, cancel).await,
                // The one before was handed back (shutdown): going now would overtake it.
                Ok(Settled::HandedBack) | Err(_) => deliver::hand_back(&s, &msg).await,
            };
            lines.lock().expect("lines lock").finish(&turn);
            let _ = turn.done.send(settled);
            finish(&s, probe, permit);
        });
    }

    /// Waits `delay` before going on with `then`, unless shutdown comes first.
    async fn pause(&self, delay: Duration, then: Flow) -> Flow {
        tokio::select! {
            () = tokio::time::sleep(delay) => then,
            () = self.shutdown.cancelled() => Flow::Stop,
        }
    }

    /// Shutdown: readiness off, no new deliveries; the running ones get `SHUTDOWN_GRACE_MS` to
    /// finish (an answer on its way is worth waiting for: handing it back means the sink does
    /// the work again), then are cancelled, which hands their messages back to JetStream at
    /// once rather than after their ack wait. Flushes whatever acks are still buffered.
    async fn drain(self) {
        let tracker = &self.tracker;
        self.health.start_draining();
        tracker.close();
        tracing::info!(
            in_flight = tracker.len(),
            "stopped fetching, draining in-flight deliveries"
        );
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.len(),
                "grace period over, handing the rest back to JetStream"
            );
            self.abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        let _ = self.client.flush().await;
    }
}

/// Delivers `msg`, catching a panic anywhere in the delivery: the message is then settled by
/// the rules (dead-lettered with the panic's message), never left for ack-wait to expire over
/// and over.
async fn guarded(s: &Arc<Shared>, msg: jetstream::Message, cancel: CancellationToken) -> Settled {
    use futures::FutureExt as _;
    match std::panic::AssertUnwindSafe(deliver::deliver(s.clone(), &msg, cancel))
        .catch_unwind()
        .await
    {
        Ok(settled) => settled,
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|p| (*p).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            deliver::after_panic(s, &msg, &text).await
        }
    }
}

/// A delivery task's end: its slot is free, and a probe lets the next one go.
fn finish(s: &Shared, probe: bool, permit: OwnedSemaphorePermit) {
    s.metrics.in_flight.add(-1, &[]);
    if probe {
        s.gate.probe_done();
    }
    drop(permit);
}

/// Hands a message of a full line back to JetStream with a delay that grows with each
/// deferral (no jitter: deferred messages of a subject should come back in order).
async fn defer(s: Arc<Shared>, msg: jetstream::Message, times: u32) {
    let delay = s.config.backoff().exponential(times);
    let _ = msg.ack_with(jetstream::AckKind::Nak(Some(delay))).await;
    s.metrics
        .settled
        .add(1, &[opentelemetry::KeyValue::new("outcome", "deferred")]);
}

/// At shutdown: naks whatever the open pull still brings, until the server ends it (at its
/// expiry at the latest), so no message waits out its ack wait unseen.
async fn hand_back(mut batch: pull::Batch, s: Arc<Shared>) {
    while let Some(next) = batch.next().await {
        if let Ok(msg) = next {
            let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
            s.metrics
                .settled
                .add(1, &[opentelemetry::KeyValue::new("outcome", "shutdown")]);
        }
    }
}

async fn connect(nats: &handler_kit::nats::NatsConfig) -> async_nats::Client {
    // Connects in the background: health answers at once, readiness waits for the consumer.
    // A refused credential shows as `authorization violation` events while it retries.
    loop {
        match nats
            .connect_options("nats-source")
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::warn!(event = %other, "nats connection event"),
                }
            })
            .retry_on_initial_connect()
            .connect(nats.servers())
            .await
        {
            Ok(client) => return client,
            Err(e) => {
                tracing::error!(servers = %nats.shown_url(), error = %e, "cannot connect to NATS");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

type BindError = Box<dyn std::error::Error + Send + Sync>;

/// What the bound consumer says about itself.
struct Bound {
    ack_wait: Duration,
    /// Its filter subjects (the stream's subjects when it has none).
    subjects: Vec<String>,
}

/// Binds the durable consumer, creating the stream, the DLQ stream and the consumer first when
/// `CREATE=true`.
async fn bind(
    config: &Config,
    js: &jetstream::Context,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, Bound), BindError> {
    let stream = if config.create {
        let dlq_subjects = config
            .dlq_subject
            .replace("{stream}", &config.stream)
            .replace("{subject}", ">");
        js.get_or_create_stream(stream::Config {
            name: format!("{}_DLQ", config.stream),
            subjects: vec![dlq_subjects],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        js.get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: config.subjects.clone(),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?
    } else {
        js.get_stream(&config.stream).await?
    };
    let mut consumer: jetstream::consumer::Consumer<pull::Config> = if config.create {
        stream
            .get_or_create_consumer(
                &config.consumer,
                pull::Config {
                    durable_name: Some(config.consumer.clone()),
                    filter_subjects: config.subjects.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    // Redelivery is counted and capped here, so a message is dead-lettered
                    // rather than silently dropped by the server.
                    max_deliver: -1,
                    max_ack_pending: i64::try_from(config.max_in_flight.max(1000))
                        .unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await?
    } else {
        stream.get_consumer(&config.consumer).await?
    };
    let info = consumer.info().await?.config.clone();
    let mut subjects = info.filter_subjects;
    if !info.filter_subject.is_empty() {
        subjects.push(info.filter_subject);
    }
    if subjects.is_empty() {
        subjects = stream.cached_info().config.subjects.clone();
    }
    Ok((
        consumer,
        Bound {
            ack_wait: info.ack_wait,
            subjects,
        },
    ))
}
