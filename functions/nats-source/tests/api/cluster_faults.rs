//! The source and tts-module as real processes on a real three-node JetStream cluster with
//! R3 streams, through crashes of each process, a SIGTERM of the source, the loss of the
//! request stream's leader node, and a TTS backend that is overloaded in bursts. Every good
//! request must get exactly one stored reply and never reach the DLQ; every poison message must
//! be dead-lettered exactly once; nothing may be left pending.
//!
//! The run prints its figures (messages, wall time, deliveries, dead letters, the backend's
//! 503s, breaker openings, the faults and when they struck) before it asserts, so a failing
//! run reports them too: `cargo nextest run -p nats-source cluster_faults --no-capture`.

mod backend;
pub mod processes;
mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use testkit::nats_server::NatsCluster;

use backend::FlakyTts;
use processes::{Service, config_map};
use traffic::{CONSUMER, DLQ_STREAM, Poison, REPLY_STREAM, STREAM};

/// Good requests: 5,000 keep a run near a minute on two cores (debug build) while every
/// fault meets hundreds of messages in flight.
const GOOD: usize = 5_000;

/// How long a fault waits for its share of the replies before it strikes anyway, so a
/// stalled run still ends, with its figures.
const PATIENCE: Duration = Duration::from_secs(60);

/// How long everything may take to settle after the last fault. Messages in flight at a
/// crash come back after the consumer's ack wait (30 s), so well above that.
const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_pipeline_survives_crashes_a_leader_loss_and_an_overloaded_backend() {
    let mut pipeline = Pipeline::start().await;
    let poison = traffic::poison();
    let started = Instant::now();
    traffic::publish(&pipeline.js, GOOD, &poison).await;
    let published = started.elapsed();

    let faults = pipeline.strike(started).await;
    let settled = pipeline.settles(poison.len()).await;
    let wall = started.elapsed();

    let figures = Figures::collect(&pipeline, &poison).await;
    figures.print(published, wall, &faults);
    assert!(settled, "not settled within {SETTLE:?} of the last fault");
    figures.assert_contract();
}

/// The cluster, the backend and the two processes, wired as in a deployment.
struct Pipeline {
    cluster: NatsCluster,
    js: jetstream::Context,
    backend: FlakyTts,
    tts: Service,
    source: Service,
    _logs: LogDir,
}

impl Pipeline {
    /// Declares the R3 streams and the consumer, then starts tts-module and nats-source with
    /// their manifests' settings; only the addresses and the breaker differ. Both get every
    /// node in `NATS_URL`, as for a cluster.
    async fn start() -> Self {
        let tts_binary = tokio::task::spawn_blocking(processes::tts_module_binary)
            .await
            .expect("tts-module binary");
        let logs = LogDir::new();
        let cluster = NatsCluster::start(3).await.expect("cluster");
        let js = jetstream::new(cluster.client().await.expect("client"));
        traffic::declare(&js).await;
        let backend = FlakyTts::start().await;
        let tts = Service::start(
            "tts-module",
            &tts_binary,
            environment(
                "knative/tts-module/config.yaml",
                &[
                    ("NATS_URL", cluster.urls()),
                    ("TTS_URL", backend.url.clone()),
                    // Open after 3 consecutive failures, probe again after 500 ms: the
                    // breaker opens in every burst and closes after it.
                    ("TTS_BREAKER_FAILURES", "3".into()),
                    ("TTS_BREAKER_OPEN_MS", "500".into()),
                ],
            ),
            &logs.0,
        )
        .await;
        let source = Service::start(
            "nats-source",
            Path::new(env!("CARGO_BIN_EXE_nats-source")),
            environment(
                "knative/tts-module/source/config.yaml",
                &[
                    ("NATS_URL", cluster.urls()),
                    ("K_SINK", tts.url()),
                    // One source process stands in for four replicas (4 x the manifest's 16
                    // in flight), so the 5,000 messages settle in about a minute, not four.
                    ("MAX_IN_FLIGHT", "64".into()),
                ],
            ),
            &logs.0,
        )
        .await;
        Self {
            cluster,
            js,
            backend,
            tts,
            source,
            _logs: logs,
        }
    }

