//! nats-source's configuration: every environment variable, with its default and why.

use std::time::Duration;

use handler_kit::config::ConfigReader;
use handler_kit::nats::NatsConfig;

use crate::backoff::Backoff;

/// How messages are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// As many at once as `MAX_IN_FLIGHT` allows; a failed message is redelivered later.
    None,
    /// Messages of one subject one at a time, in stream order (retries happen in place, so a
    /// later message never overtakes an earlier one); different subjects run concurrently.
    Subject,
}

/// nats-source's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `PORT` (default 8080): health and metrics.
    pub port: u16,
    /// `NATS_URL` (required): the NATS server, or a comma-separated list of a cluster's
    /// servers (`nats://a:4222,nats://b:4222`); the client moves to another when one is down.
    /// With it, the credential and TLS files (`NATS_CREDS_FILE`, `NATS_NKEY_FILE`,
    /// `NATS_TOKEN_FILE`, `NATS_USER_FILE` + `NATS_PASSWORD_FILE`, `NATS_TLS_*_FILE`), read
    /// again at every reconnect: see [`handler_kit::nats::NatsConfig`].
    pub nats: NatsConfig,
    /// `K_SINK` (required; a SinkBinding sets it): where events are POSTed.
    pub sink: String,
    /// `STREAM` (required): the JetStream stream to consume.
    pub stream: String,
    /// `CONSUMER` (required): the durable pull consumer's name.
    pub consumer: String,
    /// `SUBJECTS` (comma-separated): the consumer's filter subjects, and the stream's subjects
    /// when it is created; required with `CREATE=true`.
    pub subjects: Vec<String>,
    /// `CREATE` (default `false`): create the stream, consumer and DLQ stream when missing.
    /// Off by default: in a cluster they are declared (NACK) so KEDA sees the consumer's lag
    /// before anything scales.
    pub create: bool,
    /// `MAX_IN_FLIGHT` (default 64): messages being delivered at once.
    pub max_in_flight: usize,
    /// `FETCH_BATCH` (default `MAX_IN_FLIGHT`, at most 256): messages per pull request.
    pub fetch_batch: usize,
    /// `MAX_DELIVER` (default 5): failed attempts before a message is dead-lettered. Only an
    /// attempt the sink took and failed counts (500, 502, 504, 404, 408, 409, no answer
    /// within `SINK_TIMEOUT_MS`); backpressure (503, 429, refused connections), shutdown
    /// hand-backs and redeliveries after a crash do not. The count is kept in a JetStream
    /// key-value bucket, so it survives restarts and moves with the message between replicas.
    pub max_deliver: i64,
    /// `RETRY_TIMEOUT` (default `24h`; units ms, s, m, h, d): the absolute bound. A message
    /// older than this (since the stream stored it) that would be tried again is
    /// dead-lettered instead, whatever stopped it, backpressure included. A day rides out a
    /// long outage; the dead letters can be redriven.
    pub retry_timeout: Duration,
    /// `ACK_WAIT_MS` (default 30000): ack wait of a created consumer; a bound consumer's own is
    /// used. In-progress acks go out every third of it while the sink works.
    pub ack_wait: Duration,
    /// `SINK_TIMEOUT_MS` (default 300000, Knative's request timeout): one POST's deadline.
    pub sink_timeout: Duration,
    /// `BACKOFF_BASE_MS` (default 1000): first retry delay; doubles per failed attempt. Also
    /// how long the sink's gate first stays shut on backpressure without `Retry-After`
    /// (doubling while it stays unavailable).
    pub backoff_base: Duration,
    /// `BACKOFF_MAX_MS` (default 60000): longest retry delay and longest the gate stays
    /// shut (also caps `Retry-After`).
    pub backoff_max: Duration,
    /// `DLQ_SUBJECT` (default `dlq.{stream}.{subject}`): where dead letters go.
    pub dlq_subject: String,
    /// `LAG_INTERVAL_MS` (default 5000): how often the consumer's lag gauges are refreshed,
    /// at one JetStream API request (two while there is a backlog) each.
    pub lag_interval: Duration,
    /// `REPLY_SUBJECT` (default unset): where a 200's CloudEvent is published when the message
    /// names no `reply-subject`; `{subject}` and `{stream}` are filled in.
    pub reply_subject: Option<String>,
    /// `REPLY_SUBJECTS` (default unset: any subject but `$...`): comma-separated subject
    /// patterns (NATS wildcards) a reply subject named by a message (`reply-subject` header,
    /// `replysubject` extension) must match; a message naming another is dead-lettered. The
    /// source's own request subjects are refused whatever this says.
    pub reply_subjects: Vec<String>,
    /// `REPLY_TIMEOUT_MS` (default 15000, above nats-server's 4-9 s election timeout): how
    /// long publishing a reply or a dead letter may take, retries included (JetStream's PubAck when a stream stores the subject, else the
    /// flush). Within it, a stream lookup or publish that fails during a leader election is
    /// tried again with the same `Nats-Msg-Id`; past it the message is handed back (the reply
    /// path is down: not the message's fault, so not a failed attempt) rather than acked.
    pub reply_timeout: Duration,
    /// `TYPE_MAP` (default: the subject is the type): `pattern=type` pairs separated by `;`,
    /// patterns with NATS wildcards, first match wins, e.g. `ai.stt.stream.*=ai.stt.chunk`.
    pub type_map: Vec<(String, String)>,
    /// `CE_SOURCE` (default `/nats/{STREAM}`): the `source` of the events.
    pub source: String,
    /// `DEFAULT_CONTENT_TYPE` (default `application/msgpack`): `datacontenttype` of messages
    /// without a `Content-Type` header.
    pub default_content_type: String,
    /// `ORDERING` (default `none`): `none` or `subject`.
    pub ordering: Ordering,
    /// `ORDERED_SUBJECTS` (default: every subject): with `ORDERING=subject`, only subjects
    /// matching this pattern are ordered, e.g. `ai.stt.stream.>` so session chunks are
    /// ordered while one-shot requests on the same stream still run side by side.
    pub ordered_subjects: Option<String>,
    /// `MAX_IN_FLIGHT_PER_SUBJECT` (default half of `MAX_IN_FLIGHT`, at least 1): with
    /// `ORDERING=subject`, slots one subject's messages may hold (running plus waiting their
    /// turn), so one stuck subject cannot starve the others; its messages beyond that are
    /// handed back with a delay and come back in order.
    pub max_in_flight_per_subject: usize,
    /// `K_CE_OVERRIDES` (Knative's; default none): `{"extensions": {...}}` set on every event.
    pub overrides: Vec<(String, String)>,
    /// `SHUTDOWN_GRACE_MS` (default 20000): how long in-flight deliveries may finish after
    /// SIGTERM; the rest are nak'ed for prompt redelivery.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Reads every variable; problems are collected by `r`.
    pub fn read(r: &mut ConfigReader) -> Self {
        let stream = r.required("STREAM", "the JetStream stream to consume");
        let subjects = list(r.optional("SUBJECTS"));
        let create = r.parse("CREATE", false);
        if create && subjects.is_empty() {
            r.problem("SUBJECTS is required when CREATE=true");
        }
        let max_in_flight = r.positive("MAX_IN_FLIGHT", 64);
        let ordering = match r.choice("ORDERING", "none", &["none", "subject"]).as_str() {
            "subject" => Ordering::Subject,
            _ => Ordering::None,
        };
        let type_map = parse_type_map(r);
        let overrides = parse_overrides(r);
        let max_deliver: i64 = r.parse("MAX_DELIVER", 5);
        if max_deliver < 1 {
            r.problem("MAX_DELIVER must be at least 1");
        }
        Self {
            port: r.parse("PORT", 8080),
            nats: nats(r),
            sink: r.http_url("K_SINK", "where events are delivered"),
            consumer: r.required("CONSUMER", "the durable consumer's name"),
            subjects,
            create,
            max_in_flight,
            fetch_batch: r.positive("FETCH_BATCH", max_in_flight.min(256)),
            max_deliver,
            retry_timeout: r.duration("RETRY_TIMEOUT", Duration::from_secs(24 * 3600)),
            ack_wait: r.millis("ACK_WAIT_MS", 30_000),
            sink_timeout: r.millis("SINK_TIMEOUT_MS", 300_000),
            backoff_base: r.millis("BACKOFF_BASE_MS", 1000),
            backoff_max: r.millis("BACKOFF_MAX_MS", 60_000),
            dlq_subject: r.string("DLQ_SUBJECT", "dlq.{stream}.{subject}"),
            lag_interval: Duration::from_millis(r.positive("LAG_INTERVAL_MS", 5000) as u64),
            reply_subject: r.optional("REPLY_SUBJECT"),
            reply_subjects: list(r.optional("REPLY_SUBJECTS")),
            reply_timeout: r.millis("REPLY_TIMEOUT_MS", 15_000),
            type_map,
            source: r.string("CE_SOURCE", &format!("/nats/{stream}")),
            default_content_type: r.string("DEFAULT_CONTENT_TYPE", "application/msgpack"),
            ordering,
            ordered_subjects: r.optional("ORDERED_SUBJECTS"),
            max_in_flight_per_subject: r
                .positive("MAX_IN_FLIGHT_PER_SUBJECT", (max_in_flight / 2).max(1)),
            overrides,
            shutdown_grace: r.millis("SHUTDOWN_GRACE_MS", 20_000),
            stream,
        }
    }

    /// Whether messages of `subject` are delivered one at a time in stream order.
    pub fn is_ordered(&self, subject: &str) -> bool {
        self.ordering == Ordering::Subject
            && self
                .ordered_subjects
                .as_deref()
                .is_none_or(|pattern| subject_matches(pattern, subject))
    }

    /// `BACKOFF_BASE_MS` doubling up to `BACKOFF_MAX_MS`: retries, the sink's gate, deferrals.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_base, self.backoff_max)
    }

    /// The CloudEvent type for a subject.
    pub fn type_for(&self, subject: &str) -> String {
        self.type_map
            .iter()
            .find(|(pattern, _)| subject_matches(pattern, subject))
            .map_or_else(|| subject.to_string(), |(_, ty)| ty.clone())
    }
}