    /// The faults, one after another, each once its share of the replies is stored so it
    /// meets work in flight. Returns what happened, for the figures.
    async fn strike(&mut self, started: Instant) -> Vec<String> {
        let share = |percent: u64| GOOD as u64 * percent / 100;
        let mut faults = Vec::new();
        let mut note = |at: u64, what: String| {
            let what = format!("at {at} replies: {what}");
            eprintln!("{:>6.1} s  {what}", started.elapsed().as_secs_f64());
            faults.push(what);
        };

        let at = self.replies_reach(share(10)).await;
        self.tts.crash().await;
        note(at, "kill -9 tts-module, restarted".into());

        let at = self.replies_reach(share(25)).await;
        self.source.crash().await;
        note(at, "kill -9 nats-source, restarted".into());

        let at = self.replies_reach(share(40)).await;
        let exit = self.source.terminate(Duration::from_secs(30)).await;
        self.source.restart().await;
        note(at, format!("SIGTERM nats-source ({exit}), restarted"));

        // Last, so the election (several seconds) has plenty of work left to meet.
        let at = self.replies_reach(share(55)).await;
        let what = self.kill_stream_leader().await;
        note(at, what);
        faults
    }

    /// Kills the node leading the request stream and, moved there first, its consumer (the
    /// source's pulls and acks go to the consumer's leader), just after a backend burst began:
    /// the source's gate to the sink is shut then, so its first pull after the gate's wait, the
    /// probe, meets the election. Waits for the new leaders, restarts the node and waits until
    /// it is current. Says which node it was and what it led.
    async fn kill_stream_leader(&mut self) -> String {
        let cluster = &mut self.cluster;
        let leader = cluster.stream_leader(STREAM).await.expect("a leader");
        cluster
            .move_consumer_leader(STREAM, CONSUMER, leader)
            .await
            .expect("consumer led by the stream's leader");
        let mut led = vec![STREAM.to_string(), format!("consumer {CONSUMER}")];
        for other in [REPLY_STREAM, DLQ_STREAM] {
            if cluster.stream_leader(other).await == Some(leader) {
                led.push(other.to_string());
            }
        }
        let burst = self.backend.next_burst() + Duration::from_millis(100);
        tokio::time::sleep_until(burst.into()).await;
        let killed = Instant::now();
        cluster.kill(leader);
        let stream = cluster.next_stream_leader(STREAM, leader).await;
        let stream = stream.expect("AI_TTS elected a leader");
        let consumer = cluster.next_consumer_leader(STREAM, CONSUMER, leader).await;
        consumer.expect("the consumer elected a leader");
        let election = killed.elapsed();
        cluster.restart(leader).await.expect("old leader rejoined");
        format!(
            "kill -9 {} (leader of {}); new leaders {:.1} s later ({} for {STREAM}); restarted",
            cluster.server_name(leader),
            led.join(", "),
            election.as_secs_f64(),
            cluster.server_name(stream),
        )
    }