/// A comma-separated list, trimmed, empty entries dropped.
fn list(raw: Option<String>) -> Vec<String> {
    raw.map(|s| {
        s.split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

fn nats(r: &mut ConfigReader) -> NatsConfig {
    NatsConfig::read(r).unwrap_or_else(|| {
        r.problem("NATS_URL is required (the NATS server)");
        // Never used: the problem stops start-up.
        NatsConfig::from_url("nats://127.0.0.1").expect("a valid URL")
    })
}

fn parse_type_map(r: &mut ConfigReader) -> Vec<(String, String)> {
    let Some(raw) = r.optional("TYPE_MAP") else {
        return Vec::new();
    };
    let mut map = Vec::new();
    for pair in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((pattern, ty)) if !pattern.trim().is_empty() && !ty.trim().is_empty() => {
                map.push((pattern.trim().to_string(), ty.trim().to_string()));
            }
            _ => r.problem(format!("TYPE_MAP entry {pair:?} is not pattern=type")),
        }
    }
    map
}

fn parse_overrides(r: &mut ConfigReader) -> Vec<(String, String)> {
    let Some(raw) = r.optional("K_CE_OVERRIDES") else {
        return Vec::new();
    };
    #[derive(serde::Deserialize)]
    struct Overrides {
        #[serde(default)]
        extensions: std::collections::BTreeMap<String, serde_json::Value>,
    }
    match serde_json::from_str::<Overrides>(&raw) {
        Ok(o) => o
            .extensions
            .into_iter()
            .map(|(k, v)| {
                let value = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k.to_ascii_lowercase(), value)
            })
            .collect(),
        Err(e) => {
            r.problem(format!("K_CE_OVERRIDES is not valid JSON: {e}"));
            Vec::new()
        }
    }
}

/// NATS subject matching: `*` is one token, `>` one or more trailing tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(token)) if literal == token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("ai.tts.request", "ai.tts.request"));
        assert!(subject_matches("ai.*.request", "ai.tts.request"));
        assert!(subject_matches("ai.>", "ai.tts.request"));
        assert!(!subject_matches("ai.>", "ai"));
        assert!(!subject_matches("ai.*", "ai.tts.request"));
        assert!(!subject_matches("ai.tts", "ai.tts.request"));
    }

    #[test]
    fn ordering_can_be_limited_to_a_subject_pattern() {
        let base = [
            ("NATS_URL", "n"),
            ("K_SINK", "http://s"),
            ("STREAM", "S"),
            ("CONSUMER", "c"),
        ];
        let mut env: Vec<(&str, &str)> = base.to_vec();
        env.extend([
            ("ORDERING", "subject"),
            ("ORDERED_SUBJECTS", "ai.stt.stream.>"),
        ]);
        let c = handler_kit::config::load(&env, Config::read).expect("valid");
        assert!(c.is_ordered("ai.stt.stream.s1"));
        assert!(!c.is_ordered("ai.stt.request"));
        let unordered = handler_kit::config::load(&base.to_vec(), Config::read).expect("valid");
        assert!(!unordered.is_ordered("ai.stt.stream.s1"));
    }

    #[test]
    fn a_bad_server_list_is_a_problem_that_hides_credentials() {
        let env = [
            ("NATS_URL", "nats://a:4222,nats://user:s3cret@b:notaport"),
            ("K_SINK", "http://s"),
            ("STREAM", "S"),
            ("CONSUMER", "c"),
        ];
        let err = handler_kit::config::load(&env, Config::read).expect_err("invalid");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].starts_with("NATS_URL"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let env = [
            ("NATS_URL", "nats://a:4222, nats://b:4223"),
            ("K_SINK", "http://s"),
            ("STREAM", "S"),
            ("CONSUMER", "c"),
        ];
        let c = handler_kit::config::load(&env, Config::read).expect("valid");
        assert_eq!(c.nats.servers().len(), 2);
    }

    #[test]
    fn types_overrides_and_problems() {
        let env = [
            ("NATS_URL", "nats://x:4222"),
            ("K_SINK", "http://sink"),
            ("STREAM", "AI"),
            ("CONSUMER", "tts"),
            ("TYPE_MAP", "ai.stt.stream.*=ai.stt.chunk; ai.>=ai.other"),
            (
                "K_CE_OVERRIDES",
                r#"{"extensions":{"Cluster":"east","n":3}}"#,
            ),
        ];
        let c = handler_kit::config::load(&env, Config::read).expect("valid");
        assert_eq!(c.type_for("ai.stt.stream.s1"), "ai.stt.chunk");
        assert_eq!(c.type_for("ai.tts.request"), "ai.other");
        assert_eq!(c.type_for("other"), "other");
        assert_eq!(
            c.overrides,
            [("cluster".into(), "east".into()), ("n".into(), "3".into())]
        );
        assert_eq!(c.source, "/nats/AI");

        let bad = [
            ("CREATE", "true"),
            ("TYPE_MAP", "nope"),
            ("MAX_DELIVER", "0"),
        ];
        let err = handler_kit::config::load(&bad, Config::read).expect_err("invalid");
        // STREAM, NATS_URL, K_SINK, CONSUMER missing; SUBJECTS, TYPE_MAP, MAX_DELIVER wrong.
        assert_eq!(err.0.len(), 7, "{err}");
    }
}