    /// Waits until `wanted` replies are stored, at most [`PATIENCE`]; returns how many are.
    async fn replies_reach(&self, wanted: u64) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let stored = traffic::stored_messages(&self.js, REPLY_STREAM)
                .await
                .unwrap_or(0);
            if stored >= wanted || Instant::now() > deadline {
                return stored;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the consumer has nothing pending or unacknowledged and the DLQ holds at
    /// least one dead letter per poison message, at most [`SETTLE`].
    async fn settles(&self, poison: usize) -> bool {
        let deadline = Instant::now() + SETTLE;
        loop {
            let drained = matches!(consumer_state(&self.js).await, Some((0, 0, _)));
            let dead = traffic::stored_messages(&self.js, DLQ_STREAM)
                .await
                .unwrap_or(0);
            if drained && dead >= poison as u64 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// What the run left behind, counted.
struct Figures {
    /// Good requests with at least one stored reply, and their replies in all.
    answered: usize,
    good_replies: u64,
    reply_subjects: usize,
    dead_letters: usize,
    /// Good messages in the DLQ, by the first words of their reason.
    good_dead: BTreeMap<String, usize>,
    /// Per poison message, its dead letters ("deliveries N: reason").
    poison_dead: BTreeMap<&'static str, Vec<String>>,
    pending: u64,
    ack_pending: usize,
    deliveries: u64,
    backend_calls: u64,
    backend_refused: u64,
    breaker_opened: usize,
}

impl Figures {
    async fn collect(p: &Pipeline, poison: &[Poison]) -> Self {
        let replies = traffic::replies(&p.js).await;
        let good_ids: Vec<String> = (0..GOOD).map(|i| traffic::good(i).0).collect();
        let mut by_payload: HashMap<Vec<u8>, Option<&'static str>> =
            (0..GOOD).map(|i| (traffic::good(i).1, None)).collect();
        for m in poison {
            by_payload.insert(m.payload.clone(), Some(m.name));
        }
        let dead = traffic::dead_letters(&p.js).await;
        let mut good_dead = BTreeMap::new();
        let mut poison_dead: BTreeMap<&'static str, Vec<String>> =
            poison.iter().map(|m| (m.name, Vec::new())).collect();
        for (payload, reason, deliveries) in &dead {
            match by_payload.get(payload) {
                Some(Some(name)) => poison_dead
                    .entry(name)
                    .or_default()
                    .push(format!("deliveries {deliveries}: {reason}")),
                // Reasons carry ids and counts; their first words say what kind it was.
                _ => {
                    *good_dead
                        .entry(reason.chars().take(60).collect())
                        .or_default() += 1
                }
            }
        }
        let (pending, ack_pending, deliveries) = consumer_state(&p.js).await.unwrap_or_default();
        let (backend_calls, backend_refused) = p.backend.counts();
        Self {
            answered: good_ids
                .iter()
                .filter(|id| replies.contains_key(*id))
                .count(),
            good_replies: good_ids.iter().filter_map(|id| replies.get(id)).sum(),
            reply_subjects: replies.len(),
            dead_letters: dead.len(),
            good_dead,
            poison_dead,
            pending,
            ack_pending,
            deliveries,
            backend_calls,
            backend_refused,
            breaker_opened: p.tts.log_lines_with("circuit breaker opened"),
        }
    }

    fn print(&self, published: Duration, wall: Duration, faults: &[String]) {
        let poison = self.poison_dead.len();
        let share = self.backend_refused as f64 * 100.0 / self.backend_calls.max(1) as f64;
        eprintln!("--- cluster_faults figures ---");
        eprintln!(
            "messages: {GOOD} good + {poison} poison, published in {:.1} s; wall time from the first publish to settled: {:.1} s",
            published.as_secs_f64(),
            wall.as_secs_f64()
        );
        eprintln!(
            "deliveries by the consumer: {} ({} more than messages)",
            self.deliveries,
            self.deliveries.saturating_sub((GOOD + poison) as u64)
        );
        eprintln!(
            "backend: {} calls, {} answered 503 ({share:.1}%); tts-module's breaker opened {} times",
            self.backend_calls, self.backend_refused, self.breaker_opened
        );
        eprintln!(
            "replies: {} of {GOOD} requests answered, {} replies stored ({} reply subjects)",
            self.answered, self.good_replies, self.reply_subjects
        );
        let good_dead: usize = self.good_dead.values().sum();
        eprintln!(
            "DLQ: {} dead letters, {good_dead} of them good messages",
            self.dead_letters
        );
        for (kind, n) in &self.good_dead {
            eprintln!("  good, {n}x: {kind}");
        }
        for (name, entries) in &self.poison_dead {
            eprintln!("  poison {name:?}: {}x {entries:?}", entries.len());
        }
        eprintln!(
            "consumer: {} pending, {} ack pending",
            self.pending, self.ack_pending
        );
        for f in faults {
            eprintln!("fault: {f}");
        }
    }

    fn assert_contract(&self) {
        assert!(
            self.good_dead.is_empty(),
            "good messages dead-lettered: {:?}",
            self.good_dead
        );
        assert_eq!(self.answered, GOOD, "requests without a stored reply");
        assert_eq!(self.good_replies, GOOD as u64, "replies stored twice");
        for (name, entries) in &self.poison_dead {
            assert_eq!(entries.len(), 1, "poison {name:?} in the DLQ: {entries:?}");
        }
        assert_eq!(
            (self.pending, self.ack_pending),
            (0, 0),
            "consumer not drained"
        );
        assert!(
            self.backend_refused * 5 >= self.backend_calls,
            "the backend refused only {} of {} calls",
            self.backend_refused,
            self.backend_calls
        );
        assert!(self.breaker_opened > 0, "tts-module's breaker never opened");
    }
}

/// The consumer's (pending, ack pending, deliveries so far), once it answers.
async fn consumer_state(js: &jetstream::Context) -> Option<(u64, usize, u64)> {
    let stream = js.get_stream(STREAM).await.ok()?;
    let info = stream.consumer_info(CONSUMER).await.ok()?;
    Some((
        info.num_pending,
        info.num_ack_pending,
        info.delivered.consumer_sequence,
    ))
}

/// The environment of a manifest's ConfigMap with some entries replaced.
fn environment(manifest: &str, replace: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = config_map(manifest)
        .into_iter()
        .filter(|(k, _)| replace.iter().all(|(r, _)| r != k))
        .collect();
    env.extend(replace.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// Where the processes' logs go: kept (and named) when the test fails, removed otherwise.
struct LogDir(PathBuf);

impl LogDir {
    fn new() -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-faults-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("log dir");
        Self(dir)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("process logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
